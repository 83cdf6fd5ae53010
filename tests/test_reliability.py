"""A study is hours of compute: kills, Ctrl-C, crashed trials and storage hiccups must not lose a finished trial.

Each fault is made real, not mocked where it matters: a worker process kills
itself with SIGKILL in the middle of a trial (an injected `sitecustomize.py`
wraps cnnlib's training loop in every Python process of the test, spawned
workers included), SIGINT goes to the whole process group as Ctrl-C does,
and the PostgreSQL server is really stopped and started. Heartbeats are set
to 1 s with a 3 s grace period (HEARTBEAT_INTERVAL, HEARTBEAT_GRACE), so a
dead worker's trial is noticed within seconds instead of the default 30.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from cnnlib.checkpoint import load_checkpoint
from conftest import class_image
from postgres import postgres_server, postgres_url  # noqa: F401 - fixtures
from study import cli, output
from study.errors import UserError
from study.final import command as final_runner
from study.final import report as final_module
from study.search import objective as objective_module
from study.search import storage as storage_module
from study.search import trial_claims as claims_module
from study.search import worker as worker_module
from test_bad_input import assert_one_line_error
from test_search import FINISHED, SMOKE, small_data, sqlite_url, subprocess_env, trials_of  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
FAST_HEARTBEAT = {"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_GRACE": "3"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


# --- helpers ------------------------------------------------------------------------

WRAPPED_TRAINING = """\
# Every Python process of this test loads this: {purpose}
import os, signal, time
import cnnlib.training

_real_train = cnnlib.training.train_group


def train_group(configs, data, on_epoch=None, **options):
    def on_epoch_then(member, stats):
        stop = on_epoch(member, stats) if on_epoch else False
@ACTION@
        return stop
    return _real_train(configs, data, on_epoch_then, **options)


cnnlib.training.train_group = train_group
"""


def after_each_epoch(purpose: str, action: str) -> str:
    """A sitecustomize that runs `action` (Python, may `return stop`) after every epoch's own callback."""
    body = "\n".join(" " * 8 + line for line in textwrap.dedent(action).strip().splitlines())
    return WRAPPED_TRAINING.format(purpose=purpose).replace("@ACTION@", body)


def kill_one_trial(claim: Path) -> str:
    return after_each_epoch(
        "the first trial anywhere to finish its first epoch SIGKILLs its own process "
        "(no cleanup, no `finally`, no last words).", f"""
        try:
            fd = os.open({str(claim)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return stop
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
        """)


def hang_in_training(flag: Path) -> str:
    return after_each_epoch(
        'after its first epoch, a trial announces itself in a file and then trains "forever" (60 s).', f"""
        with open({str(flag)!r}, "a") as handle:
            handle.write(f"{{os.getpid()}}\\n")
        deadline = time.time() + 60
        while time.time() < deadline:
            time.sleep(0.05)
        """)


def inject(folder: Path, code: str) -> dict:
    """Environment variables that make every Python process started with them load `code` first."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}  # ROOT: this checkout, whatever is installed


def search_command(data: Path, results: Path, storage: str, *extra: str) -> list[str]:
    """One trial at a time per worker (`--fuse 1`, which `extra` may override): these tests kill or stop trials."""
    return [sys.executable, "-m", "study", "search", "--space", str(SMOKE), "--storage", storage,
            "--data", str(data), "--results", str(results), "--fuse", "1", *extra]


def make_search_command(data: Path, results: Path, storage: str, trials: int) -> list[str]:
    """`make search` with two one-trial-at-a-time workers on the smoke space, as a user would start it."""
    return ["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", "search",
            f"SPACE={SMOKE}", f"TRIALS={trials}", "WORKERS=2", "FUSE=1", f"PY={sys.executable}", f"DATA={data}",
            f"RESULTS={results}", f"STORAGE={storage}"]


def finished_params(trials) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials if t.state in FINISHED]


def assert_quota_with_retries(trials, requested: int) -> None:
    """Exactly `requested` finished trials, numbers 0..n-1 once each, nothing left running or waiting,
    and no finished config twice (a retry re-runs a *failed* trial's params, never a finished one's)."""
    states = [t.state for t in trials]
    assert sum(s in FINISHED for s in states) == requested, states
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    params = finished_params(trials)
    assert len(set(params)) == len(params), f"the same params finished twice: {params}"


def assert_killed_trial_was_retried(trials, output: str) -> None:
    """The SIGKILLed trial is FAIL (its heartbeat stopped) and a later trial re-ran exactly its params."""
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1, [(t.number, t.state) for t in trials]
    killed = failed[0]
    assert killed.intermediate_values, "the worker was meant to die mid-trial, after its first epoch"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, output
    retry = retries[0]
    assert retry.number > killed.number and retry.state in FINISHED
    assert retry.params == killed.params
    assert retry.system_attrs["retry_history"] == [killed.number]


# --- a worker SIGKILLed mid-trial, with 4 workers on one storage ----------------------------

def run_four_workers_with_a_kill(data: Path, results: Path, storage: str, study: str) -> SimpleNamespace:
    """`search --trials 6 --workers 4`; the first trial to finish an epoch kills its worker with SIGKILL."""
    claim = results / "killed.pid"
    env = subprocess_env(**FAST_HEARTBEAT, **inject(results / "inject", kill_one_trial(claim)))
    started = time.monotonic()
    done = subprocess.run(search_command(data, results, storage, "--study", study, "--trials", "6", "--workers", "4"),
                          capture_output=True, text=True, timeout=600, env=env, cwd=results)
    seconds = time.monotonic() - started
    return SimpleNamespace(done=done, output=done.stdout + done.stderr, seconds=seconds,
                           killed_pid=claim.read_text() if claim.exists() else None,
                           trials=optuna.load_study(study_name=study, storage=storage).get_trials())


@pytest.fixture(scope="module")
def sqlite_kill_run(small_data, tmp_path_factory):
    results = tmp_path_factory.mktemp("sqlite-kill")
    return run_four_workers_with_a_kill(small_data, results, sqlite_url(results), "four_workers")


@pytest.fixture(scope="module")
def postgres_kill_run(small_data, tmp_path_factory, postgres_server):  # noqa: F811
    results = tmp_path_factory.mktemp("postgres-kill")
    url = postgres_server.create_database("reliability_kill")
    return run_four_workers_with_a_kill(small_data, results, url, "four_workers")


@pytest.mark.slow
def assert_the_killed_worker_was_replaced_and_the_quota_met(run) -> None:
    assert run.done.returncode == 0, run.output[-4000:]
    assert run.killed_pid, "no worker was killed: the fault was not injected"
    assert "died (signal 9); starting a replacement" in run.done.stderr
    assert "Traceback" not in run.output, run.output[-4000:]
    assert_quota_with_retries(run.trials, 6)


def test_four_sqlite_workers_finish_exactly_the_requested_trials_despite_a_killed_worker(sqlite_kill_run):
    assert_the_killed_worker_was_replaced_and_the_quota_met(sqlite_kill_run)
    assert "study 'four_workers': 6 finished trials (6 added by this run)" in sqlite_kill_run.done.stdout


@pytest.mark.slow
def test_a_sqlite_workers_killed_trial_fails_by_heartbeat_and_is_retried_with_its_params(sqlite_kill_run):
    assert_killed_trial_was_retried(sqlite_kill_run.trials, sqlite_kill_run.output)


@pytest.mark.slow
def test_four_workers_on_one_sqlite_file_never_hit_database_is_locked(sqlite_kill_run):
    assert "database is locked" not in sqlite_kill_run.output.lower()
    assert "Traceback" not in sqlite_kill_run.output, sqlite_kill_run.output[-4000:]


@pytest.mark.slow
@pytest.mark.postgres
def test_four_postgresql_workers_finish_exactly_the_requested_trials_despite_a_killed_worker(postgres_kill_run):
    assert_the_killed_worker_was_replaced_and_the_quota_met(postgres_kill_run)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_postgresql_workers_killed_trial_fails_by_heartbeat_and_is_retried_with_its_params(postgres_kill_run):
    assert_killed_trial_was_retried(postgres_kill_run.trials, postgres_kill_run.output)


# --- Ctrl-C ---------------------------------------------------------------------------------

def _as_in_a_terminal() -> None:
    """Ctrl-C reaches a foreground program in a terminal: undo an ignored or blocked SIGINT inherited
    from the test process (Python starts a child with SIGINT ignored if its parent ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def interrupt_search(data: Path, results: Path, storage: str, *extra: str, training: int = 1) -> SimpleNamespace:
    """Start a search whose trials hang in training, wait until `training` trials are mid-epoch, then Ctrl-C it."""
    flag = results / "training.pids"
    env = subprocess_env(**inject(results / "inject", hang_in_training(flag)))
    process = subprocess.Popen(search_command(data, results, storage, "--trials", "3", *extra), env=env, cwd=results,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 240
        while len(flag.read_text().splitlines() if flag.exists() else []) < training:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"{training} trial(s) did not reach their first epoch within 240 s"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        interrupted = time.monotonic()
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 60 s after SIGINT; the test process's SIGINT handler is "
                                 f"{signal.getsignal(signal.SIGINT)!r}, blocked: {signal.pthread_sigmask(signal.SIG_BLOCK, [])}")
        seconds = time.monotonic() - interrupted
        print(f"stopped {seconds:.1f} s after Ctrl-C; {interrupted - deadline + 240:.1f} s from start to Ctrl-C")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return SimpleNamespace(code=process.returncode, out=out, err=err, seconds=seconds)


@pytest.mark.slow
def test_ctrl_c_marks_the_running_trial_failed_exits_promptly_and_the_next_run_continues(small_data, tmp_path):
    url = sqlite_url(tmp_path)

    stopped = interrupt_search(small_data, tmp_path, url)

    assert stopped.code == 130, stopped.out[-2000:] + stopped.err[-2000:]
    assert stopped.seconds < 20, f"took {stopped.seconds:.1f} s to stop after Ctrl-C"
    assert stopped.err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in stopped.err
    (trial,) = trials_of(url, "smoke")
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "interrupted (SIGINT) during training"

    code = cli.main(["search", "--space", str(SMOKE), "--storage", url, "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "1"])

    trials = trials_of(url, "smoke")
    assert code == 0
    assert [t.state for t in trials][0] == TrialState.FAIL and sum(t.state in FINISHED for t in trials) == 1
    assert TrialState.RUNNING not in [t.state for t in trials]


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_process_and_leaves_no_trial_running(small_data, tmp_path):
    url = sqlite_url(tmp_path)

    stopped = interrupt_search(small_data, tmp_path, url, "--workers", "2", training=2)

    assert stopped.code == 130, stopped.out[-2000:] + stopped.err[-2000:]
    assert stopped.seconds < 40, f"took {stopped.seconds:.1f} s to stop after Ctrl-C"
    assert "Traceback" not in stopped.err, stopped.err[-3000:]
    trials = trials_of(url, "smoke")
    assert trials and {t.state for t in trials} == {TrialState.FAIL}
    assert {t.user_attrs.get("fail_reason") for t in trials} == {"interrupted (SIGINT) during training"}


# --- a trial that runs out of memory ----------------------------------------------------------

@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError("Unable to allocate 2.00 GiB for an array")],
                         ids=["cuda", "host"])
def test_a_trial_that_runs_out_of_memory_is_recorded_and_the_study_goes_on(small_data, tmp_path, monkeypatch, error):
    real_train, calls = objective_module.train_group, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real_train(*args, **kwargs)

    monkeypatch.setattr(objective_module, "train_group", out_of_memory_once)

    code = cli.main(["search", "--space", str(SMOKE), "--storage", sqlite_url(tmp_path), "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "1"])

    first, second = trials_of(sqlite_url(tmp_path), "smoke")
    assert code == 0
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == f"out of memory: {error}"
    assert second.state in FINISHED  # the study went on and still finished the requested trial


# --- journal storage: no heartbeat, so dead local workers are recognised by their pid ----------------

@pytest.mark.slow
def test_a_journal_study_whose_worker_was_killed_mid_trial_retries_that_trial_on_the_next_run(small_data, tmp_path):
    """Journal storage has no heartbeat: without the pid check the dead trial stays RUNNING and holds a slot forever."""
    storage = f"journal:{tmp_path / 'journal.log'}"
    claim = tmp_path / "killed.pid"
    env = subprocess_env(**inject(tmp_path / "inject", kill_one_trial(claim)))
    killed = subprocess.run(search_command(small_data, tmp_path, storage, "--trials", "2"),
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]

    code = cli.main(["search", "--space", str(SMOKE), "--storage", storage, "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "2", "--timeout", "60"])

    trials = optuna.load_study(study_name="smoke", storage=storage_module.open_storage(storage)).get_trials()
    assert code == 0
    assert_quota_with_retries(trials, 2)
    assert_killed_trial_was_retried(trials, "")
    dead = trials[0]
    assert dead.user_attrs["fail_reason"] == f"worker process {claim.read_text()} on {os.uname().nodename} died during the trial"


KILL_BEFORE_FIRST_BEAT = """\
# Every Python process of this test loads this: the first trial anywhere dies (SIGKILL) after
# `ask` made it RUNNING and before its heartbeat thread starts.
import os, signal
import study.search.objective

_real_enter = study.search.objective.Heartbeat.__enter__
CLAIM = {claim!r}


def enter_or_die(self):
    try:
        fd = os.open(CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return _real_enter(self)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


study.search.objective.Heartbeat.__enter__ = enter_or_die
"""


@pytest.mark.slow
def test_a_worker_killed_between_ask_and_its_heartbeat_thread_does_not_hold_a_trial_forever(
        small_data, tmp_path, monkeypatch):
    """Optuna never calls a RUNNING trial without any heartbeat stale: the first beat is written at `ask`."""
    url = sqlite_url(tmp_path)
    claim = tmp_path / "killed"
    env = subprocess_env(**FAST_HEARTBEAT, **inject(tmp_path / "inject", KILL_BEFORE_FIRST_BEAT.format(claim=str(claim))))
    killed = subprocess.run(search_command(small_data, tmp_path, url, "--trials", "1"),
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    monkeypatch.setattr(claims_module, "HEARTBEAT_INTERVAL", 1)  # as FAST_HEARTBEAT, for this process
    monkeypatch.setattr(claims_module, "GRACE_PERIOD", 3)
    # A run counts only its own trials, so it does not wait for another run's: the dead trial is failed
    # (and its params queued again) by the first ask after the grace period, in whichever run asks.
    time.sleep(3 + 1)

    code = cli.main(["search", "--space", str(SMOKE), "--storage", url, "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "1", "--timeout", "60"])

    trials = trials_of(url, "smoke")
    assert code == 0
    assert [t.state for t in trials][0] == TrialState.FAIL
    assert sum(t.state in FINISHED for t in trials) == 1 and TrialState.RUNNING not in [t.state for t in trials]


# --- the PostgreSQL server restarting, or going away ---------------------------------------------

def run_trial_then(action):
    """`worker.run_trials` that runs `action()` once, right after the first trial is stored."""
    real, done = worker_module.run_trials, []

    def wrapped(*args, **kwargs):
        frozen = real(*args, **kwargs)
        if not done:
            done.append(frozen[0])
            action()
        return frozen

    return wrapped, done


@pytest.mark.slow
@pytest.mark.postgres
def test_a_postgresql_restart_between_trials_is_survived_and_loses_no_trial(
        postgres_server, small_data, tmp_path, monkeypatch):  # noqa: F811
    url = postgres_server.create_database("reliability_restart")
    wrapped, first = run_trial_then(postgres_server.restart)
    monkeypatch.setattr(worker_module, "run_trials", wrapped)

    code = cli.main(["search", "--space", str(SMOKE), "--storage", url, "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "3", "--fuse", "1"])  # between trials

    trials = trials_of(url, "smoke")
    assert code == 0
    assert first, "the restart was not injected"
    assert sum(t.state in FINISHED for t in trials) == 3 and len(trials) == 3
    kept = trials[0]
    assert (kept.number, kept.state, kept.values, kept.params) == (first[0].number, first[0].state, first[0].values,
                                                                   first[0].params)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_postgresql_server_that_goes_away_ends_the_run_with_one_line_and_keeps_finished_trials(
        postgres_server, small_data, tmp_path, monkeypatch, capsys):  # noqa: F811
    url = postgres_server.create_database("reliability_gone")
    wrapped, first = run_trial_then(postgres_server.stop)
    monkeypatch.setattr(worker_module, "run_trials", wrapped)
    try:
        code = cli.main(["search", "--space", str(SMOKE), "--storage", url, "--data", str(small_data),
                         "--results", str(tmp_path), "--trials", "3", "--fuse", "1"])  # between trials
    finally:
        postgres_server.start()

    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if line.startswith("trial ") and ": epoch " in line]
    error = "\n".join(line for line in err.splitlines() if line not in progress)  # epoch lines go to stderr too
    assert code == 2, err
    assert error.startswith("error: storage postgresql+psycopg2://optuna:***@127.0.0.1:"), err
    assert "failed (" in error and error.rstrip().endswith("run the same command again to continue"), err
    assert len(error.strip().splitlines()) == 1 and "pw-for-tests" not in err
    trials = trials_of(url, "smoke")
    assert trials[0].state == first[0].state and trials[0].values == first[0].values


# --- `make final` killed, then run again ------------------------------------------------------------

KILL_IN_SECOND_SEED = """\
# Every Python process of this test loads this: the second seed's training dies with SIGKILL
# (make final trains each seed's candidates as one group: one train_group call a seed).
import os, signal
import cnnlib.training

_real_train, _calls = cnnlib.training.train_group, []


def train_group(*args, **kwargs):
    _calls.append(1)
    if len(_calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_train(*args, **kwargs)


cnnlib.training.train_group = train_group
"""

KILL_MID_PUBLISH = """\
# Every Python process of this test loads this: `make final` dies with SIGKILL after moving
# two of its finished files into place, the rest still waiting in .next/.
import os, signal
import study.final.command

_real_publish, _real_replace = study.final.command.publish, os.replace


def publish(stage, out):
    moved = []

    def replace_then_die(source, target):
        _real_replace(source, target)
        moved.append(target)
        if len(moved) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_die
    _real_publish(stage, out)


study.final.command.publish = publish
"""


@pytest.fixture(scope="module")
def final_inputs(tmp_path_factory) -> SimpleNamespace:
    """A storage with one finished trial (a 2-epoch config) and tiny train/dev/test .npz of tinted images."""
    base = tmp_path_factory.mktemp("final")
    data = base / "data"
    data.mkdir()
    classes = ("car", "truck", "cat")
    for split, n in (("train", 40), ("dev", 12), ("test", 12)):
        labels = np.arange(3 * n) % 3
        images = np.stack([class_image(classes[label], i + 1000 * len(split)) for i, label in enumerate(labels)])
        np.savez(data / f"{split}.npz", images=images, labels=labels)
    url = f"sqlite:///{base / 'optuna.db'}"
    study = optuna.create_study(study_name="smoke", storage=url, direction="maximize")
    config = {"optimizer": "adam", "lr": 3e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 32, "epochs": 2,
              "imbalance": "weighted_loss", "dropout": 0.1, "flip": False, "jitter": 0.0, "seed": 0}
    study.add_trial(optuna.trial.create_trial(value=0.6, params={"lr": 3e-3},
                                              distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)},
                                              user_attrs={"config": config, "classes": list(classes)}))
    return SimpleNamespace(data=data, url=url)


def final_argv(inputs, results: Path, epsilons: str) -> list[str]:
    return ["final", "--study", "smoke", "--storage", inputs.url, "--data", str(inputs.data), "--results", str(results),
            "--device", "cpu", "--seeds", "2", "--epsilons", epsilons, "--no-png"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_outputs_whole(out: Path) -> None:
    """Every visible file loads completely; temporary files exist only inside the hidden work folders."""
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible <= final_module.OUTPUTS, visible - final_module.OUTPUTS
    assert not [p for p in out.iterdir() if p.is_file() and p.name.startswith(".")]
    assert json.loads((out / "metrics.json").read_text())["median_seed"] in (0, 1)
    rows = read_rows(out / "fgsm.csv")
    assert rows and all(None not in row.values() and None not in row for row in rows)
    load_checkpoint(out / "model.pt")
    assert "(metrics.json)" in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("kill", [KILL_IN_SECOND_SEED, KILL_MID_PUBLISH], ids=["mid-training", "mid-publish"])
def test_make_final_killed_leaves_whole_files_and_a_rerun_finishes_the_job(final_inputs, tmp_path, kill, capsys):
    results = tmp_path / "results"
    out = results / "final" / "smoke"
    assert cli.main(final_argv(final_inputs, results, "0,0.1")) == 0
    before = snapshot(out)

    killed = subprocess.run([sys.executable, "-m", "study", *final_argv(final_inputs, results, "0,0.05")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=subprocess_env(**inject(tmp_path / "inject", kill)))

    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert_outputs_whole(out)
    if kill is KILL_IN_SECOND_SEED:
        assert snapshot(out) == before, "a run killed before publishing must leave the last run's files as they were"

    capsys.readouterr()
    rerun_code = cli.main(final_argv(final_inputs, results, "0,0.05"))

    assert rerun_code == 0
    reused = re.findall(r"^seed (\d): reused from an interrupted run", capsys.readouterr().out, flags=re.M)
    assert reused == (["0"] if kill is KILL_IN_SECOND_SEED else ["0", "1"])  # finished seeds are not retrained
    assert_outputs_whole(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attack"]["epsilons"] == [0.0, 0.05]  # every file is from the rerun, none left from before
    assert load_checkpoint(out / "model.pt")[3]["seeds"] == metrics["model"]["seeds"] == [0, 1]
    assert {float(row["epsilon"]) for row in read_rows(out / "fgsm.csv")} == {0.0, 0.05}
    assert not (out / ".partial").exists() and not (out / ".next").exists()


# --- two `make final` on one study: one at a time --------------------------------------------------

def wait_in_training(started: Path, go_on: Path) -> str:
    return after_each_epoch(
        "after each epoch, a retrain notes its pid and waits until the test lets it go on.", f"""
        with open({str(started)!r}, "a") as handle:
            handle.write(f"{{os.getpid()}}\\n")
        while not os.path.exists({str(go_on)!r}):
            time.sleep(0.05)
        """)


@pytest.mark.slow
def test_two_finals_started_together_on_one_study_run_one_at_a_time_and_keep_the_model(final_inputs, tmp_path):
    """Both shared .next/ and .partial/: both said "wrote model.pt", and the folder was left without one."""
    results = tmp_path / "results"
    out = results / "final" / "smoke"
    assert cli.main(final_argv(final_inputs, results, "0,0.1")) == 0  # the last run's model, which must survive
    started, go_on = tmp_path / "training", tmp_path / "go-on"
    env = subprocess_env(**inject(tmp_path / "inject", wait_in_training(started, go_on)))
    command = [sys.executable, "-m", "study", *final_argv(final_inputs, results, "0,0.05")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
            for _ in range(2)]
    try:
        deadline = time.monotonic() + 240
        while all(run.poll() is None for run in runs) and time.monotonic() < deadline:
            training = set(started.read_text().split()) if started.exists() else set()
            assert len(training) < 2, "both runs are retraining into one folder at once"
            time.sleep(0.1)
        refused = next(run for run in runs if run.poll() is not None)
    finally:
        go_on.touch()
    holder = next(run for run in runs if run is not refused)
    _, err = refused.communicate()
    assert_one_line_error((refused.returncode, "", err), f"{out}/ is being written by another make final",
                          f"(pid {holder.pid})")
    _, err = holder.communicate(timeout=300)

    assert holder.returncode == 0, err[-3000:]
    assert_outputs_whole(out)
    assert json.loads((out / "metrics.json").read_text())["attack"]["epsilons"] == [0.0, 0.05]
    assert load_checkpoint(out / "model.pt")[3]["seeds"] == [0, 1]
    assert not (out / ".partial").exists() and not (out / ".next").exists()


HOLD_THE_FOLDER = """\
import sys, time
from study.output import sole_writer
with sole_writer(sys.argv[1], sys.argv[2], "make final"):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_folder_held_by_a_live_final_is_refused_and_one_killed_holding_it_blocks_nothing(tmp_path):
    results = tmp_path / "results"
    folder = results / "final" / "s"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_FOLDER, str(folder), str(results)],
                              stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(UserError, match=rf"^{re.escape(str(folder))}/ is being written by another make final "
                                            rf"\(pid {holder.pid}\); one make final per output folder at a time"):
            with output.sole_writer(folder, results, "make final"):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays
        holder.wait()

    with output.sole_writer(folder, results, "make final"):
        assert (results / ".locks" / "final-s.lock").read_text().strip() == str(os.getpid())


# --- a damaged resume record costs its own part, never the rerun -------------------------------------

class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def interrupted_final(final_inputs, tmp_path_factory) -> SimpleNamespace:
    """RESULTS of a `make final` of two candidates (2 folds, 2 seeds) stopped just before it published:
    every fold and seed is recorded under .partial/."""
    base = tmp_path_factory.mktemp("interrupted-final")
    url = f"sqlite:///{base / 'optuna.db'}"
    source = optuna.load_study(study_name="smoke", storage=final_inputs.url)
    study = optuna.create_study(study_name="smoke", storage=url, direction="maximize")
    first = source.trials[0]
    for lr in (3e-3, 1e-2):
        study.add_trial(optuna.trial.create_trial(
            value=0.6, params={"lr": lr}, distributions=first.distributions,
            user_attrs={**first.user_attrs, "config": {**first.user_attrs["config"], "lr": lr}}))
    argv = [*final_argv(SimpleNamespace(url=url, data=final_inputs.data), base / "results", "0,0.1"), "--folds", "2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(final_runner, "publish", lambda stage, out: (_ for _ in ()).throw(KeyboardInterrupt))
        assert cli.main(argv) == 130
    partial = base / "results" / "final" / "smoke" / ".partial"
    assert len(list(partial.glob("trial-*-folds/fold-*.json"))) == 4
    return SimpleNamespace(results=base / "results", argv=argv)


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def without(key: str):
    def edit(path: Path) -> None:
        record = json.loads(path.read_text())
        del record[key]
        path.write_text(json.dumps(record))
    return edit


DAMAGES = {  # id: (the file under .partial/ ({seeds}: the chosen trial's folder), what is done to it, what is redone)
    "fold record cut short": ("trial-1-folds/fold-1.json", cut_short, {"trial 1 fold 2"}),
    "fold record {}": ("trial-0-folds/fold-0.json", lambda path: path.write_text("{}"), {"trial 0 fold 1"}),
    "fold record without predictions": ("trial-1-folds/fold-0.json", without("predictions"), {"trial 1 fold 1"}),
    "fold record of another fold": ("trial-0-folds/fold-1.json", lambda path: path.write_text(
        path.read_text().replace('"fold": 1', '"fold": 0')), {"trial 0 fold 2"}),
    "fold fingerprint cut short": ("trial-0-folds/fingerprint.json", cut_short, {"trial 0 fold 1", "trial 0 fold 2"}),
    "seed record cut short": ("{seeds}/seed-0.json", cut_short, {"seed 0"}),
    "seed record without dev": ("{seeds}/seed-1.json", without("dev"), {"seed 1"}),
    "seed record of another class count": ("{seeds}/seed-0.json", lambda path: path.write_text(json.dumps(
        {**json.loads(path.read_text()), "dev": {"confusion_matrix": [[1, 0], [0, 1]]}})), {"seed 0"}),
    "seeds fingerprint cut short": ("{seeds}/fingerprint.json", cut_short, {"seed 0", "seed 1"}),
    "seed checkpoint of garbage": ("{seeds}/seed-1.pt", lambda path: path.write_text("garbage\n"), {"seed 1"}),
    "seed checkpoint that runs code": ("{seeds}/seed-0.pt", lambda path: path.write_bytes(
        pickle.dumps(_Marker(path.parent.parent.parent / "code-ran"))), {"seed 0"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_resume_record_is_set_aside_with_a_note_and_only_its_part_is_trained_again(
        interrupted_final, tmp_path, damage, capsys):
    results = tmp_path / "results"
    shutil.copytree(interrupted_final.results, results)
    out = results / "final" / "smoke"
    seeds = next(p.name for p in (out / ".partial").glob("trial-*") if not p.name.endswith("-folds"))
    name, change, redone = DAMAGES[damage]
    damaged = out / ".partial" / name.format(seeds=seeds)
    change(damaged)
    argv = [results if arg == str(interrupted_final.results) else arg for arg in interrupted_final.argv]

    code = cli.main([str(arg) for arg in argv])

    printed, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith(f"note: {damaged}"), err
    assert f"set aside as {damaged.name}.damaged" in notes[0]
    assert "Traceback" not in err and "weights_only" not in printed + err
    trained = set(re.findall(r"^((?:trial \d )?(?:fold \d|seed \d))(?:/2)?: (?:held-out|dev) macro", printed, re.M))
    reused = set(re.findall(r"^((?:trial \d )?(?:fold \d|seed \d))(?:/2)?: reused from an interrupted run", printed,
                            re.M))
    assert trained == redone and len(reused) == 6 - len(redone), printed
    assert_outputs_whole(out)
    assert not (out / ".partial").exists() and not (tmp_path / "code-ran").exists()


# --- a trial left RUNNING that no worker owns, and SIGTERM ---------------------------------------

def add_unowned_running_trial(url: str, started_seconds_ago: float) -> int:
    """A RUNNING trial as `study.ask()` leaves it when it raises after storing the trial: no heartbeat, no owner."""
    study = optuna.create_study(study_name="smoke", storage=url, direction="maximize", load_if_exists=True)
    template = optuna.trial.create_trial(state=TrialState.RUNNING)
    template.datetime_start = template.datetime_start - timedelta(seconds=started_seconds_ago)
    return study._storage.create_new_trial(study._study_id, template_trial=template)


def test_a_running_trial_that_no_worker_owns_is_failed_and_retried_instead_of_blocking_the_study(small_data, tmp_path):
    url = sqlite_url(tmp_path)
    add_unowned_running_trial(url, started_seconds_ago=3600)

    started = time.monotonic()
    code = cli.main(["search", "--space", str(SMOKE), "--storage", url, "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "1", "--timeout", "20"])

    trials = trials_of(url, "smoke")
    assert code == 0
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"].startswith("no worker ever claimed this trial")
    assert sum(t.state in FINISHED for t in trials) == 1, [t.state for t in trials]
    assert TrialState.RUNNING not in [t.state for t in trials]
    assert time.monotonic() - started < 20  # it did not wait out the timeout first


def test_a_just_asked_trial_is_not_taken_for_an_orphan(small_data, tmp_path):
    """Within the grace period a RUNNING trial without an owner may be one another machine is about to claim."""
    url = sqlite_url(tmp_path)
    add_unowned_running_trial(url, started_seconds_ago=0)
    study = optuna.load_study(study_name="smoke", storage=storage_module.open_storage(url))

    assert claims_module.fail_unclaimed_trials(study) == []
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


def worker_pids(flag: Path) -> set[int]:
    return {int(line) for line in flag.read_text().split()} if flag.exists() else set()


def terminate_search(command: list[str], flag: Path, results: Path, training: int) -> SimpleNamespace:
    """Start `command` with trials that hang in training; once `training` are mid-epoch, SIGTERM its first process only
    (as `make` passes SIGTERM on to its recipe); then see how long until every process that trained is gone."""
    env = subprocess_env(**inject(results / "inject", hang_in_training(flag)))
    process = subprocess.Popen(command, env=env, cwd=results, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(worker_pids(flag)) < training:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"{training} trial(s) did not reach their first epoch within 240 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        terminated = time.monotonic()
        out, err = process.communicate(timeout=60)
        while any(claims_module._process_start(pid) for pid in worker_pids(flag)):
            assert time.monotonic() - terminated < 30, "worker processes still training 30 s after SIGTERM"
            time.sleep(0.1)
        seconds = time.monotonic() - terminated
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the whole session: orphaned workers too
        except ProcessLookupError:
            pass  # every process of it is gone
        process.wait()
    return SimpleNamespace(code=process.returncode, out=out, err=err, seconds=seconds)


@pytest.mark.slow
def test_sigterm_to_make_search_stops_every_worker_and_marks_their_trials_failed(small_data, tmp_path):
    url = sqlite_url(tmp_path)
    command = make_search_command(small_data, tmp_path, url, trials=3)

    stopped = terminate_search(command, tmp_path / "training.pids", tmp_path, training=2)

    assert stopped.code == -signal.SIGTERM, stopped.out[-2000:] + stopped.err[-2000:]  # a shell shows 143
    assert "interrupted (SIGTERM)" in stopped.err
    assert stopped.seconds < 30
    assert "Traceback" not in stopped.err, stopped.err[-3000:]
    trials = trials_of(url, "smoke")
    assert len(trials) == 2 and {t.state for t in trials} == {TrialState.FAIL}
    assert {t.user_attrs.get("fail_reason") for t in trials} == {"interrupted (SIGTERM) during training"}

    code = cli.main(["search", "--space", str(SMOKE), "--storage", url, "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "1"])

    assert code == 0 and sum(t.state in FINISHED for t in trials_of(url, "smoke")) == 1


@pytest.mark.slow
def test_sigterm_to_a_single_worker_search_marks_its_trial_failed_and_exits_143(small_data, tmp_path):
    url = sqlite_url(tmp_path)

    stopped = terminate_search(search_command(small_data, tmp_path, url, "--trials", "3"), tmp_path / "training.pids",
                               tmp_path, training=1)

    assert stopped.code == 128 + signal.SIGTERM, stopped.out[-2000:] + stopped.err[-2000:]
    assert stopped.err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    (trial,) = trials_of(url, "smoke")
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted (SIGTERM) during training"


def swallow_one_sigterm(flag: Path) -> str:
    return after_each_epoch(
        "after the first epoch anywhere, a SIGTERM lands while a weakref callback runs (where Python swallows "
        "the handler's KeyboardInterrupt: 'Exception ignored in ...'); every epoch then takes 2 s.", f"""
        import weakref
        if not os.path.exists({str(flag)!r}):
            open({str(flag)!r}, "w").close()
            class Node:
                pass
            node = Node()
            ref = weakref.ref(node, lambda _: os.kill(os.getpid(), signal.SIGTERM))
            del node
        time.sleep(2)
        """)


def run_script(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """A Python script of the project's, run in a process of its own (signals reach only it)."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.run([sys.executable, str(script)], env=subprocess_env(PYTHONPATH=str(ROOT)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


SIGTERM_IN_A_CALLBACK_THEN_ANOTHER = """\
import os, signal, sys, time, weakref
from study.lifetime import interrupt_on_sigterm
signal.signal(signal.SIGTERM, interrupt_on_sigterm)
class Node:
    pass
node = Node()
ref = weakref.ref(node, lambda _: os.kill(os.getpid(), signal.SIGTERM))
del node  # the first SIGTERM arrives inside the callback, whose KeyboardInterrupt Python swallows
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("still running")
"""


def test_a_second_sigterm_after_one_a_callback_swallowed_still_stops_the_process(tmp_path):
    started = time.monotonic()
    done = run_script(tmp_path, SIGTERM_IN_A_CALLBACK_THEN_ANOTHER)

    assert done.returncode != 0 and "still running" not in done.stdout, done.stdout + done.stderr
    assert time.monotonic() - started < 8


SIGTERMS_WHILE_STOPPING = """\
import os, signal, time
from study import lifetime
lifetime.install_sigterm()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
except KeyboardInterrupt:
    for _ in range(3):  # the kernel's parent-death signals, one per thread of a dead search
        os.kill(os.getpid(), signal.SIGTERM)
    lifetime.stop_begun()
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("told every trial FAIL")
"""


def test_sigterms_while_the_interrupt_is_handled_do_not_cut_it_short(tmp_path):
    done = run_script(tmp_path, SIGTERMS_WHILE_STOPPING)

    assert done.returncode == 0 and done.stdout == "told every trial FAIL\n", done.stdout + done.stderr


@pytest.mark.slow
def test_a_search_whose_sigterm_a_callback_swallowed_stops_at_the_next_epoch(small_data, tmp_path):
    url = sqlite_url(tmp_path)
    env = subprocess_env(**inject(tmp_path / "inject", swallow_one_sigterm(tmp_path / "sent")))

    started = time.monotonic()
    done = subprocess.run(search_command(small_data, tmp_path, url, "--trials", "3"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)

    assert (tmp_path / "sent").exists()
    assert done.returncode == 128 + signal.SIGTERM, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    (trial,) = trials_of(url, "smoke")  # no trial after it was asked
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted (SIGTERM) during training"
    assert time.monotonic() - started < 60


# --- a torn journal, a full disk, a read-only database -------------------------------------------

TORN = b'{"op_code": 5, "sta'  # a record cut mid-write (kill -9, a full disk)


def test_a_journal_whose_last_record_was_torn_keeps_its_study_and_sets_the_fragment_aside(small_data, tmp_path, capsys):
    journal = tmp_path / "journal.log"
    storage = f"journal:{journal}"
    command = ["search", "--space", str(SMOKE), "--storage", storage, "--data", str(small_data),
               "--results", str(tmp_path), "--trials", "1"]
    assert cli.main(command) == 0
    with open(journal, "ab") as handle:
        handle.write(TORN)
    capsys.readouterr()

    code = cli.main(command)

    err = capsys.readouterr().err
    (side,) = tmp_path.glob("journal.log.torn-*")
    assert code == 0
    assert side.read_bytes() == TORN
    assert f"note: {journal} ended in a cut-off record ({len(TORN)} bytes" in err and str(side) in err
    trials = optuna.load_study(study_name="smoke", storage=storage_module.open_storage(storage)).get_trials()
    assert sum(t.state in FINISHED for t in trials) == 2  # readable again, both runs' trials there
    assert cli.main(["export", "--storage", storage, "--results", str(tmp_path)]) == 0


def test_a_journal_that_is_whole_is_left_alone(tmp_path):
    journal = tmp_path / "journal.log"
    optuna.create_study(study_name="s", storage=storage_module.open_storage(f"journal:{journal}"))
    before = journal.read_bytes()

    storage_module.open_storage(f"journal:{journal}")

    assert journal.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))


@pytest.mark.slow
def test_a_journal_on_a_full_disk_ends_the_run_with_one_line_and_the_next_run_goes_on(small_data, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the journal write stops part-way and raises OSError (EFBIG)."""
    journal = tmp_path / "journal.log"
    storage = f"journal:{journal}"
    assert cli.main(["search", "--space", str(SMOKE), "--storage", storage, "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "1"]) == 0  # also builds the split cache
    limit = journal.stat().st_size + 3000

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run(search_command(small_data, tmp_path, storage, "--trials", "2"), capture_output=True,
                          text=True, timeout=300, env=subprocess_env(), cwd=tmp_path, preexec_fn=small_disk)

    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-2000:]
    assert "Traceback" not in full.stderr and lines[-1].startswith(f"error: storage {storage} failed (File too large")
    code = cli.main(["search", "--space", str(SMOKE), "--storage", storage, "--data", str(small_data),
                     "--results", str(tmp_path), "--trials", "1"])
    trials = optuna.load_study(study_name="smoke", storage=storage_module.open_storage(storage)).get_trials()
    assert code == 0 and sum(t.state in FINISHED for t in trials) >= 2


def make_read_only(path: Path) -> None:
    """chmod for a normal user; root ignores it, so there the file is made immutable (chattr +i)."""
    path.chmod(0o444)
    if os.access(path, os.W_OK):
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if os.access(path, os.W_OK):
        pytest.skip(f"cannot make {path} read-only here (root, and no chattr +i on this file system)")


def test_a_read_only_sqlite_storage_is_one_line_naming_it(small_data, tmp_path):
    database = tmp_path / "optuna.db"
    url = f"sqlite:///{database}"
    optuna.create_study(study_name="smoke", storage=url)
    make_read_only(database)
    try:
        result = subprocess.run(search_command(small_data, tmp_path, url, "--trials", "1"), capture_output=True,
                                text=True, timeout=300, env=subprocess_env(), cwd=tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(database)], capture_output=True)
        database.chmod(0o644)

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: storage {url} is read-only"), lines
