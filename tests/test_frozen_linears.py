"""`memory.frozen_linears_in`: on every task's tiny backbone with its default method, a
bf16 training step with frozen linear layers held in bf16 gives bit-identical loss and
gradients; the layers it must leave alone (trainable, peft-wrapped, tied) keep their
dtype, and every weight is back in fp32 on leaving."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_model_with_default_method
from peftlab.shared.memory import frozen_linears_in
from peftlab.shared.tasks import list_tasks
from torch import nn

TASKS = [t.name for t in list_tasks()]


def _bf16_step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    torch.manual_seed(0)  # the same dropout draws in both runs
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(model(batch), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task_name", TASKS)
def test_a_bf16_step_is_bit_identical_with_frozen_linears_in_bf16(task_name, one_thread):
    model, batch, _ = tiny_model_with_default_method(task_name)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    loss, gradients = _bf16_step(model, batch)
    with frozen_linears_in(model, torch.bfloat16) as lowered:
        lowered_loss, lowered_gradients = _bf16_step(model, batch)
        # ESM-2's LoRA on k/v leaves q, out, fc1 and fc2 frozen (code review's LoRA
        # wraps every linear layer, and its head is tied to the embeddings)
        assert lowered > 0 or not task_name.startswith("protein"), task_name
    assert torch.equal(loss, lowered_loss), task_name
    assert gradients.keys() == lowered_gradients.keys() and gradients
    assert all(torch.equal(gradients[n], lowered_gradients[n]) for n in gradients), task_name
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes


def test_trainable_wrapped_and_tied_layers_keep_their_dtype():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.frozen = nn.Linear(8, 8)
            self.trained = nn.Linear(8, 8)
            self.wrapped = nn.Linear(8, 8)
            self.tied = nn.Linear(8, 10, bias=False)
            self.tied.weight = self.embed.weight

    model = Model()
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["wrapped"], r=2))
    base = model.base_model.model
    base.trained.requires_grad_(True)
    before = base.frozen.weight.detach().clone()
    with frozen_linears_in(model, torch.bfloat16) as lowered:
        assert lowered == 1
        assert base.frozen.weight.dtype == torch.bfloat16 and base.frozen.bias.dtype == torch.bfloat16
        for kept in (base.trained.weight, base.wrapped.base_layer.weight, base.tied.weight, base.embed.weight):
            assert kept.dtype == torch.float32
    assert base.frozen.weight.dtype == torch.float32
    assert torch.equal(base.frozen.weight, before.to(torch.bfloat16).float())  # the values autocast used
