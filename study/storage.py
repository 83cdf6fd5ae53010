"""Opening a study's storage from a URL, with Optuna's own crash handling switched on.

Heartbeats let a worker that dies mid-trial (SIGKILL, power loss) be noticed:
its trial turns FAIL after the grace period and Optuna's retry callback queues
the same params again, so a study never silently loses a trial.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from .cli import UserError

HEARTBEAT_INTERVAL = int(os.environ.get("HEARTBEAT_INTERVAL", 10))  # seconds between "still alive" writes
GRACE_PERIOD = int(os.environ.get("HEARTBEAT_GRACE", 30))  # silence after which a running trial is declared dead
MAX_RETRY = 3  # a trial whose worker died is re-run with the same params at most this often
SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for SQLite's lock instead of failing "database is locked"


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_storage(url: str, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """RDB (SQLite, PostgreSQL, MySQL...) or `journal:PATH` storage; errors say what was wrong with the URL."""
    if not url:
        raise UserError("empty storage URL; use e.g. sqlite:///results/optuna.db")
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):].removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {}
    path = sqlite_path(url)
    if path is not None and str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    if url.startswith("postgresql"):
        engine_kwargs = {"pool_pre_ping": True}  # reconnect after a server restart instead of failing
    kwargs = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as error:
        raise UserError(f"storage URL {url!r} not understood ({error}); "
                        "expected sqlite:///PATH, postgresql+psycopg2://user:pw@host/db or journal:PATH") from None
    except sqlalchemy.exc.OperationalError as error:
        raise UserError(f"cannot open storage {redact(url)}: {str(error.orig).strip().splitlines()[0]}") from None


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def lock_path(url: str, study_name: str, results: Path) -> Path:
    """A per-study lock file for the local workers that share it."""
    digest = hashlib.sha256(f"{url}\n{study_name}".encode()).hexdigest()[:12]
    path = Path(results) / ".locks" / f"study-{digest}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def load_existing_study(name: str | None, url: str) -> optuna.Study:
    """An existing study; an unknown name lists the studies the storage does hold."""
    storage = open_storage(url, heartbeat=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if not names:
        raise UserError(f"storage {redact(url)} holds no study yet; run `make search` first")
    if name is None:
        if len(names) > 1:
            raise UserError(f"storage {redact(url)} holds several studies ({', '.join(names)}); choose one with STUDY=...")
        name = names[0]
    if name not in names:
        raise UserError(f"no study {name!r} in {redact(url)}; it holds: {', '.join(names)}")
    return optuna.load_study(study_name=name, storage=storage)
