"""make final's selection signal: each candidate cross-validated over train+dev, folds trained as fused groups.

One trial's dev value is one model on 625 images (51 trucks, 71 cats): a
standard error near 2.7 points of macro accuracy, and retraining more seeds
does not shrink it, because every seed is judged on the same small dev set.
Pooling train and dev and holding out each of k stratified folds in turn
judges every candidate on all 5625 images (651 trucks, 471 cats), each
predicted by a model that never trained on it. The folds are the same for
every candidate (FOLD_SEED), so two candidates' fold scores pair image by
image; fold f trains with seed f, and the candidates that share batch
settings train fold f as one fused group. The held-out test split plays no
part: each fold model's test score is recorded to show how the signal
tracks it, never to choose.

A fold model trains on (k-1)/k of train+dev (4219 images at k=4 against
5000 in train), so its scores run a little below the final retrain's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from cnnlib.atomic import write_json
from cnnlib.config import TrainConfig
from cnnlib.config import group_configs
from cnnlib.folds import fold_split, pooled, stratified_folds
from cnnlib.metrics import Evaluation
from cnnlib.splits import Splits
from cnnlib.training import DeviceData, evaluate, predict_logits, train_group
from cnnlib.tta import as_evaluated

from .. import lifetime, progress
from ..errors import UserError
from ..output import read_record
from ..records import WARM_START_ATTR, trial_config
from .choice import choose_by_folds, cv_macro, cv_standard_error, rank_correlation
from .runs import CandidateRuns, FoldRun

FOLD_SEED = 0  # one set of folds for every candidate and every run: their scores pair fold by fold


class CrossValidation(CandidateRuns):
    """One candidate's folds (runs: fold -> FoldRun)."""

    def reuse(self, classes) -> None:
        """Keep the folds an interrupted run of the same trial, data and folds already finished; a damaged record
        is set aside with a note and its fold trained again."""
        for record in self.records("fold-*.json"):
            run = read_record(record, lambda data: FoldRun.from_dict(data, classes).named(record),
                              redo="that fold is trained again")
            if run is not None:
                self.runs[run.fold] = run

    def folds(self) -> list[FoldRun]:
        return [self.runs[f] for f in sorted(self.runs)]


def folds_for_rarest(splits: Splits, folds: int) -> int:
    """FOLDS, or fewer when the rarest class of train+dev has fewer images than that (said in one line): a
    stratified fold must hold every class, or its held-out macro accuracy averages fewer classes."""
    counts = dict(zip(splits.classes, (splits.train.counts(len(splits.classes)) + splits.dev.counts(len(splits.classes)))))
    rarest = min(counts, key=counts.get)
    if counts[rarest] >= folds or counts[rarest] < 2:  # fewer than 2 cannot be cross-validated: fold_assignment says so
        return folds
    print(f"note: class {rarest} has {counts[rarest]} images in train+dev, fewer than FOLDS {folds}: "
          f"cross-validating on {counts[rarest]} folds, so that every fold holds every class", flush=True)
    return counts[rarest]


def fold_assignment(splits: Splits, folds: int):
    """(train+dev pooled, fold per pooled image); too many folds for the rarest class is one line."""
    pool = pooled([splits.train, splits.dev])
    try:
        return pool, stratified_folds(pool.labels, folds, FOLD_SEED)
    except ValueError as error:
        raise UserError(f"FOLDS {folds}: {error} of train+dev") from None


def cross_validate(candidates: list[CrossValidation], splits: Splits, device, folds: int) -> None:
    """Train every candidate on every fold; fold f's candidates that share batch settings train as one group."""
    pool, fold_of = fold_assignment(splits, folds)
    for candidate in candidates:
        candidate.reuse(splits.classes)
    for fold in range(folds):
        for candidate in candidates:
            if fold in candidate.runs:
                print(f"{candidate.label}fold {fold + 1}/{folds}: reused from an interrupted run "
                      f"(held-out macro {candidate.runs[fold].held_out.macro_accuracy:.3f})", flush=True)
        pending = [c for c in candidates if fold not in c.runs]
        if not pending:
            continue
        data = DeviceData(fold_split(splits, pool, fold_of, fold), device)
        seeded = [TrainConfig.from_dict({**c.config.to_dict(), "seed": fold}) for c in pending]
        for group in group_configs(seeded):
            _train_fold([pending[i] for i in group], [seeded[i] for i in group], data, fold, folds)
        del data
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _train_fold(members: list[CrossValidation], configs: list[TrainConfig], data: DeviceData, fold: int,
                folds: int) -> None:
    def report(i, stats):
        lifetime.check_interrupt()
        progress.epoch(f"{members[i].label}fold {fold + 1}/{folds}", stats.epoch, configs[i].epochs,
                       stats.dev_macro_accuracy, metric="held-out macro")

    started = time.perf_counter()
    # Only the end is read: the held-out fold is evaluated once, after the last epoch.
    for candidate, config, result in zip(members, configs, train_group(configs, data, report, dev_epochs=1)):
        if result.error is not None:
            raise result.error
        model = as_evaluated(result.model, config.tta)
        predictions = predict_logits(model, data.dev.x).argmax(1).cpu().numpy()
        test = evaluate(model, data.test, data.classes) if data.test is not None else None
        run = FoldRun(fold, data.dev.y.cpu().numpy(), predictions, test, time.perf_counter() - started, data.classes)
        write_json(candidate.partial / f"fold-{fold}.json", run.to_dict())
        candidate.runs[fold] = run
        together = f", fused with {len(members) - 1} other(s)" if len(members) > 1 else ""
        print(f"{candidate.label}fold {fold + 1}/{folds}: held-out macro {run.held_out.macro_accuracy:.3f} "
              f"({run.seconds:.0f} s{together})", flush=True)


def select_by_folds(study_name: str, candidates, splits: Splits, device, folds: int, out: Path) -> tuple:
    """Cross-validate every candidate and choose one (choice.choose_by_folds).

    Returns (the chosen trial, why, one summary row per candidate). Each row
    carries the fold models' mean test score beside the selection value, and
    the run's rank correlations of the search's one-seed value and of the
    cross-validated value with it: evidence on the signal, never a choice.
    """
    items = []
    for candidate in candidates:
        config, _ = trial_config(candidate)
        fingerprint = {"study": study_name, "trial": candidate.number, "config": {**config.to_dict(), "seed": None},
                       "data": splits.cache_path.name if splits.cache_path else splits.source,
                       "classes": list(splits.classes), "folds": folds, "fold_seed": FOLD_SEED}
        items.append(CrossValidation(f"trial {candidate.number} ", config,
                                     out / ".partial" / f"trial-{candidate.number}-folds", fingerprint))
    print(f"cross-validating {len(candidates)} candidates on {folds} folds of train+dev "
          f"({len(splits.train) + len(splits.dev)} images)", flush=True)
    cross_validate(items, splits, device, folds)
    scored = [(candidate, item.folds()) for candidate, item in zip(candidates, items)]
    chosen, why = choose_by_folds(scored)
    rows = [candidate_row(candidate, runs, candidate is chosen) for candidate, runs in scored]
    return chosen, why, rows


def candidate_row(candidate, runs: list[FoldRun], chosen: bool) -> dict:
    tests = [r.test.macro_accuracy for r in runs if r.test is not None]
    pooled_held_out = Evaluation(runs[0].classes, sum(r.held_out.confusion for r in runs))
    return {"trial": candidate.number, "warm_start": WARM_START_ATTR in candidate.user_attrs,
            "search_value": candidate.value, "cv_macro_accuracy": cv_macro(runs), "cv_standard_error": cv_standard_error(runs),
            "cv_per_class": pooled_held_out.per_class, "cv_confusion_matrix": pooled_held_out.confusion.tolist(),
            "fold_test_macro_accuracy": statistics.fmean(tests) if tests else None,
            "fold_test_sd": statistics.stdev(tests) if len(tests) > 1 else None, "chosen": chosen}


def signal_correlations(rows: list[dict]) -> dict:
    """Spearman's rho of each selection signal with the fold models' test score, over the candidates."""
    rows = [r for r in rows if r["fold_test_macro_accuracy"] is not None]
    test = [r["fold_test_macro_accuracy"] for r in rows]
    return {"candidates": len(rows),
            "search_value": rank_correlation([r["search_value"] for r in rows], test),
            "cross_validation": rank_correlation([r["cv_macro_accuracy"] for r in rows], test)}
