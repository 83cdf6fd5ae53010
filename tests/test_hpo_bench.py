"""`make hpo-bench`: default search vs random search vs the recipe, each best config retrained on test.

One bench runs for real on a small draw of the real images (300 train / 90
dev / 60 test as .npz): the smoke space (4 trials of 2-4 epochs, which end a
search long before its BUDGET of 40 s: the deadline stops no trial), 2 search seeds, and a 2-epoch recipe, in about half a minute on one
thread. The tests below read what it wrote; the others check one piece alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import yaml

from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.training import DeviceData, TrainConfig
from study.bench import hpo as hpo_bench
from study.search.space import load_space
from conftest import STUDY_ENV, run_cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
DEFAULT_SPACE = ROOT / "search_spaces" / "default.yaml"
SEARCH_SEEDS = [0, 1]
BUDGET = 40  # seconds per search
CHECKPOINT_LABELS = ["0.333 budget", "0.667 budget", "1 budget", "end"]
TINY_RECIPE = """\
description: two quick epochs, all values fixed
params:
  optimizer: adam
  lr: 3.0e-3
  weight_decay: 0.0
  batch_size: 64
  epochs: 2
  imbalance: weighted_loss
"""

from test_search import small_data  # noqa: E402,F401 - fixture: the small real-image split

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny_recipe.yaml"
    path.write_text(TINY_RECIPE)
    return path


def bench_args(data: Path, results: Path, recipe: Path, *extra) -> list:
    return ["hpo-bench", "--space", SMOKE, "--recipe", recipe, "--budget", str(BUDGET), "--data", data,
            "--results", results, "--device", "cpu", "--no-png", *extra]


@pytest.fixture(scope="module")
def bench(small_data, recipe, tmp_path_factory):
    """One whole bench, with every retrain counted (study.bench.hpo.train_group, the retrains' only trainer)."""
    results = tmp_path_factory.mktemp("bench")
    calls = []
    real_train_group = hpo_bench.train_group

    def counting_train_group(configs, data, *args, **kwargs):
        calls.append([c.to_dict() for c in configs])
        return real_train_group(configs, data, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        for name in STUDY_ENV:
            patch.delenv(name, raising=False)
        patch.setattr(hpo_bench, "train_group", counting_train_group)
        code, out, err = run_cli(*bench_args(small_data, results, recipe, "--search-seeds", str(len(SEARCH_SEEDS))))
    runs = list((results / "hpo-bench").iterdir())
    assert code == 0, err
    assert len(runs) == 1, runs
    report = json.loads((runs[0] / "hpo_bench.json").read_text())
    return SimpleNamespace(code=code, out=out, err=err, run_dir=runs[0], report=report, calls=calls)


def searches(report: dict):
    for method in hpo_bench.SEARCHES:
        yield from report["methods"][method]["searches"]


# --- the whole bench ---------------------------------------------------------------

def test_the_report_has_all_three_methods_and_every_search_seed(bench):
    report = bench.report
    assert report["complete"] is True
    assert set(report["methods"]) == {"default", "random", "recipe"}
    for method in hpo_bench.SEARCHES:
        runs = report["methods"][method]["searches"]
        assert sorted(s["search_seed"] for s in runs) == SEARCH_SEEDS
        for s in runs:
            assert s["method"] == method and s["budget_seconds"] == BUDGET
            assert s["trials_finished"] >= 1 and s["best_config"] is not None
            assert (bench.run_dir / s["storage"]).is_file()
        assert report["methods"][method]["summary"]["search_seeds"] == len(SEARCH_SEEDS)
    recipe = report["methods"]["recipe"]
    assert recipe["config"]["epochs"] == 2 and recipe["trials_finished"] == 0
    assert 0.0 <= recipe["test_macro_mean"] <= 1.0
    assert report["settings"]["search_seeds"] == SEARCH_SEEDS and report["settings"]["retrain_seeds"] == [0, 1, 2]


def test_every_scored_checkpoint_has_a_test_macro_in_0_1_and_per_class_accuracy(bench):
    classes = bench.report["settings"]["classes"]
    for s in searches(bench.report):
        points = s["checkpoints"]
        assert [p["at"] for p in points] == CHECKPOINT_LABELS
        assert points[-1]["best_trial"] is not None, "a search that finished trials has a best at its end"
        for p in points:
            if p["best_trial"] is None:
                assert p["test_macro_mean"] is None
                continue
            assert 0.0 <= p["test_macro_mean"] <= 1.0
            assert p["test_macro_sd"] is not None and p["test_macro_sd"] >= 0.0  # over the 3 retrain seeds
            assert set(p["test_per_class"]) == set(classes)
            assert all(0.0 <= a <= 1.0 for a in p["test_per_class"].values())
            # The checkpoint's numbers are its retrain's, which holds one row per seed.
            retrain = bench.report["retrains"][p["retrain"]]
            assert [r["seed"] for r in retrain["seeds"]] == [0, 1, 2]
            assert p["test_macro_mean"] == pytest.approx(np.mean([r["test_macro_accuracy"] for r in retrain["seeds"]]))


def test_checkpoints_follow_time_and_the_best_dev_so_far_never_falls(bench):
    for s in searches(bench.report):
        points = s["checkpoints"]
        seconds = [p["elapsed_seconds"] for p in points]
        assert seconds == sorted(seconds) and seconds[2] == pytest.approx(BUDGET)
        devs = [p["best_dev"] for p in points if p["best_dev"] is not None]
        assert devs == sorted(devs)
        assert points[-1]["best_dev"] == pytest.approx(s["best_dev"])
        assert points[-1]["trials_finished"] == s["trials_finished"]


def test_the_random_method_recorded_a_random_sampler_space_without_enqueue(bench):
    original = load_space(SMOKE)
    for s in bench.report["methods"]["random"]["searches"]:
        path = bench.run_dir / s["space_file"]
        space = load_space(path)
        assert space.sampler == {"name": "RandomSampler", "seed": s["search_seed"]}
        assert space.enqueue == []
        assert space.pruner == original.pruner
        assert {n: (p.type, p.low, p.high, p.choices) for n, p in space.params.items()} == \
               {n: (p.type, p.low, p.high, p.choices) for n, p in original.params.items()}
        # The study searched exactly that file.
        study = optuna.load_study(study_name=s["study"], storage=f"sqlite:///{bench.run_dir / s['storage']}")
        assert study.user_attrs["space_text"] == path.read_text()
    for s in bench.report["methods"]["default"]["searches"]:
        space = load_space(bench.run_dir / s["space_file"])
        assert space.sampler == {**original.sampler, "seed": s["search_seed"]}


def test_a_config_that_stays_best_is_retrained_once(bench):
    report = bench.report
    retrains = report["retrains"]
    assert len(bench.calls) == len(retrains), "one train_group call per distinct config"
    configs = [json.dumps({k: v for k, v in call[0].items() if k != "seed"}, sort_keys=True) for call in bench.calls]
    assert len(set(configs)) == len(configs), "no config was retrained twice"
    assert all([c["seed"] for c in call] == [0, 1, 2] for call in bench.calls)  # 3 seeds, one fused group
    scored = [p for s in searches(report) for p in s["checkpoints"] if p["retrain"] is not None]
    assert len(scored) > len(retrains), "the bench asked for more retrains than it ran: the cache answered"
    assert {p["retrain"] for p in scored} | {report["methods"]["recipe"]["retrain"]} == set(retrains)


def test_the_table_figure_and_progress_name_every_method(bench):
    table = (bench.run_dir / "table.md").read_text()
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")}
    assert {"default", "random", "recipe"} <= rows
    assert table.splitlines()[0] in bench.out  # printed too
    html = (bench.run_dir / "test_vs_budget.html").read_text()
    assert "default (mean of 2 search seeds)" in html and "random (mean of 2 search seeds)" in html
    assert "recipe alone" in html
    total = len(hpo_bench.SEARCHES) * len(SEARCH_SEEDS)
    for done in range(1, total + 1):
        assert f"[{done}/{total}]" in bench.out


# --- one piece at a time ---------------------------------------------------------

def test_the_retrain_cache_trains_a_config_once_whatever_its_seed(small_data, monkeypatch):
    data = DeviceData(prepare_splits(DataConfig(small_data), None), "cpu")
    calls = []
    real_train_group = hpo_bench.train_group
    monkeypatch.setattr(hpo_bench, "train_group", lambda configs, d: calls.append(configs) or real_train_group(configs, d))
    cache = hpo_bench.RetrainCache(data)
    config = TrainConfig(batch_size=128, epochs=1)
    first, cached_first = cache.get(config)
    again, cached_again = cache.get(TrainConfig(batch_size=128, epochs=1, seed=7))
    other, cached_other = cache.get(TrainConfig(batch_size=128, epochs=1, lr=3e-3))
    assert (cached_first, cached_again, cached_other) == (False, True, False)
    assert again is first and other["id"] != first["id"]
    assert len(calls) == 2


def test_the_derived_spaces_of_the_default_file_keep_or_drop_its_warm_start(tmp_path):
    original = load_space(DEFAULT_SPACE)
    assert original.enqueue, "the default space warm-starts; this test needs it to"
    for method, seed in (("default", 2), ("random", 2)):
        path = tmp_path / f"{method}.yaml"
        path.write_text(hpo_bench.derived_space_text(DEFAULT_SPACE, method, seed))
        space = load_space(path)
        assert list(space.params) == list(original.params)  # order matters: conditions follow their parents
        assert space.pruner == original.pruner
        if method == "default":
            assert space.sampler == {**original.sampler, "seed": 2}
            assert space.enqueue == original.enqueue
        else:
            assert space.sampler == {"name": "RandomSampler", "seed": 2}
            assert space.enqueue == []
            assert "enqueue" not in yaml.safe_load(path.read_text())


def test_two_runs_in_one_second_get_two_folders(tmp_path):
    first, second = hpo_bench.new_run_dir(tmp_path), hpo_bench.new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("extra, culprit", [
    (["--budget", "0"], "BUDGET (--budget) '0'"),
    (["--budget", "five"], "BUDGET (--budget) 'five'"),
    (["--search-seeds", "0"], "SEARCH_SEEDS (--search-seeds) '0'"),
    (["--search-seeds", "2.5"], "SEARCH_SEEDS (--search-seeds) '2.5'"),
    (["--fuse", "0"], "FUSE (--fuse) '0'"),
    (["--recipe", str(SMOKE)], "smoke.yaml: params optimizer, lr"),
    (["--space", "search_spaces/missing.yaml"], "missing.yaml: search-space file not found"),
    (["--space", str(ROOT / "search_spaces" / "robust.yaml")], "ranks trials by dev macro accuracy alone"),
])
def test_a_bad_option_is_one_line_and_exit_code_2_before_anything_runs(small_data, recipe, tmp_path, extra, culprit):
    code, out, err = run_cli(*bench_args(small_data, tmp_path, recipe, *extra))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], err
    assert not (tmp_path / "hpo-bench").exists()  # checked before any folder, data or training


def test_a_bad_budget_from_the_environment_is_one_line_too(small_data, recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGET", "-3")
    code, _, err = run_cli(*[a for a in bench_args(small_data, tmp_path, recipe) if a not in ("--budget", str(BUDGET))])
    assert code == 2 and err.strip().splitlines() == ["error: BUDGET (--budget) '-3': expected a whole number >= 1"]
