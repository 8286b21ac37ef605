"""fair-esm's rotary position embedding on bf16 queries and keys, fused (`rotary.cpp`).

Under bf16 autocast ESM-2's q and k projections come out in bf16, and fair-esm rotates
them with fp32 cos/sin tables: x * cos + rotate_half(x) * sin makes fp32 products and
sums (six fp32 temporaries per tensor and layer, as many again in backward) that the
attention then rounds to bf16. The kernel reads bf16 and writes bf16 in one pass each
way, with the same arithmetic and roundings as torch, so outputs and gradients are
bit-identical (`tests/test_rotary.py`). On ESM-2 8M's 20 heads x 16 and a batch of
2600 tokens, forward and backward of q and k take 4.7-6.6 ms a layer, against
11.5-14.6 ms through torch (table lookups included in both).

Built at first use like the attention kernel (`native.build`); without a compiler,
`supports` is False and fair-esm's own rotation runs (the same numbers, slower).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peftlab.shared import native

SOURCE = Path(__file__).with_name("rotary.cpp")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]  # see rotary.cpp: no fused multiply-adds

_built: bool | None = None
build_error: str | None = None
"""Why the build failed, where it did (the compiler's first error line)."""


def load() -> bool:
    """Build (first time on this machine) and load the kernel, once per process; False,
    with one line on stderr saying why, where it cannot be built."""
    global _built, build_error
    if _built is None:
        build_error = native.build("rotary", SOURCE, _FLAGS, "the fused rotary embedding", 15,
                                   instead="fair-esm's own rotation runs instead (same results, slower)")
        _built = build_error is None
        if _built:
            _register_shapes()
    return _built


def _register_shapes() -> None:
    """Output shapes without running the kernel (FakeTensor: torch.compile, the meta device)."""
    for op in ("forward", "backward"):
        torch.library.register_fake(f"peftlab_rotary::{op}")(lambda x, cos, sin: torch.empty_like(x))


MAX_HEAD_WIDTH = 64
"""ESM-2 8M to 3B (16-64); wider heads (15B: 128) rotate through fair-esm."""


def supports(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the kernel takes this (batch, heads, tokens, width) tensor and table."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4 and cos.dtype == torch.float32
            and x.shape[-1] % 2 == 0 and x.shape[-1] <= MAX_HEAD_WIDTH and load())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`esm.rotary_embedding.apply_rotary_pos_emb(x, cos, sin)` rounded to bf16, for a bf16
    `x` (batch, heads, tokens, width) and fp32 `cos`, `sin` of one row per token
    ((1, tokens, width), as fair-esm's tables are shaped)."""
    if not load():
        raise RuntimeError("the fused rotary embedding is not built on this machine: check supports() first")
    return _Rotate.apply(x, cos.contiguous(), sin.contiguous())


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return torch.ops.peftlab_rotary.forward(_unit_last_stride(x), cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return torch.ops.peftlab_rotary.backward(_unit_last_stride(grad), cos, sin), None, None


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
