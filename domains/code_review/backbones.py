"""Code-review backbones: any transformers causal LM, plus names that are handy here.

A backbone name is, in order: a tiny random-init preset (`tiny`), a packaged GGUF
alias, a local folder or `.gguf` file, the Hugging Face cache, a download
(`peftlab.shared.causal_lm.load_causal_lm` documents the rules and the offline errors).
"""

from __future__ import annotations

from peftlab.shared.causal_lm import PACKAGED_GGUF, TINY_PRESETS, CausalLM, load_causal_lm

# Hub ids known to work (LLaMA-style attention, so every method applies). LLaMA-Reviewer
# fine-tuned LLaMA 6.7B; the small ones run on a laptop.
KNOWN_BACKBONES = (
    "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M",
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    "Qwen/Qwen2.5-Coder-0.5B",
    "codellama/CodeLlama-7b-hf",
    "meta-llama/Llama-2-7b-hf",
)


def backbone_names() -> list[str]:
    return [*TINY_PRESETS, *PACKAGED_GGUF, *KNOWN_BACKBONES]


def load_backbone(name: str) -> CausalLM:
    return load_causal_lm(name)
