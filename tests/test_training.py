"""The training loop: crash-safe resume, gradient accumulation, optimizer state only
for trainable parameters, early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_peftlab
from peftlab.shared import io

SETTINGS = ["train.epochs=2", "train.checkpoint_every=3", "train.early_stopping_patience=2", "data.limit.train=192"]


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("adapter_model.safetensors", "head.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in io.load_tensors(run_dir / "adapter" / name).items()})
    return tensors


def _start(run_dir: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    script = Path(sys.executable).parent / "peftlab"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "peftlab.pipelines.cli"]
    return subprocess.Popen([*command, "run", "protein-classify", "--demo", "--out", str(run_dir), *SETTINGS],
                            stdout=subprocess.DEVNULL, stderr=stderr, env=os.environ.copy(), text=True)


def _wait_for_checkpoint(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    state_file = run_dir / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if state_file.is_file() and json.loads(state_file.read_text())["train"]["global_step"] >= step:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be stopped"


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    assert run_peftlab("run", "protein-classify", "--demo", "--out", reference, *SETTINGS).returncode == 0

    interrupted = tmp_path / "interrupted"
    process = _start(interrupted)
    state_file = interrupted / "checkpoints" / "last" / "state.json"
    _wait_for_checkpoint(process, interrupted, 3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "metrics.json").exists()
    saved = json.loads(state_file.read_text())["train"]
    assert saved["global_step"] < saved["total_steps"]

    resumed = run_peftlab("run", "--resume", interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stderr
    ours, theirs = _adapter_tensors(interrupted), _adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours_metrics = json.loads((interrupted / "metrics.json").read_text())
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    assert ours_metrics["test"] == reference_metrics["test"]

    finished = run_peftlab("run", "--resume", interrupted)
    assert finished.returncode == 2 and "already finished" in finished.stderr


def test_ctrl_c_says_how_to_resume_the_run_and_from_which_checkpoint(tmp_path):
    interrupted = tmp_path / "interrupted"
    process = _start(interrupted, stderr=subprocess.PIPE)
    _wait_for_checkpoint(process, interrupted, 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    step = (interrupted / "checkpoints" / "last").resolve().name
    assert process.returncode == 130
    assert f"interrupted; `peftlab run --resume {interrupted}` continues it from its checkpoint {step}" in stderr
    # said once, with how to resume (not again bare), and no traceback
    assert "interrupted" not in [line.strip() for line in stderr.splitlines()]
    assert "Traceback" not in stderr and "aborted" not in stderr


def test_optimizer_state_only_for_trainable_parameters_and_accumulation(tmp_path):
    import peftlab

    run_dir = peftlab.run("protein-classify", demo=True, out=tmp_path / "run",
                          overrides={"train.epochs": 1, "train.grad_accum": 2, "train.batch_size": 8})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 400 training examples, batches of 8, two micro-batches a step
    assert metrics["train"]["steps"] == 25
    optimizer = io.load_tensors(run_dir / "checkpoints" / "last" / "optimizer.safetensors")
    trainable = io.load_tensors(run_dir / "checkpoints" / "last" / "trainable.safetensors")
    moments = {k for k in optimizer if k.endswith("exp_avg")}
    assert len(moments) == len(trainable)
    assert sum(optimizer[k].numel() for k in moments) == metrics["params"]["trainable"]


def test_early_stopping_stops_when_validation_stalls(tmp_path):
    import peftlab

    # lr so small nothing improves after the first epoch
    run_dir = peftlab.run("protein-classify", demo=True, out=tmp_path / "run",
                          overrides={"train.epochs": 10, "train.lr": 1e-9, "train.early_stopping_patience": 2})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["epochs"] < 10
    assert metrics["train"]["best_epoch"] <= metrics["train"]["epochs"] - 2


@pytest.mark.parametrize("keep", ["best", "last"])
def test_train_keep_chooses_the_model_that_is_evaluated_and_saved(tmp_path, keep):
    """train.keep=best (default) keeps the best validated epoch's weights; keep=last the
    weights as training ends (pyreft's protocol), whatever validation said."""
    import peftlab
    from peftlab.shared import checkpoint
    from peftlab.shared.training import BEST_STATE

    run_dir = peftlab.run("protein-classify", demo=True, out=tmp_path / keep,
                          overrides={"train.epochs": 3, "train.keep": keep, "train.early_stopping_patience": None,
                                     "data.limit": {"train": 64, "validation": 32, "test": 32}})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    kept = run_dir / (BEST_STATE if keep == "best" else Path("checkpoints") / "last" / "trainable.safetensors")
    assert (run_dir / BEST_STATE).is_file() == (keep == "best")
    assert metrics["train"]["kept_epoch"] == (metrics["train"]["best_epoch"] if keep == "best" else 3)
    predictor = peftlab.load(run_dir)
    saved = io.load_tensors(kept)
    state = checkpoint.trainable_state(predictor.model)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert predictor.evaluate("test") == metrics["test"]


def test_an_undefined_validation_metric_neither_stops_training_nor_passes_silently(tmp_path, capsys):
    import peftlab

    # one validation example: AUROC is undefined at every epoch
    run_dir = peftlab.run("protein-classify", demo=True, out=tmp_path / "run",
                          overrides={"train.epochs": 3, "train.early_stopping_patience": 1, "eval.primary_metric": "auroc",
                                     "data.limit": {"train": 64, "validation": 1, "test": 32}})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["epochs"] == 3 and metrics["train"]["best_epoch"] is None
    err = capsys.readouterr().err
    assert "note: validation auroc was undefined at every epoch" in err
    assert "validation auroc n/a (best n/a)\n" in err and "epoch None" not in err


def test_an_epoch_cut_short_by_max_steps_reports_the_mean_loss_of_its_steps(tmp_path):
    import peftlab

    def first_epoch_loss(name, steps):
        # lr so small the weights stay put: every batch's loss is the untrained model's
        overrides = {"train.epochs": 1, "train.lr": 1e-9, "eval.splits": [], **({"train.max_steps": steps} if steps else {})}
        run_dir = peftlab.run("protein-classify", demo=True, out=tmp_path / name, overrides=overrides)
        return json.loads((run_dir / "metrics.json").read_text())["history"][0]["train_loss"]

    whole, cut = first_epoch_loss("whole", None), first_epoch_loss("cut", 3)
    assert 0.5 < cut / whole < 2, (cut, whole)  # was 3 batches' losses over the epoch's ~50


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_setting_is_recorded(tmp_path, precision):
    import peftlab

    run_dir = peftlab.run("protein-classify", demo=True, out=tmp_path / "run",
                          overrides={"train.max_steps": 2, "train.precision": precision})
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["precision"] == precision


def test_auto_precision_keeps_fp32_for_narrow_models_on_every_device(monkeypatch):
    from peftlab.shared import training
    from torch import nn

    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    narrow = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(256, 64))
    wide = nn.Sequential(nn.Linear(320, 1280), nn.Linear(1280, 320), nn.Linear(320, 320))
    assert training.typical_layer_width(narrow) == 64 and training.typical_layer_width(wide) == 320
    assert training.resolve_precision("auto", narrow) == "fp32"
    assert training.resolve_precision("auto", wide) == "bf16"
    assert training.resolve_precision("auto") == "bf16"
    assert training.resolve_precision("bf16", narrow) == "bf16"  # an explicit choice stands
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    assert training.resolve_precision("auto", wide) == "fp32"
    # on a GPU too, narrow models stay fp32 (launch-bound: bf16 would only cost accuracy)
    monkeypatch.setattr(training.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training.torch.cuda, "is_bf16_supported", lambda: True)
    assert training.resolve_precision("auto", narrow) == "fp32"
    assert training.resolve_precision("auto", wide) == "bf16"


def test_attention_kernels_leave_out_cudnn_and_restore_the_setting():
    """cuDNN's fused attention builds a plan per sequence length (29 ms of CPU per
    backward call on an H100, profiled); training and inference switch it off while
    they run, and leave the process's setting as it was."""
    from peftlab.shared.evaluation import attention_kernels

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.parametrize("task_name", ["protein-ppi", "protein-classify", "medical-classify", "pointcloud-classify",
                                       "speech-emotion", "code-review-necessity"])
def test_classifier_heads_score_in_fp32_under_bf16_autocast(task_name):
    """bf16 logits gave different inputs the same score: ties in the rankings AUROC and
    AUPR measure. The head runs in fp32, the backbone in bf16 as before."""
    from conftest import tiny_model_with_default_method
    from peftlab.shared.tasks import FP32Head

    model, batch, _ = tiny_model_with_default_method(task_name)
    model.eval()
    head = next(m for m in model.head.modules() if isinstance(m, FP32Head))
    features = next(m for m in head if isinstance(m, torch.nn.Linear)).in_features
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch)
        fine = head(torch.linspace(0, 1e-3, 16 * features).view(16, features))
    assert logits.dtype == fine.dtype == torch.float32
    assert len(set(fine[:, 0].tolist())) == 16  # 1e-3 apart in the input: 16 distinct scores


def test_log_lines_during_training_start_their_own_line(tmp_path, capsys):
    """Into a file the progress bar's last state and an epoch's line were one line."""
    from peftlab.pipelines import runner

    config = runner.build_config("protein-ppi", demo=True, overrides=["train.epochs=2", "data.limit.train=32",
                                                                      "data.limit.validation=16", "data.limit.test=16"])
    runner.run(config, out=tmp_path / "run")
    err = capsys.readouterr().err
    assert "epoch 1: train loss" in err and "epoch 2: train loss" in err
    assert all(err[err.index(line) - 1] in "\r\n" for line in ("epoch 1: train loss", "epoch 2: train loss"))
