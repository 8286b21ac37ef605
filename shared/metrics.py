"""The metrics registry, over scikit-learn (imported at the first metric computed).

Canonical names are the same in every domain and in `metrics.json`; values are
fractions in [0, 1] (ranks stay ranks). Classification metrics take the true class
indices and the predicted scores: shape (N,) positive-class probabilities for binary
tasks, (N, K) class probabilities otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from peftlab.shared.errors import UserError, did_you_mean
from peftlab.shared.lazy import lazy_import

skm = lazy_import("sklearn.metrics")


@dataclass(frozen=True)
class Metric:
    name: str
    # None: a value that only the tasks listing it in their `metrics` derive, in their
    # `compute_metrics` (reasoning's accuracy_avg); registered for its name and direction.
    fn: Callable[[np.ndarray, np.ndarray], float | None] | None
    higher_is_better: bool = True
    scores: str = "classes"
    """What it scores: `classes` (class scores against labels), `text` (generated text
    against references) or `ranking` (a query-item similarity matrix)."""


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, fn: Callable | None, higher_is_better: bool = True, scores: str = "classes") -> None:
    if name in _METRICS:
        raise ValueError(f"metric {name!r} is registered twice")
    _METRICS[name] = Metric(name, fn, higher_is_better, scores)


def get_metric(name: str) -> Metric:
    if name not in _METRICS:
        raise UserError(f"unknown metric {name!r}{did_you_mean(name, _METRICS)}")
    return _METRICS[name]


def list_metrics() -> list[str]:
    return sorted(_METRICS)


def metrics_scoring(what: str) -> tuple[str, ...]:
    """The metrics that score `what` (a `Metric.scores`) and compute themselves: the ones
    a task with such outputs can be asked for, unless it says otherwise."""
    return tuple(name for name, metric in sorted(_METRICS.items()) if metric.scores == what and metric.fn is not None)


def predicted_classes(scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return (scores >= threshold).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)


def _is_binary(scores: np.ndarray) -> bool:
    return scores.ndim == 1


def _only_one_class(y: np.ndarray) -> bool:
    return len(np.unique(y)) < 2


def _auroc(y, scores):
    if _only_one_class(y):
        return None  # undefined: no ranking to judge with a single class present
    if _is_binary(scores):
        return skm.roc_auc_score(y, scores)
    present = np.unique(y)
    if len(present) < scores.shape[1]:
        # one-vs-rest over the classes that occur, so a rare class missing from a split
        # does not make the whole metric undefined
        return float(np.mean([skm.roc_auc_score(y == c, scores[:, c]) for c in present]))
    return skm.roc_auc_score(y, scores, multi_class="ovr", average="macro")


def _aupr(y, scores):
    if _only_one_class(y):
        return None
    if _is_binary(scores):
        return skm.average_precision_score(y, scores)
    return float(np.mean([skm.average_precision_score(y == c, scores[:, c]) for c in np.unique(y)]))


def _binary_or_macro(sklearn_name: str):
    """A binary value that divides by zero (recall with no positives, precision with none
    predicted) is undefined, None, as AUROC with one class is: a 0 would read as a
    failure and open a group gap of 1. A macro average keeps sklearn's 0 for such a class."""
    def metric(y, scores):
        if _is_binary(scores):
            return getattr(skm, sklearn_name)(y, predicted_classes(scores), average="binary", zero_division=np.nan)
        return getattr(skm, sklearn_name)(y, predicted_classes(scores), average="macro", zero_division=0)

    return metric


def _mcc(y, scores):
    if _only_one_class(y):
        return None  # undefined: with one class there is no correlation to measure
    return skm.matthews_corrcoef(y, predicted_classes(scores))


def _two_classes_as_binary(fn):
    """Two columns of class probabilities are a binary task's: scored on the second
    class's column, as a one-column task is (a two-class point-cloud or image run)."""
    return lambda y, scores: fn(y, scores[:, 1] if scores.ndim == 2 and scores.shape[1] == 2 else scores)


for _name, _fn in {
    "accuracy": lambda y, s: skm.accuracy_score(y, predicted_classes(s)),
    "balanced_accuracy": lambda y, s: skm.balanced_accuracy_score(y, predicted_classes(s)),
    "uar": lambda y, s: skm.balanced_accuracy_score(y, predicted_classes(s)),
    "macro_f1": lambda y, s: skm.f1_score(y, predicted_classes(s), average="macro", zero_division=0),
    "f1": _binary_or_macro("f1_score"),
    "precision": _binary_or_macro("precision_score"),
    "recall": _binary_or_macro("recall_score"),
    "auroc": _auroc,
    "aupr": _aupr,
    "mcc": _mcc,
}.items():
    register_metric(_name, _two_classes_as_binary(_fn))


def compute(names: Sequence[str], y_true, scores) -> dict[str, float | None]:
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            value = get_metric(name).fn(y_true, scores)
            results[name] = None if value is None or math.isnan(value) else float(value)
    return results


def compute_by_group(names: Sequence[str], y_true, scores, groups, compute_metrics=compute) -> dict[str, dict]:
    """Each metric per group, plus `worst_group_gap`: max - min over groups per metric
    (None where fewer than two groups have a value: one group has no gap to report).
    `compute_metrics(names, y_true, scores)` scores one group (multi-label tasks pass theirs).
    Examples whose group is unknown (an empty cell, None, NaN) belong to no group: they
    are counted as `ungrouped`, not made a group of their own."""
    y_true, scores, groups = np.asarray(y_true), np.asarray(scores), np.asarray([str(g).strip() for g in groups])
    unknown = np.isin(np.char.lower(groups), list(UNKNOWN_GROUPS))
    per_group = {str(g): compute_metrics(names, y_true[groups == g], scores[groups == g])
                 for g in np.unique(groups[~unknown])}
    gaps = {}
    for name in names:
        values = [m[name] for m in per_group.values() if m.get(name) is not None]
        gaps[name] = max(values) - min(values) if len(values) > 1 else None
    result = {"groups": per_group, "worst_group_gap": gaps}
    if unknown.any():
        result["ungrouped"] = int(unknown.sum())
    return result


UNKNOWN_GROUPS = frozenset({"", "none", "nan", "null"})
"""Group values that say the group is not known (as CSV readers and pandas write them)."""


def is_better(metric: str, value: float | None, best: float | None) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value > best if get_metric(metric).higher_is_better else value < best
