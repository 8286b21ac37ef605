"""Multi-process (DDP) training: `peftlab run --num-processes 2` on the CPU (gloo) against
one process with the same global batch.

Both runs walk the same global batches; each of the two processes trains on half of
every batch and DDP averages the gradients, weighted so that a step follows the
gradient of the whole batch's mean loss. With dropout off and fp32, the only
difference is the order of floating-point sums (a half-batch mean, then the average of
two), so the runs agree to float32 rounding: adapter weights within 1e-5 (observed
~3e-8 after 12 steps), the train loss within 1e-5 relative, and every evaluation
metric within 1e-3 (observed: identical). Dropout or augmentation would draw
different random numbers per process, and the runs would then agree only
statistically.

With `train.sharding=fsdp` each process keeps half of every parameter, gradient and
optimizer slot instead; the sums run in the same two halves, so the same tolerances
hold, and the checkpoint it writes (gathered from the shards) has the single-process
run's files and layout. accelerate's own FSDP and DeepSpeed launches are refused: on
CPUs accelerate runs DDP under them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_peftlab
from peftlab.pipelines.cli import main
from peftlab.shared import io

SETTINGS = ["train.max_steps=12", "train.epochs=1", "train.batch_size=16", "data.limit.train=192",
            "method.dropout=0", "task.head_dropout=0", "train.precision=fp32"]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("adapter_model.safetensors", "head.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in io.load_tensors(run_dir / "adapter" / name).items()})
    return tensors


pytestmark = pytest.mark.xdist_group("one-process-reference")  # computed once, for both comparisons


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    assert main(["run", "protein-classify", "--demo", "--out", str(run_dir), *SETTINGS]) == 0
    return run_dir


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="NCCL needs a GPU per process and this machine has one")
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(sharding, single, tmp_path):
    # no --out: the main process picks the run directory and the other one learns it
    result = run_peftlab("run", "protein-classify", "--demo", "--num-processes", "2", *SETTINGS,
                         f"train.sharding={sharding}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    made = list((tmp_path / "runs" / "protein-classify").iterdir())
    assert len(made) == 1, made
    multi = made[0]
    # one process reports: one JSON line, one epoch line, one checkpoint
    assert len(result.stdout.strip().splitlines()) == 1
    assert json.loads(result.stdout)["run_dir"] == str(Path("runs") / "protein-classify" / multi.name)
    assert result.stderr.count("epoch 1: train loss") == 1
    assert [p.name for p in (multi / "checkpoints").glob("step-*")] == ["step-00000012"]

    ours, theirs = _adapter(multi), _adapter(single)
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    multi_metrics, single_metrics = (json.loads((d / "metrics.json").read_text()) for d in (multi, single))
    assert multi_metrics["train"]["steps"] == single_metrics["train"]["steps"] == 12
    assert multi_metrics["history"][0]["train_loss"] == pytest.approx(single_metrics["history"][0]["train_loss"], rel=1e-5)
    for split in ("validation", "test"):
        for name, value in single_metrics[split].items():
            assert multi_metrics[split][name] == pytest.approx(value, abs=1e-3), (split, name)
    # the checkpoint, sharded or not, is the single-process one: same files, same layout
    ours, theirs = (io.load_tensors(d / "checkpoints" / "last" / "optimizer.safetensors") for d in (multi, single))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    layout = [json.loads((d / "checkpoints" / "last" / "state.json").read_text())["optimizer"] for d in (multi, single)]
    assert layout[0] == layout[1]
    assert ("fsdp: parameters, gradients and optimizer state sharded over 2 processes" in result.stderr) == (
        sharding == "fsdp")


def test_batch_shares_cover_the_global_batch_with_weights_that_restore_its_mean():
    from peftlab.shared.training import batch_share

    batch = list(range(10, 17))  # 7 examples over 3 processes: 3 + 2 + 2
    shares = [batch_share(batch, rank, 3) for rank in range(3)]
    assert [s for s, _ in shares] == [[10, 11, 12], [13, 14], [15, 16]]
    # DDP averages the processes' weighted means: (1/3) sum(w_r mean_r) = the batch mean
    values = {i: float(i * i) for i in batch}
    averaged = sum(w * sum(values[i] for i in s) / len(s) for s, w in shares) / 3
    assert averaged == pytest.approx(sum(values.values()) / len(batch))
    # fewer examples than processes: a stand-in example that weighs nothing
    assert batch_share([4], 1, 2) == ([4], 0.0)
    assert batch_share(batch, 0, 1) == (batch, 1.0)


@pytest.mark.parametrize("sharding", ["FSDP", "DEEPSPEED"])
def test_a_launch_asking_for_sharded_training_is_refused_with_nothing_written(sharding, tmp_path, monkeypatch, capsys):
    # what `accelerate launch` with an FSDP or DeepSpeed distributed_type sets; on CPUs accelerate
    # would otherwise run DDP under that config without a word (peftlab shards with train.sharding)
    monkeypatch.setenv(f"ACCELERATE_USE_{sharding}", "true")
    out = tmp_path / "run"
    assert main(["run", "protein-classify", "--demo", "--out", str(out), "train.max_steps=1"]) == 2
    assert f"peftlab does not run accelerate's {sharding}; launch with torchrun" in capsys.readouterr().err
    assert not out.exists()


def test_more_processes_than_gpus_stop_with_a_clear_error(monkeypatch):
    # NCCL would fail deep inside the first collective ("Duplicate GPU detected")
    from peftlab.shared import training
    from peftlab.shared.errors import UserError

    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="2 processes on this machine but 1 GPU.*start at most 1"):
        training.process_state()
