"""Macro accuracy, per-class accuracy and the confusion matrix.

The user's data is imbalanced (dev: 503 car, 51 truck, 71 cat), so plain
accuracy rewards predicting "car"; the metric is the mean of per-class
accuracies, always reported with the per-class figures and the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def confusion_matrix(labels, predictions, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    labels = torch.as_tensor(labels).long().flatten().cpu()
    predictions = torch.as_tensor(predictions).long().flatten().cpu()
    if labels.shape != predictions.shape:
        raise ValueError(f"labels ({labels.numel()}) and predictions ({predictions.numel()}) differ in length")
    counts = torch.bincount(labels * n_classes + predictions, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).numpy()


def per_class_accuracy(matrix) -> np.ndarray:
    """Recall of each class; NaN for a class with no samples (it then drops out of the macro mean)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(matrix) / support, np.nan)


def macro_accuracy(matrix) -> float:
    """Mean of per-class accuracies over the classes that have samples."""
    per_class = per_class_accuracy(matrix)
    if np.all(np.isnan(per_class)):
        return float("nan")
    return float(np.nanmean(per_class))


@dataclass
class Evaluation:
    """What every report shows: macro accuracy, per-class accuracy and the matrix."""

    classes: tuple[str, ...]
    confusion: np.ndarray
    loss: float = float("nan")

    @property
    def macro_accuracy(self) -> float:
        return macro_accuracy(self.confusion)

    @property
    def per_class(self) -> dict[str, float]:
        return {c: float(a) for c, a in zip(self.classes, per_class_accuracy(self.confusion))}

    @property
    def accuracy(self) -> float:
        """Plain (micro) accuracy, shown only to contrast with the macro figure."""
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")

    def to_dict(self) -> dict:
        return {
            "macro_accuracy": self.macro_accuracy,
            "per_class": self.per_class,
            "confusion_matrix": self.confusion.tolist(),
            "accuracy": self.accuracy,
            "loss": self.loss,
            "n": int(self.confusion.sum()),
        }

    @classmethod
    def from_dict(cls, classes, data: dict) -> "Evaluation":
        matrix = np.asarray(data["confusion_matrix"])
        if matrix.shape != (len(classes), len(classes)):
            raise ValueError(f"a confusion matrix of shape {matrix.shape} for {len(classes)} classes")
        return cls(tuple(classes), matrix, data.get("loss", float("nan")))

    def format(self, title: str = "") -> str:
        """A plain-text block: macro and per-class accuracy, then the matrix."""
        width = max(7, *(len(c) for c in self.classes)) + 1  # one space at least between columns, whatever the names
        lines = []
        if title:
            lines.append(title)
        per = "  ".join(f"{c} {a:6.1%}" for c, a in self.per_class.items())
        lines.append(f"  macro accuracy {self.macro_accuracy:6.1%}   ({per})   n={int(self.confusion.sum())}")
        lines.append("  confusion (rows true, columns predicted):")
        lines.append("  " + " " * width + "".join(f"{c:>{width}}" for c in self.classes))
        for c, row in zip(self.classes, self.confusion):
            lines.append("  " + f"{c:>{width}}" + "".join(f"{int(v):>{width}}" for v in row))
        return "\n".join(lines)


def majority_baseline(train_labels, eval_labels, n_classes: int, classes) -> Evaluation:
    """Predict the most frequent training class for everything: the 1/n_classes floor the user saw."""
    majority = int(np.bincount(np.asarray(train_labels), minlength=n_classes).argmax())
    eval_labels = np.asarray(eval_labels)
    return Evaluation(tuple(classes), confusion_matrix(eval_labels, np.full_like(eval_labels, majority), n_classes))
