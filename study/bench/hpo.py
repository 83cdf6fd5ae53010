"""Is the search worth running? Default search vs random search vs the user's recipe, at an equal budget (`make hpo-bench`).

Three methods, each judged on the held-out test split, which no search sees:
- default: the space file as it is (TPE, its pruner, its enqueued warm-start
  points), sampler seed = search seed;
- random: the same space with RandomSampler(seed = search seed), the same
  pruner and no enqueued points;
- recipe: the user's hand-tuned recipe (search_spaces/seed_final.yaml), no search.

Each search is `make search` with TIMEOUT = BUDGET seconds (the trials still
training then are stopped and PRUNED, as for a user), in its own
SQLite storage, for SEARCH_SEEDS search seeds; the two searches of a seed run
back to back, the leader alternating by seed, so a neighbour's load falls on
both alike. TPE draws its start-up trials with a RandomSampler of the same
seed as the random method's, so their early random trials often coincide
(common random numbers): the methods differ by the warm-start points and by
TPE's model after its start-up trials. At checkpoints of the
budget (1/3, 2/3, all of it) and at the search's end (the last trials told
included), the best trial so far
(by dev macro accuracy, from trial completion times) is retrained with seeds
0, 1, 2 as one fused group and scored on test: the mean and sd over those
seeds, and per-class accuracy. A config retrains once, whichever search or
checkpoint picks it (the recipe, too, when a search's best is the recipe).

Writes RESULTS/hpo-bench/<timestamp>/ (a new folder per run): hpo_bench.json
(rewritten after each search, `complete` true at the end), table.md,
test_vs_budget.html (+ PNG when kaleido can start Chromium), the space file
each search ran (spaces/) and its study (studies/<method>-seed<k>.db).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

from cnnlib.device import resolve_device
from cnnlib.training import DeviceData, TrainConfig, evaluate, train_group
from cnnlib.tta import as_evaluated

from ..search import command as search
from ..errors import UserError
from ..final import trial_config
from ..options import MAX_GROUP, add_common_options, add_data_options, load_splits, sqlite_url, use_cpu_threads
from ..output import fresh_folder, write_atomic, write_json, write_pngs
from ..search.objective import STOPPED_BY_DEADLINE
from ..search.plan import FINISHED
from ..search.space import load_space
from .hpo_report import _f, figure, format_table, mean_sd, method_summary

SEARCHES = ("default", "random")  # the two methods that search; "recipe" is the third
DEFAULT_BUDGET = {"cpu": 300, "cuda": 900}  # seconds per search; 2 x 3 searches fit in about an hour on 2 cores
CHECKPOINTS = (1 / 3, 2 / 3, 1.0)  # fractions of the budget; a last checkpoint ("end") takes every finished trial
RETRAIN_SEEDS = (0, 1, 2)


def add_arguments(parser) -> None:
    env = os.environ
    parser.add_argument("--space", default=env.get("SPACE") or "search_spaces/default.yaml",
                        help="the space the default and random searches search (env SPACE)")
    parser.add_argument("--recipe", default="search_spaces/seed_final.yaml",
                        help="the hand-tuned recipe: a space file whose values are all fixed")
    parser.add_argument("--budget", default=env.get("BUDGET") or None,
                        help="seconds per search (TIMEOUT of each `make search`; default "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_BUDGET.items()) + "; env BUDGET)")
    parser.add_argument("--search-seeds", default=env.get("SEARCH_SEEDS") or "3",
                        help="search seeds 0..k-1 per searching method (env SEARCH_SEEDS, default 3)")
    parser.add_argument("--fuse", default=env.get("FUSE") or None,
                        help="FUSE of each search (default: make search's default for the device; env FUSE)")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG copy of the figure (the HTML is always written)")
    add_data_options(parser)
    add_common_options(parser)


def _whole(name: str, text, minimum: int = 1, maximum: int | None = None) -> int:
    bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UserError(f"{name} {text!r}: expected a whole number {bounds}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise UserError(f"{name} {text!r}: expected a whole number {bounds}")
    return value


def settings_from(args) -> dict:
    """The bench's settings from the options; a bad value is one line naming the option."""
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as error:
        raise UserError(f"DEVICE {args.device!r}: {error}") from None
    budget = _whole("BUDGET (--budget)", args.budget) if args.budget is not None else DEFAULT_BUDGET.get(device.type, 300)
    seeds = _whole("SEARCH_SEEDS (--search-seeds)", args.search_seeds, maximum=MAX_GROUP)
    fuse = _whole("FUSE (--fuse)", args.fuse, maximum=MAX_GROUP) if args.fuse is not None else None
    space = load_space(args.space)
    if space.objectives != ["dev_macro_accuracy"]:
        raise UserError(f"{space.path}: hpo-bench ranks trials by dev macro accuracy alone; "
                        f"this space's objectives are {', '.join(space.objectives)}")
    recipe = load_space(args.recipe)
    return {"budget_seconds": budget, "search_seeds": list(range(seeds)), "fuse": fuse, "device": device,
            "space": space, "recipe": recipe, "recipe_config": recipe.fixed_config()}


# --- the run folder and its space files -------------------------------------

def new_run_dir(parent: Path) -> Path:
    """RESULTS/hpo-bench/<timestamp>/, created now: two runs never share one."""
    return fresh_folder(parent)


def derived_space_text(space_path: Path, method: str, seed: int) -> str:
    """The space file a search runs: the original with its sampler seeded (default) or replaced (random)."""
    raw = yaml.safe_load(Path(space_path).read_text())
    sampler = raw.get("sampler") or {"name": "TPESampler"}
    sampler = {"name": sampler} if isinstance(sampler, str) else dict(sampler)
    if method == "default":
        raw["sampler"] = {**sampler, "seed": seed}
        what = f"its own sampler ({sampler['name']}) seeded {seed}, its pruner and enqueued points"
    else:
        raw["sampler"] = {"name": "RandomSampler", "seed": seed}
        raw.pop("enqueue", None)
        what = f"RandomSampler(seed={seed}) instead of {sampler['name']}, the same pruner, no enqueued points"
    header = f"# make hpo-bench, {method} search, search seed {seed}: {space_path} with {what}.\n"
    # File order kept (a condition's parent comes first); one line per param, as in search_spaces/.
    return header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=1000)


def write_search_space(run_dir: Path, space_path: Path, method: str, seed: int) -> Path:
    path = run_dir / "spaces" / f"{method}-seed{seed}.yaml"
    write_atomic(path, derived_space_text(space_path, method, seed))
    load_space(path)  # a derived file that would not load fails now, before any search
    return path


# --- retraining on the held-out test split ------------------------------------


def retrain(config: TrainConfig, data: DeviceData, seeds=RETRAIN_SEEDS) -> dict:
    """Train `config` with each seed as one fused group; test macro and per-class accuracy per seed and their mean."""
    configs = [TrainConfig.from_dict({**config.to_dict(), "seed": seed}) for seed in seeds]
    use_cpu_threads(data.device)  # chosen again by the load now: a search before it set its own
    started = time.perf_counter()
    results = train_group(configs, data)
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
    """One 3-seed retrain per distinct config (its seed aside): a config that stays best trains once."""

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
    """What a checkpoint (or the recipe) copies from its retrain."""
    return {"retrain": entry["id"], "test_macro_mean": entry["test_macro_mean"], "test_macro_sd": entry["test_macro_sd"],
            "test_per_class": entry["test_per_class"]}


def describe(entry: dict, cached: bool) -> str:
    if entry["test_macro_mean"] is None:
        return f"retrain {entry['id']}: every seed diverged"
    per = " ".join(f"{c} {a:.3f}" for c, a in entry["test_per_class"].items())
    sd = f" ± {entry['test_macro_sd']:.3f}" if entry["test_macro_sd"] is not None else ""
    how = "cached" if cached else f"{entry['seconds']:.0f} s"
    return f"retrain {entry['id']} ({how}): test macro {entry['test_macro_mean']:.3f}{sd} over seeds ({per})"


# --- one search ---------------------------------------------------------------

def search_args(args, space_file: Path, storage: str, study_name: str, budget: int, fuse: int | None):
    """`make search`'s options for one search: the bench's data and device, its own space, storage and budget."""
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


def elapsed(trial: FrozenTrial, started: datetime) -> float:
    return (trial.datetime_complete - started).total_seconds()


def best_by(trials: list[FrozenTrial], started: datetime, seconds: float) -> FrozenTrial | None:
    """The best complete trial (highest dev macro accuracy, earliest number on ties) finished by `seconds`."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and elapsed(t, started) <= seconds]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def run_search(args, settings: dict, run_dir: Path, method: str, seed: int, cache: RetrainCache) -> dict:
    space_file = write_search_space(run_dir, settings["space"].path, method, seed)
    name = f"{method}-seed{seed}"
    db = run_dir / "studies" / f"{name}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    storage = sqlite_url(db)
    budget = settings["budget_seconds"]
    started, clock = datetime.now(), time.perf_counter()
    code = search.run(search_args(args, space_file, storage, name, budget, settings["fuse"]))
    wall = time.perf_counter() - clock
    if code:
        print(f"hpo-bench: {name}: the search ended with exit code {code}; scoring the trials it finished", flush=True)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    record = {
        "method": method, "search_seed": seed, "space_file": str(space_file.relative_to(run_dir)),
        "storage": str(db.relative_to(run_dir)), "study": name, "exit_code": code,
        "budget_seconds": budget, "wall_seconds": wall,
        "trials_finished": len(finished), "trials_complete": len(complete),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_stopped_by_deadline": sum(t.user_attrs.get("stopped") == STOPPED_BY_DEADLINE for t in trials),
        "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
        "complete_trials": [{"number": t.number, "elapsed_seconds": elapsed(t, started), "dev_macro_accuracy": t.value}
                            for t in complete],
        "best_trial": None, "best_dev": None, "best_config": None, "checkpoints": [],
    }
    marks = [(f"{fraction:.3g} budget", fraction, fraction * budget) for fraction in CHECKPOINTS]
    # "end": every trial the search finished, those told after the deadline included (a search that
    # met its trial quota early counts as ending at the budget, so checkpoints stay in time order).
    marks.append(("end", None, max(budget, wall, max((elapsed(t, started) for t in finished), default=0.0))))
    for label, fraction, seconds in marks:
        best = best_by(trials, started, seconds)
        point = {"at": label, "fraction_of_budget": fraction, "elapsed_seconds": seconds,
                 "trials_finished": sum(elapsed(t, started) <= seconds for t in finished),
                 "best_trial": None, "best_dev": None, "retrain": None,
                 "test_macro_mean": None, "test_macro_sd": None, "test_per_class": None}
        if best is not None:
            config, _ = trial_config(best)
            entry, cached = cache.get(config)
            point.update(best_trial=best.number, best_dev=best.value, **scores(entry))
            print(f"hpo-bench: {name} at {label} ({seconds:.0f} s): best trial {best.number} "
                  f"(dev {best.value:.3f}); {describe(entry, cached)}", flush=True)
        else:
            print(f"hpo-bench: {name} at {label} ({seconds:.0f} s): no complete trial yet", flush=True)
        record["checkpoints"].append(point)
    best = best_by(trials, started, float("inf"))
    if best is not None:
        record.update(best_trial=best.number, best_dev=best.value, best_config=trial_config(best)[0].to_dict())
    return record


# --- writing the figure ---------------------------------------------------------------


def write_figure(fig, run_dir: Path, png: bool) -> str:
    """test_vs_budget.html (plotly.js inside: opens offline) and, when kaleido can start Chromium, the PNG."""
    write_atomic(run_dir / "test_vs_budget.html", fig.to_html(include_plotlyjs=True, full_html=True))
    if not png:
        return "PNG skipped (--no-png)"
    failed = write_pngs({run_dir / "test_vs_budget.png": fig}, width=1100)
    if failed:
        return f"PNG export unavailable ({failed}); the HTML report does not need it"
    return f"wrote 1 PNGs to {run_dir}/"


# --- the command: settings -> the recipe -> the searches, seed by seed -> summary, table, figure ---

def run(args) -> int:
    settings = settings_from(args)  # every option and file is checked before data, folders or training
    splits = load_splits(args)
    if splits.test is None:
        raise UserError(f"{args.data}: no test split; hpo-bench scores every method on held-out test images")
    data = DeviceData(splits, settings["device"])
    threads = use_cpu_threads(data.device)  # the retrains' threads; each search chooses its own as it starts
    run_dir = new_run_dir(Path(args.results) / "hpo-bench")
    write_atomic(run_dir / "spaces" / "recipe.yaml", settings["recipe"].path.read_text())
    budget, seeds = settings["budget_seconds"], settings["search_seeds"]
    total = len(SEARCHES) * len(seeds)
    report = report_skeleton(settings, data, splits)
    print(f"hpo-bench: {run_dir}: {total} searches of {budget} s ({', '.join(SEARCHES)} x search seeds "
          f"{', '.join(map(str, seeds))}) on {data.device}{f' ({threads})' if threads else ''}, about {total * budget / 60:.0f} min of search plus the "
          f"set-up of each search and the {len(RETRAIN_SEEDS)}-seed retrains", flush=True)
    cache = RetrainCache(data)
    bench_started = time.perf_counter()

    def save():
        report["retrains"] = cache.records()
        write_json(run_dir / "hpo_bench.json", report)

    report["methods"]["recipe"] = retrain_recipe(settings, cache)
    save()
    run_searches(report, args, settings, run_dir, cache, save, bench_started)
    for method in SEARCHES:
        report["methods"][method]["summary"] = method_summary(report["methods"][method]["searches"], data.classes)
    report["complete"] = True
    report["settings"]["finished"] = datetime.now().isoformat(timespec="seconds")
    report["settings"]["bench_seconds"] = time.perf_counter() - bench_started
    table = format_table(report)
    write_atomic(run_dir / "table.md", table + "\n")
    save()
    png_status = write_figure(figure(report), run_dir, png=not args.no_png)
    print(f"\n{table}\n\nfigure: {run_dir / 'test_vs_budget.html'}; {png_status}")
    print(f"wrote {run_dir}/ (hpo_bench.json, table.md, test_vs_budget.html, spaces/, studies/)")
    return 0


def report_skeleton(settings: dict, data: DeviceData, splits) -> dict:
    """hpo_bench.json before any training: what runs, on what, with which versions."""
    return {
        "complete": False,
        "settings": {"budget_seconds": settings["budget_seconds"], "search_seeds": settings["search_seeds"],
                     "checkpoints": [*CHECKPOINTS, "end"],
                     "retrain_seeds": list(RETRAIN_SEEDS), "space": str(settings["space"].path),
                     "recipe": str(settings["recipe"].path), "fuse": settings["fuse"], "device": str(data.device),
                     "classes": list(data.classes), "data": splits.summary(), "torch": torch.__version__,
                     "optuna": optuna.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                     "host": platform.node(), "started": datetime.now().isoformat(timespec="seconds")},
        "methods": {"recipe": None, **{m: {"searches": []} for m in SEARCHES}},
        "retrains": {},
    }


def retrain_recipe(settings: dict, cache: RetrainCache) -> dict:
    """The third method: the user's recipe, no search, retrained with the retrain seeds."""
    print(f"hpo-bench: recipe {settings['recipe'].path}: retraining with seeds "
          f"{', '.join(map(str, RETRAIN_SEEDS))}", flush=True)
    entry, cached = cache.get(settings["recipe_config"])
    print(f"hpo-bench: recipe: {describe(entry, cached)}", flush=True)
    return {"space_file": "spaces/recipe.yaml", "config": entry["config"],
            "trials_finished": 0, "dev_macro_mean": entry["dev_macro_mean"], **scores(entry)}


def run_searches(report: dict, args, settings: dict, run_dir: Path, cache: RetrainCache, save,
                 bench_started: float) -> None:
    """Both searching methods for every search seed, the report saved after each search."""
    budget, seeds = settings["budget_seconds"], settings["search_seeds"]
    total, done = len(SEARCHES) * len(seeds), 0
    for seed in seeds:
        # The leader alternates seed by seed: a one-off warm-up or a neighbour's drift favours neither method.
        for method in (SEARCHES if seed % 2 == 0 else SEARCHES[::-1]):
            done += 1
            print(f"\nhpo-bench: [{done}/{total}] {method} search, search seed {seed}, budget {budget} s "
                  f"(bench {(time.perf_counter() - bench_started) / 60:.1f} min elapsed, "
                  f"{total * budget / 60:.0f} min of search budget in all)", flush=True)
            record = run_search(args, settings, run_dir, method, seed, cache)
            report["methods"][method]["searches"].append(record)
            print(f"hpo-bench: [{done}/{total}] {method} seed {seed}: {record['trials_finished']} trials finished in "
                  f"{record['wall_seconds']:.0f} s of a {budget} s budget, best dev {_f(record['best_dev'])}, "
                  f"test at its end {_f(record['checkpoints'][-1]['test_macro_mean'])}", flush=True)
            save()
