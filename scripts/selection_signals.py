"""Which selection signal ranks a study's configs as the held-out test does? (docs/results.md, "Choosing with less noise").

For every rankable trial of a study (or the top N by search value), three
signals and one truth:
- the search's own value (one seed, dev, the study's objective);
- the mean dev macro accuracy of SEEDS retrains on train (the old make final);
- make final's k-fold cross-validation over train+dev (study.final.folds);
- truth: the mean held-out test macro accuracy of the SEEDS retrains on train,
  models that no signal saw.
Prints and writes (OUT/selection_signals.json, OUT/table.md) each trial's
values and Spearman's rho of each signal with the truth, and of each with
the fold models' own test score. Finished folds and seeds are kept under
OUT/.partial, so a killed run resumes.

    PYTHONPATH=. .venv/bin/python scripts/selection_signals.py --storage sqlite:///results/optuna.db \
        --study default --out results/selection-signals
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cnnlib.atomic import write_atomic, write_json
from cnnlib.device import resolve_device
from cnnlib.training import DeviceData
from study.final.choice import cv_macro, cv_standard_error, mean_dev, rank_correlation, rankable_trials
from study.final.folds import CrossValidation, FOLD_SEED, cross_validate
from study.final.retrain import Retrain, retrain_seeds
from study.data import load_splits
from study.options import add_common_options, add_data_options
from study.threads import use_cpu_threads
from study.records import trial_config
from study.search.storage import load_existing_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--top", type=int, default=None, help="the top N trials by search value (default: all rankable)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    add_data_options(parser)
    add_common_options(parser)
    args = parser.parse_args()
    study = load_existing_study(args.study, args.storage)
    trials = sorted(rankable_trials(study), key=lambda t: (-t.value, t.number))[:args.top]
    if study.user_attrs.get("classes") and not args.classes:
        args.classes = ",".join(study.user_attrs["classes"])
    splits = load_splits(args)
    device = resolve_device(args.device)
    threads = use_cpu_threads(device)
    out = Path(args.out)
    started = time.perf_counter()
    print(f"{len(trials)} trials of study {args.study!r}: {args.folds} folds and {args.seeds} seeds each "
          f"on {device} ({threads})", flush=True)
    fingerprint = {"data": splits.cache_path.name if splits.cache_path else splits.source, "folds": args.folds,
                   "fold_seed": FOLD_SEED}
    configs = [trial_config(t)[0] for t in trials]  # rebuilt once per trial, for its folds and its seeds
    folds = [CrossValidation(f"trial {t.number} ", c, out / ".partial" / f"trial-{t.number}-folds",
                             {**fingerprint, "trial": t.number, "config": c.to_dict()}) for t, c in zip(trials, configs)]
    cross_validate(folds, splits, device, args.folds)
    seeds = [Retrain(f"trial {t.number} ", c, out / ".partial" / f"trial-{t.number}-seeds",
                     {**fingerprint, "trial": t.number, "config": {**c.to_dict(), "seed": None}})
             for t, c in zip(trials, configs)]
    retrain_seeds(seeds, DeviceData(splits, device), args.seeds)
    rows = []
    for trial, cv, retrain in zip(trials, folds, seeds):
        runs = [retrain.runs[s] for s in range(args.seeds)]
        tests = [r.evaluations["test"] for r in runs]
        rows.append({"trial": trial.number, "warm_start": "warm_start_point" in trial.user_attrs,
                     "search_value": trial.value, "seeds_mean_dev": mean_dev(runs),
                     "cv_macro_accuracy": cv_macro(cv.folds()), "cv_standard_error": cv_standard_error(cv.folds()),
                     "fold_test": statistics.fmean(f.test.macro_accuracy for f in cv.folds()),
                     "test": statistics.fmean(t.macro_accuracy for t in tests),
                     "test_sd": statistics.stdev(t.macro_accuracy for t in tests) if len(tests) > 1 else None,
                     "test_per_class": {c: statistics.fmean(t.per_class[c] for t in tests) for c in splits.classes},
                     "config": {k: v for k, v in retrain.config.to_dict().items() if k != "seed"}})
    signals = ("search_value", "seeds_mean_dev", "cv_macro_accuracy")
    rho = {truth: {s: rank_correlation([r[s] for r in rows], [r[truth] for r in rows]) for s in signals}
           for truth in ("test", "fold_test")}
    report = {"study": args.study, "trials": len(rows), "folds": args.folds, "seeds": args.seeds, "rows": rows,
              "spearman": rho, "seconds": time.perf_counter() - started, "device": str(device),
              "torch": torch.__version__, "host": platform.node()}
    write_json(out / "selection_signals.json", report)
    table = format_table(report, splits.classes)
    write_atomic(out / "table.md", table + "\n")
    print(table)


def format_table(report: dict, classes) -> str:
    lines = ["| trial | from | search dev | mean dev, seeds | CV ± SE | test, seeds | " + " | ".join(classes) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(classes)]
    for r in sorted(report["rows"], key=lambda r: -r["test"]):
        sd = f" ± {r['test_sd']:.3f}" if r["test_sd"] is not None else ""
        lines.append(f"| {r['trial']} | {'warm start' if r['warm_start'] else 'search'} | {r['search_value']:.3f} | "
                     f"{r['seeds_mean_dev']:.3f} | {r['cv_macro_accuracy']:.3f} ± {r['cv_standard_error']:.3f} | "
                     f"{r['test']:.3f}{sd} | " + " | ".join(f"{r['test_per_class'][c]:.3f}" for c in classes) + " |")
    rho = report["spearman"]
    lines += ["", "Spearman's rho with the test score of the seeds' retrains (models no signal saw): " + ", ".join(
        f"{name} {value:.2f}" if value is not None else f"{name} –" for name, value in rho["test"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
