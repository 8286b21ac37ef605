"""`train.activation_checkpointing` on every task's tiny backbone: recomputing block
activations in the backward pass gives the gradients keeping them gives; a backbone
without a switch is refused with a one-line error naming the setting."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import tiny_model_with_default_method
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import list_tasks
from peftlab.shared.training import enable_activation_checkpointing

TASKS = [t.name for t in list_tasks()]


def _gradients(model, batch) -> tuple[dict[str, torch.Tensor], Counter]:
    """Gradients of one training step, and how often each leaf module of the backbone ran."""
    calls = Counter()
    hooks = [module.register_forward_hook(lambda module, args, output, name=name: calls.update([name]))
             for name, module in model.backbone.named_modules() if not list(module.children())]
    model.train()
    torch.manual_seed(0)  # the same dropout draws in both runs
    model.zero_grad(set_to_none=True)
    model.loss(model(batch), batch).backward()
    for hook in hooks:
        hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("task_name", TASKS)
def test_recomputed_activations_give_the_same_gradients(task_name, one_thread):
    model, batch, _ = tiny_model_with_default_method(task_name)
    kept, kept_calls = _gradients(model, batch)
    recomputing = copy.deepcopy(model)
    enable_activation_checkpointing(recomputing)  # every task's backbone has a switch
    recomputed, recomputed_calls = _gradients(recomputing, batch)
    # modules inside recomputed blocks run again in the backward pass
    assert any(recomputed_calls[name] > kept_calls[name] for name in kept_calls), f"{task_name}: nothing was recomputed"
    assert kept.keys() == recomputed.keys() and kept
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_backbone_without_a_switch_is_refused():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

    with pytest.raises(UserError, match=r"the Sequential backbone has no activation checkpointing; "
                                        r"set train.activation_checkpointing=false"):
        enable_activation_checkpointing(Plain())
