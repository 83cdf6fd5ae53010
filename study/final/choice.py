"""Which trial `make final` retrains, and which retrained candidate it keeps.

Before retraining: the candidates (the best trial, the top CANDIDATES by dev,
or TRIAL=n; plus the space file's warm-start points that completed), read
from what each trial recorded (study.records). After: the candidate that
cross-validates best over train+dev (or, with FOLDS=0, whose seeds score best
on dev on average), unless it is a search trial within the noise of a known
recipe.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from ..errors import UserError
from ..records import WARM_START_ATTR, nearly_done

if TYPE_CHECKING:
    from .runs import FoldRun, SeedRun


# --- before retraining: the candidates -------------------------------------------

def dev_objective_index(study: optuna.Study) -> int:
    names = study.metric_names or study.user_attrs.get("objectives") or []  # `make search` stores the latter
    return names.index("dev_macro_accuracy") if "dev_macro_accuracy" in names else 0


def rankable_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials whose value ranks their config: COMPLETE ones and those the deadline cut when nearly done."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.state == TrialState.COMPLETE or nearly_done(t)]


def choose_trial(study: optuna.Study, number: int | None = None) -> tuple[FrozenTrial, str]:
    """(trial, why it was chosen): TRIAL=n, else the best; in a multi-objective study, the best dev on the front."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    if number is not None:
        match = [t for t in trials if t.number == number]
        if not match:
            numbers = f"0..{trials[-1].number}" if trials else "none"
            raise UserError(f"study {study.study_name!r} has no trial {number} (trials: {numbers})")
        if match[0].state != TrialState.COMPLETE and not nearly_done(match[0]):
            raise UserError(f"trial {number} of study {study.study_name!r} is {match[0].state.name}, not COMPLETE; "
                            f"choose a finished trial (finished: {', '.join(str(t.number) for t in finished) or 'none'})")
        return match[0], f"trial {number}, chosen with TRIAL={number}"
    if len(study.directions) == 1:
        ranked = rankable_trials(study)
        if not ranked:
            raise UserError(f"study {study.study_name!r} has no finished trial yet ({len(trials)} trials in other "
                            "states); run `make search` first")
        best = min(ranked, key=lambda t: (-t.value, t.number))
        cut = len(ranked) - len(finished)
        return best, f"best dev macro accuracy of {len(finished)} finished trials" + (
            f" and {cut} the deadline stopped nearly done" if cut else "")
    if not finished:
        raise UserError(f"study {study.study_name!r} has no finished trial yet ({len(trials)} trials in other states); "
                        "run `make search` first")
    index = dev_objective_index(study)
    front = study.best_trials
    best = max(front, key=lambda t: (t.values[index], -t.number))
    return best, (f"multi-objective study: of the {len(front)} Pareto-optimal trial{'s' if len(front) != 1 else ''}, the one with the best "
                  f"dev macro accuracy (objective {index})")


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The k rankable trials with the best dev macro accuracy (single-objective studies), best first."""
    return sorted(rankable_trials(study), key=lambda t: (-t.value, t.number))[:k]


def warm_start_trials(study: optuna.Study, besides: list[FrozenTrial]) -> list[FrozenTrial]:
    """The complete trials that trained a space file's known points (SearchSpace.enqueue_into), best first.

    They compete in the final whatever their one-seed search value. Four
    fresh-clone default searches here: when the enqueued recipes were among
    the top 3 by dev they retrained to 0.876-0.878 test; when a luckier
    single seed pushed them out (search value 0.864 against 0.865 for third
    place), the final kept a trial that scored 0.852.
    """
    taken = {t.number for t in besides}
    known = [t for t in rankable_trials(study) if WARM_START_ATTR in t.user_attrs and t.number not in taken]
    return sorted(known, key=lambda t: (-t.value, t.number))


# --- after retraining: the one to keep --------------------------------------

def mean_dev(runs: list[SeedRun]) -> float:
    return statistics.fmean(r.evaluations["dev"].macro_accuracy for r in runs)


def seed_noise(retrained) -> float | None:
    """The standard error of a difference of two candidates' mean dev over seeds, from the seeds' pooled spread."""
    seeds = [[r.evaluations["dev"].macro_accuracy for r in runs] for _, _, _, runs in retrained]
    if any(len(values) < 2 for values in seeds):
        return None  # one seed shows no spread
    pooled = statistics.fmean(statistics.variance(values) for values in seeds)
    return math.sqrt(pooled * 2 / len(seeds[0]))


def choose_retrained(retrained) -> tuple:
    """The candidate with the best mean dev, unless it is a search trial within the seeds' noise of a warm-start point.

    Then the warm-start point (a known recipe) is kept: a search trial must
    beat it by more than one standard error of the difference (a one-SE rule).
    In the fourth fresh-clone default search here the seeds of one config
    spread over 0.84-0.89 dev, and the best search trial's mean dev (0.867)
    led the enqueued AdamW recipe (0.866) while scoring 0.856 test against
    its 0.879; over four runs the enqueued recipes retrained to 0.866-0.884
    test and the search's own leaders to 0.825-0.866.

    Returns (candidate, config, source, runs, why).
    """
    def key(item):
        return mean_dev(item[3]), item[0].value, -item[0].number

    best = max(retrained, key=key)
    known = [item for item in retrained if WARM_START_ATTR in item[0].user_attrs]
    noise = seed_noise(retrained)
    why = f"the best mean dev macro accuracy over the seeds: {mean_dev(best[3]):.3f}"
    if not known or best in known or noise is None:
        return (*best, why)
    anchor = max(known, key=key)
    gap = mean_dev(best[3]) - mean_dev(anchor[3])
    if gap > noise:
        return (*best, f"{why}, {gap:.3f} above the best warm-start point (trial {anchor[0].number}), more than "
                       f"the seeds' noise ({noise:.3f})")
    return (*anchor, f"the best warm-start point by mean dev ({mean_dev(anchor[3]):.3f}): trial {best[0].number} "
                     f"led it by {gap:.3f}, within the seeds' noise ({noise:.3f})")


# --- choosing by cross-validation (folds.py) -------------------------------------

def cv_macro(folds: list[FoldRun]) -> float:
    """The selection value: held-out macro accuracy, averaged over the folds."""
    return statistics.fmean(f.held_out.macro_accuracy for f in folds)


def _standard_error(per_fold: list[float], labels: np.ndarray, per_image: np.ndarray, n_classes: int) -> float:
    """The larger of two estimates of a fold mean's standard error (or of a paired difference's).

    Over folds: their spread / sqrt(k), which holds the models' training
    noise but rests on k - 1 degrees of freedom. Over images: each class's
    per-image variance / its count, combined as macro accuracy weighs them,
    the floor that a few folds agreeing by chance cannot go under.
    """
    over_folds = statistics.stdev(per_fold) / math.sqrt(len(per_fold)) if len(per_fold) > 1 else 0.0
    terms = [per_image[labels == c].var(ddof=1) / (labels == c).sum() for c in range(n_classes) if (labels == c).sum() > 1]
    over_images = math.sqrt(sum(terms)) / n_classes
    return max(over_folds, over_images)


def cv_standard_error(folds: list[FoldRun]) -> float:
    labels = np.concatenate([f.labels for f in folds])
    correct = np.concatenate([f.correct for f in folds]).astype(float)
    return _standard_error([f.held_out.macro_accuracy for f in folds], labels, correct, len(folds[0].classes))


def paired_standard_error(a: list[FoldRun], b: list[FoldRun]) -> float:
    """Of cv_macro(a) - cv_macro(b): the same folds, so the difference pairs image by image."""
    labels = np.concatenate([f.labels for f in a])
    difference = np.concatenate([x.correct.astype(float) - y.correct for x, y in zip(a, b)])
    per_fold = [x.held_out.macro_accuracy - y.held_out.macro_accuracy for x, y in zip(a, b)]
    return _standard_error(per_fold, labels, difference, len(a[0].classes))


def choose_by_folds(items: list[tuple[FrozenTrial, list[FoldRun]]]) -> tuple[FrozenTrial, str]:
    """The candidate with the best cross-validated macro accuracy, unless it is a search trial within one
    standard error of the paired difference of the best warm-start point; then that known recipe."""
    def key(item):
        return cv_macro(item[1]), item[0].value, -item[0].number

    best = max(items, key=key)
    why = f"the best {len(best[1])}-fold cross-validated macro accuracy over train+dev: {cv_macro(best[1]):.3f}"
    known = [item for item in items if WARM_START_ATTR in item[0].user_attrs]
    if not known or best in known:
        return best[0], why
    anchor = max(known, key=key)
    gap, noise = cv_macro(best[1]) - cv_macro(anchor[1]), paired_standard_error(best[1], anchor[1])
    if gap > noise:
        return best[0], (f"{why}, {gap:.3f} above the best warm-start point (trial {anchor[0].number}), more than "
                         f"the standard error of the difference ({noise:.3f})")
    return anchor[0], (f"the best warm-start point by cross-validation ({cv_macro(anchor[1]):.3f}): trial "
                       f"{best[0].number} led it by {gap:.3f}, within the standard error of the difference ({noise:.3f})")


def rank_correlation(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho (None with fewer than 3 pairs or no spread): how well one ranking orders another."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(pd.Series(xs).corr(pd.Series(ys), method="spearman"))
