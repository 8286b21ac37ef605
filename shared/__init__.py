"""The PEFT core: methods, training loop, metrics, data cards, run directories.

Knows no domain; domains plug in through the task and method registries.
"""
