"""Crash-safe checkpoints in safetensors + JSON (no pickles).

`checkpoints/last` is a symlink to a complete `step-N/` folder, swapped atomically
after the new folder is fully written, so a run killed at any moment still has an
intact previous checkpoint to resume from (a copy that lost the symlink resumes from
the highest complete `step-N/`).
"""

from __future__ import annotations

import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peftlab.shared import io, sharding
from peftlab.shared.errors import UserError
from safetensors import SafetensorError, safe_open
from torch import nn


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changes: trainable parameters, BatchNorm running stats, and
    buffers a PEFT method fills while training (e.g. a memory bank)."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    state.update(batchnorm_buffers(model))
    for module_name, module in model.named_modules():
        if hasattr(module, "method_buffers"):
            prefix = f"{module_name}.model." if module_name else "model."
            state.update({prefix + name: b.detach() for name, b in module.method_buffers().items()})
    return state


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    # Running statistics move during training even when the norm's affine is frozen,
    # so they belong to the adapter.
    buffers = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    buffers[f"{module_name}.{buffer_name}" if module_name else buffer_name] = buffer.detach()
    return buffers


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    missing = [k for k in tensors if k not in own]
    if missing:
        raise ValueError(f"{source}: tensors {missing[:3]} do not exist in the model")
    if sharding.is_sharded(model):
        sharding.load_model_tensors(model, tensors)
        return
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


def _optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, slots in state_dict["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_files(model, optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    sharding.load_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: Path, model, optimizer, scheduler, train_state: dict, write: bool = True) -> None:
    """Every process of a run calls this (a sharded model's state is gathered from all of
    them); the one with `write` (the main process) writes."""
    optimizer_state = sharding.optimizer_state_dict(model, optimizer)
    sharded = sharding.is_sharded(model)
    with sharding.gathered(model):  # copies: a gathered parameter's memory is freed on leaving
        trainable = {name: tensor.clone() if sharded else tensor for name, tensor in trainable_state(model).items()}
    if not write:
        return
    directory = Path(directory)
    step_dir = directory / f"step-{train_state['global_step']:08d}"
    if step_dir.exists():
        shutil.rmtree(step_dir)
    step_dir.mkdir(parents=True)
    io.save_tensors(step_dir / "trainable.safetensors", trainable)
    optimizer_tensors, optimizer_meta = _optimizer_to_files(optimizer_state)
    io.save_tensors(step_dir / "optimizer.safetensors", optimizer_tensors)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    io.save_tensors(step_dir / "rng.safetensors", rng)
    # LambdaLR stores None for plain-function lambdas: the state is plain JSON.
    scheduler_state = scheduler.state_dict()
    io.write_json(step_dir / "state.json", {
        "train": train_state,
        "optimizer": optimizer_meta,
        "scheduler": scheduler_state,
        "python_random": _jsonable(random.getstate()),
    })
    link = directory / "last"
    tmp_link = directory / f".last.{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(step_dir.name, tmp_link)
    os.replace(tmp_link, link)  # the atomic switch
    for old in directory.glob("step-*"):
        if old.name != step_dir.name:
            shutil.rmtree(old, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The checkpoint to resume from: `last`, else (a copy that dropped the symlink: zip,
    object stores, rsync without -l) the highest complete `step-N/`; None if there is none."""
    directory = Path(directory)
    if (directory / "last" / "state.json").is_file():
        return directory / "last"
    complete = [d for d in directory.glob("step-*") if (d / "state.json").is_file() and d.name[5:].isdigit()]
    return max(complete, key=lambda d: int(d.name[5:]), default=None)


def has_checkpoint(directory: Path) -> bool:
    return latest(directory) is not None


@contextmanager
def _resumable(last: Path):
    """Reading `last` fails as one UserError naming it. Checkpoints are swapped in
    atomically, so a crash never leaves a damaged one: its files were changed by hand, or
    the run's config no longer builds the same model."""
    try:
        yield
    except (UserError, OSError, KeyError, ValueError, SafetensorError) as error:
        where = "" if str(last) in str(error) else f"{last.resolve()}: "
        raise UserError(f"{where}{str(error).splitlines()[0]}; this checkpoint cannot be resumed (damaged, "
                        f"or from another model): start the run again without --resume") from None


def check_checkpoint(directory: Path) -> None:
    """Read the last checkpoint's state and tensor headers: a damaged one fails before any
    model is built."""
    last = latest(directory)
    with _resumable(last):
        saved = io.read_json(last / "state.json")
        for key in ("train", "optimizer", "scheduler", "python_random"):
            saved[key]  # noqa: B018 - a KeyError names the missing part
        for name in ("trainable", "optimizer", "rng"):
            with safe_open(str(last / f"{name}.safetensors"), "pt"):
                pass


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> dict:
    last = latest(directory)
    with _resumable(last):
        saved = io.read_json(last / "state.json")
        load_state(model, io.load_tensors(last / "trainable.safetensors"), str(last))
        _optimizer_from_files(model, optimizer, io.load_tensors(last / "optimizer.safetensors"), saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng = io.load_tensors(last / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tuples(saved["python_random"]))
    return saved["train"]


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
