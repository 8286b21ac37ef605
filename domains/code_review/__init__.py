"""Code review domain: LLaMA-Reviewer's tasks (Lu et al. 2023) on LLaMA-family causal LMs.

Importing it registers `code-review-necessity`, `code-review-comment` and `code-refine`;
the causal-LM methods it uses (`llama_adapter`, `prefix_tuning`, `prompt_tuning`) come
with `peftlab.shared.causal_lm`, which the tasks import.
"""

from . import tasks  # noqa: F401  (registers the three tasks)
