"""WA / UA / confusion matrix against scikit-learn; fold summaries against the statistics module."""

from __future__ import annotations

import io
import statistics
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from ser_platform.metrics import classification_scores, confusion_figure, confusion_matrix, summarize_folds


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, size=int(rng.integers(5, 200)))
    # Mostly right, sometimes wrong: a realistic confusion.
    y_pred = np.where(rng.random(y_true.size) < 0.6, y_true, rng.integers(0, 4, size=y_true.size))
    scores = classification_scores(y_true.tolist(), y_pred.tolist())
    assert scores["wa"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert scores["ua"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    assert scores["confusion"] == sklearn_confusion_matrix(y_true, y_pred, labels=[0, 1, 2, 3]).tolist()


def test_class_never_predicted_counts_with_recall_zero():
    y_true = [0, 0, 1, 1, 2, 2, 3, 3]
    y_pred = [0, 0, 1, 0, 2, 1, 0, 0]  # class 3 is never predicted
    scores = classification_scores(y_true, y_pred)
    assert scores["ua"] == pytest.approx((1.0 + 0.5 + 0.5 + 0.0) / 4)
    assert scores["ua"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert scores["wa"] == pytest.approx(accuracy_score(y_true, y_pred))


def test_class_absent_from_truth_is_left_out_of_ua_as_scikit_learn_does():
    y_true = [0, 0, 1, 1, 2]  # no class 3 in the truth, yet predicted once
    y_pred = [0, 3, 1, 1, 2]
    scores = classification_scores(y_true, y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred holds a class y_true lacks
        expected = balanced_accuracy_score(y_true, y_pred)
    assert scores["ua"] == pytest.approx(expected)
    assert scores["ua"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert scores["confusion"][0] == [1, 0, 0, 1]
    assert scores["confusion"][3] == [0, 0, 0, 0]


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match=r"y_pred\[2\]=4"):
        classification_scores([0, 1, 2], [0, 1, 4])
    with pytest.raises(ValueError, match="differ in length"):
        confusion_matrix([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        classification_scores([], [])


def test_summarize_folds_uses_sample_std():
    values = [0.71, 0.75, 0.69, 0.80, 0.77]
    summary = summarize_folds(values)
    assert summary["mean"] == pytest.approx(statistics.mean(values))
    assert summary["std"] == pytest.approx(statistics.stdev(values))
    assert summarize_folds([0.5]) == {"mean": 0.5, "std": 0.0}
    with pytest.raises(ValueError, match="no fold"):
        summarize_folds([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize_folds([0.5, float("nan")])


def test_confusion_figure_renders_counts():
    from matplotlib.figure import Figure

    confusion = [[5, 1, 0, 0], [2, 7, 0, 1], [0, 0, 3, 0], [0, 0, 0, 0]]
    figure = confusion_figure(confusion, ("angry", "happy", "neutral", "sad"), "fold 1")
    assert isinstance(figure, Figure)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert "7\n0.70" in texts and "0\n0.00" in texts  # count and recall; an empty row reads 0.00, not NaN
    assert figure.axes[0].get_title() == "fold 1"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="does not match"):
        confusion_figure(confusion, ("a", "b"))
