"""Attention for narrow heads on CPU: a small C++ kernel built for this machine at first use.

torch's fused CPU attention spends about 7 cycles per attention score on 16-wide heads
(ESM-2 8M/35M/150M have 16-32-wide heads), and ESM-2 8M training then spends half of
each step in it. `narrow_attention.cpp` keeps 8 query rows x 16 keys of scores in
vector registers, multiplies bf16 inputs as bf16 pairs where the CPU has AVX512-BF16,
and sweeps the keys once for dQ, dK and dV in the backward pass. Against torch's
kernel in fp32, one sequence of 100-1000 tokens, 20 heads, 2-core CPU
(`benchmarks/narrow_attention_speed.py`, one run):

| inputs | head width | forward | backward |
|---|---|---|---|
| fp32 | 16 | 1.19-1.57x | 1.38-1.66x |
| fp32 | 24 | 1.25-1.89x | 1.27-1.50x |
| fp32 | 32 | 1.10-1.64x | 1.09-1.36x |
| bf16 | 16 | 1.46-2.39x | 1.76-2.45x |
| bf16 | 24 | 1.39-2.14x | 1.38-1.93x |
| bf16 | 32 | 1.10-1.71x | 1.36-1.61x |

The gain is smallest at 1000 tokens, where a head's keys and values outgrow the L1 cache.
Numerics: fp32 arithmetic throughout (bf16 inputs' pair products are exact in fp32),
outputs in the inputs' dtype; fp32 results within 2e-6 of torch's fused kernel,
all checked against fp64 attention (`tests/test_narrow_attention.py`).

The kernel is compiled with the machine's own vector instructions (`-march=native`)
into a cache folder keyed by its source, torch's version and the CPU's flags
(`$PEFTLAB_KERNEL_CACHE`, default `~/.cache/peftlab/kernels`): the first use on a
machine takes about 20 s, later ones load the library. Where no C++ compiler is found
the build fails once with a message on stderr and attention runs through torch's fused
kernel (same results, slower).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peftlab.shared import native

SOURCE = Path(__file__).with_name("narrow_attention.cpp")
HEAD_WIDTHS = (16, 24, 32)
"""Head widths the kernel is built for: ESM-2 8M (16), 35M (24), 150M (32). From 64 on
torch's kernel is as fast (`benchmarks/narrow_attention_speed.py`)."""

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]  # OpenMP: at::parallel_for's threads

_built: bool | None = None
"""Whether this process has the kernel; None before the first `load()`."""
build_error: str | None = None
"""Why the build failed, where it did (the compiler's first error line)."""


def load() -> bool:
    """Build (first time on this machine) and load the kernel, once per process; False,
    with one line on stderr saying why, where it cannot be built."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> bool:
    global build_error
    build_error = native.build("narrow_attention", SOURCE, _FLAGS, "the narrow-head attention kernel", 20,
                               instead="attention runs through torch's fused kernel instead (same results, slower "
                                       "on narrow heads)")
    if build_error is not None:
        return False
    _register_shapes()
    return True


def _register_shapes() -> None:
    """Output shapes and layouts without running the kernel (FakeTensor: torch.compile,
    the meta device)."""

    @torch.library.register_fake("peftlab_narrow_attention::forward")
    def _forward(q, k, v, spans):
        return _token_major_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("peftlab_narrow_attention::backward")
    def _backward(grad_out, q, k, v, out, logsumexp, spans):
        return _token_major_like(q), _token_major_like(q), _token_major_like(q)


def _token_major_like(q: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, width) laid out as (batch, tokens, heads, width), as the kernel writes it."""
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel takes this (batch, heads, tokens, width) query tensor."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] in HEAD_WIDTHS
            and (load() if _built is None else _built))  # torch.compile reads the flag, not the build


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor):
    """(output, logsumexp) of softmax(q k^T / sqrt(width)) v within each span; `spans`
    is an (n, 3) int64 tensor of (batch row, first token, end token)."""
    return _ops().forward(*_unit_last_stride(q, k, v), spans)


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             logsumexp: torch.Tensor, spans: torch.Tensor):
    """Gradients of q, k, v given the output's gradient and `forward`'s results."""
    return _ops().backward(*_unit_last_stride(grad_out.to(q.dtype), q, k, v, out), logsumexp, spans)


def _ops():
    if not load():
        raise RuntimeError("the narrow-head attention kernel is not built on this machine: check supports() first")
    return torch.ops.peftlab_narrow_attention


def _unit_last_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]
