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
the run completes: an interrupted run picks up where it stopped.
Epsilons are on the [0, 1] pixel scale (see cnnlib/attacks.py): the user's
[-1, 1]-scale eps 0.1 is 0.05 here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from cnnlib.atomic import FILE_MODE, write_atomic, write_json
from cnnlib.attacks import ATTACKS, DEFAULT_EPSILONS, PGD_STEPS, attack_sweep, check_epsilon
from cnnlib.checkpoint import load_checkpoint, save_checkpoint
from cnnlib.device import resolve_device
from cnnlib.ensemble import Ensemble
from cnnlib.metrics import Evaluation, majority_baseline
from cnnlib.splits import require_every_class
from cnnlib.training import DeviceData, TrainConfig, evaluate, group_configs, make_criterion, train_group
from cnnlib.tta import as_evaluated

from . import hints, interrupt, progress
from .errors import UserError
from .final_choice import (choose_retrained, choose_trial, epochs_trained, mean_dev, top_trials, trial_config,
                           warm_start_trials)
from .final_folds import select_by_folds, signal_correlations
from .final_report import (accuracy_figure, flip_figure, format_report, grid_figure, model_words, publish, write_csv,
                           write_figures)
from .options import (MAX_GROUP, add_common_options, add_data_options, add_study_options, check_recorded_data,
                      data_config, load_splits, switch, use_cpu_threads, whole_number)
from .output import claim_partial, study_folder
from .search.storage import load_existing_study
from .search.storage_url import redact


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


# --- retraining -----------------------------------------------------------

@dataclass
class SeedRun:
    seed: int
    evaluations: dict[str, Evaluation]  # split name -> evaluation
    seconds: float
    epochs: int
    checkpoint: Path

    def to_dict(self) -> dict:
        return {"seed": self.seed, "seconds": self.seconds, "epochs": self.epochs,
                **{name: e.to_dict() for name, e in self.evaluations.items()}}

    @classmethod
    def from_dict(cls, data: dict, classes, checkpoint: Path) -> "SeedRun":
        evaluations = {name: Evaluation.from_dict(classes, data[name]) for name in ("dev", "test") if name in data}
        return cls(data["seed"], evaluations, data["seconds"], data["epochs"], checkpoint)


def eval_splits(data: DeviceData) -> dict:
    return {name: split for name, split in (("dev", data.dev), ("test", data.test)) if split is not None}


@dataclass
class Retrain:
    """One candidate's seeds; each is recorded under `partial` as it finishes, so a killed run resumes there."""
    label: str  # "trial 29 " when several candidates train, else ""
    config: TrainConfig
    partial: Path
    fingerprint: dict
    runs: dict[int, SeedRun] = field(default_factory=dict)

    def reuse(self, classes) -> None:
        """Keep the seeds an interrupted run of the same trial and data already finished."""
        claim_partial(self.partial, self.fingerprint)
        for record in sorted(self.partial.glob("seed-*.json")):
            checkpoint = record.with_suffix(".pt")
            if checkpoint.is_file():
                run = SeedRun.from_dict(json.loads(record.read_text()), classes, checkpoint)
                self.runs[run.seed] = run


def retrain_seeds(retrains: list[Retrain], data: DeviceData, seeds: int) -> None:
    """Train seeds 0..k-1 of every candidate; per seed, candidates that share batch settings train as one fused group.

    A group holds one seed, so each member sees the batch order, initial
    weights and dropout masks of its own unfused run with that seed
    (tests/test_fused.py): fusing changes the wall time, not the result.
    2-core CPU, 1 thread, torch 2.14.1, 3 candidates at batch 64: one
    fused group trained them 1.8x faster than three runs in turn.
    """
    for retrain in retrains:
        retrain.reuse(data.classes)
    criteria = {id(r): make_criterion(r.config, data.train.y, data.n_classes) for r in retrains}  # once each
    for seed in range(seeds):
        for retrain in retrains:
            if seed in retrain.runs:
                print(f"{retrain.label}seed {seed}: reused from an interrupted run ({_scores(retrain.runs[seed])})",
                      flush=True)
        pending = [r for r in retrains if seed not in r.runs]
        seeded = [TrainConfig.from_dict({**r.config.to_dict(), "seed": seed}) for r in pending]
        for group in group_configs(seeded):
            members, configs = [pending[i] for i in group], [seeded[i] for i in group]

            def report(i, stats, members=members, configs=configs):
                interrupt.check()
                progress.epoch(f"{members[i].label}seed {seed}", stats.epoch, configs[i].epochs, stats.dev_macro_accuracy)

            # Dev is read at the end only: evaluating it every epoch (ten views with flip_translate) cost a third.
            for retrain, config, result in zip(members, configs, train_group(configs, data, report, dev_epochs=1)):
                if result.error is not None:
                    raise result.error
                evaluations = {name: evaluate(as_evaluated(result.model, config.tta), split, data.classes,
                                              criteria[id(retrain)])
                               for name, split in eval_splits(data).items()}
                checkpoint = retrain.partial / f"seed-{seed}.pt"
                run = SeedRun(seed, evaluations, result.seconds, len(result.history), checkpoint)
                save_checkpoint(checkpoint, result.model, config, data.classes, data.image_size)
                write_json(checkpoint.with_suffix(".json"), run.to_dict())  # after the weights: a record has its checkpoint
                together = f", fused with {len(members) - 1} other(s)" if len(members) > 1 else ""
                print(f"{retrain.label}seed {seed}: {_scores(run)}  ({result.seconds:.1f} s, {len(result.history)} "
                      f"epochs{together})", flush=True)
                retrain.runs[seed] = run


def _scores(run: SeedRun) -> str:
    return "  ".join(f"{name} macro {e.macro_accuracy:.3f}" for name, e in run.evaluations.items())


def sweep_rows(model, data: DeviceData, epsilons, attacks, pgd_steps: int, tta: str = "none") -> list[dict]:
    """fgsm.csv's rows: for each attack, each evaluated split, each epsilon, of `model` as evaluated with `tta`.

    The attacks differentiate through the test-time views (cnnlib.tta.TTAModel):
    the rows describe the model as deployed, views and all.
    """
    rows = []
    evaluated = as_evaluated(model, tta)
    for attack in attacks:
        options = {"steps": pgd_steps} if attack == "pgd" else {}
        for name, split in eval_splits(data).items():
            rows += [{"tta": tta, **r.row()}
                     for r in attack_sweep(evaluated, split, data.classes, epsilons, attack, name, **options)]
    return rows


def median_run(runs: list[SeedRun]) -> SeedRun:
    ranked = sorted(runs, key=lambda r: (r.evaluations["dev"].macro_accuracy, r.seed))
    return ranked[(len(ranked) - 1) // 2]


def spread(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


# --- the command: candidates -> data -> retrain and choose -> attack -> outputs ---

def run(args) -> int:
    device = resolve_device(args.device)  # a device this machine lacks fails before any work
    study = load_existing_study(args.study, args.storage)
    trial, selection, candidates, what = pick_candidates(study, args)
    config, _ = trial_config(trial)  # a trial whose config cannot be rebuilt fails before the data loads
    recorded = study.user_attrs.get("classes")
    splits = load_study_splits(study, trial, args)
    data = DeviceData(splits, device)
    threads = use_cpu_threads(device)
    if threads:
        print(f"cpu: {threads}", flush=True)
    out = output_folder(args.results, study.study_name)
    announce(study, trial, selection if len(candidates) == 1 else None, what, config, data.classes, recorded,
             args.folds)

    if len(candidates) > 1 and args.folds:
        trial, why, candidate_summary = select_by_folds(study.study_name, candidates, splits, device, args.folds, out)
        selection = f"of {what}, cross-validated on {args.folds} folds of train+dev: {why}"
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


def retrain_candidates(study, candidates, data, args, out: Path, splits) -> tuple:
    """Retrain each candidate with SEEDS seeds; the one with the best mean dev macro accuracy wins.

    One trial's dev value is one seed on a small dev set (51 trucks: a standard
    error near 2.7 points), so the search's best is partly its luckiest seed.
    In the first default search here the best trial (dev 0.858, one seed)
    retrained to 0.841 dev / 0.847 test over 3 seeds, while the third best
    (dev 0.844) retrains to 0.867 dev / 0.883 test. Averaging seeds takes the
    seed's luck out of the choice; the test split still plays no part in it.
    """
    sources, retrains = [], []
    for candidate in candidates:
        config, source = trial_config(candidate)
        sources.append(source)
        if len(candidates) > 1:
            done, asked = epochs_trained(candidate)
            cut = f", stopped by the deadline after epoch {done} of {asked}" if candidate.state.name == "PRUNED" else ""
            print(f"candidate trial {candidate.number} (search value {candidate.value:.4f}{cut}): "
                  f"{args.seeds} seed(s)", flush=True)
        fingerprint = {"study": study.study_name, "trial": candidate.number,
                       "config": {**config.to_dict(), "seed": None},
                       "data": splits.cache_path.name if splits.cache_path else splits.source,
                       "classes": list(data.classes)}
        label = f"trial {candidate.number} " if len(candidates) > 1 else ""
        retrains.append(Retrain(label, config, out / ".partial" / f"trial-{candidate.number}", fingerprint))
    retrain_seeds(retrains, data, args.seeds)
    retrained = [(candidate, retrain.config, source, [retrain.runs[seed] for seed in range(args.seeds)])
                 for candidate, source, retrain in zip(candidates, sources, retrains)]
    summary = [{"trial": c.number, "search_value": c.value, "mean_dev_macro_accuracy": mean_dev(runs),
                "mean_test_macro_accuracy": statistics.fmean(r.evaluations["test"].macro_accuracy for r in runs)
                if all("test" in r.evaluations for r in runs) else None} for c, _, _, runs in retrained]
    return choose_retrained(retrained), summary


def stage_model(stage: Path, chosen: SeedRun, study_name: str, trial_number: int, data: DeviceData, device):
    """The median seed's checkpoint as stage/model.pt, with what it is; returns the model."""
    model, seeded_config, _, _ = load_checkpoint(chosen.checkpoint, device)
    save_checkpoint(stage / "model.pt", model, seeded_config, data.classes, data.image_size,
                    extra={"study": study_name, "trial": trial_number, "seed": chosen.seed,
                           "selection": "median seed by dev macro accuracy"})
    os.chmod(stage / "model.pt", FILE_MODE)
    return model


def stage_ensemble(stage: Path, runs: list[SeedRun], study_name: str, trial_number: int, data: DeviceData,
                   device) -> tuple[Ensemble, dict[str, Evaluation], dict]:
    """The seeds' ensemble as stage/model.pt, evaluated as its config evaluates: (model, evaluations, what it is)."""
    loaded = [load_checkpoint(run.checkpoint, device) for run in runs]
    model, config = Ensemble([m for m, _, _, _ in loaded]).eval(), loaded[0][1]
    seeds = [run.seed for run in runs]
    save_checkpoint(stage / "model.pt", model, config, data.classes, data.image_size,
                    extra={"study": study_name, "trial": trial_number, "seeds": seeds,
                           "selection": "ensemble of the seeds: mean softmax"})
    os.chmod(stage / "model.pt", FILE_MODE)
    criterion = make_criterion(config, data.train.y, data.n_classes)
    evaluations = {name: evaluate(as_evaluated(model, config.tta), split, data.classes, criterion)
                   for name, split in eval_splits(data).items()}
    print("ensemble of seeds " + ", ".join(map(str, seeds)) + ": "
          + "  ".join(f"{name} macro {e.macro_accuracy:.3f}" for name, e in evaluations.items()), flush=True)
    return model, evaluations, {"kind": "ensemble", "seeds": seeds}


def run_attack_sweep(model, tta: str, data: DeviceData, args, stage: Path) -> tuple[list[dict], list[dict], float]:
    """Every attack at every epsilon on dev and test, written as stage/fgsm.csv; (rows, plain rows, seconds).

    The rows attack the model as evaluated (with its test-time views); with views,
    the plain model's rows come beside them so the two can be compared.
    """
    started = time.perf_counter()
    rows = sweep_rows(model, data, args.epsilons, args.attack, args.pgd_steps, tta)
    seconds = time.perf_counter() - started
    plain_rows = sweep_rows(model, data, args.epsilons, args.attack, args.pgd_steps) if tta != "none" else []
    print(f"attack sweep: {len(rows)} rows in {seconds:.1f} s (tta {tta})"
          + (f", and the plain model's {len(plain_rows)}" if plain_rows else ""), flush=True)
    write_csv(stage / "fgsm.csv", rows + plain_rows)
    return rows, plain_rows, seconds


def draw_figures(model, data: DeviceData, splits, args, rows: list[dict], baseline: dict) -> tuple[dict, dict, str]:
    """(figures by name, the flip example, the split they show).

    The pictures show the held-out test images (dev when the data has no test
    split) under the first attack asked for.
    """
    figure_name = "test" if data.test is not None else "dev"
    figure_split, attack = eval_splits(data)[figure_name], args.attack[0]
    attack_options = {"steps": args.pgd_steps} if attack == "pgd" else {}
    figures = {"accuracy_vs_epsilon": accuracy_figure(rows, data.classes, {k: v.macro_accuracy for k, v in baseline.items()}),
               "examples_grid": grid_figure(model, figure_split, figure_name, data.classes, args.epsilons, attack,
                                            attack_options)}
    figures["flip_example"], flip = flip_figure(model, figure_split, figure_name, data.classes, args.epsilons, attack,
                                                attack_options)
    flip["id"] = str(getattr(splits, figure_name).ids[flip["index"]])
    return figures, flip, figure_name


def attack_record(args, seconds: float) -> dict:
    return {"attacks": list(args.attack), "epsilons": list(args.epsilons), "pgd_steps": args.pgd_steps,
            "epsilon_scale": "[0, 1] pixels; on [-1, 1] inputs the same perturbation is 2 x epsilon",
            "seconds": seconds}


def seed_summary(runs: list[SeedRun], data: DeviceData) -> dict:
    """Per evaluated split: the spread over seeds of macro and per-class accuracy."""
    return {name: {"macro_accuracy": spread([r.evaluations[name].macro_accuracy for r in runs]),
                   "per_class": {c: spread([r.evaluations[name].per_class[c] for r in runs]) for c in data.classes}}
            for name in eval_splits(data)}


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
