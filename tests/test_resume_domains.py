"""Crash safety in every domain: a run stopped right after a mid-epoch checkpoint, then
resumed, ends with exactly the weights (adapter, head, buffers), metrics and training
history of an uninterrupted run. (The subprocess SIGKILL test is in test_training.py.)

Each case trains 2 epochs of 4 steps on its tiny demo setting and stops after the
checkpoint at step 3, so the resumed run finishes an epoch, evaluates, keeps its best
checkpoint and trains another. What each adds that a resume must restore besides the
optimizer and scheduler:
- pointcloud: numpy augmentation drawn per batch, head dropout from the torch RNG,
  BatchNorm buffers saved beside the adapter;
- medical imaging: random crops and flips per batch;
- speech emotion: a LoRA backbone with a hidden-layer head;
- code review (necessity): a causal LM as a classifier, prompts truncated to length;
- video-text retrieval: a contrastive loss over the batch, LoRA on both CLIP towers;
- reasoning (commonsense): a causal LM trained whole, scored by generated answers;
- protein-ppi: pairs of sequences, combined as [mean, a*b].
"""

from __future__ import annotations

import json

import pytest
import torch
from peftlab.pipelines import runner
from peftlab.shared import checkpoint, io

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

STEPS_PER_EPOCH = 4
STOP_AFTER_STEP = 3  # a mid-epoch checkpoint of epoch 1

# pipeline -> its settings; batch_size x STEPS_PER_EPOCH training examples each
CASES = {
    "pointcloud-classify": ["train.batch_size=8", "data.limit.train=32", "data.limit.validation=16", "data.limit.test=16",
                            "task.num_points=128"],
    "medical-classify": ["train.batch_size=8", "data.limit.train=32", "data.limit.validation=16", "data.limit.test=16"],
    "speech-emotion": ["train.batch_size=8", "data.limit.train=32", "data.limit.validation=16", "data.limit.test=16"],
    "code-review-necessity": ["train.batch_size=4", "data.limit.train=16", "data.limit.validation=8", "data.limit.test=8",
                              "task.max_prompt_tokens=64"],
    "video-text-retrieval": ["train.batch_size=4", "data.limit.train=16", "data.limit.validation=8", "data.limit.test=8",
                             "task.frames=2"],
    "reasoning-commonsense": ["train.batch_size=4", "data.limit.train=16", "data.limit.validation=8", "data.limit.test=8"],
    "protein-ppi": ["train.batch_size=8", "data.limit.train=32", "data.limit.validation=16", "data.limit.test=16"],
}
COMMON = ["train.epochs=2", f"train.checkpoint_every={STOP_AFTER_STEP}", "train.early_stopping_patience=2",
          "train.precision=fp32"]


class Stop(Exception):
    """Stands in for the kill: nothing after the checkpoint happens."""


def _saved(run_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((run_dir / "adapter").glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in io.load_tensors(path).items()})
    return tensors


@pytest.mark.parametrize("pipeline", list(CASES))
def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_result(pipeline, tmp_path, monkeypatch, capsys):
    config = runner.build_config(pipeline, demo=True, overrides=CASES[pipeline] + COMMON)
    reference = runner.run(config, out=tmp_path / "reference")
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    assert reference_metrics["train"]["steps"] == 2 * STEPS_PER_EPOCH  # the stop below is mid-epoch 1

    original = checkpoint.save_checkpoint

    def save_then_stop(directory, model, optimizer, scheduler, state, **options):
        original(directory, model, optimizer, scheduler, state, **options)
        if state["global_step"] == STOP_AFTER_STEP:
            raise Stop

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Stop):
        runner.run(config, out=interrupted)
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    assert not (interrupted / "metrics.json").exists()
    state = json.loads((interrupted / "checkpoints" / "last" / "state.json").read_text())["train"]
    assert (state["global_step"], state["epoch"]) == (STOP_AFTER_STEP, 0)

    if pipeline == "protein-ppi":  # a copy that dropped the `last` symlink (zip, object stores) resumes all the same
        (interrupted / "checkpoints" / "last").unlink()
    capsys.readouterr()
    runner.resume(interrupted)
    # it continued from the checkpoint (a fresh start would match the reference too)
    assert (f"resumed from step {STOP_AFTER_STEP} of {2 * STEPS_PER_EPOCH} (after step {STOP_AFTER_STEP} of epoch 1; "
            f"step-{STOP_AFTER_STEP:08d})") in capsys.readouterr().err
    ours, theirs = _saved(interrupted), _saved(reference)
    assert ours and ours.keys() == theirs.keys()
    if pipeline == "pointcloud-classify":  # BatchNorm running statistics travel with the adapter
        assert any(k.startswith("buffers.safetensors:") for k in ours)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    metrics = json.loads((interrupted / "metrics.json").read_text())
    assert metrics["history"] == reference_metrics["history"]
    assert metrics["test"] == reference_metrics["test"]
    assert (metrics["train"]["resumed_at_steps"], reference_metrics["train"]["resumed_at_steps"]) == ([STOP_AFTER_STEP], [])
