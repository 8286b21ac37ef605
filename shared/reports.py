"""Per-class files written next to a split's predictions, for the tasks whose field reads
them: a confusion matrix (counts and per-class recall, as JSON and a PNG) and a table of
one-vs-rest scores per class or finding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from peftlab.shared import io
from peftlab.shared.lazy import lazy_import
from peftlab.shared.metrics import predicted_classes

skm = lazy_import("sklearn.metrics")


def write_confusion(split: str, examples, scores: np.ndarray, labels: list[str], directory: Path) -> None:
    """`<split>_confusion.json` (counts and per-class recall; rows are the true class) and
    `<split>_confusion.png`."""
    from matplotlib.figure import Figure

    truth = [e["label"] for e in examples]
    matrix = skm.confusion_matrix(truth, predicted_classes(scores), labels=list(range(len(labels))))
    totals = matrix.sum(axis=1, keepdims=True)
    recall = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    io.write_json(Path(directory) / f"{split}_confusion.json", {
        "labels": labels, "rows": "true class", "columns": "predicted class",
        "counts": matrix.tolist(), "recall": recall.round(4).tolist(),
    })
    size = 1.6 + 0.7 * len(labels)
    figure = Figure(figsize=(size, size))
    axes = figure.subplots()
    skm.ConfusionMatrixDisplay(matrix, display_labels=labels).plot(ax=axes, colorbar=False, xticks_rotation=45)
    axes.set_title(f"{split}: counts (rows: true class)")
    figure.tight_layout()
    with io.atomic_path(Path(directory) / f"{split}_confusion.png") as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def one_vs_rest(is_positive: np.ndarray, scores: np.ndarray) -> dict:
    """AUROC and average precision of one class (or finding) against the rest, with its
    positives and count; the scores are None where the split holds only one side."""
    defined = 0 < is_positive.sum() < len(is_positive)
    return {"auroc": float(skm.roc_auc_score(is_positive, scores)) if defined else None,
            "average_precision": float(skm.average_precision_score(is_positive, scores)) if defined else None,
            "positives": int(is_positive.sum()), "count": int(len(is_positive))}
