"""Crash safety beyond protein: a point-cloud run stopped right after a mid-epoch
checkpoint, then resumed, ends with exactly the weights (adapter, head, BatchNorm
buffers), metrics and training history of an uninterrupted run. Point clouds exercise
what a resume must restore besides the optimizer: numpy augmentation drawn per batch
and head dropout from the torch RNG. (The subprocess SIGKILL test is in test_training.py.)"""

from __future__ import annotations

import json

import torch
from peftlab.pipelines import runner
from peftlab.shared import checkpoint, io

SETTINGS = ["train.epochs=2", "train.checkpoint_every=3", "train.early_stopping_patience=2", "train.batch_size=16",
            "data.limit.train=64", "data.limit.validation=32", "data.limit.test=32", "train.precision=fp32"]


class Stop(Exception):
    """Stands in for the kill: nothing after the checkpoint happens."""


def _saved(run_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((run_dir / "adapter").glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in io.load_tensors(path).items()})
    return tensors


def test_pointcloud_run_stopped_after_a_checkpoint_resumes_to_the_same_result(tmp_path, monkeypatch):
    config = runner.build_config("pointcloud-classify", demo=True, overrides=SETTINGS)
    reference = runner.run(config, out=tmp_path / "reference")

    original = checkpoint.save_checkpoint

    def save_then_stop(directory, model, optimizer, scheduler, state):
        original(directory, model, optimizer, scheduler, state)
        if state["global_step"] == 3:  # mid-epoch 1 (4 steps per epoch)
            raise Stop

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    interrupted = tmp_path / "interrupted"
    try:
        runner.run(config, out=interrupted)
        raise AssertionError("the run was not stopped")
    except Stop:
        pass
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    assert not (interrupted / "metrics.json").exists()
    assert json.loads((interrupted / "checkpoints" / "last" / "state.json").read_text())["train"]["global_step"] == 3

    runner.resume(interrupted)
    ours, theirs = _saved(interrupted), _saved(reference)
    assert ours.keys() == theirs.keys() and any(k.startswith("buffers.safetensors:") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (interrupted, reference)]
    assert metrics[0]["test"] == metrics[1]["test"] and metrics[0]["history"] == metrics[1]["history"]
