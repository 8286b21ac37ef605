"""The fused rotary embedding (shared/rotary.cpp): bit for bit fair-esm's rotation of bf16
queries and keys rounded to bf16, forward and backward, at every head width and on the
model's strided views; an ESM-2 training step (packed) and inference (padded) are
bit-identical with it and without it; a failed build says why and leaves the rotation
to fair-esm."""

from __future__ import annotations

import shutil

import pytest
import torch
from esm.rotary_embedding import RotaryEmbedding, apply_rotary_pos_emb
from peftlab.shared import rotary

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the kernel")


@pytest.mark.parametrize("width", [8, 16, 24, 32, 64])
def test_forward_and_backward_are_fair_esms_bit_for_bit(width):
    generator = torch.Generator().manual_seed(width)
    batch, tokens, heads = 3, 77, 5
    # the model's q and k: (batch, token, head) in memory, seen as (batch, head, token)
    stored = (3 * torch.randn(batch, tokens, heads, width, generator=generator)).to(torch.bfloat16)
    grad = (2 * torch.randn(batch, heads, tokens, width, generator=generator)).to(torch.bfloat16)
    cos, sin = RotaryEmbedding(width)._update_cos_sin_tables(stored.new_empty(tokens, 0), seq_dimension=0)
    theirs_input = stored.transpose(1, 2).detach().requires_grad_()
    theirs = apply_rotary_pos_emb(theirs_input, cos, sin).to(torch.bfloat16)
    theirs.backward(grad)
    ours_input = stored.transpose(1, 2).detach().requires_grad_()
    assert rotary.supports(ours_input, cos), rotary.build_error
    ours = rotary.rotate(ours_input, cos, sin)
    ours.backward(grad)
    assert ours.dtype == torch.bfloat16 and ours.stride() == ours_input.stride()
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_input.grad, theirs_input.grad)


def test_a_bf16_esm_step_and_inference_are_bit_identical_with_the_kernel_and_without(monkeypatch, one_thread):
    from conftest import tiny_model_with_default_method

    model, batch, _ = tiny_model_with_default_method("protein-classify")
    calls = []
    rotate = rotary.rotate
    monkeypatch.setattr(rotary, "rotate", lambda *args: calls.append(1) or rotate(*args))

    def step():
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(model(batch), batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def infer():  # inference keeps the padded layout
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(batch)

    model.train()
    fused_loss, fused_gradients = step()
    trained_calls = len(calls)
    model.eval()
    fused_inference = infer()
    model.train()
    assert trained_calls and len(calls) > trained_calls  # q and k of every layer went through the kernel
    monkeypatch.setattr(rotary, "supports", lambda x, cos: False)
    loss, gradients = step()
    model.eval()
    assert torch.equal(fused_inference, infer())
    assert torch.equal(fused_loss, loss)
    assert fused_gradients.keys() == gradients.keys() and gradients
    assert all(torch.equal(fused_gradients[n], gradients[n]) for n in gradients)


def test_fp32_other_tables_and_wide_heads_stay_with_fair_esm():
    cos = torch.zeros(1, 4, 16)
    assert not rotary.supports(torch.zeros(1, 2, 4, 16), cos)
    assert not rotary.supports(torch.zeros(1, 2, 4, 16, dtype=torch.bfloat16), cos.to(torch.bfloat16))
    assert not rotary.supports(torch.zeros(1, 2, 4, 128, dtype=torch.bfloat16), torch.zeros(1, 4, 128))  # ESM-2 15B


def test_a_build_that_fails_says_why_and_leaves_rotation_to_fair_esm(failing_compiler, monkeypatch, capsys):
    monkeypatch.setattr(rotary, "_built", None)  # this process has not loaded it yet
    monkeypatch.setattr(rotary, "build_error", None)
    assert not rotary.supports(torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), torch.zeros(1, 3, 16))
    message = capsys.readouterr().err
    assert "fused rotary embedding could not be built" in message and str(failing_compiler) in message
    assert rotary.build_error == "error: command 'c++' failed: No such file or directory"
