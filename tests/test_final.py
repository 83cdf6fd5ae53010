"""`make final`: which trial it retrains, what it writes, and that an interrupted run finishes on rerun.

The smoke study is made here with Optuna directly (SQLite in tmp_path), its
trials carrying the user attributes the search writes ("config", "classes"),
so these tests depend on the storage contract, not on the search code.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from cnnlib.checkpoint import load_checkpoint
from cnnlib.ensemble import Ensemble
from cnnlib.errors import OutputError
from cnnlib.metrics import Evaluation
from cnnlib.training import DeviceData, evaluate
from study import cli, records
from study.errors import UserError
from study.final import choice as final_choice
from study.final import command as final
from study.final import report as final_report
from study.final import retrain as final_retrain
from study.final import runs as final_runs

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["car", "truck", "cat"]
# The user's 80/12/8 imbalance, scaled down: seconds per seed on a CPU.
DATA_ARGS = ["--train-counts", "320,48,32", "--dev-counts", "60,20,20", "--test-counts", "40,40,40"]
FILES = ["model.pt", "metrics.json", "fgsm.csv", "report.md", "plotly.min.js",
         "accuracy_vs_epsilon.html", "examples_grid.html", "flip_example.html"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def smoke_config(**overrides) -> dict:
    config = dict(optimizer="adam", lr=3e-3, momentum=0.9, weight_decay=1e-4, batch_size=64, epochs=3,
                  imbalance="weighted_loss", dropout=0.1, flip=False, jitter=0.0, seed=0)
    return {**config, **overrides}


def add_trial(study, value, config, state=TrialState.COMPLETE, with_config=True, values=None):
    params = {"lr": config["lr"], "optimizer": config["optimizer"]}
    distributions = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "optimizer": CategoricalDistribution(["sgd", "adam"])}
    attrs = {"classes": CLASSES, **({"config": config} if with_config else {})}
    if state != TrialState.COMPLETE:
        value, values = None, None
    study.add_trial(create_trial(state=state, value=value, values=values, params=params,
                                 distributions=distributions, user_attrs=attrs))


@pytest.fixture
def smoke_study(tmp_path):
    """sqlite storage holding study 'smoke': trial 0 (0.55), trial 1 (0.62, the best), trial 2 failed."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="smoke", storage=storage, direction="maximize")
    add_trial(study, 0.55, smoke_config(lr=1e-3))
    add_trial(study, 0.62, smoke_config(lr=3e-3))
    add_trial(study, None, smoke_config(lr=5e-2), state=TrialState.FAIL)
    return storage


def final_args(storage, results, real_data, device, *extra) -> list[str]:
    return ["final", "--study", "smoke", "--storage", storage, "--results", str(results), "--data", str(real_data),
            "--device", str(device), "--candidates", "1", *DATA_ARGS, *extra]


def cli_namespace(real_data, results) -> argparse.Namespace:
    """The data options `make final` would parse, to rebuild the same split in a test."""
    parser = argparse.ArgumentParser()
    final.add_arguments(parser)
    return parser.parse_args(["--data", str(real_data), "--results", str(results), *DATA_ARGS])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- end to end -----------------------------------------------------------

@pytest.mark.slow
def test_final_on_a_smoke_study_writes_every_file(smoke_study, tmp_path, real_data, device):
    results = tmp_path / "results"
    env = {"OMP_NUM_THREADS": "1", **os.environ, "STUDY": "smoke", "STORAGE": smoke_study, "RESULTS": str(results), "DATA": str(real_data),
           "DEVICE": str(device), "SEEDS": "2", "EPSILONS": "0,0.03,0.1", "ATTACK": "both", "TRIAL": "", "CANDIDATES": "1"}
    done = subprocess.run([sys.executable, "-m", "study", "final", *DATA_ARGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = results / "final" / "smoke"
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == sorted(FILES)
    assert not list(out.glob(".*")), "no temporary file or .partial folder is left behind"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trial"]["number"] == 1 and metrics["trial"]["params"]["lr"] == 3e-3
    assert [s["seed"] for s in metrics["seeds"]] == [0, 1]
    for split in ("dev", "test"):
        block = metrics[split]
        assert {"macro_accuracy", "per_class", "confusion_matrix", "majority_baseline"} <= set(block)
        assert block["majority_baseline"]["macro_accuracy"] == pytest.approx(1 / 3)
        summary = metrics["summary"][split]["macro_accuracy"]
        per_seed = [s[split]["macro_accuracy"] for s in metrics["seeds"]]
        assert summary["mean"] == pytest.approx(sum(per_seed) / 2)
    assert metrics["model"] == {"kind": "ensemble", "seeds": [0, 1]}

    rows = read_rows(out / "fgsm.csv")
    assert [(r["split"], r["attack"], float(r["epsilon"])) for r in rows] == [
        (s, a, e) for a in ("fgsm", "pgd") for s in ("dev", "test") for e in (0.0, 0.03, 0.1)]
    assert {f"accuracy_{c}" for c in CLASSES} | {"macro_accuracy", "attack_success_rate"} <= set(rows[0])
    for r in rows:
        if float(r["epsilon"]) == 0:
            assert float(r["macro_accuracy"]) == pytest.approx(metrics[r["split"]]["macro_accuracy"])
    fgsm_rows = [r for r in rows if r["attack"] == "fgsm"]
    pgd_rows = [r for r in rows if r["attack"] == "pgd"]
    for f, p in zip(fgsm_rows, pgd_rows):
        assert float(p["macro_accuracy"]) <= float(f["macro_accuracy"])

    model, config, classes, extra = load_checkpoint(out / "model.pt", device)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert extra["seeds"] == [0, 1] and list(classes) == CLASSES
    data = DeviceData(final.load_splits(cli_namespace(real_data, results)), device)
    for split in ("dev", "test"):  # the kept checkpoint is the model the numbers describe
        assert evaluate(model, getattr(data, split), classes).confusion.tolist() == metrics[split]["confusion_matrix"]
    for i, member in enumerate(model.members):  # each member is its seed's own model
        alone = evaluate(member, data.test, classes).macro_accuracy
        assert alone == pytest.approx(metrics["seeds"][i]["test"]["macro_accuracy"])
    html = (out / "accuracy_vs_epsilon.html").read_text()
    assert re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", html) == ["plotly.min.js"], "one local plotly.js, no CDN"
    assert "Plotly.newPlot" in html and len(html) < 200_000
    report = (out / "report.md").read_text()
    for name in FILES:
        assert name in ("report.md", "plotly.min.js") or f"({name})" in report, f"report.md links {name}"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{f}.png" for f in final_report.FIGURES) or "PNG export: unavailable" in report


@pytest.mark.slow
def test_interrupted_run_keeps_old_outputs_and_a_rerun_finishes_without_redoing_seeds(
        smoke_study, tmp_path, real_data, device, monkeypatch):
    results = tmp_path / "results"
    out = results / "final" / "smoke"
    quick = ["--seeds", "2", "--no-png"]
    assert cli.main(final_args(smoke_study, results, real_data, device, *quick, "--epsilons", "0,0.1")) == 0
    first = json.loads((out / "metrics.json").read_text())

    real_train, calls = final_retrain.train_group, []

    def train_then_interrupt(configs, *args, **kwargs):
        calls.extend(c.seed for c in configs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(configs, *args, **kwargs)

    monkeypatch.setattr(final_retrain, "train_group", train_then_interrupt)
    assert cli.main(final_args(smoke_study, results, real_data, device, *quick, "--epsilons", "0,0.05")) == 130
    assert json.loads((out / "metrics.json").read_text()) == first, "an interrupted run leaves the last outputs whole"
    assert (out / ".partial" / "trial-1" / "seed-0.json").is_file()

    calls.clear()
    monkeypatch.setattr(final_retrain, "train_group",
                        lambda configs, *a, **k: calls.extend(c.seed for c in configs) or real_train(configs, *a, **k))
    assert cli.main(final_args(smoke_study, results, real_data, device, *quick, "--epsilons", "0,0.05")) == 0
    assert calls == [1], "seed 0 finished before the interruption and is reused"
    assert [float(r["epsilon"]) for r in read_rows(out / "fgsm.csv")] == [0.0, 0.05, 0.0, 0.05]
    assert not (out / ".partial").exists()


# --- choosing the trial and its config -------------------------------------

def _retrained(number, devs, warm_start=False):
    """A retrained candidate as retrain_candidates builds it: (trial, config, source, runs)."""
    trial = create_trial(state=TrialState.COMPLETE, value=max(devs), params={}, distributions={},
                         user_attrs={"warm_start_point": 0} if warm_start else {})
    trial.number = number
    runs = [final_runs.SeedRun(seed, {"dev": Evaluation(("a", "b"), [[round(100 * d), 100 - round(100 * d)], [0, 100]])},
                          1.0, 1, Path("x")) for seed, d in enumerate(devs)]
    return trial, None, "test", runs


def test_a_search_trial_within_the_seeds_noise_of_a_warm_start_point_leaves_it_the_choice():
    # Mean dev (macro over two classes, the second always right): 0.90 vs 0.895; seed spread ~0.03.
    lucky, known = _retrained(31, [0.84, 0.86, 0.90]), _retrained(0, [0.82, 0.86, 0.89], warm_start=True)
    chosen = final_choice.choose_retrained([lucky, known])
    assert chosen[0].number == 0 and "within the seeds' noise" in chosen[4]
    clear = _retrained(31, [0.96, 0.98, 0.97])
    chosen = final_choice.choose_retrained([clear, known])
    assert chosen[0].number == 31 and "more than the seeds' noise" in chosen[4]
    one_seed = final_choice.choose_retrained([_retrained(31, [0.9]), _retrained(0, [0.88], warm_start=True)])
    assert one_seed[0].number == 31, "one seed shows no spread: the best mean dev stands"


def test_completed_warm_start_points_join_the_top_trials_as_candidates():
    study = optuna.create_study(direction="maximize")
    for value, attrs in ((0.86, {"warm_start_point": 0}), (0.90, {}), (0.89, {}), (0.88, {}),
                         (0.70, {"warm_start_point": 1})):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, user_attrs=attrs))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"warm_start_point": 2}))
    top = final_choice.top_trials(study, 3)
    assert [t.number for t in top] == [1, 2, 3]
    assert [t.number for t in final_choice.warm_start_trials(study, top)] == [0, 4]


def test_candidates_sharing_batch_settings_retrain_fused_seed_by_seed_as_their_own_runs(real_data, tmp_path,
                                                                                       monkeypatch):
    """One fused group per seed (make final's 9 retrains ~1.8x faster); each member is its unfused run."""
    from cnnlib.splits import DataConfig, prepare_splits
    from cnnlib.config import TrainConfig
    from cnnlib.training import train

    splits = prepare_splits(DataConfig(real_data, train_counts=(80, 24, 16), dev_counts=(20, 20, 20),
                                       test_counts=(10, 10, 10)), tmp_path / "cache")
    data = DeviceData(splits, "cpu")
    configs = [TrainConfig.from_dict(smoke_config(epochs=2, batch_size=16, lr=lr)) for lr in (3e-3, 1e-3)]
    configs.append(TrainConfig.from_dict(smoke_config(epochs=2, batch_size=32)))  # other batches: its own group
    real, groups = final_retrain.train_group, []
    monkeypatch.setattr(final_retrain, "train_group", lambda cs, *a, **k: groups.append([c.seed for c in cs]) or real(cs, *a, **k))
    retrains = [final_retrain.Retrain(f"trial {i} ", c, tmp_path / f"trial-{i}", {"trial": i}) for i, c in enumerate(configs)]
    final_retrain.retrain_seeds(retrains, data, 2)
    assert groups == [[0, 0], [0], [1, 1], [1]]
    for seed in (0, 1):
        alone = train(TrainConfig.from_dict({**configs[1].to_dict(), "seed": seed}), data)
        fused = retrains[1].runs[seed]
        assert fused.evaluations["dev"].loss == pytest.approx(evaluate(alone.model, data.dev, data.classes,
                                                                       final_retrain.make_criterion(configs[1], data.train.y, 3)).loss,
                                                              rel=1e-3)
        assert (tmp_path / "trial-1" / f"seed-{seed}.pt").is_file()


def final_of_two_candidates(storage, results, real_data, device, *extra) -> tuple[dict, Path]:
    """`make final CANDIDATES=2` on the smoke study, no PNG, one epsilon: (metrics.json, its folder)."""
    args = final_args(storage, results, real_data, device, "--no-png", "--epsilons", "0", *extra)
    args[args.index("--candidates") + 1] = "2"
    assert cli.main(args) == 0
    out = results / "final" / "smoke"
    return json.loads((out / "metrics.json").read_text()), out


@pytest.mark.slow
def test_without_trial_the_top_candidates_are_retrained_and_the_best_mean_dev_is_kept(
        smoke_study, tmp_path, real_data, device, capsys):
    metrics, out = final_of_two_candidates(smoke_study, tmp_path / "results", real_data, device, "--seeds", "2",
                                           "--folds", "0", "--ensemble", "0")
    candidates = metrics["candidates"]
    assert [c["trial"] for c in candidates] == [1, 0]  # best search value first
    best = max(candidates, key=lambda c: c["mean_dev_macro_accuracy"])
    assert metrics["trial"]["number"] == best["trial"]
    assert metrics["summary"]["dev"]["macro_accuracy"]["mean"] == pytest.approx(best["mean_dev_macro_accuracy"])
    assert "top 2 trials" in metrics["trial"]["selection"]
    assert "by the mean dev over seeds" in capsys.readouterr().out
    # ENSEMBLE=0: the model is the median seed, and the numbers are its own
    assert metrics["model"] == {"kind": "median seed", "seeds": [metrics["median_seed"]]}
    median = next(s for s in metrics["seeds"] if s["seed"] == metrics["median_seed"])
    assert metrics["test"]["confusion_matrix"] == median["test"]["confusion_matrix"]
    _, _, _, extra = load_checkpoint(out / "model.pt")
    assert extra["seed"] == metrics["median_seed"]
    assert f"is seed {metrics['median_seed']}, the median by dev" in (out / "report.md").read_text()


@pytest.mark.slow
def test_by_default_the_candidates_are_cross_validated_and_the_best_is_retrained_alone(
        smoke_study, tmp_path, real_data, device, capsys):
    metrics, out = final_of_two_candidates(smoke_study, tmp_path / "results", real_data, device, "--seeds", "1",
                                           "--folds", "2")
    rows = {r["trial"]: r for r in metrics["candidates"]}
    assert set(rows) == {0, 1} and metrics["selection"]["folds"] == 2
    best = max(rows.values(), key=lambda r: r["cv_macro_accuracy"])
    assert metrics["trial"]["number"] == best["trial"] and best["chosen"]
    assert "cross-validated on 2 folds" in metrics["trial"]["selection"]
    for row in rows.values():
        assert 0 <= row["cv_macro_accuracy"] <= 1 and row["cv_standard_error"] > 0
        assert sum(map(sum, row["cv_confusion_matrix"])) == 320 + 48 + 32 + 60 + 20 + 20  # every image once
        assert row["fold_test_macro_accuracy"] is not None
    assert [r["seed"] for r in metrics["seeds"]] == [0]  # only the chosen one retrains on train
    printed = capsys.readouterr().out
    configs = [line for line in printed.splitlines() if line.startswith("config: ")]
    assert len(configs) == 1 and printed.index("chosen: trial") < printed.index("config: ")  # the kept one's
    assert json.loads(configs[0][len("config: "):]) == {k: v for k, v in metrics["config"].items() if k != "seed"}
    report = (out / "report.md").read_text()
    assert "## Candidates" in report and "CV macro ± SE" in report
    assert "fold 2/2" in printed


def test_unknown_study_is_a_one_line_error_listing_the_studies(smoke_study, tmp_path, real_data, capsys):
    args = final_args(smoke_study, tmp_path / "results", real_data, "cpu")
    args[args.index("smoke")] = "nope"
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "no study 'nope'" in error and "smoke" in error and error.count("\n") == 1


def test_best_trial_is_chosen_by_default(smoke_study):
    trial, why = final_choice.choose_trial(optuna.load_study(study_name="smoke", storage=smoke_study))
    assert trial.number == 1 and "best" in why


def test_trial_number_overrides_the_best(smoke_study):
    trial, why = final_choice.choose_trial(optuna.load_study(study_name="smoke", storage=smoke_study), 0)
    assert trial.number == 0 and "TRIAL=0" in why


def test_a_failed_or_missing_trial_number_is_refused_with_its_state(smoke_study):
    study = optuna.load_study(study_name="smoke", storage=smoke_study)
    with pytest.raises(cli.UserError, match="trial 2 of study 'smoke' is FAIL, not COMPLETE"):
        final_choice.choose_trial(study, 2)
    with pytest.raises(cli.UserError, match="has no trial 9"):
        final_choice.choose_trial(study, 9)


@pytest.mark.parametrize("names, where, dev_index", [
    (["dev_macro_accuracy", "robust_macro_accuracy"], "metric_names", 0),
    (["robust_macro_accuracy", "dev_macro_accuracy"], "metric_names", 1),
    (["robust_macro_accuracy", "dev_macro_accuracy"], "user_attrs", 1),  # how `make search` records them
])
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_multi_objective_study_picks_the_pareto_trial_with_the_best_dev_accuracy(names, where, dev_index):
    study = optuna.create_study(directions=["maximize", "maximize"])
    if where == "metric_names":
        study.set_metric_names(names)
    else:
        study.set_user_attr("objectives", names)
    # (dev, robust): trial 0 has the best dev; trial 3 is dominated by trial 2 and has the best robust.
    for dev, robust in ((0.70, 0.20), (0.60, 0.50), (0.65, 0.30), (0.50, 0.10)):
        values = [dev, robust] if dev_index == 0 else [robust, dev]
        add_trial(study, None, smoke_config(), values=values)
    trial, why = final_choice.choose_trial(study)
    assert trial.number == 0
    assert "Pareto" in why and "3 Pareto-optimal" in why


def test_config_comes_from_the_config_attribute():
    study = optuna.create_study(direction="maximize")
    add_trial(study, 0.5, smoke_config(batch_size=128, dropout=0.3))
    config, source = records.trial_config(study.trials[0])
    assert (config.batch_size, config.dropout) == (128, 0.3) and "config" in source


def test_config_falls_back_to_params_over_defaults_without_the_attribute():
    study = optuna.create_study(direction="maximize")
    add_trial(study, 0.5, smoke_config(lr=2e-3, optimizer="sgd", batch_size=128), with_config=False)
    config, source = records.trial_config(study.trials[0])
    assert (config.lr, config.optimizer) == (2e-3, "sgd")
    assert config.batch_size == final.TrainConfig().batch_size, "unsearched settings keep TrainConfig defaults"
    assert "params" in source


def test_median_seed_is_chosen_on_dev_and_is_the_lower_middle_for_even_counts():
    def run(seed, dev, test):
        evaluations = {"dev": Evaluation(tuple(CLASSES), _matrix(dev)), "test": Evaluation(tuple(CLASSES), _matrix(test))}
        return final_runs.SeedRun(seed, evaluations, 1.0, 3, Path("x"))
    runs = [run(0, 0.5, 0.9), run(1, 0.7, 0.1), run(2, 0.6, 0.5)]
    assert final_runs.median_run(runs).seed == 2
    assert final_runs.median_run(runs[:2]).seed == 0


def _matrix(accuracy: float):
    """A 3-class confusion matrix whose every class has the given accuracy (100 images each)."""
    right = round(accuracy * 100)
    return [[right if i == j else (100 - right if j == (i + 1) % 3 else 0) for j in range(3)] for i in range(3)]


def stage_of(out: Path, names) -> Path:
    stage = out / ".next"
    stage.mkdir(parents=True)
    for name in names:
        (stage / name).write_text("new")
    return stage


def test_publish_moves_every_output_into_place_and_drops_files_this_run_did_not_make(tmp_path):
    out = tmp_path / "final"
    stage = stage_of(out, final_report.REQUIRED_OUTPUTS)
    for name in ("report.md", "fgsm.csv", "model.pt", "examples_grid.png"):
        (out / name).write_text("old")
    (out / "notes.txt").write_text("the user's own file")
    final_report.publish(stage, out)
    assert {name: (out / name).read_text() for name in final_report.REQUIRED_OUTPUTS} == dict.fromkeys(
        final_report.REQUIRED_OUTPUTS, "new")
    assert not (out / "examples_grid.png").exists(), "a PNG of the replaced model must not outlive it"
    assert (out / "notes.txt").exists() and not stage.exists()


@pytest.mark.parametrize("made", [set(), {"report.md", "fgsm.csv"}, final_report.REQUIRED_OUTPUTS - {"model.pt"}],
                         ids=["emptied stage", "half a stage", "no model"])
def test_publish_of_an_incomplete_stage_replaces_and_removes_nothing(tmp_path, made):
    """A stage emptied by another run (or never finished) must not cost the last run's outputs."""
    out = tmp_path / "final"
    stage = stage_of(out, made)
    for name in final_report.OUTPUTS:
        (out / name).write_text("old")

    with pytest.raises(UserError, match=r"this run's outputs are incomplete \(no .*\); nothing in .* was replaced"):
        final_report.publish(stage, out)

    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == dict.fromkeys(final_report.OUTPUTS, "old")


def test_publish_never_puts_a_file_in_place_of_a_pipe_planted_among_the_outputs(tmp_path):
    """A rename onto a named pipe (or a device) would replace it with a regular file: refused before anything moves."""
    out = tmp_path / "final"
    stage = stage_of(out, final_report.REQUIRED_OUTPUTS)
    os.mkfifo(out / "fgsm.csv")
    (out / "model.pt").write_text("old")

    with pytest.raises(OutputError, match="named pipe"):
        final_report.publish(stage, out)

    assert stat.S_ISFIFO(os.lstat(out / "fgsm.csv").st_mode) and (out / "model.pt").read_text() == "old"


def test_figures_are_written_as_html_even_when_no_browser_can_draw_png(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium-here"))  # where kaleido looks for Chromium
    png, status = final_report.write_figures({"accuracy_vs_epsilon": go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))}, tmp_path, True)
    assert png == [] and status.startswith("unavailable")
    assert (tmp_path / "accuracy_vs_epsilon.html").is_file() and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("flag, value, message", [("--epsilons", "0,abc", "EPSILONS"), ("--epsilons", "0,2", "pixel scale"),
                                                  ("--attack", "cw", "fgsm, pgd or both"), ("--seeds", "0", ">= 1"),
                                                  ("--folds", "1", "expected 0 (choose by dev over seeds) or 2"),
                                                  ("--folds", "11", "FOLDS"),
                                                  ("--ensemble", "maybe", "ENSEMBLE='maybe': expected 1 (on) or 0")])
def test_bad_option_values_name_themselves(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["final", flag, value])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_final_judges_and_attacks_the_model_as_evaluated_and_the_plain_model_beside_it(tmp_path, real_data, device):
    from cnnlib.tta import as_evaluated

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="smoke", storage=storage, direction="maximize")
    add_trial(study, 0.6, smoke_config(tta="flip", ema=0.9))
    results = tmp_path / "results"
    env = {"OMP_NUM_THREADS": "1", **os.environ, "STUDY": "smoke", "STORAGE": storage, "RESULTS": str(results),
           "DATA": str(real_data), "DEVICE": str(device), "SEEDS": "1", "EPSILONS": "0,0.03", "ATTACK": "fgsm",
           "TRIAL": "", "CANDIDATES": "1"}
    done = subprocess.run([sys.executable, "-m", "study", "final", "--no-png", *DATA_ARGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = results / "final" / "smoke"
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_rows(out / "fgsm.csv")
    assert [(r["tta"], r["split"], float(r["epsilon"])) for r in rows] == [
        (t, s, e) for t in ("flip", "none") for s in ("dev", "test") for e in (0.0, 0.03)]
    model, config, classes, _ = load_checkpoint(out / "model.pt", device)
    assert (config.tta, config.ema) == ("flip", 0.9)
    data = DeviceData(final.load_splits(cli_namespace(real_data, results)), device)
    for split in ("dev", "test"):
        deployed = evaluate(as_evaluated(model, "flip"), getattr(data, split), classes)
        assert deployed.confusion.tolist() == metrics[split]["confusion_matrix"]
        clean = [r for r in rows if r["split"] == split and float(r["epsilon"]) == 0]
        assert float(clean[0]["macro_accuracy"]) == pytest.approx(deployed.macro_accuracy)
        assert float(clean[1]["macro_accuracy"]) == pytest.approx(evaluate(model, getattr(data, split), classes).macro_accuracy)
    report = (out / "report.md").read_text()
    assert "test-time augmentation `flip`" in report and "### The plain model (tta none)" in report
