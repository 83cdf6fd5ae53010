"""Which process runs each trial, and what happens to a trial whose worker died.

Heartbeats (SQL storages) let a worker that dies mid-trial (SIGKILL, power
loss) be noticed: its trial turns FAIL after the grace period and Optuna's
retry callback queues the same params again, so a study never silently loses a trial.

Journal storage has no heartbeat and is for one machine: each trial records
which process runs it (host, pid, the pid's start time), and a worker fails
and retries a RUNNING trial whose process on this machine is gone. A RUNNING
trial that no worker ever claimed is failed and retried too.
"""

from __future__ import annotations

import copy
import os
import socket
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

HEARTBEAT_INTERVAL = int(os.environ.get("HEARTBEAT_INTERVAL", 10))  # seconds between "still alive" writes
GRACE_PERIOD = int(os.environ.get("HEARTBEAT_GRACE", 30))  # silence after which a running trial is declared dead
MAX_RETRY = 3  # a trial whose worker died is re-run with the same params at most this often
OWNER_ATTR = "worker_process"  # trial system attribute: {"host", "pid", "start"} of the process running it


def heartbeat_settings() -> dict:
    """RDBStorage's heartbeat options, read when a storage opens (so a test may shorten them for its process)."""
    return dict(heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))


def _process_start(pid: int) -> str | None:
    """When `pid` started (Linux: clock ticks since boot): a later process that reuses the pid differs.
    None when there is no such live process (a zombie counts as dead)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _is_alive(owner: dict) -> bool:
    if Path("/proc/self/stat").exists():
        return owner.get("start") is not None and _process_start(owner["pid"]) == owner["start"]
    try:  # no /proc (macOS): the pid alone
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_trial(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark a just-asked trial as this process's, before it can die with it.

    With heartbeats, the first beat is written now: Optuna never declares stale
    a RUNNING trial that has no heartbeat at all, so a worker killed between
    `ask` and its heartbeat thread would hold that trial (and a quota slot) forever.
    The owner is recorded on every storage: a RUNNING trial without one was
    never claimed (fail_unclaimed_trials).
    """
    storage = study._storage
    pid = os.getpid()
    storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR,
                                  {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)})
    if is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial._trial_id)


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Storages without heartbeat: fail RUNNING trials whose process on this machine is gone, and queue
    their params again (as the heartbeat's retry callback does). Returns the failed trial numbers.
    Trials of other machines are left alone: only heartbeats can tell whether those are alive."""
    storage = study._storage
    if is_heartbeat_enabled(storage):
        return []
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_ATTR)
        if not owner or owner.get("host") != host or _is_alive(owner):
            continue
        if _fail_and_retry(study, trial, f"worker process {owner['pid']} on {host} died during the trial"):
            failed.append(trial.number)
    return failed


def fail_unclaimed_trials(study: optuna.Study) -> list[int]:
    """Fail and retry RUNNING trials that no worker ever claimed; returns their numbers.

    `study.ask()` stores the new trial before the sampler runs; when the sampler
    (or the worker) fails in between, the trial has neither owner nor heartbeat,
    so neither a pid check nor Optuna's staleness check would ever end it, and
    it would hold a quota slot forever. A live worker claims its trial
    milliseconds after asking: GRACE_PERIOD is ample, even across machines.
    """
    asked_before = datetime.now() - timedelta(seconds=GRACE_PERIOD)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if OWNER_ATTR in trial.system_attrs or not trial.datetime_start or trial.datetime_start > asked_before:
            continue
        if _fail_and_retry(study, trial, "no worker ever claimed this trial (study.ask failed, or its worker died, "
                                         "before it started)"):
            failed.append(trial.number)
    return failed


def _fail_and_retry(study: optuna.Study, trial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with `reason` and queue its params again, as the heartbeat's retry callback does.
    False when it finished (or another worker failed it) meanwhile."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    dead = copy.deepcopy(storage.get_trial(trial._trial_id))  # the retry starts without the dead one's marks
    dead.system_attrs.pop(OWNER_ATTR, None)
    dead.user_attrs.pop("fail_reason", None)
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, dead)
    return True
