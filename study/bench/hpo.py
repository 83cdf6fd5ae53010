"""Is TPE worth it? TPE, random search, the warm-started default and TPE with Hyperband at an equal budget (`make hpo-bench`).

Each search is `make search` with TIMEOUT = BUDGET seconds (the trials still
training then are stopped and PRUNED, as for a user) on a file derived from
the bench space (hpo_settings: which method changes what), in its own SQLite
storage, for SEARCH_SEEDS search seeds on each data set. The searches of one
seed and data set run back to back, the leader rotating seed by seed, so a
neighbour's load falls on every method alike. Every method's sampler takes
the search seed, and TPE draws its start-up trials with a RandomSampler of
that seed, so TPE's and random search's early trials coincide (common random
numbers): the cold methods differ by TPE's model alone, which acts on the
asks after its n_startup_trials. The bench space is sized so that each search
gets two or more of those; a search that got fewer is named in a warning.

At each search's end the best trial by dev macro accuracy is retrained with
seeds 0, 1, 2 as one fused group and scored on the held-out test split, which
no search sees; a config retrains once, whichever search picks it.

Writes RESULTS/hpo-bench/<timestamp>/ (a new folder per run): hpo_bench.json
(rewritten after each search, `complete` true at the end), table.md (a table
and verdict per data set), dev_vs_time.html (+ PNG when kaleido can start
Chromium), and per data set the space file each search ran
(<data set>/spaces/) and its study (<data set>/studies/<method>-seed<k>.db).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData, evaluate, train_group
from cnnlib.tta import as_evaluated

from .. import lifetime
from ..data import load_splits
from ..errors import UserError
from ..options import add_common_options, add_data_options, sqlite_url
from ..output import fresh_folder, write_atomic, write_json
from ..records import FINISHED, STOPPED_BY_DEADLINE, WARM_START_ATTR, trial_config
from ..search import command as search
from ..search.space_file import load_space
from ..threads import use_cpu_threads
from . import hpo_settings
from .hpo_report import figure, format_tables, mean_sd, method_summary, number_text, verdicts, write_figure
from .hpo_settings import RECIPE, derived_space_text, max_epochs, settings_from

RETRAIN_SEEDS = (0, 1, 2)
MIN_MODEL_DRIVEN_ASKS = 2  # fewer, and a search says little about TPE's model
# A search ends within 1.1 x its TIMEOUT after its set-up (study/search/deadline.py); one that
# ends later is flagged.
BUDGET_SLACK = 1.1
# For the start-up line's estimate, measured on the shared 2-core CPU (torch 2.14.1, 1 thread while
# other jobs ran, one smoke run): a search's set-up to its first ask (1.4-2.4 s) and one epoch of a
# 3-seed retrain with its test scoring (29 s for 20 epochs).
SETUP_SECONDS = 3
RETRAIN_EPOCH_SECONDS = {"cpu": 1.5}


def add_arguments(parser) -> None:
    hpo_settings.add_arguments(parser)
    parser.add_argument("--no-png", action="store_true", help="skip the PNG copy of the figure (the HTML is always written)")
    add_data_options(parser)
    add_common_options(parser)


# --- retraining on the held-out test split ------------------------------------


def retrain(config: TrainConfig, data: DeviceData, seeds=RETRAIN_SEEDS) -> dict:
    """Train `config` with each seed as one fused group; test macro and per-class accuracy per seed and their mean."""
    configs = [TrainConfig.from_dict({**config.to_dict(), "seed": seed}) for seed in seeds]
    use_cpu_threads(data.device)  # chosen again by the load now: a search before it set its own
    started = time.perf_counter()
    results = train_group(configs, data, on_epoch=lambda member, stats: lifetime.check_interrupt())
    rows = []
    for seed, result in zip(seeds, results):
        if result.error is not None:
            rows.append({"seed": seed, "error": str(result.error)})
            continue
        test = evaluate(as_evaluated(result.model, config.tta), data.test, data.classes)
        rows.append({"seed": seed, "test_macro_accuracy": test.macro_accuracy, "test_per_class": test.per_class,
                     "dev_macro_accuracy": result.dev.macro_accuracy})
    ok = [r for r in rows if "error" not in r]
    test_mean, test_sd = mean_sd([r["test_macro_accuracy"] for r in ok])
    return {"config": {k: v for k, v in config.to_dict().items() if k != "seed"}, "seeds": rows,
            "test_macro_mean": test_mean, "test_macro_sd": test_sd,
            "test_per_class": {c: mean_sd([r["test_per_class"][c] for r in ok])[0] for c in data.classes},
            "dev_macro_mean": mean_sd([r["dev_macro_accuracy"] for r in ok])[0],
            "seconds": time.perf_counter() - started}


class RetrainCache:
    """One 3-seed retrain per distinct config (its seed aside): a config that several searches pick trains once."""

    def __init__(self, data: DeviceData, seeds=RETRAIN_SEEDS):
        self.data, self.seeds = data, tuple(seeds)
        self.entries: dict[str, dict] = {}

    @staticmethod
    def key(config: TrainConfig) -> str:
        return json.dumps({k: v for k, v in config.to_dict().items() if k != "seed"}, sort_keys=True)

    def get(self, config: TrainConfig) -> tuple[dict, bool]:
        """(the retrain's record, whether it came from the cache)."""
        key = self.key(config)
        if key in self.entries:
            return self.entries[key], True
        entry = {"id": f"r{len(self.entries)}", **retrain(config, self.data, self.seeds)}
        self.entries[key] = entry
        return entry, False

    def records(self) -> dict[str, dict]:
        return {entry["id"]: entry for entry in self.entries.values()}


def scores(entry: dict) -> dict:
    """What a search's end (or the recipe) copies from its retrain."""
    return {"retrain": entry["id"], "test_macro_mean": entry["test_macro_mean"], "test_macro_sd": entry["test_macro_sd"],
            "test_per_class": entry["test_per_class"]}


def describe(entry: dict, cached: bool) -> str:
    if entry["test_macro_mean"] is None:
        return f"retrain {entry['id']}: every seed diverged"
    per = " ".join(f"{c} {a:.3f}" for c, a in entry["test_per_class"].items())
    sd = f" ± {entry['test_macro_sd']:.3f}" if entry["test_macro_sd"] is not None else ""
    how = "cached" if cached else f"{entry['seconds']:.0f} s"
    return f"retrain {entry['id']} ({how}): test macro {entry['test_macro_mean']:.3f}{sd} over seeds ({per})"


# --- what a search did: its asks, its budget ------------------------------------


def asks_of(trials: list[FrozenTrial], startup: int) -> dict:
    """How a search's trials were asked, and how many asks TPE's model drove.

    An ask is the trials a worker asked together (one fused group on the CPU):
    they share the number of trials finished before them, since the worker
    tells a group before it asks the next. A trial is model-driven when at
    least `startup` trials had finished (COMPLETE or PRUNED: what TPESampler
    counts against its n_startup_trials) as it was asked, and it is not an
    enqueued warm-start point. For random search the same count says how many
    asks TPE's model would have driven in its place. A model-driven ask is
    judged when one of its trials trained to its end or to the pruner's
    verdict: an ask the deadline cut short says nothing about the model's picks.
    """
    finished_at = sorted(t.datetime_complete for t in trials if t.state in FINISHED and t.datetime_complete)
    asks: dict[int, list[FrozenTrial]] = {}
    for trial in trials:
        if trial.datetime_start is not None:  # a WAITING (enqueued, never asked) trial has none
            asks.setdefault(bisect.bisect_right(finished_at, trial.datetime_start), []).append(trial)
    model = {before: [t for t in group if WARM_START_ATTR not in t.user_attrs]
             for before, group in asks.items() if before >= startup}
    model = {before: group for before, group in model.items() if group}
    return {"asks": len(asks), "startup_trials": startup,
            "model_driven_trials": sum(len(group) for group in model.values()),
            "model_driven_asks": len(model),
            "model_driven_asks_judged": sum(any(judged(t) for t in group) for group in model.values())}


def judged(trial: FrozenTrial) -> bool:
    """Trained to its end (COMPLETE), or pruned on its merits (the pruner, a collapse, a divergence), not by the deadline."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.PRUNED and
                                                  trial.user_attrs.get("stopped") != STOPPED_BY_DEADLINE)


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best complete trial (highest dev macro accuracy, earliest number on ties)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def search_args(args, space_file: Path, storage: str, study_name: str, budget: int, fuse: int):
    """`make search`'s options for one search: the data set's data options, the bench's device, its own space, storage and budget."""
    parser = argparse.ArgumentParser()
    try:
        search.add_arguments(parser)  # its defaults read TRIALS, TIMEOUT, WORKERS, FUSE from the environment
    except ValueError as error:
        raise UserError(f"a search variable in the environment is not a whole number ({error})") from None
    ns = parser.parse_args([])
    for key, value in vars(args).items():
        if hasattr(ns, key):
            setattr(ns, key, value)  # data, results, device: the bench's own
    ns.space, ns.study, ns.storage, ns.timeout = str(space_file), study_name, storage, budget
    ns.trials, ns.workers, ns.fuse = None, 1, fuse  # no TRIALS or WORKERS from the environment: time is the budget
    return ns


def run_search(args, settings: dict, folder: Path, run_dir: Path, method: str, seed: int,
               cache: RetrainCache) -> dict:
    """One search of one method, seed and data set (`args`: that data set's options), then its best retrained on test."""
    name = f"{method}-seed{seed}"
    space_file = folder / "spaces" / f"{name}.yaml"
    db = folder / "studies" / f"{name}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    storage = sqlite_url(db)
    budget = settings["budget_seconds"]
    started, clock = datetime.now(), time.perf_counter()
    code = search.run(search_args(args, space_file, storage, name, budget, settings["fuse"]))
    wall = time.perf_counter() - clock
    if code:
        print(f"hpo-bench: {name}: the search ended with exit code {code}; scoring the trials it finished", flush=True)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    first_ask = min((t.datetime_start for t in trials if t.datetime_start is not None), default=None)
    # Set-up: from the call to the first ask (study, split, sampler); the deadline counts from about then.
    setup = (first_ask - started).total_seconds() if first_ask else wall
    search_seconds = wall - setup
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    record = {
        "method": method, "search_seed": seed, "space_file": str(space_file.relative_to(run_dir)),
        "storage": str(db.relative_to(run_dir)), "study": name, "exit_code": code,
        "budget_seconds": budget, "wall_seconds": wall, "setup_seconds": setup, "search_seconds": search_seconds,
        "kept_budget": search_seconds <= BUDGET_SLACK * budget,
        "trials_finished": sum(t.state in FINISHED for t in trials), "trials_complete": len(complete),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_stopped_by_deadline": sum(t.user_attrs.get("stopped") == STOPPED_BY_DEADLINE for t in trials),
        "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
        **asks_of(trials, settings["startup_trials"]),
        "complete_trials": [{"number": t.number, "elapsed_seconds": (t.datetime_complete - started).total_seconds(),
                             "dev_macro_accuracy": t.value} for t in complete],
        "best_trial": None, "best_dev": None, "best_config": None,
        "test": {"retrain": None, "test_macro_mean": None, "test_macro_sd": None, "test_per_class": None},
    }
    best = best_trial(trials)
    if best is None:
        print(f"hpo-bench: {name}: no trial completed; nothing to retrain", flush=True)
        return record
    config, _ = trial_config(best)
    entry, cached = cache.get(config)
    record.update(best_trial=best.number, best_dev=best.value, best_config=config.to_dict(), test=scores(entry))
    print(f"hpo-bench: {name}: best trial {best.number} (dev {best.value:.3f}); {describe(entry, cached)}", flush=True)
    return record


def search_warnings(record: dict, dataset: str) -> list[str]:
    """What makes one search a weak witness: too few model-driven asks, an overrun budget."""
    name = f"{dataset} {record['method']} seed {record['search_seed']}"
    found = []
    if record["model_driven_asks_judged"] < MIN_MODEL_DRIVEN_ASKS:
        found.append(f"{name}: {record['model_driven_asks_judged']} model-driven ask(s) judged before the deadline "
                     f"after its {record['startup_trials']} start-up trials (want >= {MIN_MODEL_DRIVEN_ASKS}); "
                     f"raise BUDGET or shorten the space's trials")
    if not record["kept_budget"]:
        found.append(f"{name}: searched {record['search_seconds']:.0f} s after a {record['setup_seconds']:.0f} s "
                     f"set-up, over {BUDGET_SLACK} x its {record['budget_seconds']} s budget")
    return found


# --- the command: settings -> splits -> per data set: recipe, searches seed by seed -> tables, figure ---


def estimate_minutes(settings: dict) -> float:
    """The whole run: every search's budget and set-up, and (on the CPU) one retrain per search and the recipe's."""
    searches = len(settings["datasets"]) * len(settings["searches"]) * len(settings["search_seeds"])
    seconds = searches * (settings["budget_seconds"] + SETUP_SECONDS)
    epoch = RETRAIN_EPOCH_SECONDS.get(settings["device"].type)
    if epoch is not None:
        seconds += searches * max_epochs(settings["space"]) * epoch
        if settings["recipe"] is not None:
            seconds += len(settings["datasets"]) * settings["recipe_config"].epochs * epoch
    return seconds / 60


def search_order(methods: list[str], seeds: list[int]) -> list[tuple[int, str]]:
    """(search seed, method) in the order they run on a data set: a seed's searches back to back, the
    leader rotating seed by seed, so that a one-off warm-up or a neighbour's drift favours no method."""
    return [(seed, method) for index, seed in enumerate(seeds)
            for method in methods[index % len(methods):] + methods[:index % len(methods)]]


def run(args) -> int:
    settings = settings_from(args)  # every option and file is checked before data, folders or training
    datasets = settings["datasets"]
    splits, run_dir = prepare(args, settings)
    threads = use_cpu_threads(settings["device"])
    budget, seeds, methods = settings["budget_seconds"], settings["search_seeds"], settings["searches"]
    total = len(datasets) * len(methods) * len(seeds)
    print(f"hpo-bench: {run_dir}: {total} searches of {budget} s ({', '.join(methods)} x search seeds "
          f"{', '.join(map(str, seeds))} x data sets {', '.join(d.name for d in datasets)}), {settings['fuse']} trials "
          f"per ask ({settings['fuse_from']}), on {settings['device']}{f' ({threads})' if threads else ''}; "
          f"about {estimate_minutes(settings):.0f} min with the set-up of each search and the "
          f"{len(RETRAIN_SEEDS)}-seed retrains", flush=True)
    report = report_skeleton(settings, datasets, splits)
    bench_started = time.perf_counter()
    save = lambda: write_json(run_dir / "hpo_bench.json", report)  # noqa: E731
    save()
    done = 0
    for dataset in datasets:
        part = report["datasets"][dataset.name]
        data = DeviceData(splits[dataset.name], settings["device"])
        cache = RetrainCache(data)
        if settings["recipe"] is not None:
            part["methods"][RECIPE] = retrain_recipe(settings, cache, dataset.name)
            part["retrains"] = cache.records()
            save()
        for seed, method in search_order(methods, seeds):
            lifetime.check_interrupt()  # a search that a swallowed SIGTERM ended early is the last one
            done += 1
            print(f"\nhpo-bench: [{done}/{total}] {dataset.name}: {method} search, search seed {seed}, budget "
                  f"{budget} s (bench {(time.perf_counter() - bench_started) / 60:.1f} min elapsed)", flush=True)
            record = run_search(dataset.options(args), settings, run_dir / dataset.name, run_dir, method, seed, cache)
            part["methods"][method]["searches"].append(record)
            part["retrains"] = cache.records()
            print(f"hpo-bench: [{done}/{total}] {dataset.name} {method} seed {seed}: {record['trials_finished']} "
                  f"trials finished, {record['model_driven_asks_judged']} model-driven ask(s) judged, "
                  f"searched {record['search_seconds']:.0f} s of a {budget} s budget "
                  f"(+{record['setup_seconds']:.0f} s set-up), best dev {number_text(record['best_dev'])}, "
                  f"test {number_text(record['test']['test_macro_mean'])}", flush=True)
            for warning in search_warnings(record, dataset.name):
                report["warnings"].append(warning)
                print(f"hpo-bench: warning: {warning}", flush=True)
            save()
        for method in methods:
            part["methods"][method]["summary"] = method_summary(part["methods"][method]["searches"], part["classes"])
        part["verdicts"] = verdicts(part)
        del data, cache  # this data set's images leave memory before the next one's load
    report["complete"] = True
    report["settings"]["finished"] = datetime.now().isoformat(timespec="seconds")
    report["settings"]["bench_seconds"] = time.perf_counter() - bench_started
    tables = format_tables(report)
    write_atomic(run_dir / "table.md", tables + "\n")
    save()
    png_status = write_figure(figure(report), run_dir, png=not args.no_png)
    print(f"\n{tables}\n\nfigure: {run_dir / 'dev_vs_time.html'}; {png_status}")
    print(f"wrote {run_dir}/ (hpo_bench.json, table.md, dev_vs_time.html, and per data set spaces/, studies/) "
          f"in {report['settings']['bench_seconds'] / 60:.1f} min")
    return 0


def prepare(args, settings: dict) -> tuple[dict, Path]:
    """(split per data set, the run's folder): every split built and every derived space file loaded before any
    search, so that a bad one stops the run before it trains."""
    datasets = settings["datasets"]
    splits = {}
    for dataset in datasets:  # every split is built (and checked) before the first search
        splits[dataset.name] = load_splits(dataset.options(args))
        if splits[dataset.name].test is None:
            raise UserError(f"{dataset.path}: no test split; hpo-bench scores every method on held-out test images")
    run_dir = fresh_folder(Path(args.results) / "hpo-bench")
    for dataset in datasets:  # every derived space file loads, or the run stops before any search
        for seed in settings["search_seeds"]:
            for method in settings["searches"]:
                path = run_dir / dataset.name / "spaces" / f"{method}-seed{seed}.yaml"
                write_atomic(path, derived_space_text(settings["space"], method, seed))
                load_space(path)
    return splits, run_dir


def report_skeleton(settings: dict, datasets, splits: dict) -> dict:
    """hpo_bench.json before any training: what runs, on what, with which versions."""
    space = settings["space"]
    return {
        "complete": False,
        "settings": {"methods": list(settings["methods"]), "budget_seconds": settings["budget_seconds"],
                     "budget_slack": BUDGET_SLACK, "search_seeds": settings["search_seeds"],
                     "retrain_seeds": list(RETRAIN_SEEDS), "space": str(space.path),
                     "startup_trials": settings["startup_trials"], "min_model_driven_asks": MIN_MODEL_DRIVEN_ASKS,
                     "fuse": settings["fuse"], "fuse_from": settings["fuse_from"],
                     "recipe": str(settings["recipe"].path) if settings["recipe"] else None,
                     "device": str(settings["device"]), "torch": torch.__version__, "optuna": optuna.__version__,
                     "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "host": platform.node(),
                     "estimated_minutes": estimate_minutes(settings),
                     "started": datetime.now().isoformat(timespec="seconds")},
        "datasets": {d.name: {"data": d.path, "classes": list(splits[d.name].classes),
                              "split": splits[d.name].summary(),
                              "methods": {m: {"searches": []} for m in settings["searches"]},
                              "retrains": {}, "verdicts": []}
                     for d in datasets},
        "warnings": [],
    }


def retrain_recipe(settings: dict, cache: RetrainCache, dataset: str) -> dict:
    """The reference row: the user's recipe, no search, retrained with the retrain seeds."""
    print(f"hpo-bench: {dataset}: recipe {settings['recipe'].path}: retraining with seeds "
          f"{', '.join(map(str, RETRAIN_SEEDS))}", flush=True)
    entry, cached = cache.get(settings["recipe_config"])
    print(f"hpo-bench: {dataset}: recipe: {describe(entry, cached)}", flush=True)
    return {"space_file": str(settings["recipe"].path), "config": entry["config"],
            "dev_macro_mean": entry["dev_macro_mean"], **scores(entry)}
