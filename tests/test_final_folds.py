"""make final's cross-validated choice: the folds, the standard errors and the rule that keeps a known recipe."""

from __future__ import annotations

import numpy as np
import pytest
from optuna.trial import TrialState, create_trial

from cnnlib.folds import fold_split, pooled, stratified_folds
from cnnlib.metrics import Evaluation
from cnnlib.sources import LabeledImages
from cnnlib.splits import Splits
from study.final.choice import (choose_by_folds, cv_macro, cv_standard_error, paired_standard_error,
                                rank_correlation)
from study.final.folds import candidate_row, signal_correlations
from study.final.runs import FoldRun

CLASSES = ("a", "b")


def images(labels, start=0) -> LabeledImages:
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.array([f"img{start + i}" for i in range(len(labels))])
    return LabeledImages(np.zeros((len(labels), 4, 4, 3), dtype=np.uint8), labels, ids)


def test_folds_hold_out_every_pooled_image_once_and_keep_the_test_split():
    splits = Splits(CLASSES, images([0] * 30 + [1] * 10), images([0] * 5 + [1] * 5, start=100), images([0, 1], 200))
    pool = pooled([splits.train, splits.dev])
    fold_of = stratified_folds(pool.labels, 5, seed=0)
    held = []
    for fold in range(5):
        part = fold_split(splits, pool, fold_of, fold)
        assert not set(part.train.ids) & set(part.dev.ids)
        assert len(part.train) + len(part.dev) == 50 and part.test is splits.test
        assert np.bincount(part.dev.labels).tolist() == [7, 3]  # the class mix in every fold
        held += list(part.dev.ids)
    assert sorted(held) == sorted(pool.ids)
    assert (stratified_folds(pool.labels, 5, seed=0) == fold_of).all(), "one seed, the same folds"


def test_too_many_folds_for_the_rarest_class_is_refused():
    with pytest.raises(ValueError, match="smallest class size \\(3\\)"):
        stratified_folds(np.array([0] * 10 + [1] * 3), 4, seed=0)


def fold_runs(correct_per_fold: list[tuple[int, int]], n=(100, 20)) -> list[FoldRun]:
    """Folds of n[0] images of class a and n[1] of class b, the first k of each right."""
    runs = []
    for fold, (right_a, right_b) in enumerate(correct_per_fold):
        labels = np.array([0] * n[0] + [1] * n[1])
        predictions = labels.copy()
        predictions[right_a:n[0]] = 1
        predictions[n[0] + right_b:] = 0
        runs.append(FoldRun(fold, labels, predictions, None, 1.0, CLASSES))
    return runs


def candidate(number, warm_start=False, value=0.8):
    trial = create_trial(state=TrialState.COMPLETE, value=value, params={}, distributions={},
                         user_attrs={"warm_start_point": 0} if warm_start else {})
    trial.number = number
    return trial


def test_the_cross_validated_value_is_the_mean_of_the_folds_macro_accuracy():
    runs = fold_runs([(90, 10), (80, 20)])
    assert cv_macro(runs) == pytest.approx(((0.9 + 0.5) / 2 + (0.8 + 1.0) / 2) / 2)


def test_the_standard_error_is_never_below_the_images_binomial_floor():
    same = fold_runs([(90, 15)] * 4)  # four identical folds: no spread over folds at all
    floor = np.sqrt(0.9 * 0.1 / 400 * 400 / 399 + 0.75 * 0.25 / 80 * 80 / 79) / 2
    assert cv_standard_error(same) == pytest.approx(floor)
    spread = fold_runs([(90, 5), (90, 20), (90, 5), (90, 20)])
    over_folds = np.std([0.575, 0.95, 0.575, 0.95], ddof=1) / 2
    assert cv_standard_error(spread) == pytest.approx(over_folds)


def test_a_paired_difference_of_identical_predictions_has_no_error_and_differs_from_unpaired():
    runs = fold_runs([(90, 15), (85, 16)])
    assert paired_standard_error(runs, runs) == 0.0
    other = fold_runs([(89, 15), (85, 17)])
    assert 0 < paired_standard_error(runs, other) < cv_standard_error(runs)


def test_a_search_trial_must_lead_the_best_warm_start_point_by_more_than_the_paired_error():
    known = (candidate(0, warm_start=True), fold_runs([(90, 15)] * 4))
    close = (candidate(7), fold_runs([(91, 17), (91, 14), (89, 16), (89, 15)]))  # +0.0125 macro, folds disagree
    chosen, why = choose_by_folds([close, known])
    assert chosen.number == 0 and "within the standard error" in why
    clear = (candidate(7), fold_runs([(95, 19)] * 4))
    chosen, why = choose_by_folds([clear, known])
    assert chosen.number == 7 and "more than the standard error" in why
    chosen, _ = choose_by_folds([close, (candidate(3), fold_runs([(90, 15)] * 4))])
    assert chosen.number == 7, "no warm-start point: the best value stands"


def test_candidate_rows_and_the_rank_correlations_come_from_the_fold_models():
    test = Evaluation(CLASSES, np.array([[9, 1], [2, 8]]))
    rows = []
    for number, (right_b, test_score) in enumerate([(10, 0.70), (15, 0.80), (18, 0.90)]):
        runs = fold_runs([(90, right_b)] * 2)
        for run in runs:
            run.test = Evaluation(CLASSES, np.array([[round(100 * test_score), 100 - round(100 * test_score)], [0, 100]]))
        rows.append(candidate_row(candidate(number, value=1 - test_score), runs, chosen=number == 2))
    assert rows[2]["chosen"] and rows[0]["fold_test_macro_accuracy"] == pytest.approx((0.7 + 1) / 2)
    assert rows[0]["cv_confusion_matrix"] == [[180, 20], [20, 20]]
    rho = signal_correlations(rows)
    assert rho == {"candidates": 3, "search_value": pytest.approx(-1.0), "cross_validation": pytest.approx(1.0)}
    assert rank_correlation([1, 2], [1, 2]) is None and test.macro_accuracy == pytest.approx(0.85)
