"""Parallel search: no process outlives its command, WORKERS is capped at what can run, limits are stated
plainly, and runs started together on one storage each add their own, distinct trials (docs/parallel.md).

The kills and the concurrent starts are real: `python -m study search` and `make search` run as
process sessions of their own, are SIGKILLed, and /proc is read to see which of their processes remain.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from postgres import postgres_server, postgres_url  # noqa: F401 - fixtures
from study import cli
from study.lifetime import PARENT_VARIABLE
from study.search import plan as plan_module
from study.search import worker_processes as workers_module
from study.search.space import SpaceError
from study.search.space_file import load_space
from test_reliability import hang_in_training, inject, make_search_command, search_command, worker_pids
from test_search import FINISHED, SMOKE, small_data, sqlite_url, subprocess_env, trials_of, write_space  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN = 15  # seconds after the kill by which every process of the command must have ended

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


# --- processes die with their command ----------------------------------------------------------

def session_processes(session: int) -> list[str]:
    """Live processes of a session (pid and command line); a session's processes keep its id when orphaned."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # it ended while we looked
        if int(fields[3]) == session and fields[0] not in ("Z", "X"):
            found.append(f"{entry.name} {command[:150]}")
    return found


def sigkill_when_training(command: list[str], results: Path, training: int) -> tuple[list[str], float, str]:
    """Start `command` as its own session with trials that hang in training; once `training` of them are
    mid-epoch, SIGKILL its first process only. Returns the session's processes left GONE_WITHIN seconds
    later (none, once every one has ended), how long they took to end, and the command's output."""
    flag = results / "training.pids"
    log = results / "output.log"
    env = subprocess_env(**inject(results / "inject", hang_in_training(flag)))
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, cwd=results, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(worker_pids(flag)) < training:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{training} trial(s) not training within 240 s: {log.read_text()}"
            time.sleep(0.1)
        assert len(session_processes(process.pid)) > training  # the command, its workers, the resource tracker
        process.kill()
        killed = time.monotonic()
        process.wait()
        while (left := session_processes(process.pid)) and time.monotonic() - killed < GONE_WITHIN:
            time.sleep(0.2)
        return left, time.monotonic() - killed, log.read_text()
    finally:
        kill_session(process)


@pytest.mark.slow
def test_sigkill_of_a_two_worker_search_ends_every_worker_and_the_resource_tracker(small_data, tmp_path):
    url = sqlite_url(tmp_path)
    command = search_command(small_data, tmp_path, url, "--trials", "4", "--workers", "2")

    left, seconds, output = sigkill_when_training(command, tmp_path, training=2)

    assert not left, f"still running {GONE_WITHIN} s after SIGKILL of the search:\n" + "\n".join(left)
    print(f"every process gone {seconds:.1f} s after the kill")
    trials = trials_of(url, "smoke")  # the workers were told to stop: each told its trial FAIL on the way out
    assert len(trials) == 2 and {t.state for t in trials} == {TrialState.FAIL}, output[-3000:]


@pytest.mark.slow
def test_sigkill_of_make_search_ends_the_search_and_its_workers(small_data, tmp_path):
    url = sqlite_url(tmp_path)
    command = make_search_command(small_data, tmp_path, url, trials=4)

    left, seconds, output = sigkill_when_training(command, tmp_path, training=2)

    assert not left, f"still running {GONE_WITHIN} s after SIGKILL of make:\n" + "\n".join(left)
    print(f"every process gone {seconds:.1f} s after the kill")
    assert "interrupted (SIGTERM)" in output, output[-3000:]  # the search stopped as on `kill`, not cut off
    assert TrialState.RUNNING not in {t.state for t in trials_of(url, "smoke")}


def test_make_runs_each_command_in_place_of_its_shell():
    """`exec`: make's signals reach Python itself, and Python knows make as its parent (docs/parallel.md)."""
    recipes = subprocess.run(["make", "-n", "-C", str(ROOT), "-o", ".venv/.installed", "search", "final", "dashboard"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    commands = [line for line in recipes if " -m study " in line]
    assert len(commands) == 3, recipes
    assert all(line.startswith(f"{PARENT_VARIABLE}=$PPID exec ") for line in commands), recipes


FOLLOWER = """\
import sys, time
import study.lifetime as lifetime
if sys.argv[1] == "watchdog-only":  # as where prctl is missing (not Linux)
    lifetime.set_parent_death_signal = lambda *args: False
lifetime.follow_parent_from_environment()
print("following", flush=True)
time.sleep(60)
"""

PARENT = """\
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "STUDY_PARENT_PID": sys.argv[3] or str(os.getpid())})
child.stdout.readline()
print(child.pid, flush=True)
child.wait()
"""


def start_follower(how: str, parent_pid: str = "") -> tuple[subprocess.Popen, int]:
    """A process that follows its parent (the variable make sets), under a parent this test can SIGKILL."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, FOLLOWER, how, parent_pid], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    return parent, int(parent.stdout.readline())


def kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the session `leader` started, so a failing test leaves nothing behind."""
    try:
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leader.wait()


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["prctl", "watchdog-only"])
def test_a_process_named_the_follower_of_its_parent_ends_when_the_parent_is_sigkilled(how):
    parent, follower = start_follower(how)
    try:
        assert not gone_within(follower, 0.5)  # alive while its parent is
        parent.kill()
        parent.wait()
        assert gone_within(follower, 3), f"{how}: the follower outlived its SIGKILLed parent"
    finally:
        kill_session(parent)


def test_a_process_whose_parent_died_before_it_could_follow_ends_at_once():
    parent, follower = start_follower("prctl", parent_pid="1")  # names a parent that is not (or no longer) its own
    try:
        assert gone_within(follower, 3)
    finally:
        kill_session(parent)


# --- WORKERS is capped at what can run -----------------------------------------------------------

GIB = 2 ** 30


@pytest.mark.parametrize("trials_left, fuse, cores, memory, expected, why", [
    (None, 1, 2, 64 * GIB, 2, "2 CPU cores"),
    (2, 1, 16, 64 * GIB, 2, "2 trials left to run"),
    (40, 16, 16, 64 * GIB, 3, "40 trials left to run, up to 16 per worker (FUSE)"),
    (None, 1, 16, 4.5 * GIB, 3, "memory for 3"),
    (None, 1, 16, 0.1 * GIB, 1, "memory for 1"),
])
def test_workers_are_capped_at_what_can_run(trials_left, fuse, cores, memory, expected, why):
    workers, note = workers_module.cap_workers(64, trials_left, fuse, cores=cores, memory=memory)

    assert workers == expected
    assert note.startswith(f"note: WORKERS=64 lowered to {expected}: ") and why in note and "\n" not in note


def test_workers_that_can_all_run_are_left_as_asked():
    assert workers_module.cap_workers(2, 10, 1, cores=2, memory=64 * GIB) == (2, "")


@pytest.mark.slow
def test_sixty_four_workers_on_a_small_machine_start_only_what_can_run_and_finish(small_data, tmp_path):
    command = search_command(small_data, tmp_path, sqlite_url(tmp_path), "--trials", "2", "--workers", "64")
    process = subprocess.Popen(command, env=subprocess_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=180)
    finally:
        kill_session(process)

    assert process.returncode == 0, out[-3000:] + err[-3000:]
    cap = re.search(r"^note: WORKERS=64 lowered to (\d+): .+$", err, flags=re.M)
    assert cap and 1 <= int(cap.group(1)) <= 2, err
    assert "64 worker(s)" not in out and f"; {cap.group(1)} worker(s) on cpu" in out
    assert "2 finished trials (2 added by this run)" in out


# --- limits: TIMEOUT and TRIALS ------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--timeout", "0"), ("--timeout", "-5"), ("--trials", "0"),
                                           ("TIMEOUT", "0"), ("TIMEOUT", "-1"), ("TRIALS", "0")])
def test_a_zero_or_negative_limit_is_refused_in_one_line(tmp_path, monkeypatch, capsys, option, value):
    extra = [f"{option}={value}"] if option.startswith("--") else []
    if not option.startswith("--"):
        monkeypatch.setenv(option, value)

    with pytest.raises(SystemExit) as stopped:
        cli.main(["search", "--space", str(SMOKE), "--storage", sqlite_url(tmp_path), "--results", str(tmp_path),
                  "--data", str(tmp_path / "no-data"), *extra])

    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    variable = option.strip("-").upper()
    assert f"{variable}={value!r}" in err and ">= 1" in err
    assert not (tmp_path / "optuna.db").exists()


@pytest.mark.parametrize("key", ["timeout", "trials"])
def test_a_space_whose_budget_is_zero_is_refused(tmp_path, key):
    path = write_space(tmp_path, f"budget: {{{key}: 0}}\nparams: {{epochs: 2}}\n", "zero_budget")
    with pytest.raises(SpaceError, match=rf"budget\.{key}: must be at least 1, got 0"):
        load_space(path)


@pytest.mark.parametrize("trials, trials_from, timeout, timeout_from, expected", [
    (4, "TRIALS", None, None, "up to 4 trials (TRIALS); no time limit"),
    (4, "the space's budget", None, None, "up to 4 trials (the space's budget); no time limit"),
    (None, None, 780, "the default when neither TRIALS nor TIMEOUT is set", "trials for up to 13.0 min (780 s, "
     "the default when neither TRIALS nor TIMEOUT is set), then stops the trials still training (PRUNED); no trial limit"),
    (2, "TRIALS", 60, "TIMEOUT", "up to 2 trials (TRIALS) and trains for up to 1.0 min (60 s, TIMEOUT), then stops "
     "the trials still training (PRUNED)"),
    (None, None, None, None, "trials with no trial or time limit: it runs until stopped (Ctrl-C)"),
])
def test_the_run_says_plainly_what_limits_it(trials, trials_from, timeout, timeout_from, expected):
    assert plan_module.describe_limits(trials, trials_from, timeout, timeout_from) == expected


def test_a_run_with_trials_and_no_timeout_says_it_has_no_time_limit(small_data, tmp_path, capsys):
    code = cli.main(["search", "--space", str(SMOKE), "--storage", sqlite_url(tmp_path), "--results", str(tmp_path),
                     "--data", str(small_data), "--trials", "1"])

    out = capsys.readouterr().out
    assert code == 0
    assert "this run adds up to 1 trials (TRIALS); no time limit; 1 worker(s) on cpu" in out, out


# --- runs started together on one storage --------------------------------------------------------

def start_together(small_data: Path, results: Path, url: str, runs: int, trials: int) -> list[str]:
    """`runs` searches of the same study started at once, each asking for `trials`; returns their outputs."""
    command = search_command(small_data, results, url, "--trials", str(trials))
    processes = [subprocess.Popen(command, env=subprocess_env(), cwd=results, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(runs)]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, out[-3000:] + err[-3000:]
        outputs.append(out)
    return outputs


def assert_each_run_added_its_own_distinct_trials(trials, outputs: list[str], per_run: int) -> None:
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == per_run * len(outputs), [(t.number, t.state) for t in trials]
    sampled = [tuple(sorted(t.params.items())) for t in trials if "fixed_params" not in t.system_attrs]
    assert len(set(sampled)) == len(sampled), f"runs started together proposed the same params: {sampled}"
    by_run = {}
    for trial in finished:
        by_run.setdefault(trial.user_attrs[plan_module.RUN_ATTR], []).append(trial.number)
    assert sorted(len(numbers) for numbers in by_run.values()) == [per_run] * len(outputs), by_run
    for out in outputs:
        assert f"({per_run} added by this run)" in out, out[-2000:]


@pytest.mark.slow
def test_two_runs_started_together_on_one_sqlite_study_each_add_their_own_distinct_trials(small_data, tmp_path):
    url = sqlite_url(tmp_path)

    outputs = start_together(small_data, tmp_path, url, runs=2, trials=3)

    assert_each_run_added_its_own_distinct_trials(trials_of(url, "smoke"), outputs, per_run=3)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_runs_started_together_on_one_postgresql_study_each_add_their_own_distinct_trials(
        small_data, tmp_path, postgres_server):  # noqa: F811
    url = postgres_server.create_database("started_together")

    outputs = start_together(small_data, tmp_path, url, runs=2, trials=3)

    assert_each_run_added_its_own_distinct_trials(trials_of(url, "smoke"), outputs, per_run=3)
