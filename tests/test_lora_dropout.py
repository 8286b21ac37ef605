"""LoRA's dropout (`UniformMaskDropout`): the Bernoulli mask of nn.Dropout, drawn faster
(its rate rounded to a multiple of 1/65536)."""

from __future__ import annotations

import torch
from conftest import TinyNet
from peftlab.shared import methods
from peftlab.shared.methods.peft_methods import UniformMaskDropout


def test_lora_branches_draw_their_dropout_mask_from_uniform_integers():
    model = methods.apply(TinyNet(), "lora", r=2, dropout=0.25)
    dropouts = [m for name, m in model.named_modules() if ".lora_dropout." in name]
    assert dropouts and all(type(m) is UniformMaskDropout for m in dropouts)
    # without dropout peft puts an identity there: nothing to swap
    assert not any(isinstance(m, UniformMaskDropout) for m in methods.apply(TinyNet(), "lora", r=2).modules())


def test_the_mask_keeps_one_minus_p_of_the_inputs_scaled_as_nn_dropout_does():
    torch.manual_seed(0)
    dropout = UniformMaskDropout(0.25)
    x = (torch.rand(1_000_000) + 1).requires_grad_()  # no zeros of its own
    y = dropout(x)
    dropped = y == 0
    # Bernoulli(0.75) keeps: std of the dropped share over 1e6 draws is 4.3e-4
    assert abs(dropped.float().mean().item() - 0.25) < 3e-3
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75, rtol=1e-6, atol=0)
    y.sum().backward()  # the gradient flows through the kept inputs only, scaled alike
    torch.testing.assert_close(x.grad, (~dropped).float() / 0.75, rtol=1e-6, atol=0)
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_a_rate_between_levels_is_rounded_and_the_scale_follows_it():
    torch.manual_seed(1)
    dropout = UniformMaskDropout(0.1)  # 6553.6 of 65536 levels -> 6554
    rate = 6554 / 2**16
    y = dropout(torch.ones(2_000_000))
    assert abs((y == 0).float().mean().item() - rate) < 1e-3  # std 2.1e-4
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / (1 - rate)]))
