"""The metrics registry: canonical names, fractions, agreement with hand-checked values."""

from __future__ import annotations

import numpy as np
import pytest
from peftlab.shared import metrics
from peftlab.shared.errors import UserError


def test_binary_metrics_match_hand_computed_values():
    y = [0, 0, 1, 1, 1, 0]
    scores = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2])
    result = metrics.compute(["accuracy", "precision", "recall", "f1", "auroc", "aupr", "balanced_accuracy"], y, scores)
    # predictions at 0.5: [0, 1, 1, 0, 1, 0] -> TP 2, FP 1, FN 1, TN 2
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    # positives {0.7, 0.4, 0.9} vs negatives {0.1, 0.6, 0.2}: 8 of 9 pairs ordered right
    assert result["auroc"] == pytest.approx(8 / 9)
    # ranked: 0.9+ 0.7+ 0.6- 0.4+ -> AP = (1 + 1 + 3/4) / 3
    assert result["aupr"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert result["balanced_accuracy"] == pytest.approx(4 / 6)


def test_multiclass_metrics_and_uar_alias():
    y = [0, 1, 2, 2]
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    result = metrics.compute(["accuracy", "macro_f1", "uar", "balanced_accuracy", "auroc"], y, scores)
    assert result["accuracy"] == 0.75
    assert result["uar"] == result["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert 0 <= result["auroc"] <= 1


def test_undefined_metrics_are_none_not_nan():
    assert metrics.compute(["auroc", "aupr"], [1, 1, 1], np.array([0.2, 0.5, 0.9])) == {"auroc": None, "aupr": None}
    # a perfect model on an all-positive split: its MCC is undefined, not 0
    assert metrics.compute(["mcc", "recall", "f1"], [1, 1], np.array([0.9, 0.8])) == {"mcc": None, "recall": 1.0, "f1": 1.0}
    # no positives and none predicted: recall, precision and F1 divide by zero
    assert metrics.compute(["recall", "precision", "f1", "accuracy"], [0, 0], np.array([0.1, 0.2])) == \
        {"recall": None, "precision": None, "f1": None, "accuracy": 1.0}


def test_a_group_where_a_metric_is_undefined_opens_no_gap():
    # group b has no positives: its recall is undefined and the gap is over group a alone (none)
    y, scores = [1, 1, 0, 0], np.array([0.9, 0.8, 0.1, 0.2])
    result = metrics.compute_by_group(["recall", "accuracy"], y, scores, ["a", "a", "b", "b"])
    assert result["groups"]["b"] == {"recall": None, "accuracy": 1.0}
    assert result["worst_group_gap"] == {"recall": None, "accuracy": 0.0}


def test_groups_and_gap():
    y = [0, 1, 0, 1]
    scores = np.array([0.1, 0.9, 0.8, 0.2])
    result = metrics.compute_by_group(["accuracy"], y, scores, ["a", "a", "b", "b"])
    assert result["groups"] == {"a": {"accuracy": 1.0}, "b": {"accuracy": 0.0}}
    assert result["worst_group_gap"] == {"accuracy": 1.0}
    # one group present (a small test split held one speaker): no gap, not a perfect 0.0
    alone = metrics.compute_by_group(["accuracy"], y[:2], scores[:2], ["a", "a"])
    assert alone["worst_group_gap"] == {"accuracy": None}


def test_unknown_metric_and_direction():
    with pytest.raises(UserError, match="unknown metric 'auc'"):
        metrics.get_metric("auc")
    assert metrics.is_better("aupr", 0.5, 0.4) and not metrics.is_better("aupr", None, 0.4)


def test_two_columns_of_class_probabilities_score_as_a_binary_task():
    y = [0, 1, 1, 0, 1]
    positive = np.array([0.2, 0.7, 0.4, 0.1, 0.9])
    names = ["auroc", "aupr", "recall", "precision", "f1", "accuracy", "mcc"]
    assert metrics.compute(names, y, np.stack([1 - positive, positive], axis=1)) == metrics.compute(names, y, positive)


def test_examples_of_unknown_group_belong_to_none():
    y, scores = [0, 1, 0, 1, 1, 0], np.array([0.1, 0.9, 0.8, 0.2, 0.9, 0.9])
    result = metrics.compute_by_group(["accuracy"], y, scores, ["a", "a", "b", "b", "", None])
    assert set(result["groups"]) == {"a", "b"} and result["ungrouped"] == 2
    assert result["worst_group_gap"] == {"accuracy": 1.0}
    assert "ungrouped" not in metrics.compute_by_group(["accuracy"], y[:4], scores[:4], ["a", "a", "b", "b"])


def test_evaluation_refuses_scores_that_are_not_finite(monkeypatch):
    """A NaN row would count as class 0 in accuracy and fail inside sklearn's AUROC:
    evaluation (validation during training, eval, bench) names the input instead."""
    from peftlab.shared import evaluation

    examples = [{"id": "a", "label": 1}, {"id": "b", "label": 0}]
    outputs = [np.array([0.1, 0.9], dtype=np.float32), np.array([np.nan, np.inf], dtype=np.float32)]
    monkeypatch.setattr(evaluation, "predict_outputs", lambda *args, **kwargs: outputs)
    with pytest.raises(UserError, match="^b: the model's scores for this input are not finite numbers"):
        evaluation.evaluate(object(), None, examples, ["accuracy", "auroc"], 2, None)
    outputs[1] = np.array([0.7, 0.3], dtype=np.float32)
    assert evaluation.evaluate(object(), None, examples, ["accuracy"], 2, None)[0]["accuracy"] == 1.0


def test_a_task_without_applicable_metrics_may_use_its_own_and_their_kind():
    """The default was every class-score metric alone, so a task's own derived or text
    metric was refused ("cannot compute 'dice' ... it computes dice, accuracy")."""
    from types import SimpleNamespace

    from peftlab.pipelines.runner import run_metrics
    from peftlab.shared.text_metrics import TEXT_METRICS

    card = SimpleNamespace(metrics=None, card_path="card.md")

    def config(metrics=None, primary=None):
        return SimpleNamespace(eval=SimpleNamespace(metrics=metrics, primary_metric=primary))

    derived = SimpleNamespace(name="segment", metrics=("accuracy_avg", "accuracy"), primary_metric="accuracy_avg")
    assert run_metrics(config(), derived, card, None) == (["accuracy_avg", "accuracy"], "accuracy_avg")
    assert run_metrics(config(["auroc"]), derived, card, None) == (["accuracy_avg", "auroc"], "accuracy_avg")
    writer = SimpleNamespace(name="writer", metrics=("bleu4",), primary_metric="bleu4")
    for name in TEXT_METRICS:  # every text metric, as its own scores text
        assert run_metrics(config([name]), writer, card, None)[0][-1] == name
    with pytest.raises(UserError, match=r"^eval\.metrics: writer cannot compute 'auroc' \(it scores class predictions\); "
                                        r"it computes bleu4 \(and on request cider, corpus_bleu4, exact_match, rouge_l\)$"):
        run_metrics(config(["auroc"]), writer, card, None)
