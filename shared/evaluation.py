"""Evaluation shared by training, `peftlab eval` and `peftlab predict`.

A model's per-example output is a row of `model.scores(model(batch))` (class
probabilities), or, for models that generate (text, captions), whatever their
`predict(batch)` returns per example. Metrics come from the registry over the labels
and scores, unless the task computes its own (`task.compute_metrics`); examples that
carry a `group` also get each metric per group and the worst-group gap.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from peftlab.shared import metrics
from peftlab.shared.data import BucketBatchSampler
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import Example


def attention_kernels():
    """Fused attention (torch SDPA) without cuDNN's kernel, for the block's duration.

    cuDNN builds an execution plan for each new sequence length: on an H100, 29 ms of
    CPU per backward call and 4-7 ms per forward against ~0.1 ms of GPU work, and the
    batches here vary in length. The flash and memory-efficient kernels need no plan.
    CPUs have no cuDNN kernel, so nothing changes there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.inference_mode()
def predict_outputs(model, examples: Sequence[Example], batch_size: int, autocast, progress: str | None = None) -> list[Any]:
    """Outputs for `examples` in their order; batches are length-sorted, deterministically.
    `progress` names a progress bar on stderr (none when not given: a server, validation)."""
    if not examples:
        return []
    with attention_kernels():
        return _predict_outputs(model, examples, batch_size, autocast, progress)


def _predict_outputs(model, examples: Sequence[Example], batch_size: int, autocast, progress: str | None) -> list[Any]:
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    sampler = BucketBatchSampler([model.example_length(e) for e in examples], batch_size, seed=0, shuffle=False)
    device = next(model.parameters()).device
    outputs: dict[int, Any] = {}
    batches = tqdm(sampler, desc=progress, unit="batch", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                   leave=False, **hidden_unless(progress is not None))
    with batches:  # closed on an error too, so the error is not written after the bar
        for indices in batches:
            batch = to_device(model.collate([examples[i] for i in indices], rng=None), device)
            with autocast():
                if hasattr(model, "predict"):
                    rows = model.predict(batch)
                else:
                    rows = list(model.scores(model(batch)).float().cpu().numpy())
            outputs.update(zip(indices, rows))
    model.train(was_training)
    return [outputs[i] for i in range(len(examples))]


def hidden_unless(shown: bool) -> dict[str, bool]:
    """tqdm's `disable` for a bar shown only sometimes: left out where it is shown, since an
    explicit `disable=False` overrides tqdm's environment defaults and `TQDM_DISABLE=1`
    would no longer hide it."""
    return {} if shown else {"disable": True}


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """Tensors of a batch onto the model's device (other values stay as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def compute_metrics(task, metric_names: Sequence[str], examples: Sequence[Example], outputs: list[Any]) -> dict:
    if hasattr(task, "compute_metrics"):
        return task.compute_metrics(metric_names, examples, outputs)
    labels = [e["label"] for e in examples]
    scores = np.stack(outputs)
    result: dict[str, Any] = metrics.compute(metric_names, labels, scores)
    if all("group" in e for e in examples):
        result["by_group"] = metrics.compute_by_group(metric_names, labels, scores, [e["group"] for e in examples])
    return result


def _finite(output) -> bool:
    """Whether a model output (scores, embeddings, or generated text) holds no NaN or inf."""
    if isinstance(output, dict):
        return all(_finite(value) for value in output.values())
    if isinstance(output, np.ndarray | np.generic | float) and np.issubdtype(np.asarray(output).dtype, np.floating):
        return bool(np.isfinite(output).all())
    return True


def check_finite(examples: Sequence[Example], outputs: list[Any]) -> None:
    """Refuse outputs with NaN or inf, naming the first such input: a metric over them
    would count NaN as class 0 or fail inside sklearn."""
    for example, output in zip(examples, outputs):
        if not _finite(output):
            raise UserError(f"{example['id']}: the model's scores for this input are not finite numbers; its "
                            f"values are outside the range the model computes in (check its scale)")


def evaluate(task, model, examples, metric_names, batch_size, autocast, progress: str | None = None,
             outputs_of=None) -> tuple[dict, list[Any]]:
    """Metrics of `model` on `examples`, and its outputs; `outputs_of(examples, progress)`
    computes the outputs instead where the model runs elsewhere (a served, shared backbone)."""
    outputs = predict_outputs(model, examples, batch_size, autocast, progress) if outputs_of is None \
        else outputs_of(examples, progress)
    check_finite(examples, outputs)
    return compute_metrics(task, metric_names, examples, outputs), outputs
