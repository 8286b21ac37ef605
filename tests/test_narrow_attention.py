"""The narrow-head attention kernel against torch's attention in fp64: forward values,
log-sum-exp and gradients, for every head width it is built for, in fp32 and bf16, on
padded and packed layouts."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from peftlab.shared import narrow_attention
from torch.nn import functional as F

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the kernel")


def test_the_kernel_builds_and_loads_on_this_machine():
    assert narrow_attention.load(), narrow_attention.build_error
    assert narrow_attention.supports(torch.zeros(1, 2, 3, 16))
    assert not narrow_attention.supports(torch.zeros(1, 2, 3, 20))  # width it is not built for
    assert not narrow_attention.supports(torch.zeros(1, 2, 3, 16, dtype=torch.float16))


def _token_major(batch: int, heads: int, tokens: int, width: int, dtype, generator) -> torch.Tensor:
    """(batch, heads, tokens, width) as the model's views of its projections are laid out."""
    return torch.randn(batch, tokens, heads, width, generator=generator).to(dtype).transpose(1, 2)


def _reference(q, k, v, grad, spans):
    """fp64 attention within each span, and its gradients; zeros outside the spans."""
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = torch.zeros(q.shape, dtype=torch.float64)
    logsumexp = torch.zeros(q.shape[:3], dtype=torch.float64)
    for row, start, end in spans:
        part = [t[row:row + 1, :, start:end] for t in inputs]
        out[row:row + 1, :, start:end] = F.scaled_dot_product_attention(*part)
        scores = part[0] @ part[1].transpose(-1, -2) / math.sqrt(q.shape[-1])
        logsumexp[row:row + 1, :, start:end] = scores.logsumexp(-1).detach()
    out.backward(grad.double())
    return out.detach(), logsumexp, [t.grad for t in inputs]


SPANS = {
    "padded": (3, 70, ((0, 0, 70), (1, 0, 33), (2, 0, 1))),  # batch rows, tokens, spans
    "packed": (1, 104, ((0, 0, 70), (0, 70, 103), (0, 103, 104))),  # one row; the last token is padding
}


@pytest.mark.parametrize("layout", sorted(SPANS))
@pytest.mark.parametrize("width", narrow_attention.HEAD_WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_fp64_attention_within_each_span(layout, width, dtype):
    batch, tokens, spans = SPANS[layout]
    generator = torch.Generator().manual_seed(width)
    q, k, v, grad = (_token_major(batch, 3, tokens, width, dtype, generator) for _ in range(4))
    out, logsumexp = narrow_attention.forward(q, k, v, torch.tensor(spans))
    grads = narrow_attention.backward(grad, q, k, v, out, logsumexp, torch.tensor(spans))
    expected_out, expected_logsumexp, expected_grads = _reference(q, k, v, grad, spans)

    # fp32: within a few ulp-sized errors of fp64; bf16: the output and gradients are
    # rounded to bf16 once (inputs are exact in fp32, the compute is fp32)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.double(), expected_out, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(logsumexp.double(), expected_logsumexp, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(mine.double(), theirs, rtol=tolerance, atol=tolerance)
    inside = torch.zeros(batch, tokens, dtype=torch.bool)
    for row, start, end in spans:
        inside[row, start:end] = True
    outside = ~inside[:, None, :].expand(batch, 3, tokens)
    for tensor in (out, logsumexp, *grads):
        assert not tensor[outside].any()


def test_strides_do_not_change_the_results():
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (_token_major(2, 4, 50, 16, torch.float32, generator) for _ in range(4))
    spans = torch.tensor([(0, 0, 50), (1, 0, 41)])
    token_major = narrow_attention.forward(q, k, v, spans)
    contiguous = narrow_attention.forward(q.contiguous(), k.contiguous(), v.contiguous(), spans)
    assert all(torch.equal(a, b) for a, b in zip(token_major, contiguous))
    grads = narrow_attention.backward(grad, q, k, v, *token_major, spans)
    grads_contiguous = narrow_attention.backward(grad.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                                 *contiguous, spans)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_contiguous))
    # the output is laid out (batch, tokens, heads, width): the output projection reads it without a copy
    assert token_major[0].transpose(1, 2).is_contiguous()


def test_a_build_that_fails_says_why_and_leaves_attention_to_torch(failing_compiler, monkeypatch, capsys):
    monkeypatch.setattr(narrow_attention, "_built", None)  # this process has not loaded it yet
    monkeypatch.setattr(narrow_attention, "build_error", None)
    assert not narrow_attention.supports(torch.zeros(1, 2, 3, 16))
    message = capsys.readouterr().err
    assert "narrow-head attention kernel could not be built" in message and "No such file" in message
    assert str(failing_compiler) in message
    assert narrow_attention.build_error == "error: command 'c++' failed: No such file or directory"


def test_torch_compile_traces_through_the_kernel_with_the_same_results():
    from peftlab.domains.protein.backbones import CPUFlashAttention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (_token_major(2, 4, 30, 16, torch.float32, generator).requires_grad_() for _ in range(3))
    spans = ((0, 0, 30), (1, 0, 21))

    def attention(q, k, v):
        return CPUFlashAttention.apply(q, k, v, spans, None).sum(-1)

    eager = attention(q, k, v)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)(q, k, v)
    assert torch.equal(compiled, eager)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(compiled.sum(), (q, k, v)), eager_grads))
