"""`make search`: Optuna studies over the seed CNN that complete, resume, prune, survive bad trials and share storage.

Every study here trains for real, on a small draw of the real images (300
train / 90 dev) written as .npz files, so a trial takes a second or two on a
CPU. Single-worker studies run in-process through the CLI; the ones about
worker processes, `make` and PostgreSQL run as subprocesses and are marked slow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from cnnlib.splits import DataConfig, prepare_splits
import postgres
from postgres import postgres_server, postgres_url  # noqa: F401 - fixtures
from study import cli
from study.search import objective as objective_module
from conftest import STUDY_ENV

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# The contract every consumer of a trial (export, plots, dashboard, make final) relies on.
CONTRACT_ATTRS = {"config", "classes", "dev_per_class", "dev_confusion_matrix", "train_macro_accuracy",
                  "train_per_class", "curve_train_loss", "curve_dev_loss", "curve_dev_macro_accuracy",
                  "train_seconds", "device", "epochs_run"}
DEV_SIZE = 50 + 20 + 20

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- fixtures and helpers -----------------------------------------------------

@pytest.fixture(scope="module")
def small_data(real_data, tmp_path_factory) -> Path:
    """train/dev/test .npz drawn from the real images: the whole pipeline, a trial in seconds."""
    splits = prepare_splits(DataConfig(real_data, train_counts=(200, 60, 40), dev_counts=(50, 20, 20),
                                       test_counts=(20, 20, 20)), None)
    folder = tmp_path_factory.mktemp("small-data")
    for name, part in splits.named().items():
        np.savez(folder / f"{name}.npz", images=part.images, labels=part.labels, ids=part.ids)
    return folder


pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


def search(data: Path, results: Path, storage: str, *extra: str, space: Path = SMOKE) -> int:
    """`python -m study search ...` in this process."""
    return cli.main(["search", "--space", str(space), "--storage", storage, "--results", str(results),
                     "--data", str(data), *extra])


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'optuna.db'}"


def trials_of(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def write_space(folder: Path, text: str, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def subprocess_env(**extra: str) -> dict:
    """This environment without the study variables, nor an outer `make test`'s flags and overrides."""
    env = {k: v for k, v in os.environ.items() if k not in STUDY_ENV + ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(extra)
    return env


def assert_exact_quota(trials, requested: int) -> None:
    """Exactly `requested` finished trials, nothing left running, no number twice, no config proposed twice."""
    states = [t.state for t in trials]
    assert sum(s in FINISHED for s in states) == requested, states
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), numbers
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params), f"workers proposed the same params twice: {params}"


# --- one worker, in-process ----------------------------------------------------

@pytest.fixture(scope="module")
def smoke_study(small_data, tmp_path_factory):
    """One 3-trial smoke study, shared by the tests that only read it."""
    results = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as patch:
        for name in STUDY_ENV:
            patch.delenv(name, raising=False)
        code = search(small_data, results, sqlite_url(results), "--trials", "3")
    return SimpleNamespace(code=code, results=results, url=sqlite_url(results), trials=trials_of(sqlite_url(results), "smoke"))


def test_smoke_study_finishes_exactly_the_requested_trials(smoke_study):
    assert smoke_study.code == 0
    assert_exact_quota(smoke_study.trials, 3)
    assert [t.state for t in smoke_study.trials].count(TrialState.COMPLETE) >= 2  # the pruner waits for 2


def test_complete_trials_hold_every_contract_attribute(smoke_study):
    complete = [t for t in smoke_study.trials if t.state == TrialState.COMPLETE]
    assert complete
    for trial in complete:
        attrs = trial.user_attrs
        assert CONTRACT_ATTRS <= set(attrs), f"trial {trial.number} lacks {sorted(CONTRACT_ATTRS - set(attrs))}"
        config = attrs["config"]
        assert {k: config[k] for k in trial.params} == trial.params
        assert config["dropout"] == 0.1 and config["imbalance"] == "weighted_loss"  # the space's fixed values
        assert attrs["classes"] == ["car", "truck", "cat"]
        epochs = config["epochs"]
        assert attrs["epochs_run"] == epochs
        for curve in ("curve_train_loss", "curve_dev_loss", "curve_dev_macro_accuracy"):
            assert len(attrs[curve]) == epochs and all(np.isfinite(attrs[curve]))
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))  # one report per epoch
        # The value is dev macro accuracy after the last epoch, consistent with everything recorded.
        assert trial.value == pytest.approx(attrs["curve_dev_macro_accuracy"][-1])
        assert trial.value == pytest.approx(np.mean(list(attrs["dev_per_class"].values())))
        confusion = np.array(attrs["dev_confusion_matrix"])
        assert confusion.shape == (3, 3) and confusion.sum() == DEV_SIZE
        assert confusion.sum(axis=1).tolist() == [50, 20, 20]  # rows are the true classes
        assert list(attrs["dev_per_class"]) == list(attrs["train_per_class"]) == ["car", "truck", "cat"]
        assert 0 <= attrs["train_macro_accuracy"] <= 1 and attrs["train_seconds"] > 0
        assert attrs["device"] in ("cpu", "cuda") or attrs["device"].startswith("cuda:")


def test_a_second_run_continues_the_same_study(smoke_study, small_data, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(smoke_study.results / "optuna.db", results / "optuna.db")

    code = search(small_data, results, sqlite_url(results), "--trials", "2")

    trials = trials_of(sqlite_url(results), "smoke")
    assert code == 0
    assert_exact_quota(trials, 5)  # also: the resumed run did not re-propose the first run's params
    for before, after in zip(smoke_study.trials, trials[:3]):  # the first run's trials untouched
        assert (after.number, after.state, after.params, after.value) == (before.number, before.state, before.params, before.value)


def test_a_pruned_trial_is_recorded_as_pruned_with_its_reason(small_data, tmp_path):
    space = write_space(tmp_path, """\
        sampler: {name: RandomSampler, seed: 0}
        pruner: {name: ThresholdPruner, lower: 1.01, n_warmup_steps: 2}   # no accuracy reaches 1.01
        params:
          lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
          optimizer: adam
          batch_size: 256
          epochs: 3
        """, "always_prune")

    code = search(small_data, tmp_path, sqlite_url(tmp_path), "--trials", "1", space=space)

    (trial,) = trials_of(sqlite_url(tmp_path), "always_prune")
    assert code == 0
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["pruned_reason"] == "pruned by ThresholdPruner at epoch 2"
    assert trial.user_attrs["epochs_run"] == 2 and len(trial.user_attrs["curve_dev_macro_accuracy"]) == 2
    assert sorted(trial.intermediate_values) == [1, 2]
    assert "dev_confusion_matrix" in trial.user_attrs  # a pruned trial still shows where it stood


def test_a_diverging_trial_is_recorded_and_the_study_goes_on(small_data, tmp_path):
    space = write_space(tmp_path, """\
        sampler: {name: GridSampler, seed: 1}   # seed 1 orders the grid: 1e6 first
        params:
          lr: {type: categorical, choices: [1.0e+6, 1.0e-2]}   # 1e6: NaN loss within the first epoch
          optimizer: sgd
          batch_size: 128
          epochs: 2
        """, "diverge")

    code = search(small_data, tmp_path, sqlite_url(tmp_path), "--trials", "2", space=space)

    trials = trials_of(sqlite_url(tmp_path), "diverge")
    diverged = [t for t in trials if t.params["lr"] == 1e6]
    sane = [t for t in trials if t.params["lr"] == 1e-2]
    assert code == 0
    assert len(diverged) == 1 and diverged[0].state == TrialState.PRUNED
    assert re.fullmatch(r"diverged: training loss became (nan|inf) in epoch 1", diverged[0].user_attrs["pruned_reason"])
    assert len(sane) == 1 and sane[0].state == TrialState.COMPLETE
    assert diverged[0].number < sane[0].number  # the study went on after the divergence


def test_a_grid_study_resumed_in_steps_covers_its_grid_once_then_stops(small_data, tmp_path, capsys):
    """Each run builds the grid sampler anew; every run must agree on the grid order and skip what is done."""
    space = write_space(tmp_path, """\
        sampler: {name: GridSampler, seed: 0}
        params:
          lr: {type: categorical, choices: [1.0e-2, 3.0e-3, 1.0e-3]}
          optimizer: adam
          batch_size: 256
          epochs: 1
        """, "grid")

    codes = [search(small_data, tmp_path, sqlite_url(tmp_path), "--trials", trials, space=space)
             for trials in ("2", "5", "5")]

    trials = trials_of(sqlite_url(tmp_path), "grid")
    assert codes == [0, 0, 0]
    assert sorted(t.params["lr"] for t in trials) == [1e-3, 3e-3, 1e-2]
    assert_exact_quota(trials, 3)
    assert "grid study 'grid' is complete (3 trials)" in capsys.readouterr().out


def test_a_trial_that_raises_is_recorded_as_failed_and_the_study_goes_on(small_data, tmp_path, monkeypatch):
    real_train, calls = objective_module.train_group, []

    def crash_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated crash in training")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(objective_module, "train_group", crash_once)

    code = search(small_data, tmp_path, sqlite_url(tmp_path), "--trials", "2", "--fuse", "1")

    trials = trials_of(sqlite_url(tmp_path), "smoke")
    assert code == 0
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"] == "RuntimeError: simulated crash in training"
    assert "simulated crash" in trials[0].user_attrs["traceback"]
    assert [t.state in FINISHED for t in trials[1:]] == [True, True]  # a failed trial does not use up the quota


def test_a_study_whose_every_trial_fails_stops_with_an_error(small_data, tmp_path, monkeypatch, capsys):
    """A broken setup must end the run, not fail trial after trial until the time budget is gone."""
    def always_crash(*args, **kwargs):
        raise RuntimeError("simulated broken setup")

    monkeypatch.setattr(objective_module, "train_group", always_crash)

    code = search(small_data, tmp_path, sqlite_url(tmp_path), "--trials", "1")

    trials = trials_of(sqlite_url(tmp_path), "smoke")
    assert code == 3
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert "3 trials failed in a row; last reason: RuntimeError: simulated broken setup" in capsys.readouterr().err


def test_a_journal_file_storage_runs_and_resumes_a_study(small_data, tmp_path):
    storage = f"journal:{tmp_path / 'journal.log'}"

    codes = [search(small_data, tmp_path, storage, "--trials", "1") for _ in range(2)]

    assert codes == [0, 0]
    assert_exact_quota(trials_of(optuna_journal(tmp_path / "journal.log"), "smoke"), 2)


def optuna_journal(path: Path):
    from optuna.storages import JournalStorage  # noqa: PLC0415
    from optuna.storages.journal import JournalFileBackend  # noqa: PLC0415
    return JournalStorage(JournalFileBackend(str(path)))


# --- worker processes, make, PostgreSQL (slow) ------------------------------------

@pytest.fixture(scope="module")
def make_search(small_data, tmp_path_factory):
    """`make search SPACE=search_spaces/smoke.yaml TRIALS=4 WORKERS=2`, exactly as a user types it."""
    results = tmp_path_factory.mktemp("make-search")
    command = ["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", "search",
               "SPACE=search_spaces/smoke.yaml", "TRIALS=4", "WORKERS=2", "FUSE=1", f"PY={sys.executable}",
               f"DATA={small_data}", f"RESULTS={results}", f"STORAGE={sqlite_url(results)}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=subprocess_env())
    return SimpleNamespace(done=done, trials=trials_of(sqlite_url(results), "smoke") if done.returncode == 0 else None)


@pytest.mark.slow
def test_make_search_with_two_workers_finishes_exactly_four_trials(make_search):
    done = make_search.done
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_exact_quota(make_search.trials, 4)
    assert "study 'smoke': 4 finished trials (4 added by this run)" in done.stdout


@pytest.mark.slow
def test_make_search_prints_a_line_per_trial_and_the_best_trial(make_search):
    out = make_search.done.stdout
    assert len(re.findall(r"^\[w[01]\] trial +\d+ (COMPLETE|PRUNED) ", out, flags=re.M)) == 4, out
    assert re.search(r"^best trial #\d+: value 0\.\d{4}$", out, flags=re.M), out
    assert "confusion (rows true, columns predicted)" in out


def test_without_a_postgresql_server_the_tests_skip_locally_but_fail_in_ci(monkeypatch):
    """A shared-storage check that silently skips in CI would prove nothing."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="binaries not found"):
        postgres.unavailable("PostgreSQL server binaries not found")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="binaries not found.*CI is set"):
        postgres.unavailable("PostgreSQL server binaries not found")


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_on_postgresql_finish_exactly_the_requested_trials(postgres_url, small_data, tmp_path):  # noqa: F811
    command = [sys.executable, "-m", "study", "search", "--space", str(SMOKE), "--storage", postgres_url,
               "--study", "two_workers", "--trials", "4", "--workers", "2", "--fuse", "1", "--data", str(small_data),
               "--results", str(tmp_path)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=tmp_path)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_exact_quota(trials_of(postgres_url, "two_workers"), 4)
    assert "pw-for-tests" not in done.stdout + done.stderr  # the password is redacted in messages


@pytest.mark.slow
def test_a_parallel_run_whose_workers_all_give_up_fails(small_data, tmp_path):
    """`make search` must not report success when every worker process stopped on failing trials."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent("""\
        # Loaded by every Python process of this test, spawned workers included: training always crashes.
        import cnnlib.training

        def train_group(*args, **kwargs):
            raise RuntimeError("injected training failure")

        cnnlib.training.train_group = train_group
        """))
    command = [sys.executable, "-m", "study", "search", "--space", str(SMOKE), "--storage", sqlite_url(tmp_path),
               "--trials", "2", "--workers", "2", "--fuse", "1", "--data", str(small_data),
               "--results", str(tmp_path)]  # 2 trials: with 1, one worker would be all that can run

    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=subprocess_env(PYTHONPATH=os.pathsep.join([str(inject), str(ROOT)])))  # this checkout

    states = [t.state for t in trials_of(sqlite_url(tmp_path), "smoke")]
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert states and set(states) == {TrialState.FAIL}
    assert "failed in a row; last reason: RuntimeError: injected training failure" in done.stderr


def test_a_collapsed_trial_is_pruned_as_a_constant_predictor_within_a_few_epochs(small_data, tmp_path, capsys):
    # L2 weight decay 5 with Adam drives every weight to zero: the net predicts one class.
    # The median pruner alone could not stop it (no trial has finished yet).
    space = write_space(tmp_path, """
        objective: dev_macro_accuracy
        sampler: {name: TPESampler, seed: 0}
        pruner: {name: MedianPruner, n_startup_trials: 5}
        params: {optimizer: adam, lr: 1.0e-2, weight_decay: 5.0, batch_size: 128, epochs: 30, imbalance: none}
        """, "collapse")
    storage = sqlite_url(tmp_path)
    assert search(small_data, tmp_path, storage, "--trials", "1", space=space) == 0
    trial, = trials_of(storage, "collapse")
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["pruned_reason"].startswith("constant predictor")
    assert trial.user_attrs["epochs_run"] <= objective_module.COLLAPSE_EPOCHS + 2
    assert "constant predictor" in capsys.readouterr().out


def test_a_healthy_trial_is_not_called_a_constant_predictor():
    from cnnlib.metrics import Evaluation
    from cnnlib.training import EpochStats

    healthy = Evaluation(("a", "b", "c"), np.array([[5, 1, 0], [1, 4, 1], [0, 2, 6]]))
    constant = Evaluation(("a", "b", "c"), np.array([[6, 0, 0], [6, 0, 0], [8, 0, 0]]))
    assert objective_module.collapsed(EpochStats(1, 1.0, 1.0, healthy, 0.1)) is None
    assert objective_module.collapsed(EpochStats(1, 1.0, 1.0, constant, 0.1)) == "predicts only a"


# --- what a run must refuse, and trials no worker owns --------------------------------------------

@pytest.mark.parametrize("variable", ["WORKERS", "FUSE"])
def test_workers_or_fuse_zero_from_the_environment_is_refused_not_read_as_one(tmp_path, monkeypatch, capsys, variable):
    monkeypatch.setenv(variable, "0")

    with pytest.raises(SystemExit) as stopped:  # argparse refuses it, with a one-line error
        search(tmp_path / "no-data", tmp_path, sqlite_url(tmp_path), "--trials", "1")
    code = stopped.value.code

    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert f"{variable}=" in err and "0" in err and ">= 1" in err


def add_finished_trial(url: str, study_name: str, params: dict, distributions: dict) -> None:
    study = optuna.create_study(study_name=study_name, storage=url, direction="maximize", load_if_exists=True)
    study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=0.5))


def test_a_second_space_file_whose_params_do_not_fit_the_study_is_refused_before_any_trial(small_data, tmp_path):
    """Optuna fails every trial whose categorical choices differ from the study's earlier trials: refuse the file."""
    url = sqlite_url(tmp_path)
    add_finished_trial(url, "shared", {"batch_size": 128},
                       {"batch_size": optuna.distributions.CategoricalDistribution([128, 256])})
    other = write_space(tmp_path, """\
        params:
          batch_size: {type: categorical, choices: [16, 32]}
          epochs: 1
        """, "other")

    result = subprocess.run([sys.executable, "-m", "study", "search", "--space", str(other), "--study", "shared",
                             "--storage", url, "--data", str(small_data), "--results", str(tmp_path), "--trials", "1"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {other}: params.batch_size"), lines
    assert "study 'shared'" in lines[0] and "STUDY=" in lines[0]
    assert len(trials_of(url, "shared")) == 1  # no trial was asked, none failed


def test_a_second_space_file_that_fits_the_study_is_named_as_such(small_data, tmp_path, capsys):
    url = sqlite_url(tmp_path)
    first = write_space(tmp_path, "params:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-2}\n  epochs: 1\n  batch_size: 256\n",
                        "first")
    second = write_space(tmp_path, "params:\n  lr: {type: float, low: 2.0e-3, high: 5.0e-3}\n  epochs: 1\n  batch_size: 256\n",
                         "second")

    codes = [search(small_data, tmp_path, url, "--study", "s", "--trials", "1", space=space) for space in (first, second)]

    err = capsys.readouterr().err
    assert codes == [0, 0]
    assert f"note: {second} differs from the space file study 's' began with ({first})" in err
    assert [t.state for t in trials_of(url, "s")] == [TrialState.COMPLETE] * 2


def test_warm_up_epochs_are_not_judged_as_collapse():
    from cnnlib.metrics import Evaluation
    from cnnlib.training import EpochStats

    constant = Evaluation(("a", "b", "c"), np.array([[6, 0, 0], [6, 0, 0], [8, 0, 0]]))
    trial = SimpleNamespace(number=0, user_attrs={"config": {"epochs": 7}})
    reporter = objective_module.EpochReporter(trial=trial, can_prune=False, warmup_epochs=4)
    assert [reporter(EpochStats(epoch, 1.0, 1.0, constant, 0.1)) for epoch in range(1, 8)] == \
        [False] * 6 + [True]  # epochs 5, 6, 7 are the three after the warm-up
    assert "epochs 5-7" in reporter.pruned_reason


def test_the_objective_can_average_the_last_epochs(small_data, tmp_path):
    space = write_space(tmp_path, """
        objective: dev_macro_accuracy
        objective_epochs: 2
        params: {optimizer: adam, lr: 3.0e-3, weight_decay: 0.0, batch_size: 128, epochs: 3}
        """, "smooth")
    storage = sqlite_url(tmp_path)
    assert search(small_data, tmp_path, storage, "--trials", "1", space=space) == 0
    trial, = trials_of(storage, "smooth")
    curve = trial.user_attrs["curve_dev_macro_accuracy"]
    assert trial.value == pytest.approx((curve[-1] + curve[-2]) / 2)
