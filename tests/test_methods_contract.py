"""The method contract, for every registered method, on a generic tiny model and on
every registered task's tiny model (new methods and tasks are picked up automatically)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import TinyNet, demo_card_for
from peftlab.pipelines import runner
from peftlab.shared import methods
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import list_tasks
from torch import nn

TASKS = [t.name for t in list_tasks()]  # loads the domains, which register their own methods
METHODS = methods.list_methods()


@functools.cache
def _task_base(task_name):
    from peftlab.shared.cards import read_card
    from peftlab.shared.tasks import get_task

    task = get_task(task_name)
    options = task.options()
    dataset = task.read(read_card(demo_card_for(task_name)), options)
    torch.manual_seed(0)
    model = task.build_model("tiny", dataset.labels, options)
    return task, model, dataset.splits["train"][:6]


def _task_setup(task_name):
    """(task, model, examples): the task's tiny backbone and a few demo examples.
    The demo data and model are built once per task; each test gets its own copy."""
    task, model, examples = _task_base(task_name)
    return task, copy.deepcopy(model), examples


def _frozen_snapshot(model):
    state = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def _train_steps(model, loss_fn, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    model.eval()


def _check_contract(base, adapted_holder, adapted, forward, loss_fn, head_names=()):
    """base: the model before the method; adapted_holder: the adapted model or its parent."""
    spec = adapted.spec
    # 1. identity at init
    with torch.no_grad():
        base.eval()
        adapted_holder.eval()
        reference, start = forward(base), forward(adapted_holder)
    if spec.identity_at_init:
        torch.testing.assert_close(start, reference, atol=1e-5, rtol=1e-5)
    # 2. only the method's parameters (and the head) train
    method_names = set(adapted.method_parameters())
    assert method_names, f"{spec.name}: no method parameters"
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == method_names
    before = _frozen_snapshot(adapted_holder)
    _train_steps(adapted_holder, loss_fn)
    after = _frozen_snapshot(adapted_holder)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = {f"p:{n}" for n, p in adapted_holder.named_parameters() if p.requires_grad}
    allowed |= {k for k in before if k.startswith("b:") and ("running_" in k or "num_batches" in k)}
    assert changed, f"{spec.name}: nothing changed after training"
    assert changed <= allowed, f"{spec.name}: frozen tensors changed: {sorted(changed - allowed)[:3]}"
    for name in head_names:
        assert f"p:{name}" in changed, f"head parameter {name} did not train"
    # 3. trainable count reported
    counts = adapted.parameter_counts()
    assert counts["method"] == sum(p.numel() for p in adapted.method_parameters().values()) > 0
    assert counts["method_percent"] == pytest.approx(100 * counts["method"] / counts["base"])
    with torch.no_grad():
        trained = forward(adapted_holder)
    return adapted, trained, spec


@pytest.mark.parametrize("name", METHODS)
def test_generic_model_contract(name, tiny_net, tmp_path):
    if not methods.get_method(name).fits(tiny_net):
        pytest.skip(f"{name} is specific to another architecture")
    x = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(1))
    base = copy.deepcopy(tiny_net)
    adapted = methods.apply(copy.deepcopy(tiny_net), name)
    adapted, trained, spec = _check_contract(
        base, adapted, adapted, lambda m: m(x), lambda: adapted(x).pow(2).mean())
    # 4. save -> load round-trips exactly
    adapted.save(tmp_path / "adapter")
    reloaded = methods.load_adapter(copy.deepcopy(tiny_net), tmp_path / "adapter")
    from peftlab.shared.checkpoint import batchnorm_buffers

    # BatchNorm running stats travel with the run's adapter folder, not the method's:
    with torch.no_grad():
        for key, value in batchnorm_buffers(adapted.model).items():
            reloaded.model.get_buffer(key).copy_(value)
        reloaded.eval()
        torch.testing.assert_close(reloaded(x), trained, atol=0, rtol=0)
    # 5. merged equals unmerged where the method allows it
    if spec.mergeable:
        merged = adapted.merge()
        with torch.no_grad():
            torch.testing.assert_close(merged(x), trained, atol=1e-5, rtol=1e-4)
    else:
        with pytest.raises(UserError):
            adapted.merge()


def check_task_method(task, model, examples, name, options, tmp_path):
    """The contract for one method on one task model, through the run's adapter folder
    (method files + head + BatchNorm buffers), as `peftlab.load` restores it. Domain tests
    call it for backbones other than their task's `tiny` preset."""
    from peftlab.shared import io
    from peftlab.shared.checkpoint import load_state

    batch = model.collate(examples, rng=None)
    base = copy.deepcopy(model)
    model.backbone = methods.apply(model.backbone, name, **{**task.default_method_options(name, model), **options})
    head_names = [f"head.{n}" for n, _ in model.head.named_parameters()]
    adapted, trained, spec = _check_contract(
        base, model, model.backbone, lambda m: m(batch), lambda: model.loss(model(batch), batch),
        head_names=head_names)
    adapter = tmp_path / "adapter"
    runner.save_adapter(model, adapter)
    rebuilt = copy.deepcopy(base)
    rebuilt.backbone = methods.load_adapter(rebuilt.backbone, adapter)
    load_state(rebuilt.head, io.load_tensors(adapter / runner.HEAD_FILE), "head")
    if (adapter / runner.BUFFERS_FILE).is_file():
        load_state(rebuilt.backbone, io.load_tensors(adapter / runner.BUFFERS_FILE), "buffers")
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch), trained, atol=0, rtol=0)
    if spec.mergeable:
        model.backbone = adapted.merge()
        with torch.no_grad():
            torch.testing.assert_close(model(batch), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("name", METHODS)
def test_task_model_contract(name, task_name, tmp_path):
    task, model, examples = _task_setup(task_name)
    if not methods.get_method(name).fits(model.backbone):
        pytest.skip(f"{name} does not fit {task_name}'s backbone")
    check_task_method(task, model, examples, name, {}, tmp_path)


def test_every_task_has_a_demo_card():
    for task_name in TASKS:
        assert demo_card_for(task_name).is_file()


def test_registry_errors():
    with pytest.raises(UserError, match="unknown PEFT method 'lorra'.*did you mean 'lora'"):
        methods.get_method("lorra")
    with pytest.raises(ValueError, match="registered twice"):
        methods.register_method("lora", methods.get_method("lora").options, lambda m, o: None,
                                description="", mergeable=False, identity_at_init=False)
    with pytest.raises(UserError, match="has no option 'rank'.*valid options: alpha"):
        methods.apply(TinyNet(), "lora", rank=4)
    with pytest.raises(UserError, match="no module matches"):
        methods.apply(TinyNet(), "lora", target_modules=["nope"])
    # IA3's feedforward names were matched against its targets and a miss dropped silently
    adapted = methods.apply(TinyNet(), "ia3", target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"])
    assert adapted.model.peft_config["default"].feedforward_modules
    with pytest.raises(UserError, match=r"^ia3: method\.feedforward_modules names 'fc_2', which no module of the "
                                        r"model is \(IA3 targets e\.g\. layers\.0\.q_proj"):
        methods.apply(TinyNet(), "ia3", target_modules=["q_proj", "fc2"], feedforward_modules=["fc_2"])
    # a task's default feedforward module left out of the user's narrower targets is no mistake: it scales nothing
    narrowed = methods.apply(TinyNet(), "ia3", target_modules=["q_proj"], feedforward_modules=["fc2"])
    assert not narrowed.model.peft_config["default"].feedforward_modules


def test_target_selection_by_suffix_regex_and_layers(tiny_net):
    adapted = methods.apply(tiny_net, "lora", target_modules=["q_proj"], layers="last_2")
    names = {n.split(".lora_")[0] for n in adapted.method_parameters()}
    assert names == {"base_model.model.layers.1.q_proj", "base_model.model.layers.2.q_proj"}
    adapted = methods.apply(TinyNet(), "ssf", target_modules=r"layers\.0\.fc\d")
    assert {n.rsplit(".ssf", 1)[0] for n in adapted.method_parameters()} == {"layers.0.fc1", "layers.0.fc2"}


def test_freeze_layers_trains_last_blocks_only(tiny_net):
    adapted = methods.apply(tiny_net, "freeze_layers", trainable_blocks=1)
    names = set(adapted.method_parameters())
    assert all(n.startswith(("layers.2.", "final_norm.")) for n in names)
    assert {n for n in names if n.startswith("layers.2.")} == {f"layers.2.{n}" for n, _ in tiny_net.layers[2].named_parameters()}


def test_bitfit_trains_biases_only(tiny_net):
    adapted = methods.apply(tiny_net, "bitfit")
    assert set(adapted.method_parameters()) == {n for n, _ in tiny_net.named_parameters() if n.endswith("bias")}


def test_ssf_starts_as_identity_and_folds_into_weights(tiny_net):
    adapted = methods.apply(tiny_net, "ssf", target_modules=["fc1"])
    for name, param in adapted.method_parameters().items():
        expected = torch.ones_like(param) if name.endswith("scale") else torch.zeros_like(param)
        assert torch.equal(param, expected)


def _randomise(adapted):
    with torch.no_grad():
        for param in adapted.method_parameters().values():
            param.add_(torch.randn_like(param) * 0.3)


def test_torch_attention_output_projection_is_never_a_target():
    """nn.MultiheadAttention passes out_proj's weight to its kernel without calling
    out_proj, so a hook there would never act while a merge folded it in."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    adapted = methods.apply(copy.deepcopy(model), "ssf")
    assert not any("out_proj" in name for name in adapted.method_parameters())
    _randomise(adapted)
    with torch.no_grad():
        unmerged = adapted.model(x)
        assert not torch.allclose(unmerged, model(x), atol=1e-3)
        torch.testing.assert_close(adapted.merge()(x), unmerged, atol=1e-5, rtol=1e-5)
    for method in ("ssf", "adapter", "lora"):
        with pytest.raises(UserError, match=r"layers\.0\.self_attn\.out_proj is the output projection of torch's "
                                            r"nn\.MultiheadAttention.*leave it out of target_modules"):
            methods.apply(copy.deepcopy(model), method, target_modules=["out_proj"])


def test_ssf_refuses_to_merge_into_tied_weights():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.body(self.embed(tokens)))

    adapted = methods.apply(TiedLM(), "ssf", target_modules=["body", "head"])
    with pytest.raises(UserError, match=r"ssf: head\.weight is the same tensor as embed\.weight \(tied weights\)"):
        adapted.merge()
    model = TiedLM()
    tokens = torch.tensor([[1, 2, 3]])
    adapted = methods.apply(model, "ssf", target_modules=["body"])
    _randomise(adapted)
    with torch.no_grad():
        unmerged = adapted.model(tokens)
        torch.testing.assert_close(adapted.merge()(tokens), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_ssf_on_a_transposed_convolution_scales_and_folds_its_output_channels(groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, kernel_size=3, groups=groups), nn.Conv2d(6, 3, 1)).eval()
    x = torch.randn(2, 4, 4, 4)  # output 6 x 6 x 6: a wrong channel axis would go unnoticed by shape
    adapted = methods.apply(copy.deepcopy(model), "ssf", target_modules=["0"])
    with torch.no_grad():
        adapted.model[0].ssf.scale.copy_(torch.arange(1.0, 7.0))
        torch.testing.assert_close(adapted.model[0](x), model[0](x) * torch.arange(1.0, 7.0).view(1, 6, 1, 1))
    _randomise(adapted)
    with torch.no_grad():
        unmerged = adapted.model(x)
        torch.testing.assert_close(adapted.merge()(x), unmerged, atol=1e-5, rtol=1e-5)


def test_parallel_adapter_can_span_the_feed_forward_block(tiny_net):
    """He et al.'s parallel adapter: a branch from the feed-forward block's input (fc1's)
    to its output (fc2's), d -> size -> d, not from fc2's 2d-wide input."""
    adapted = methods.apply(copy.deepcopy(tiny_net), "parallel_adapter", target_modules=["fc2"], input_from="fc1",
                            size=3, scale=4.0, activation="gelu")
    width = tiny_net.final_norm.normalized_shape[0]
    assert adapted.parameter_counts()["method"] == 3 * (3 * (width + width) + 3 + width)
    _randomise(adapted)
    block = adapted.model.layers[1]
    seen = {}
    block.fc1.register_forward_pre_hook(lambda module, args: seen.update(ffn_input=args[0]))
    with torch.no_grad():
        out = block(seen.setdefault("block_input", torch.randn(2, 7, width)))
        ffn_input, linear = seen["ffn_input"], torch.nn.functional.linear
        feed_forward = linear(torch.relu(linear(ffn_input, block.fc1.weight, block.fc1.bias)), block.fc2.weight, block.fc2.bias)
        adapter = block.fc2.adapter
        branch = 4.0 * adapter.up(torch.nn.functional.gelu(adapter.down(ffn_input)))
    assert branch.abs().max() > 1e-2  # a branch that matters
    torch.testing.assert_close(out, ffn_input + feed_forward + branch, atol=1e-5, rtol=1e-5)
    assert "kept_input" not in adapter.__dict__  # nothing held between passes
    copied = copy.deepcopy(adapted.model)  # a copy's branches read its own blocks
    with torch.no_grad():
        torch.testing.assert_close(copied.layers[1](seen["block_input"]), out, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="input_from applies to parallel_adapter only"):
        methods.apply(copy.deepcopy(tiny_net), "adapter", target_modules=["fc2"], input_from="fc1")
    with pytest.raises(UserError, match=r"layers\.0\.fc2 has no sibling layers\.0\.mlp_in"):
        methods.apply(copy.deepcopy(tiny_net), "parallel_adapter", target_modules=["fc2"], input_from="mlp_in")
    backwards = methods.apply(copy.deepcopy(tiny_net), "parallel_adapter", target_modules=["fc1"], input_from="fc2")
    with pytest.raises(UserError, match="the input_from module did not run before the module the adapter follows"):
        backwards.model(torch.randn(2, 4, 7))


def test_ssf_can_start_from_the_ssf_codes_random_init(tiny_net):
    torch.manual_seed(0)
    adapted = methods.apply(copy.deepcopy(tiny_net), "ssf", init_std=0.02)
    scales = torch.cat([p.detach() for n, p in adapted.method_parameters().items() if n.endswith("scale")])
    shifts = torch.cat([p.detach() for n, p in adapted.method_parameters().items() if n.endswith("shift")])
    assert 0.01 < scales.std() < 0.03 and abs(scales.mean() - 1) < 0.01
    assert 0.01 < shifts.std() < 0.03 and abs(shifts.mean()) < 0.01
    x = torch.randn(2, 4, 7)
    with torch.no_grad():
        adapted.model.eval()
        unmerged = adapted.model(x)
        assert not torch.allclose(unmerged, tiny_net.eval()(x), atol=1e-4)  # not the identity at init
        torch.testing.assert_close(adapted.merge()(x), unmerged, atol=1e-5, rtol=1e-5)
