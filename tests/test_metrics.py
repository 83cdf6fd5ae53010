"""Macro accuracy, per-class accuracy and the confusion matrix, on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnlib.metrics import Evaluation, confusion_matrix, macro_accuracy, majority_baseline, per_class_accuracy

CLASSES = ("car", "truck", "cat")
# The user's reported dev confusion matrix (rows true car/truck/cat, columns predicted).
USER_MATRIX = [[473, 29, 11], [7, 42, 2], [5, 2, 64]]


def test_users_matrix_gives_the_reported_per_class_and_macro_accuracy():
    per_class = per_class_accuracy(USER_MATRIX)
    assert per_class == pytest.approx([473 / 513, 42 / 51, 64 / 71])
    assert [round(100 * a, 1) for a in per_class] == [92.2, 82.4, 90.1]
    assert round(100 * macro_accuracy(USER_MATRIX), 1) == 88.2


def test_confusion_matrix_rows_are_true_and_columns_predicted():
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 1, 2, 1, 1, 0]
    expected = [[1, 1, 1],
                [0, 2, 0],
                [1, 0, 0]]
    assert confusion_matrix(labels, predictions, 3).tolist() == expected
    assert per_class_accuracy(expected).tolist() == pytest.approx([1 / 3, 1.0, 0.0])
    assert macro_accuracy(expected) == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_confusion_matrix_counts_classes_that_never_occur():
    assert confusion_matrix([1, 1], [1, 1], 4).shape == (4, 4)


def test_confusion_matrix_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match=r"labels \(3\) and predictions \(2\)"):
        confusion_matrix([0, 1, 2], [0, 1], 3)


def test_a_class_without_samples_drops_out_of_the_macro_mean():
    matrix = [[3, 1, 0], [0, 0, 0], [1, 0, 1]]
    per_class = per_class_accuracy(matrix)
    assert per_class[0] == 0.75 and math.isnan(per_class[1]) and per_class[2] == 0.5
    assert macro_accuracy(matrix) == pytest.approx(0.625)


def test_majority_baseline_scores_one_third_macro_but_high_plain_accuracy():
    train = np.repeat([0, 1, 2], [4000, 600, 400])
    dev = np.repeat([0, 1, 2], [503, 51, 71])
    baseline = majority_baseline(train, dev, 3, CLASSES)
    assert baseline.per_class == {"car": 1.0, "truck": 0.0, "cat": 0.0}
    assert baseline.macro_accuracy == pytest.approx(1 / 3)
    assert baseline.accuracy == pytest.approx(503 / 625)  # why plain accuracy misled the user


def test_evaluation_dict_holds_macro_per_class_and_matrix():
    report = Evaluation(CLASSES, np.array(USER_MATRIX), loss=0.5).to_dict()
    assert report["macro_accuracy"] == pytest.approx(0.88232, abs=1e-5)
    assert report["per_class"] == pytest.approx({"car": 473 / 513, "truck": 42 / 51, "cat": 64 / 71})
    assert report["confusion_matrix"] == USER_MATRIX
    assert report["n"] == 635 and report["loss"] == 0.5  # 513 car rows: the report's matrix, not its 503 dev cars
    again = Evaluation.from_dict(CLASSES, report)
    assert again.confusion.tolist() == USER_MATRIX and again.loss == 0.5


def test_evaluation_text_shows_the_reported_figures():
    text = Evaluation(CLASSES, np.array(USER_MATRIX)).format("dev:")
    assert text.splitlines()[0] == "dev:"
    assert "88.2%" in text and "92.2%" in text and "82.4%" in text and "90.1%" in text
    assert text.splitlines()[-1].split() == ["cat", "5", "2", "64"]
