"""bf16 training's two memory levers, on every task's tiny backbone with its default
method: a step is bit-identical (loss and gradients) with frozen linear layers held in
bf16 (`memory.frozen_linears_in`) and with peft's input casts off, and keeps no more
bytes for backward. The layers `frozen_linears_in` must leave alone (trainable,
peft-wrapped, tied) keep their dtype, and every weight is back in fp32 on leaving;
training turns peft's casts off only while it runs."""

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
    return _bf16_step_keeping(model, batch)[:2]


def _bf16_step_keeping(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss, the gradients and the bytes kept for backward (each storage once)."""
    model.train()
    torch.manual_seed(0)  # the same dropout draws in both runs
    model.zero_grad(set_to_none=True)
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(model(batch), batch)
    loss.backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), gradients, sum(kept.values())


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


@pytest.mark.parametrize("task_name", TASKS)
def test_a_bf16_step_is_bit_identical_with_peft_input_casts_off(task_name, one_thread):
    model, batch, _ = tiny_model_with_default_method(task_name)
    loss, gradients, kept = _bf16_step_keeping(model, batch)
    with peft.helpers.disable_input_dtype_casting(model):
        uncast_loss, uncast_gradients, uncast_kept = _bf16_step_keeping(model, batch)
    assert torch.equal(loss, uncast_loss), task_name
    assert gradients.keys() == uncast_gradients.keys() and gradients
    assert all(torch.equal(gradients[n], uncast_gradients[n]) for n in gradients), task_name
    assert uncast_kept <= kept, task_name


class _TwoHeads(nn.Module):
    """Two layers reading one bf16 activation, as q/k/v read one norm output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head_a, self.head_b = nn.Linear(16, 64), nn.Linear(64, 16), nn.Linear(64, 16)

    def forward(self, x):
        h = nn.functional.gelu(self.fc1(x))
        return self.head_a(h) + self.head_b(h)

    def loss(self, out, batch):
        return (out.float() ** 2).mean()


def test_lora_adapters_reading_one_bf16_input_share_its_copy_without_peft_input_casts():
    """Under autocast fc1's output is bf16: peft widened it to fp32 for each head's fp32
    adapter, and autocast narrowed each widened copy into a bf16 copy of its own, kept
    for backward; uncast, both adapters keep the one activation."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_TwoHeads(), peft.LoraConfig(target_modules=["head_a", "head_b"], r=4,
                                                             init_lora_weights=False))
    batch = torch.randn(32, 16)
    loss, gradients, kept = _bf16_step_keeping(model, batch)
    with peft.helpers.disable_input_dtype_casting(model):
        uncast_loss, uncast_gradients, uncast_kept = _bf16_step_keeping(model, batch)
    assert torch.equal(loss, uncast_loss)
    assert all(torch.equal(gradients[n], uncast_gradients[n]) for n in gradients)
    assert kept - uncast_kept == 32 * 64 * 2  # one bf16 copy of fc1's output fewer


@pytest.mark.parametrize("precision, casts_off", [("bf16", True), ("fp32", False)])
def test_training_turns_peft_input_casts_off_under_autocast_only(tmp_path, monkeypatch, precision, casts_off):
    import peftlab
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peftlab.shared import training

    during, trained = [], []
    original = training._train

    def recording(task, model, *args, **kwargs):
        during.extend(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
        trained.append(model)
        return original(task, model, *args, **kwargs)

    monkeypatch.setattr(training, "_train", recording)
    peftlab.run("protein-classify", demo=True, out=tmp_path / "run",
                overrides={"train.max_steps": 1, "train.epochs": 1, "train.precision": precision})
    assert during and set(during) == {not casts_off}
    assert all(m.cast_input_dtype_enabled for m in trained[0].modules() if isinstance(m, BaseTunerLayer))
