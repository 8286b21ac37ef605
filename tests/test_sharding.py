"""FSDP's pieces (`shared/sharding.py`) on two CPU processes (gloo), against one process.

A small model with a frozen layer, repeated blocks and a trainable scalar trains for
four steps in three ways (and sharded once more, keeping gathered blocks for backward): whole in one process on the global batch; sharded over two
processes, each on half the batch; and sharded, stopped after step 2, its checkpoint
written (the gathered state, in the single-process layout) and read into a freshly
sharded model that trains on. All three must end at the same weights (float32 rounding: the sharded runs
sum a gradient in two halves). Run with `torch.multiprocessing.spawn`, so each case
pays one process start, not peftlab's CLI imports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

STEPS, STOP_AFTER = 4, 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.inner(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.embed.weight.requires_grad_(False)  # frozen beside trainable, in one unit
        self.blocks = nn.ModuleList([Block(), Block(), Block()])
        self.temperature = nn.Parameter(torch.tensor(1.5))  # a scalar: kept whole
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x) * self.temperature


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(STEPS, 6, 4, generator=generator), torch.randint(0, 3, (STEPS, 6), generator=generator)


def _fresh():
    torch.manual_seed(0)
    model = Net()
    return model


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)


def _step(model, optimizer, x, y, clip):
    nn.functional.cross_entropy(model(x), y).backward()
    clip(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _whole_run() -> dict[str, torch.Tensor]:
    model = _fresh()
    optimizer = _optimizer(model)
    xs, ys = _data()
    for step in range(STEPS):
        _step(model, optimizer, xs[step], ys[step],
              lambda m: torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 0.5))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _sharded_worker(rank: int, folder: Path, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=2)
    try:
        for name, resume, keep_gathered in (("sharded", False, False), ("resumed", True, False),
                                            ("kept gathered", False, True)):
            results_of_run = _sharded_training(rank, resume, keep_gathered, folder / "checkpoints")
            if rank == 0:
                results[name] = results_of_run
    finally:
        dist.destroy_process_group()


def _schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _sharded_training(rank: int, resume: bool, keep_gathered: bool, checkpoints: Path) -> dict | None:
    from peftlab.shared import checkpoint, sharding

    xs, ys = _data()
    share = slice(0, 3) if rank == 0 else slice(3, 6)

    def clip(m):
        sharding.average_replicated_gradients(m)
        sharding.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 0.5)

    model = _fresh()
    units = sharding.shard(model, torch.device("cpu"), keep_gathered_for_backward=keep_gathered)
    with torch.no_grad():  # after a forward, a block's parameters are whole only if kept gathered
        model(xs[0][share])
    kept_whole = not isinstance(model.blocks[0].inner.weight, DTensor)
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()  # back to shards, as a backward pass would leave them
    optimizer = _optimizer(model)
    for step in range(STEPS):
        if resume and step == STOP_AFTER:  # peftlab's checkpoint files, read by a new sharded model
            checkpoint.save_checkpoint(checkpoints, model, optimizer, _schedule(optimizer), {"global_step": step},
                                       write=rank == 0)
            dist.barrier()
            model = _fresh()
            sharding.shard(model, torch.device("cpu"), keep_gathered_for_backward=keep_gathered)
            optimizer = _optimizer(model)
            assert checkpoint.load_checkpoint(checkpoints, model, optimizer, _schedule(optimizer)) == {"global_step": 2}
        _step(model, optimizer, xs[step][share], ys[step][share], clip)
    result = None
    with sharding.gathered(model):
        if rank == 0:  # the main process reads and runs the gathered model alone
            result = {"weights": {name: p.detach().clone() for name, p in model.named_parameters()},
                      "units": units, "output": model(xs[0]).detach(), "kept_whole": kept_whole}
    dist.barrier()
    return result


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict:
    """The sharded trainings' results by name, from one pair of processes."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sharded_worker, args=(tmp_path_factory.mktemp("fsdp"), results), nprocs=2)
        return dict(results)


def test_repeated_blocks_are_the_members_of_lists_of_one_kind():
    from peftlab.shared.sharding import repeated_blocks

    model = Net()
    assert repeated_blocks(model) == list(model.blocks)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))  # not one kind: not blocks
    assert repeated_blocks(nn.ModuleDict({"mlp": mixed})) == []


@pytest.mark.parametrize("run", ["sharded", "kept gathered"])
def test_two_sharded_processes_train_like_one_whole_model(run, sharded_runs):
    whole = _whole_run()
    sharded = sharded_runs[run]
    assert sharded["units"] == 4  # three blocks and the rest
    assert sharded["kept_whole"] == (run == "kept gathered")
    assert sharded["weights"].keys() == whole.keys()
    for name, value in whole.items():
        torch.testing.assert_close(sharded["weights"][name], value, rtol=0, atol=1e-6, msg=name)
    assert whole["temperature"] != 1.5  # the replicated scalar trained, and alike on both
    with torch.no_grad():
        model = _fresh()
        model.load_state_dict(whole)
        torch.testing.assert_close(sharded["output"], model(_data()[0][0]), rtol=0, atol=1e-5)


def test_a_sharded_run_resumed_from_its_gathered_state_ends_where_an_uninterrupted_one_does(sharded_runs):
    uninterrupted, resumed = sharded_runs["sharded"]["weights"], sharded_runs["resumed"]["weights"]
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
