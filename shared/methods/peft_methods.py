"""Methods peft already implements, as thin wrappers.

Their adapters are ordinary peft adapters (`adapter_config.json` +
`adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads. We resolve
`target_modules` + `layers` to explicit module names ourselves, so every method in
peftlab selects modules the same way and errors name what exists.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field

import torch
from peftlab.shared.errors import UserError
from peftlab.shared.lazy import lazy_import
from peftlab.shared.methods.registry import Applied, register_method
from peftlab.shared.methods.targeting import find_blocks, select_modules
from torch import nn

peft = lazy_import("peft")

_TUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)

TARGETS_HELP = (
    "module-name suffixes (list) or a full-name regex (string); "
    "default: the task's choice for its backbone, else every Linear inside the blocks"
)
LAYERS_HELP = "blocks to adapt: 'all', 'last_N', 'first_N' or a list of indices"
BLOCKS_HELP = "path of the block list (default: the model's longest nn.ModuleList)"


def target_names(model: nn.Module, targets, layers, blocks, method: str, types=_TUNABLE) -> str:
    """The chosen modules as one anchored regex: peft matches a list by suffix, which
    would also catch e.g. `blocks.0.attn.norm` for a top-level `norm`."""
    if targets is None:
        path, _ = find_blocks(model, blocks)
        targets = rf"{path}\.\d+\..*" if path else r"\d+\..*"
        types = (nn.Linear,)
    chosen = select_modules(model, targets, types=types, layers=layers, blocks_path=blocks, method=method)
    return "(" + "|".join(re.escape(name) for name, _ in chosen) + ")"


class UniformMaskDropout(nn.Dropout):
    """nn.Dropout with its keep-mask drawn from 16-bit uniform integers: a Bernoulli
    mask whose drop rate is p rounded to a multiple of 1/65536 (0.1 -> 0.100006), scaled
    by that rate so the output stays unbiased. On CPUs torch draws nn.Dropout's mask with
    bernoulli_, a 32-bit draw per element; four 16-bit draws out of each 64-bit one make
    forward + backward 2.3x faster (8 x 322 x 320 fp32: 6.0 ms -> 2.6 ms; a float
    `rand_like(x) >= p` mask takes 3.7 ms). LoRA draws one such mask per adapted module
    and step, 5-7 % of an ESM-2 8M training step with bernoulli_. The mask is kept for
    backward as bools (see `_ScaledMask`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        dropped_levels = min(round(self.p * 2**16), 2**16 - 1)  # of the 2**16 values an int16 takes
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)
        levels = words.view(torch.int16)[: x.numel()].view(x.shape)
        keep = levels >= dropped_levels - 2**15
        return _ScaledMask.apply(x, keep, 2**16 / (2**16 - dropped_levels))


class _ScaledMask(torch.autograd.Function):
    """x * keep * scale, keeping the bool mask for backward (1 byte an element, where
    `x * keep.to(x.dtype)` would keep the mask in x's dtype: 4 bytes in fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


PEFT_NOTICES = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # read on every model peft wraps
    (UserWarning, r"Could not find a config file in "),  # a GGUF backbone's folder (a pip package) has no config.json
    # merging LN tuning: peft's merge walks every module and names the LayerNorm it tuned
    # "unsupported", then merges it correctly (merged predictions equal unmerged ones)
    (UserWarning, r"Unsupported layer type '<class 'torch\.nn\.modules\.normalization\.LayerNorm'>'"),
)
"""peft's notices that say nothing a peftlab user could act on: neither changes what runs."""


@contextlib.contextmanager
def quiet_peft():
    """Silence `PEFT_NOTICES` around a call into peft (and only there), from the CLI or Python."""
    with warnings.catch_warnings():
        for category, message in PEFT_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def wrap_quietly(model: nn.Module, config: peft.PeftConfig) -> peft.PeftModel:
    with quiet_peft():
        return peft.get_peft_model(model, config)


def _wrap(model: nn.Module, config: peft.PeftConfig) -> Applied:
    peft_model = wrap_quietly(model, config)
    for name, module in peft_model.named_modules():
        if ".lora_dropout." in f".{name}." and type(module) is nn.Dropout:
            module.__class__ = UniformMaskDropout
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    return Applied(peft_model, names)


def _merge(model, options, state):
    with quiet_peft():
        return model.merge_and_unload()


@dataclass
class LoraOptions:
    r: int = field(default=8, metadata={"help": "rank of the low-rank update"})
    alpha: float = field(default=16, metadata={"help": "scaling numerator: the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": TARGETS_HELP})
    layers: str | list[int] | int | None = field(default=None, metadata={"help": LAYERS_HELP})
    blocks: str | None = field(default=None, metadata={"help": BLOCKS_HELP})

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _lora_config(model, options: LoraOptions, method: str, use_dora: bool) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=target_names(model, options.target_modules, options.layers, options.blocks, method),
        use_dora=use_dora,
    )


register_method(
    "lora",
    LoraOptions,
    lambda model, o: _wrap(model, _lora_config(model, o, "lora", use_dora=False)),
    description="LoRA (Hu et al. 2021): W + (alpha/r)·B·A with B zero-initialised (peft)",
    mergeable=True,
    identity_at_init=True,
    merge=_merge,
    peft_backed=True,
)

register_method(
    "dora",
    LoraOptions,
    lambda model, o: _wrap(model, _lora_config(model, o, "dora", use_dora=True)),
    description="DoRA (Liu et al. 2024): LoRA on the direction, a learned magnitude per output (peft)",
    mergeable=True,
    identity_at_init=True,
    merge=_merge,
    peft_backed=True,
)


@dataclass
class IA3Options:
    target_modules: list[str] | str | None = field(default=None, metadata={"help": TARGETS_HELP})
    feedforward_modules: list[str] | None = field(
        default=None,
        metadata={"help": "targets whose input (not output) is rescaled, as IA3 does for the FFN's second layer"},
    )
    layers: str | list[int] | int | None = field(default=None, metadata={"help": LAYERS_HELP})
    blocks: str | None = field(default=None, metadata={"help": BLOCKS_HELP})


def _ia3(model, o: IA3Options) -> Applied:
    targets = target_names(model, o.target_modules, o.layers, o.blocks, "ia3")
    feedforward = None
    if o.feedforward_modules:
        chosen = [n for n, _ in model.named_modules() if re.fullmatch(targets, n)]
        named = lambda name, wanted: name == wanted or name.endswith("." + wanted)  # noqa: E731
        every = [n for n, _ in model.named_modules()]
        unknown = [wanted for wanted in o.feedforward_modules if not any(named(n, wanted) for n in every)]
        if unknown:  # a typo: peft would scale no module's input for it, silently
            raise UserError(f"ia3: method.feedforward_modules names {unknown[0]!r}, which no module of the model is "
                            f"(IA3 targets e.g. {', '.join(chosen[:3])}); name the FFN's second layer")
        # a name outside the targets (the task's default fc2 where target_modules leaves it out) scales nothing
        matched = [n for n in chosen if any(named(n, f) for f in o.feedforward_modules)]
        feedforward = "(" + "|".join(re.escape(n) for n in matched) + ")" if matched else None
    return _wrap(model, peft.IA3Config(target_modules=targets, feedforward_modules=feedforward or []))


register_method(
    "ia3",
    IA3Options,
    _ia3,
    description="(IA)³ (Liu et al. 2022): learned per-channel rescaling of activations (peft)",
    mergeable=True,
    identity_at_init=True,
    merge=_merge,
    peft_backed=True,
)


@dataclass
class LycorisOptions:
    r: int = field(default=8, metadata={"help": "rank of each factor"})
    alpha: float = field(default=8, metadata={"help": "scaling numerator: the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "rank dropout"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": TARGETS_HELP})
    layers: str | list[int] | int | None = field(default=None, metadata={"help": LAYERS_HELP})
    blocks: str | None = field(default=None, metadata={"help": BLOCKS_HELP})


register_method(
    "loha",
    LycorisOptions,
    lambda model, o: _wrap(model, peft.LoHaConfig(
        r=o.r, alpha=o.alpha, rank_dropout=o.dropout,
        target_modules=target_names(model, o.target_modules, o.layers, o.blocks, "loha"))),
    description="LoHa (Hyeon-Woo et al. 2022): Hadamard product of two low-rank updates (peft)",
    mergeable=True,
    identity_at_init=True,
    merge=_merge,
    peft_backed=True,
)

register_method(
    "lokr",
    LycorisOptions,
    lambda model, o: _wrap(model, peft.LoKrConfig(
        r=o.r, alpha=o.alpha, rank_dropout=o.dropout,
        target_modules=target_names(model, o.target_modules, o.layers, o.blocks, "lokr"))),
    description="LoKr (Yeh et al. 2023): Kronecker-product update, as in KAdaptation (peft)",
    mergeable=True,
    identity_at_init=True,
    merge=_merge,
    peft_backed=True,
)


@dataclass
class VeraOptions:
    r: int = field(default=256, metadata={"help": "rank of the shared frozen random projections"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the VeRA branch input"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": TARGETS_HELP})
    layers: str | list[int] | int | None = field(default=None, metadata={"help": LAYERS_HELP})
    blocks: str | None = field(default=None, metadata={"help": BLOCKS_HELP})


register_method(
    "vera",
    VeraOptions,
    lambda model, o: _wrap(model, peft.VeraConfig(
        r=o.r, vera_dropout=o.dropout,
        target_modules=target_names(model, o.target_modules, o.layers, o.blocks, "vera", types=(nn.Linear,)))),
    description="VeRA (Kopiczko et al. 2024): shared frozen random projections, trained scaling vectors (peft)",
    mergeable=True,
    identity_at_init=True,
    merge=_merge,
    peft_backed=True,
)


@dataclass
class LNTuningOptions:
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "norm layers to tune (default: every LayerNorm)"}
    )


def _ln_tuning(model, o: LNTuningOptions) -> Applied:
    targets = o.target_modules
    if targets is None and not any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        raise UserError(f"ln_tuning: the model has no LayerNorm to tune (its norms: {', '.join(norms) or 'none'}); "
                        f"name the norm layers with method.target_modules=[...], or use bitfit")
    chosen = select_modules(model, targets, types=None if targets is not None else (nn.LayerNorm,), method="ln_tuning")
    pattern = "(" + "|".join(re.escape(name) for name, _ in chosen) + ")"
    return _wrap(model, peft.LNTuningConfig(target_modules=pattern))


register_method(
    "ln_tuning",
    LNTuningOptions,
    _ln_tuning,
    description="LN tuning (Zhao et al. 2023): train only the normalisation layers (peft)",
    mergeable=True,
    identity_at_init=True,
    merge=_merge,
    peft_backed=True,
)
