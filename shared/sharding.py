"""Fully sharded data-parallel training (`train.sharding=fsdp`): torch's `fully_shard`.

Under DDP every process keeps the whole model, its gradients and its optimizer state;
under FSDP each of N processes keeps 1/N of every parameter, gradient and optimizer
slot, gathers a block's parameters just before the block runs and frees them after.
That is what lets a model whose full fine-tuning state does not fit one device train
on several.

peftlab calls torch's `fully_shard` (FSDP2) itself rather than going through
accelerate's FSDP plugin: on CPUs accelerate 1.15 runs DDP under an FSDP config, and
FSDP2 is what runs the same way on GPUs (NCCL) and on CPUs (gloo), so the CPU tests
exercise the code that multi-GPU runs use.

The loop's contract with a sharded model:
- training steps are collective (every process runs every forward and backward);
- evaluation and the best-adapter file: every process enters `gathered`, which
  gathers each block's parameters once and keeps them; the main process then
  evaluates and reads trainable state alone;
- checkpoints hold the gathered full state, in the same files and layout as a
  single-process run's (`optimizer_state_dict` / `load_optimizer_state_dict`), so a
  run may resume with another process count;
- after training, the main process evaluates and saves with a freshly built
  unsharded model that loads the trained state (`pipelines/runner.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (transformer layers, residual stages): the members of
    a ModuleList or Sequential of two or more modules of one class that hold
    parameters. Each becomes a unit whose parameters are gathered together; the
    outermost such blocks only, so a block's own sub-lists stay inside its unit."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            members = list(child.children())
            if (isinstance(child, nn.ModuleList | nn.Sequential) and len(members) >= 2
                    and len({type(member) for member in members}) == 1
                    and all(any(True for _ in member.parameters()) for member in members)):
                blocks.extend(members)
            else:
                visit(child)

    visit(model)
    return blocks


def shard(model: nn.Module, device: torch.device, keep_gathered_for_backward: bool = False) -> int:
    """Shard `model` in place over the processes of the default process group: one unit
    per repeated block, one for the rest. Returns the number of units. Parameters
    become DTensors, so an optimizer must be built after this.

    By default a block's gathered parameters are freed after its forward and gathered
    again for its backward (ZeRO-3's memory); `keep_gathered_for_backward` keeps them
    from forward to backward (ZeRO-2's: one gather per step, more memory).

    Scalar parameters (e.g. CLIP's logit scale) cannot be split: every process keeps
    them whole, and `average_replicated_gradients` does for their gradients what the
    shards' reduce-scatter does for the others'."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    replicated = {p for p in model.parameters() if p.ndim == 0}
    blocks = repeated_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=replicated, reshard_after_forward=not keep_gathered_for_backward)
        block.reshards_after_forward = not keep_gathered_for_backward  # for `gathered` to restore
    fully_shard(model, mesh=mesh, ignored_params=replicated)
    model.reshards_after_forward = False  # FSDP's choice for the root: backward needs it at once
    model.replicated_parameters = [p for p in model.parameters() if p in replicated]
    return len(blocks) + 1


def average_replicated_gradients(model: nn.Module) -> None:
    """The mean over processes of the gradients of parameters every process keeps whole."""
    processes = torch.distributed.get_world_size()
    for parameter in getattr(model, "replicated_parameters", []):
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)  # a sum: gloo has no average
            parameter.grad.div_(processes)


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside, every parameter is whole on every process and stays whole across
    forward passes, so one process may run forwards alone (evaluation) and read its
    parameters (trainable state). Every process must enter. A no-op when unsharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit.reshards_after_forward, recurse=False)


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the norm of the whole (all processes') gradient, as one process would."""
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in parameters if p.grad is not None]
    groups = [[p for p in with_grad if isinstance(p, DTensor)], [p for p in with_grad if not isinstance(p, DTensor)]]
    squares = []
    for group in groups:
        if group:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            if isinstance(norm, DTensor):  # each process holds a part of the sum
                norm = norm.full_tensor()
            squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.tensor(0.0)
    for group in groups:  # apart: one foreach call cannot mix DTensors and tensors
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state in `Optimizer.state_dict()`'s own layout (slots by
    parameter index), gathered from the shards; collective, the main process gets it
    (the others an empty state). Unsharded: `optimizer.state_dict()`."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    groups, start = [], 0
    for group in optimizer.param_groups:  # the layout's params are consecutive indices
        hyper = {key: value for key, value in group.items() if key != "params"}
        groups.append({**hyper, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": {index[name]: slots for name, slots in by_name.get("state", {}).items()},
            "param_groups": groups}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """The inverse of `optimizer_state_dict`: a whole state, each process keeping its shards."""
    if not is_sharded(model):
        optimizer.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: slots for i, slots in state_dict["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                         for group in state_dict["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Whole tensors (a subset of the model's) into a sharded model; collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
