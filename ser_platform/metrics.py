"""WA, UA and the confusion matrix (paper §3.2), fold summaries, and a confusion-matrix figure for MLflow.

* WA (weighted accuracy) = overall accuracy: correct / all utterances.
* UA (unweighted accuracy) = mean per-class recall over the classes **present in y_true**; a class with no true
  utterance has no recall (0/0) and is left out of the mean, as scikit-learn's ``balanced_accuracy_score`` does.
  A class that is present but never predicted counts with recall 0.
* ``summarize_folds``: mean and the *sample* standard deviation (ddof = 1) over folds — the folds are a sample
  of possible speaker splits, and the spread the paper-style "mean ± std" tables report; one fold gives std 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["classification_scores", "confusion_figure", "confusion_matrix", "summarize_folds"]


def _as_labels(values: Sequence[int] | np.ndarray, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence of class indices, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name}: expected integer class indices, got dtype {array.dtype}")
        array = array.astype(np.int64)
    bad = (array < 0) | (array >= num_classes)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{index}]={array[index].item()!r}: expected a class index in [0, {num_classes})")
    return array.astype(np.int64)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int = 4) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    true = _as_labels(y_true, "y_true", num_classes)
    pred = _as_labels(y_pred, "y_pred", num_classes)
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.size} vs {pred.size}")
    counts = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def classification_scores(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int = 4) -> dict:
    """{"wa": overall accuracy, "ua": mean recall over classes present in y_true, "confusion": list of lists}."""
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("classification_scores: no utterances to score (y_true is empty)")
    per_class = confusion.sum(axis=1)
    present = per_class > 0
    recalls = np.diag(confusion)[present] / per_class[present]
    return {
        "wa": float(np.trace(confusion) / total),
        "ua": float(recalls.mean()),
        "confusion": confusion.tolist(),
    }


def summarize_folds(values: Sequence[float]) -> dict:
    """{"mean", "std"} over per-fold scores; std is the sample standard deviation (ddof=1), 0.0 for one fold."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError("summarize_folds: no fold values")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"summarize_folds: non-finite fold value in {array.tolist()}")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std}


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = ""):
    """A matplotlib Figure of the confusion matrix: cells coloured by row-normalised recall, annotated with
    counts and recall. Built on the Agg canvas directly (no pyplot state), so it is safe in workers; log it
    with ``mlflow.log_figure(fig, "confusion.png")``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(classes):
        raise ValueError(f"confusion of shape {counts.shape} does not match {len(classes)} classes {list(classes)}")
    row_totals = counts.sum(axis=1, keepdims=True)
    recall = np.divide(counts, row_totals, out=np.zeros(counts.shape, dtype=np.float64), where=row_totals > 0)

    size = 1.2 + 0.9 * len(classes)
    figure = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(recall, vmin=0.0, vmax=1.0, cmap="Blues")
    figure.colorbar(image, ax=axes, label="recall (row-normalised)")
    ticks = range(len(classes))
    axes.set_xticks(ticks, labels=list(classes), rotation=45, ha="right")
    axes.set_yticks(ticks, labels=list(classes))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in ticks:
        for column in ticks:
            colour = "white" if recall[row, column] > 0.5 else "black"
            axes.text(column, row, f"{counts[row, column]}\n{recall[row, column]:.2f}", ha="center",
                      va="center", color=colour, fontsize=8)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return figure

