"""Retrain a study's chosen trial with several seeds, judge it on the held-out test split, and attack it.

Writes RESULTS/final/<study>/: model.pt (the seeds' ensemble), metrics.json,
fgsm.csv (one row per split, attack and epsilon), figures as self-contained
HTML (and PNG when headless Chromium is there for kaleido) and report.md.

One search result is one seed; a retrain with seeds 0..k-1 shows how much of
the trial's score was luck. The model kept is the seeds' ensemble (mean
softmax, cnnlib.ensemble): those trainings are paid for already, and on the
user's data three seeds together scored above each of them alone. With
ENSEMBLE=0 it is the median seed by dev macro accuracy (the lower middle one
when k is even), chosen on dev so that the test split is never used to
select anything.

Outputs are made in .next/ and renamed into place only when all are done,
so an interrupted run leaves the last run's files whole, and a rerun replaces
them one whole file at a time. Finished seeds are kept under .partial/ until
the run completes: an interrupted run picks up where it stopped. One run at a
time holds the folder (output.sole_writer): two would share .next/ and .partial/.
Epsilons are on the [0, 1] pixel scale (see cnnlib/attacks.py): the user's
[-1, 1]-scale eps 0.1 is 0.05 here.

This module is the command: its options and the run from start to end. The
steps, in the order it takes them: choice.py (which trials compete, which one
is kept), folds.py (choosing by cross-validation over train+dev), retrain.py
(each candidate's seeds, the model kept), attack.py (the sweep and its
figures), report.py (report.md, the move into place); runs.py holds the
records of a seed's and a fold's run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

from cnnlib.atomic import write_atomic, write_json
from cnnlib.attacks import ATTACKS, DEFAULT_EPSILONS, PGD_STEPS, check_epsilon
from cnnlib.config import TrainConfig
from cnnlib.device import resolve_device
from cnnlib.metrics import majority_baseline
from cnnlib.splits import require_every_class
from cnnlib.training import DeviceData
from cnnlib.tta import as_evaluated

from ..data import data_config, load_splits
from ..errors import UserError
from ..options import MAX_GROUP, add_common_options, add_data_options, add_study_options, switch, whole_number
from ..output import sole_writer, study_folder
from ..records import check_recorded_data, trial_config
from ..search import hints
from ..search.storage import load_existing_study
from ..search.storage_url import redact
from ..threads import use_cpu_threads
from .attack import attack_record, draw_figures, run_attack_sweep
from .choice import choose_trial, top_trials, warm_start_trials
from .folds import folds_for_rarest, select_by_folds, signal_correlations
from .report import format_report, model_words, publish, write_figures
from .retrain import retrain_candidates, stage_ensemble, stage_model
from .runs import eval_splits, median_run, seed_summary


# --- options --------------------------------------------------------------

# Four folds: every pooled image judged once (a standard error near 0.8 point of macro accuracy
# on the user's data), each fold model trained on 3/4 of train+dev (4219 images against train's 5000).
DEFAULT_FOLDS = 4
MAX_FOLDS = 10

def _epsilons(text: str) -> tuple[float, ...]:
    try:
        values = tuple(check_epsilon(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"EPSILONS {text!r}: {error}; expected numbers like 0,0.03,0.1") from None
    if not values:
        raise argparse.ArgumentTypeError("EPSILONS is empty; expected numbers like 0,0.03,0.1")
    return tuple(sorted(set(values)))


def _attacks(text: str) -> tuple[str, ...]:
    text = text.strip().lower()
    if text == "both":
        return ATTACKS
    if text not in ATTACKS:
        raise argparse.ArgumentTypeError(f"ATTACK {text!r}: expected fgsm, pgd or both")
    return (text,)


def _folds(text: str) -> int:
    value = whole_number("FOLDS", 0, MAX_FOLDS)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("FOLDS 1: expected 0 (choose by dev over seeds) or 2 to "
                                         f"{MAX_FOLDS} folds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_study_options(parser)
    env = os.environ
    parser.add_argument("--trial", type=whole_number("TRIAL"), default=env.get("TRIAL") or None,
                        help="trial number to retrain instead of the best one (env TRIAL)")
    parser.add_argument("--seeds", type=whole_number("SEEDS", 1, MAX_GROUP), default=env.get("SEEDS") or "3",
                        help="retrain with seeds 0..k-1 and report mean and spread (env SEEDS)")
    parser.add_argument("--ensemble", type=switch("ENSEMBLE"), default=env.get("ENSEMBLE") or "1",
                        help="1: the model is the seeds' ensemble (mean softmax); 0: the median seed by dev "
                             "(env ENSEMBLE)")
    parser.add_argument("--candidates", type=whole_number("CANDIDATES", 1, MAX_GROUP), default=env.get("CANDIDATES") or "3",
                        help="without TRIAL: the top K trials by dev macro accuracy, with the warm-start points, "
                             "compete for the final retrain (env CANDIDATES)")
    parser.add_argument("--folds", type=_folds, default=env.get("FOLDS") or str(DEFAULT_FOLDS),
                        help=f"choose among the candidates by k-fold cross-validation over train+dev (default "
                             f"{DEFAULT_FOLDS}); 0: by the mean dev macro accuracy of their seeds (env FOLDS)")
    parser.add_argument("--epsilons", type=_epsilons, default=env.get("EPSILONS") or ",".join(map(str, DEFAULT_EPSILONS)),
                        help="attack strengths on the [0, 1] pixel scale, comma-separated (env EPSILONS)")
    parser.add_argument("--attack", type=_attacks, default=env.get("ATTACK") or "fgsm",
                        help="fgsm, pgd or both (env ATTACK)")
    parser.add_argument("--pgd-steps", type=whole_number("--pgd-steps", 1), default=str(PGD_STEPS), help="PGD iterations per epsilon")
    parser.add_argument("--no-png", action="store_true", help="skip PNG export (HTML figures are always written)")
    add_data_options(parser)
    add_common_options(parser)


# --- files ----------------------------------------------------------------

def output_folder(results: Path, study_name: str) -> Path:
    """RESULTS/final/<study>, one folder per study name (export.study_folder)."""
    return study_folder(Path(results) / "final", study_name)


# --- the command: candidates -> data -> retrain and choose -> attack -> outputs ---

def run(args) -> int:
    device = resolve_device(args.device)  # a device this machine lacks fails before any work
    study = load_existing_study(args.study, args.storage)
    refuse_several_objectives(study)
    out = output_folder(args.results, study.study_name)
    with sole_writer(out, args.results, "make final"):  # two runs on one folder would publish each other's halves
        return run_holding(args, device, study, out)


def refuse_several_objectives(study) -> None:
    """A study of several objectives has no one value to rank or report its trials by: refused in one line."""
    if len(study.directions) > 1:
        names = (study.metric_names or study.user_attrs.get("objectives")
                 or [f"objective {i}" for i in range(len(study.directions))])
        raise UserError(f"study {study.study_name!r} has {len(study.directions)} objectives ({', '.join(names)}); "
                        "make final retrains the trial of a single-objective study only")


def run_holding(args, device, study, out: Path) -> int:
    """The run, once this process alone holds the output folder."""
    trial, selection, candidates, what = pick_candidates(study, args)
    config, _ = trial_config(trial)  # a trial whose config cannot be rebuilt fails before the data loads
    recorded = study.user_attrs.get("classes")
    splits = load_study_splits(study, trial, args)
    data = DeviceData(splits, device)
    threads = use_cpu_threads(device)
    if threads:
        print(f"cpu: {threads}", flush=True)
    announce(study, trial, selection if len(candidates) == 1 else None, what, config, data.classes, recorded,
             args.folds)

    trial, config, config_source, runs, selection, candidate_summary = choose_and_retrain(
        study, candidates, what, selection, data, splits, device, args, out)
    chosen = median_run(runs)
    # Everything is made in .next/ and moved into place at the end: until then the last run's files stay whole.
    stage = out / ".next"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    if args.ensemble and len(runs) > 1:
        model, evaluations, kept = stage_ensemble(stage, runs, study.study_name, trial.number, data, device)
    else:
        model = stage_model(stage, chosen, study.study_name, trial.number, data, device)
        evaluations, kept = chosen.evaluations, {"kind": "median seed", "seeds": [chosen.seed]}
    rows, plain_rows, sweep_seconds = run_attack_sweep(model, config.tta, data, args, stage)
    baseline = {name: majority_baseline(splits.train.labels, getattr(splits, name).labels, data.n_classes, data.classes)
                for name in eval_splits(data)}
    # The figures show the model as evaluated, views and all.
    figures, flip, figure_name = draw_figures(as_evaluated(model, config.tta), data, splits, args, rows, baseline)
    png, png_status = write_figures(figures, stage, png=not args.no_png)
    print(f"figures: HTML written; PNG {png_status}", flush=True)

    metrics = {
        "study": study.study_name, "storage": redact(args.storage), "classes": list(data.classes),
        "trial": {"number": trial.number, "selection": selection, "params": trial.params,
                  "values": trial.values, "config_source": config_source},
        "config": config.to_dict(), "device": str(device), "data": splits.summary(),
        "seeds": [r.to_dict() for r in runs], "median_seed": chosen.seed, "model": kept,
        "candidates": candidate_summary,
        "selection": selection_record(args, candidates, candidate_summary),
        "summary": seed_summary(runs, data), "attack": attack_record(args, sweep_seconds),
        "figure_split": figure_name, "flip_example": flip,
        **{name: {**evaluations[name].to_dict(), "majority_baseline": baseline[name].to_dict()}
           for name in eval_splits(data)},
    }
    write_json(stage / "metrics.json", metrics)
    write_atomic(stage / "report.md", format_report(metrics, rows + plain_rows, {"png": png, "png_status": png_status}))
    publish(stage, out)
    shutil.rmtree(out / ".partial", ignore_errors=True)  # done: a later run retrains from scratch
    print_outcome(metrics, baseline, data, out, args)
    return 0


def choose_and_retrain(study, candidates, what: str, selection: str, data: DeviceData, splits, device, args,
                       out: Path) -> tuple:
    """(trial, config, config source, its seeds' runs, why it was chosen, one row per candidate).

    With several candidates and FOLDS, cross-validation chooses and only the
    chosen one is retrained; otherwise every candidate is retrained and the
    best mean dev over its seeds is kept (one candidate: it is retrained).
    """
    if len(candidates) > 1 and args.folds:
        args.folds = folds = folds_for_rarest(splits, args.folds)  # the folds used are the ones metrics.json records
        trial, why, candidate_summary = select_by_folds(study.study_name, candidates, splits, device, folds, out)
        selection = f"of {what}, cross-validated on {folds} folds of train+dev: {why}"
        print(f"chosen: trial {trial.number} ({selection}); retraining it on train with {args.seeds} seed(s)",
              flush=True)
        print_config(trial_config(trial)[0])
        trial, config, config_source, runs, _ = retrain_candidates(study, [trial], data, args, out, splits)[0]
    else:
        (trial, config, config_source, runs, why), candidate_summary = retrain_candidates(study, candidates, data,
                                                                                          args, out, splits)
        if len(candidates) > 1:
            selection = f"of {what}, retrained with {args.seeds} seed(s): {why}"
            print(f"chosen: trial {trial.number} ({selection})", flush=True)
            print_config(config)
    return trial, config, config_source, runs, selection, candidate_summary


def selection_record(args, candidates, rows: list[dict]) -> dict:
    """How the candidates were compared, and how each signal ranked them against their test scores."""
    if len(candidates) < 2:
        return {"signal": "none: one candidate"}
    if not args.folds:
        return {"signal": f"mean dev macro accuracy over {args.seeds} seed(s)"}
    return {"signal": f"{args.folds}-fold cross-validation over train+dev", "folds": args.folds,
            "rank_correlation_with_fold_test": signal_correlations(rows)}


def announce(study, trial, selection: str | None, what: str, config: TrainConfig, classes, recorded,
             folds: int) -> None:
    """What is retrained, with which config and class order; `selection` None: several candidates."""
    if selection is None:  # the config is printed once one is chosen
        how = f"cross-validation on {folds} folds of train+dev" if folds else "the mean dev over seeds"
        print(f"study {study.study_name!r}: choosing among {what} by {how}", flush=True)
    else:
        print(f"study {study.study_name!r}: trial {trial.number} ({selection})", flush=True)
        print_config(config)
    print(f"classes: {', '.join(f'{i} {c}' for i, c in enumerate(classes))}"
          f"{' (as recorded on the study)' if recorded else ''}", flush=True)


def print_config(config: TrainConfig) -> None:
    print(f"config: {json.dumps({k: v for k, v in config.to_dict().items() if k != 'seed'})}", flush=True)


def pick_candidates(study, args) -> tuple:
    """(trial, why it was chosen, the candidates to retrain, how to name them in a line)."""
    trial, selection = choose_trial(study, args.trial)
    single = args.trial is None and len(study.directions) == 1
    candidates = top_trials(study, args.candidates) if single else [trial]
    known = warm_start_trials(study, candidates) if single else []
    what = f"the top {len(candidates)} trials by dev macro accuracy ({', '.join(str(c.number) for c in candidates)})" + (
        f" and the warm-start point(s) {', '.join(str(c.number) for c in known)}" if known else "")
    return trial, selection, candidates + known, what


def load_study_splits(study, trial, args):
    """The split the study was searched on, in its recorded class order; any other split is refused."""
    recorded = study.user_attrs.get("classes")
    if not args.classes and recorded:  # the search's class order, not a guess from the folders
        args.classes = ",".join(recorded)
    splits = load_splits(args)
    if splits.test is not None:  # judged on every class of it: an empty or partial test split fails in the figures
        require_every_class(splits, ("test",), data_config(args))
    check_recorded_data(study, splits, args.corrections)
    if trial.user_attrs.get("classes") and list(trial.user_attrs["classes"]) != list(splits.classes):
        raise UserError(f"trial {trial.number} was trained on classes {','.join(trial.user_attrs['classes'])}, "
                        f"but the data options give {','.join(splits.classes)}; pass the same DATA and CLASSES "
                        "as the search")
    return splits


def print_outcome(metrics: dict, baseline: dict, data: DeviceData, out: Path, args) -> None:
    for name in eval_splits(data):
        summary = metrics["summary"][name]["macro_accuracy"]
        spread_text = (f"{summary['mean']:.3f} ± {summary['std']:.3f} over {summary['n']} seeds" if summary["n"] > 1
                       else "one seed, no spread")
        print(f"{name}: macro accuracy {metrics[name]['macro_accuracy']:.3f} ({model_words(metrics['model'])}); "
              f"single seeds {spread_text}; "
              f"majority baseline {baseline[name].macro_accuracy:.3f}")
    print(f"wrote {out}/ (report.md, metrics.json, fgsm.csv, model.pt, figures)")
    evaluate = hints.settings_of(args, "RESULTS", *hints.DATA_SETTINGS, "DEVICE", CHECKPOINT=out / "model.pt",
                                 SPLIT="test" if data.test is not None else "dev")
    print(f"evaluate it:  {hints.command('evaluate', evaluate)}")
