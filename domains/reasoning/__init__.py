"""Reasoning domain: the ReFT paper's commonsense and arithmetic tasks (Wu et al. 2024).

Importing it registers `reasoning-commonsense` and `reasoning-arithmetic`. LoReFT and
DiReFT live in the core method registry (`peftlab.shared.methods.reft`): they apply to
any transformers causal LM, so other domains can use them too.
"""

from . import tasks  # noqa: F401  (registers the two tasks)
