"""`make hpo-bench`: TPE vs random search vs the warm-started default vs TPE + Hyperband, each best retrained on test.

One bench runs for real on two small draws of the real images (cars/trucks/cats
and deer/dog/horse, 300 train / 90 dev / 60 test each, as .npz): a tiny TPE
space (2 start-up trials, 6 trials of 1-2 epochs, so three asks of 2, the
last two model-driven), every method and the recipe, one search seed, in
about half a minute on one thread. The tests below read what it wrote; the others
check one piece alone, on synthetic trials and reports.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData
from study.bench import hpo as hpo_bench
from study.bench import hpo_report, hpo_settings
from study.records import WARM_START_ATTR
from study.search.space_file import load_space
from conftest import REAL_DATA, STUDY_ENV, run_cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
BENCH_SPACE = ROOT / "search_spaces" / "bench.yaml"
DEFAULT_SPACE = ROOT / "search_spaces" / "default.yaml"
DEER_DATA = REAL_DATA.parent / "cifar10-deer-dog-horse"
SEARCH_SEEDS = [0]  # one: two data sets x four methods is already 8 searches
BUDGET = 40  # seconds per search: the trial quota ends each search long before it
METHODS = ["tpe", "random", "default", "tpe_hyperband", "recipe"]
SEARCHING = METHODS[:-1]
TINY_SPACE = """\
description: tiny TPE space, 2 start-up trials, three asks of 2 trials
objective: dev_macro_accuracy
sampler: {name: TPESampler, seed: 0, constant_liar: true, n_startup_trials: 2}
pruner: {name: MedianPruner, n_startup_trials: 2, n_warmup_steps: 1}
budget: {trials: 6}
params:
  optimizer: {type: categorical, choices: [sgd, adam]}
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  batch_size: 128
  epochs: {type: int, low: 1, high: 2}
  imbalance: weighted_loss
enqueue:
  - {optimizer: adam, lr: 3.0e-3, epochs: 2}
"""
TINY_RECIPE = """\
description: two quick epochs, all values fixed
params:
  optimizer: adam
  lr: 3.0e-3
  weight_decay: 0.0
  batch_size: 128
  epochs: 2
  imbalance: weighted_loss
"""

from test_search import small_data  # noqa: E402,F401 - fixture: the small real-image split

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


@pytest.fixture(scope="module")
def small_deer(tmp_path_factory) -> Path:
    """train/dev/test .npz drawn from the shared deer/dog/horse images, the counts of small_data."""
    if not (DEER_DATA / "train").is_dir():
        pytest.fail(f"deer/dog/horse data not found at {DEER_DATA} (beside the cars/trucks/cats data)")
    splits = prepare_splits(DataConfig(DEER_DATA, classes=("deer", "dog", "horse"), train_counts=(200, 60, 40),
                                       dev_counts=(50, 20, 20), test_counts=(20, 20, 20)), None)
    folder = tmp_path_factory.mktemp("small-deer")
    for name, part in splits.named().items():
        np.savez(folder / f"{name}.npz", images=part.images, labels=part.labels, ids=part.ids)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "tiny.yaml").write_text(TINY_SPACE)
    (folder / "recipe.yaml").write_text(TINY_RECIPE)
    return SimpleNamespace(space=folder / "tiny.yaml", recipe=folder / "recipe.yaml")


def bench_args(data: Path, results: Path, inputs, *extra) -> list:
    return ["hpo-bench", "--space", inputs.space, "--recipe", inputs.recipe, "--budget", str(BUDGET),
            "--datasets", str(data), "--results", results, "--device", "cpu", "--no-png", *extra]


@pytest.fixture(scope="module")
def bench(small_data, small_deer, inputs, tmp_path_factory):
    """One whole bench on two data sets, with every retrain counted (hpo.train_group, the retrains' only trainer)."""
    results = tmp_path_factory.mktemp("bench")
    calls = []
    real_train_group = hpo_bench.train_group

    def counting_train_group(configs, data, *args, **kwargs):
        calls.append((tuple(data.classes), [c.to_dict() for c in configs]))
        return real_train_group(configs, data, *args, **kwargs)

    datasets = f"{small_data} {small_deer}:deer,dog,horse"
    with pytest.MonkeyPatch.context() as patch:
        for name in STUDY_ENV:
            patch.delenv(name, raising=False)
        patch.setattr(hpo_bench, "train_group", counting_train_group)
        code, out, err = run_cli(*bench_args(small_data, results, inputs, "--datasets", datasets,
                                             "--methods", ",".join(METHODS),
                                             "--search-seeds", str(len(SEARCH_SEEDS))))
    runs = list((results / "hpo-bench").iterdir())
    assert code == 0, err
    assert len(runs) == 1, runs
    report = json.loads((runs[0] / "hpo_bench.json").read_text())
    return SimpleNamespace(code=code, out=out, err=err, run_dir=runs[0], report=report, calls=calls,
                           names=[small_data.name, small_deer.name])


def searches(report: dict, method: str | None = None):
    for name, part in report["datasets"].items():
        for m in SEARCHING if method is None else [method]:
            for s in part["methods"][m]["searches"]:
                yield name, s


# --- the whole bench ---------------------------------------------------------------

@pytest.mark.slow  # trains: the whole bench, once per module
def test_every_method_ran_every_search_seed_on_both_data_sets(bench):
    report = bench.report
    assert report["complete"] is True
    assert list(report["datasets"]) == bench.names
    assert report["datasets"][bench.names[1]]["classes"] == ["deer", "dog", "horse"]
    for name, part in report["datasets"].items():
        assert set(part["methods"]) == set(METHODS)
        for method in SEARCHING:
            runs = part["methods"][method]["searches"]
            assert sorted(s["search_seed"] for s in runs) == SEARCH_SEEDS
            for s in runs:
                assert s["method"] == method and s["budget_seconds"] == BUDGET
                assert s["trials_finished"] >= 1 and s["best_config"] is not None
                assert (bench.run_dir / s["storage"]).is_file() and s["storage"].startswith(f"{name}/studies/")
            assert part["methods"][method]["summary"]["search_seeds"] == len(SEARCH_SEEDS)
        recipe = part["methods"]["recipe"]
        assert recipe["config"]["epochs"] == 2 and 0.0 <= recipe["test_macro_mean"] <= 1.0
    assert report["settings"]["search_seeds"] == SEARCH_SEEDS and report["settings"]["retrain_seeds"] == [0, 1, 2]
    assert report["settings"]["fuse"] == 2 and report["settings"]["fuse_from"] == "the space's n_startup_trials"


@pytest.mark.slow  # trains: the whole bench, once per module
def test_each_search_scores_its_best_trial_on_test_with_three_retrain_seeds(bench):
    for name, s in searches(bench.report):
        part = bench.report["datasets"][name]
        test = s["test"]
        assert 0.0 <= test["test_macro_mean"] <= 1.0
        assert test["test_macro_sd"] is not None and test["test_macro_sd"] >= 0.0  # over the 3 retrain seeds
        assert set(test["test_per_class"]) == set(part["classes"])
        retrain = part["retrains"][test["retrain"]]
        assert [r["seed"] for r in retrain["seeds"]] == [0, 1, 2]
        assert test["test_macro_mean"] == pytest.approx(np.mean([r["test_macro_accuracy"] for r in retrain["seeds"]]))
        assert s["best_dev"] == max(t["dev_macro_accuracy"] for t in s["complete_trials"])
        assert retrain["config"] == {k: v for k, v in s["best_config"].items() if k != "seed"}


@pytest.mark.slow  # trains: the whole bench, once per module
def test_every_search_had_three_asks_the_last_two_model_driven(bench):
    """6 trials, 2 per ask, TPE's start-up 2: the first ask is random, the next two are TPE's model's."""
    for name, s in searches(bench.report):
        assert (s["asks"], s["startup_trials"], s["model_driven_asks"]) == (3, 2, 2), (name, s["method"])
        assert s["model_driven_trials"] == 4
        assert 0 <= s["model_driven_asks_judged"] <= 2
        weak = s["model_driven_asks_judged"] < hpo_bench.MIN_MODEL_DRIVEN_ASKS
        line = f"warning: {name} {s['method']} seed {s['search_seed']}: {s['model_driven_asks_judged']} model-driven"
        assert (line in bench.out) == weak


@pytest.mark.slow  # trains: the whole bench, once per module
def test_every_search_kept_its_budget_and_recorded_its_set_up(bench):
    for _, s in searches(bench.report):
        assert s["kept_budget"] is True
        assert 0.0 <= s["setup_seconds"] < s["wall_seconds"]
        assert s["search_seconds"] == pytest.approx(s["wall_seconds"] - s["setup_seconds"])
        assert s["search_seconds"] <= 1.1 * BUDGET


@pytest.mark.slow  # trains: the whole bench, once per module
def test_each_search_ran_its_methods_space_file(bench):
    original = load_space(bench.report["settings"]["space"])
    for name, s in searches(bench.report):
        path = bench.run_dir / s["space_file"]
        space = load_space(path)
        method, seed = s["method"], s["search_seed"]
        sampler = {"name": "RandomSampler", "seed": seed} if method == "random" else {**original.sampler, "seed": seed}
        assert space.sampler == sampler
        assert space.enqueue == (original.enqueue if method == "default" else [])
        assert space.pruner["name"] == ("HyperbandPruner" if method == "tpe_hyperband" else "MedianPruner")
        study = optuna.load_study(study_name=s["study"], storage=f"sqlite:///{bench.run_dir / s['storage']}")
        assert study.user_attrs["space_text"] == path.read_text()  # the study searched exactly that file


@pytest.mark.slow  # trains: the whole bench, once per module
def test_the_cold_methods_start_up_trials_coincide_seed_for_seed(bench):
    """Common random numbers: TPE's start-up draws are random search's, so the methods differ by TPE's model."""
    for name in bench.names:
        firsts = {}
        for _, s in searches({"datasets": {name: bench.report["datasets"][name]}}):
            if s["method"] == "default":
                continue  # its first ask holds the enqueued point
            study = optuna.load_study(study_name=s["study"], storage=f"sqlite:///{bench.run_dir / s['storage']}")
            firsts[(s["method"], s["search_seed"])] = [t.params for t in study.get_trials()[:2]]
        for seed in SEARCH_SEEDS:
            assert firsts[("tpe", seed)] == firsts[("random", seed)] == firsts[("tpe_hyperband", seed)]
            assert firsts[("tpe", seed)][0] != firsts[("tpe", seed)][1]  # two draws, not one repeated


@pytest.mark.slow  # trains: the whole bench, once per module
def test_a_config_is_retrained_once_per_data_set(bench):
    for name, part in bench.report["datasets"].items():
        classes = tuple(part["classes"])
        calls = [configs for data_classes, configs in bench.calls if data_classes == classes]
        assert len(calls) == len(part["retrains"]), "one train_group call per distinct config"
        keys = [json.dumps({k: v for k, v in call[0].items() if k != "seed"}, sort_keys=True) for call in calls]
        assert len(set(keys)) == len(keys), "no config was retrained twice on one data set"
        assert all([c["seed"] for c in call] == [0, 1, 2] for call in calls)  # 3 seeds, one fused group
        used = {s["test"]["retrain"] for m in SEARCHING for s in part["methods"][m]["searches"]}
        assert used | {part["methods"]["recipe"]["retrain"]} == set(part["retrains"])


@pytest.mark.slow  # trains: the whole bench, once per module
def test_the_tables_verdicts_figure_and_progress_name_every_method_and_data_set(bench):
    table = (bench.run_dir / "table.md").read_text()
    for name, part in bench.report["datasets"].items():
        assert f"### {name} (" in table
        verdict = next(line for line in part["verdicts"] if line.startswith("TPE (cold) vs random (cold): "))
        assert f"- {verdict}" in table and verdict in bench.out
        diff = hpo_report.paired_difference(part, "tpe", "random")
        assert f"{diff['mean']:+.3f} test macro" in verdict
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows.count("tpe_hyperband") == 2 and rows.count("recipe (no search)") == 2
    html = (bench.run_dir / "dev_vs_time.html").read_text()
    assert all(f"{m}, mean over 1 search seed(s)" in html for m in SEARCHING)
    total = len(SEARCHING) * len(SEARCH_SEEDS) * 2
    assert all(f"[{done}/{total}]" in bench.out for done in range(1, total + 1))


# --- one piece at a time: the methods' space files ------------------------------------------

def derived(tmp_path, space_path: Path, method: str, seed: int):
    path = tmp_path / f"{method}-{seed}.yaml"
    path.write_text(hpo_settings.derived_space_text(load_space(space_path), method, seed))
    return load_space(path), yaml.safe_load(path.read_text())


@pytest.mark.parametrize("method", hpo_settings.SEARCH_METHODS)
def test_each_methods_space_file_changes_only_what_its_name_says(tmp_path, method):
    original = load_space(BENCH_SPACE)
    assert original.enqueue, "the bench space warm-starts; this test needs it to"
    space, raw = derived(tmp_path, BENCH_SPACE, method, 2)
    assert list(space.params) == list(original.params)  # order matters: conditions follow their parents
    assert space.objectives == original.objectives and space.objective_epochs == original.objective_epochs
    if method == "random":
        assert space.sampler == {"name": "RandomSampler", "seed": 2}
    else:
        assert space.sampler == {**original.sampler, "seed": 2}
    if method == "default":
        assert space.enqueue == original.enqueue
    else:
        assert space.enqueue == [] and "enqueue" not in raw
    if method == "tpe_hyperband":
        assert space.pruner == {"name": "HyperbandPruner", "min_resource": 3, "max_resource": 16,
                                "reduction_factor": 3}
        assert isinstance(space.make_pruner(), optuna.pruners.HyperbandPruner)
    else:
        assert space.pruner == original.pruner


def test_the_hyperband_pruner_follows_the_space_epochs_and_warm_up(tmp_path):
    space, _ = derived(tmp_path, SMOKE, "tpe_hyperband", 0)  # epochs 2-4, n_warmup_steps 1
    assert space.pruner == {"name": "HyperbandPruner", "min_resource": 1, "max_resource": 4, "reduction_factor": 3}
    default, _ = derived(tmp_path, DEFAULT_SPACE, "tpe_hyperband", 0)  # epochs 30-100, n_warmup_steps 15
    assert (default.pruner["min_resource"], default.pruner["max_resource"]) == (15, 100)


def test_the_bench_space_is_the_default_space_with_short_trials():
    bench, default = load_space(BENCH_SPACE), load_space(DEFAULT_SPACE)
    shape = lambda p: (p.type, p.low, p.high, p.log, p.choices, p.when, p.field)  # noqa: E731
    assert {n: shape(p) for n, p in bench.params.items() if n not in ("epochs", "tta")} == \
           {n: shape(p) for n, p in default.params.items() if n not in ("epochs", "tta")}
    assert (bench.params["epochs"].low, bench.params["epochs"].high) == (6, 16)
    assert bench.params["tta"].value == "none"
    assert {k: v for k, v in bench.sampler.items() if k != "n_startup_trials"} == \
           {k: v for k, v in default.sampler.items() if k != "n_startup_trials"}
    assert hpo_settings.startup_trials(bench) == 8
    clip = lambda point: {**point, "epochs": min(point["epochs"], 16)}  # noqa: E731
    assert bench.enqueue == [clip(point) for point in default.enqueue]


def test_the_default_run_fits_in_90_minutes_by_its_own_estimate():
    """2 data sets x 4 methods x 3 seeds of the default budget, their set-up and retrains, on the CPU."""
    args = SimpleNamespace(device="cpu", methods=",".join(hpo_settings.DEFAULT_METHODS), budget=None,
                           search_seeds="3", fuse=None, space=str(BENCH_SPACE), recipe=hpo_settings.RECIPE_SPACE,
                           datasets=None, data=str(REAL_DATA), classes=None)
    settings = hpo_settings.settings_from(args)
    assert [d.name for d in settings["datasets"]] == [REAL_DATA.name, "cifar10-deer-dog-horse"]
    assert settings["datasets"][1].classes == "deer,dog,horse"
    assert settings["searches"] == ["tpe", "random", "default", "tpe_hyperband"] and settings["recipe"] is None
    assert settings["budget_seconds"] == 160 and settings["fuse"] == 8
    assert hpo_bench.estimate_minutes(settings) <= 90


def test_a_seeds_searches_run_back_to_back_with_the_leader_rotating():
    assert hpo_bench.search_order(["tpe", "random", "default"], [0, 1, 2, 3]) == [
        (0, "tpe"), (0, "random"), (0, "default"), (1, "random"), (1, "default"), (1, "tpe"),
        (2, "default"), (2, "tpe"), (2, "random"), (3, "tpe"), (3, "random"), (3, "default")]


# --- the data sets and methods options --------------------------------------------------------

def test_datasets_are_folders_with_an_optional_class_order(small_data, small_deer):
    found = hpo_settings.parse_datasets(f" {small_data};{small_deer}:deer,dog,horse ", "unused", None)
    assert [(d.name, d.path, d.classes) for d in found] == [
        (small_data.name, str(small_data), None), (small_deer.name, str(small_deer), "deer,dog,horse")]
    args = SimpleNamespace(data="x", classes="a,b", train_counts=None)
    assert vars(found[1].options(args)) == {"data": str(small_deer), "classes": "deer,dog,horse", "train_counts": None,
                                            "counts": None}


def test_without_datasets_the_bench_runs_data_and_the_shared_deer_set(small_data):
    found = hpo_settings.parse_datasets(None, str(small_data), "car,truck,cat")
    assert [(d.path, d.classes) for d in found] == [(str(small_data), "car,truck,cat"),
                                                    (str(hpo_settings.shared_second_dataset()), "deer,dog,horse")]
    assert Path(found[1].path).resolve() == DEER_DATA.resolve()
    # deer/dog/horse stands in for the user's problem at their counts; COUNTS set for the bench wins
    assert [d.counts for d in found] == [None, "user"]
    assert found[1].options(SimpleNamespace(data="x", classes=None, counts="all")).counts == "all"


@pytest.mark.parametrize("extra, culprit", [
    (["--budget", "0"], "BUDGET (--budget) '0'"),
    (["--budget", "five"], "BUDGET (--budget) 'five'"),
    (["--search-seeds", "0"], "SEARCH_SEEDS (--search-seeds) '0'"),
    (["--search-seeds", "2.5"], "SEARCH_SEEDS (--search-seeds) '2.5'"),
    (["--fuse", "0"], "FUSE (--fuse) '0'"),
    (["--methods", "tpe,bayes"], "unknown method 'bayes'"),
    (["--methods", "tpe,,random"], "METHODS (--methods) 'tpe,,random': expected a comma list"),
    (["--methods", "tpe,tpe"], "a method is named twice"),
    (["--methods", "recipe"], "name at least one method that searches"),
    (["--methods", "tpe,recipe", "--recipe", str(SMOKE)], "smoke.yaml: params optimizer, lr"),
    (["--datasets", "/nowhere/at/all"], "'/nowhere/at/all' is not a folder"),
    (["--datasets", "{data}:deer,deer"], "must name at least two distinct"),
    (["--datasets", "{data} {data}"], "two data sets are named"),
    (["--datasets", ":car,truck,cat"], "an entry has no folder"),
    (["--space", "search_spaces/missing.yaml"], "missing.yaml: search-space file not found"),
    (["--space", str(ROOT / "search_spaces" / "robust.yaml")], "ranks trials by dev macro accuracy alone"),
    (["--space", str(ROOT / "search_spaces" / "sweeps" / "lr.yaml")], "compare TPE with random search"),
])
def test_a_bad_option_is_one_line_and_exit_code_2_before_anything_runs(small_data, inputs, tmp_path, extra, culprit):
    extra = [e.replace("{data}", str(small_data)) for e in extra]
    code, out, err = run_cli(*bench_args(small_data, tmp_path, inputs, *extra))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], err
    assert not (tmp_path / "hpo-bench").exists()  # checked before any folder, data or training


def test_a_bad_budget_from_the_environment_is_one_line_too(small_data, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGET", "-3")
    code, _, err = run_cli(*[a for a in bench_args(small_data, tmp_path, inputs) if a not in ("--budget", str(BUDGET))])
    assert code == 2 and err.strip().splitlines() == ["error: BUDGET (--budget) '-3': expected a whole number >= 1"]


def test_methods_and_datasets_come_from_the_environment(small_data, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("METHODS", "tpe,annealing")
    code, _, err = run_cli(*bench_args(small_data, tmp_path, inputs))
    assert code == 2 and "METHODS (--methods) 'tpe,annealing': unknown method 'annealing'" in err
    monkeypatch.setenv("METHODS", "tpe,random")
    monkeypatch.setenv("DATASETS", "/nowhere/else")
    code, _, err = run_cli(*[a for a in bench_args(small_data, tmp_path, inputs) if a not in ("--datasets", str(small_data))])
    assert code == 2 and "DATASETS (--datasets) '/nowhere/else': '/nowhere/else' is not a folder" in err


# --- one piece at a time: asks, warnings, verdicts ---------------------------------------------

T0 = datetime(2025, 1, 1, 12, 0, 0)


def trials_at(rows) -> list:
    """Stored trials from (asked, told, state, user attrs) rows, times in seconds after T0."""
    made = []
    for number, (asked, told, state, attrs) in enumerate(rows):
        made.append(FrozenTrial(
            number=number, trial_id=number, state=state, value=0.5 if state == TrialState.COMPLETE else None,
            datetime_start=T0 + timedelta(seconds=asked),
            datetime_complete=T0 + timedelta(seconds=told) if told is not None else None,
            params={}, distributions={}, user_attrs=dict(attrs), system_attrs={}, intermediate_values={}))
    return made


C, P, F = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
WARM, CUT = {WARM_START_ATTR: 0}, {"stopped": "deadline"}


def test_asks_after_the_start_up_trials_are_model_driven_and_judged_unless_the_deadline_cut_them():
    rows = ([(0, 40, C, WARM)] + [(0, 40, C, {})] * 3  # ask 1: a warm-start point and 3 random picks
            + [(41, 80, P, {})] * 4  # ask 2: 4 finished before it, under the 6 start-up trials: random
            + [(81, 120, P, {"stopped": "pruner"})] * 4  # ask 3: 8 finished before it: TPE's, pruned on merit
            + [(121, 150, P, CUT)] * 2 + [(121, None, F, CUT)] * 2)  # ask 4: TPE's, cut by the deadline
    asks = hpo_bench.asks_of(trials_at(rows), startup=6)
    assert asks == {"asks": 4, "startup_trials": 6, "model_driven_trials": 8, "model_driven_asks": 2,
                    "model_driven_asks_judged": 1}


def test_an_enqueued_point_asked_after_the_start_up_is_not_model_driven():
    rows = [(0, 10, C, {})] * 2 + [(11, 20, C, WARM)]
    asks = hpo_bench.asks_of(trials_at(rows), startup=2)
    assert (asks["asks"], asks["model_driven_asks"], asks["model_driven_trials"]) == (2, 0, 0)


def search_record(method: str, seed: int, test: float | None, asks: int = 3, seconds: float = 140.0) -> dict:
    return {"method": method, "search_seed": seed, "best_dev": 0.8, "trials_finished": 24, "startup_trials": 8,
            "model_driven_asks_judged": asks, "search_seconds": seconds, "setup_seconds": 5.0,
            "budget_seconds": 150, "kept_budget": seconds <= 165,
            "test": {"test_macro_mean": test, "test_per_class": None if test is None else {"a": test, "b": test}}}


def synthetic_part(tpe: list[float], random: list[float]) -> dict:
    part = {"classes": ["a", "b"], "split": {"classes": ["a", "b"], "splits": {"test": {"a": 5, "b": 5}}},
            "methods": {"tpe": {"searches": [search_record("tpe", k, v) for k, v in enumerate(tpe)]},
                        "random": {"searches": [search_record("random", k, v) for k, v in enumerate(random)]}}}
    for entry in part["methods"].values():
        entry["summary"] = hpo_report.method_summary(entry["searches"], part["classes"])
    part["verdicts"] = hpo_report.verdicts(part)
    return part


def test_the_verdict_is_the_paired_difference_over_search_seeds():
    part = synthetic_part(tpe=[0.80, 0.84, 0.79], random=[0.78, 0.80, 0.81])  # diffs +0.02, +0.04, -0.02
    assert part["verdicts"] == ["TPE (cold) vs random (cold): +0.013 test macro "
                                "(sd 0.031 over 3 paired search seeds; tpe ahead on 2 of 3); "
                                "within the seeds' noise (2 standard errors: 0.035)"]
    clear = synthetic_part(tpe=[0.82, 0.84, 0.83], random=[0.78, 0.80, 0.80])  # +0.04, +0.04, +0.03
    assert clear["verdicts"][0].endswith("tpe ahead on 3 of 3)")
    summary = part["methods"]["tpe"]["summary"]
    assert summary["test_macro_mean"] == pytest.approx(0.81)
    assert summary["test_macro_sd_over_search_seeds"] == pytest.approx(np.std([0.80, 0.84, 0.79], ddof=1))


def test_the_verdict_says_plainly_where_tpe_did_not_beat_random():
    part = synthetic_part(tpe=[0.78, 0.80, 0.80], random=[0.80, 0.80, 0.81])
    (line,) = part["verdicts"]
    assert line.startswith("TPE (cold) vs random (cold): -0.010 test macro")
    assert line.endswith("tpe ahead on 0 of 3); tpe did not beat random here")


def test_a_seed_without_a_score_drops_out_of_the_pairing():
    part = synthetic_part(tpe=[0.80, None, 0.82], random=[0.79, 0.80, None])
    assert hpo_report.paired_difference(part, "tpe", "random") == {
        "method": "tpe", "against": "random", "mean": pytest.approx(0.01), "sd": None, "seeds": 1, "ahead": 1}
    assert part["verdicts"][0].endswith("(1 search seed; tpe ahead on 1 of 1)")


def test_the_table_has_a_section_per_data_set_with_its_verdict_and_warnings():
    report = {"settings": {"budget_seconds": 150, "retrain_seeds": [0, 1, 2], "space": "bench.yaml", "fuse": 8,
                           "startup_trials": 8, "budget_slack": 1.1},
              "datasets": {"cars": synthetic_part([0.80, 0.84], [0.78, 0.80]),
                           "deer": synthetic_part([0.70, 0.71], [0.72, 0.73])},
              "warnings": ["deer tpe seed 1: 1 model-driven ask(s)"]}
    table = hpo_report.format_tables(report)
    assert table.index("### cars (a, b: test 5/5)") < table.index("### deer (a, b: test 5/5)")
    assert "- TPE (cold) vs random (cold): +0.030 test macro" in table
    assert "- TPE (cold) vs random (cold): -0.020 test macro" in table and "tpe did not beat random here" in table
    row = next(line for line in table.splitlines() if line.startswith("| tpe |"))
    assert "| 0.820 ± 0.028 | +0.030 ± 0.014 |" in row and "| 3–3 | 140 |" in row
    assert table.endswith("Warnings:\n- deer tpe seed 1: 1 model-driven ask(s)")


def test_the_figure_draws_best_dev_so_far_and_a_search_without_a_complete_trial_draws_nothing():
    part = synthetic_part([0.8, 0.8], [0.8, 0.8])
    tpe, random = part["methods"]["tpe"]["searches"], part["methods"]["random"]["searches"]
    tpe[0]["complete_trials"] = [{"elapsed_seconds": 30.0, "dev_macro_accuracy": 0.7},
                                 {"elapsed_seconds": 90.0, "dev_macro_accuracy": 0.6},
                                 {"elapsed_seconds": 120.0, "dev_macro_accuracy": 0.75}]
    tpe[1]["complete_trials"] = [{"elapsed_seconds": 60.0, "dev_macro_accuracy": 0.72}]
    random[0]["complete_trials"] = random[1]["complete_trials"] = []
    assert hpo_report.best_so_far(tpe[0], [0.0, 30.0, 100.0, 150.0]) == [None, 0.7, 0.7, 0.75]
    fig = hpo_report.figure({"settings": {"budget_seconds": 150}, "datasets": {"cars": part}})
    means = {trace.name: trace.y for trace in fig.data if "mean over" in trace.name}
    assert set(means) == {"tpe, mean over 2 search seed(s)", "random, mean over 2 search seed(s)"}
    assert all(y is None for y in means["random, mean over 2 search seed(s)"])
    assert max(y for y in means["tpe, mean over 2 search seed(s)"] if y is not None) == pytest.approx((0.75 + 0.72) / 2)


def test_a_search_with_too_few_model_driven_asks_or_over_its_budget_is_named():
    assert hpo_bench.search_warnings(search_record("tpe", 0, 0.8, asks=2, seconds=160), "cars") == []
    few, over = hpo_bench.search_warnings(search_record("random", 1, 0.8, asks=1, seconds=170), "cars")
    assert few.startswith("cars random seed 1: 1 model-driven ask(s) judged before the deadline after its 8 start-up")
    assert over == "cars random seed 1: searched 170 s after a 5 s set-up, over 1.1 x its 150 s budget"


def test_the_retrain_cache_trains_a_config_once_whatever_its_seed(small_data, monkeypatch):
    data = DeviceData(prepare_splits(DataConfig(small_data), None), "cpu")
    calls = []
    real_train_group = hpo_bench.train_group
    monkeypatch.setattr(hpo_bench, "train_group",
                        lambda configs, d, **options: calls.append(configs) or real_train_group(configs, d, **options))
    cache = hpo_bench.RetrainCache(data)
    config = TrainConfig(batch_size=128, epochs=1)
    first, cached_first = cache.get(config)
    again, cached_again = cache.get(TrainConfig(batch_size=128, epochs=1, seed=7))
    other, cached_other = cache.get(TrainConfig(batch_size=128, epochs=1, lr=3e-3))
    assert (cached_first, cached_again, cached_other) == (False, True, False)
    assert again is first and other["id"] != first["id"]
    assert len(calls) == 2
