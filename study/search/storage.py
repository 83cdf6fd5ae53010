"""Opening a study's storage from a URL, with Optuna's own crash handling switched on.

Heartbeats let a worker that dies mid-trial (SIGKILL, power loss) be noticed:
its trial turns FAIL after the grace period and Optuna's retry callback queues
the same params again, so a study never silently loses a trial.

Journal storage (`journal:PATH`) has no heartbeat and is for one machine: each
trial records which process runs it (host, pid, the pid's start time), and a
worker fails and retries a RUNNING trial whose process on this machine is gone.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import socket
import sqlite3
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

from ..errors import UserError
from ..options import default_storage

HEARTBEAT_INTERVAL = int(os.environ.get("HEARTBEAT_INTERVAL", 10))  # seconds between "still alive" writes
GRACE_PERIOD = int(os.environ.get("HEARTBEAT_GRACE", 30))  # silence after which a running trial is declared dead
MAX_RETRY = 3  # a trial whose worker died is re-run with the same params at most this often
OWNER_ATTR = "worker_process"  # trial system attribute: {"host", "pid", "start"} of the process running it
SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for SQLite's lock instead of failing "database is locked"
SCHEMA_RACE_TRIES = 3  # opens of a new database whose tables another process is creating at the same moment
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write that stops part-way: the disk, a quota, a size limit


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def storage_file(url: str) -> Path | None:
    """The file behind a SQLite or journal URL; None for a server (or in-memory) storage."""
    if url.startswith("journal:"):
        return Path(url[len("journal:"):].removeprefix("//"))
    path = sqlite_path(url)
    return None if path is None or str(path) in ("", ":memory:") else path


def is_in_memory(url: str) -> bool:
    """sqlite:// and sqlite:///:memory: (sqlite:/// with no path too): a database that lives and dies with one connection."""
    if not url.startswith("sqlite:"):
        return False
    rest = url[len("sqlite:"):].split("?", 1)[0]
    return rest in ("", "//", "///", "///:memory:", "//:memory:")


def open_storage(url: str, heartbeat: bool = True, read_only: bool = False) -> optuna.storages.BaseStorage:
    """RDB (SQLite, PostgreSQL, MySQL...) or `journal:PATH` storage; errors say what was wrong with the URL.

    `read_only` (export, final, dashboard): the file is never written, not even
    repaired, and a file that is not an Optuna storage is refused untouched.
    """
    if not url:
        raise UserError(f"empty storage URL; use e.g. {default_storage('results')}")
    if is_in_memory(url):  # every connection, worker and later command would see an empty database of its own
        raise UserError(f"STORAGE={url!r} is an in-memory database, which no worker or later command can read; "
                        f"give a file, e.g. {default_storage('results')}")
    path = storage_file(url)
    if path is not None and not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the folder of storage {url!r}: {path.parent}: {error.strerror}") from None
    if url.startswith("journal:"):
        check_journal(path)
        try:
            if read_only:
                torn = _torn_length(path)
                if torn:
                    print(f"note: {path} ends in a cut-off record ({torn} bytes, from a crash or a full disk "
                          "mid-write); reading its complete records; the next `make search` sets it aside",
                          file=sys.stderr)
            else:
                set_aside_torn_record(path)
            return JournalStorage(JournalFileBackend(str(path)))
        except (OSError, ValueError) as error:  # unreadable, or a record in the middle is not JSON
            raise UserError(f"cannot open journal storage {path}: {error}") from None
    if path is not None:
        check_sqlite_storage(url, path, read_only)
    engine_kwargs = {}
    if path is not None:
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    if url.startswith("postgresql"):
        engine_kwargs = {"pool_pre_ping": True}  # reconnect after a server restart instead of failing
    kwargs = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    try:
        return _rdb_storage(url, engine_kwargs, kwargs)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as error:
        raise UserError(f"storage URL {redact(url)!r} not understood ({error}); "
                        "expected sqlite:///PATH, postgresql+psycopg2://user:pw@host/db or journal:PATH") from None
    except ImportError as error:  # e.g. mysql:// without a MySQL driver installed
        raise UserError(f"storage URL {redact(url)!r} needs a database driver that is not installed ({error}); "
                        "postgresql+psycopg2:// and sqlite:/// work out of the box") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        # server unreachable, bad password, a file that is no database, a damaged one
        detail = _first_line(error)
        raise UserError(damaged_message(url, detail) if _is_damage(detail)
                        else f"cannot open storage {redact(url)}: {detail}") from None


def check_sqlite_storage(url: str, path: Path, read_only: bool) -> None:
    """Refuse, untouched, a damaged SQLite file; for a reading command also one without Optuna's tables.

    A damaged file still takes some writes (a search created its study in one
    before failing on a damaged page), which spreads the damage; SQLite's
    quick_check reads every page, about a second for 100 MB. Opening any other
    SQLite database through Optuna would create its tables there, a write from
    a command that only reads. The file is opened read-only here.
    """
    if not path.is_file():
        if read_only:
            raise UserError(f"no storage file at {path}; run `make search` first, or set STORAGE=... to the one it wrote")
        return  # a new storage
    connection = None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT)
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        problems = [row[0] for row in connection.execute("PRAGMA quick_check(1)")]
    except sqlite3.Error as error:
        detail = _first_line(error)
        if _is_damage(detail):
            raise UserError(damaged_message(url, detail)) from None
        raise UserError(f"cannot open storage {redact(url)}: {detail}") from None
    finally:
        if connection is not None:
            connection.close()
    if problems != ["ok"]:
        raise UserError(damaged_message(url, "quick_check: " + " ".join(str(problems[0]).split())))
    if read_only and "studies" not in tables:
        raise UserError(f"storage {redact(url)} holds no study yet ({path} has no Optuna tables); "
                        "run `make search` first, or set STORAGE=... to the file it wrote")


def check_journal(path: Path) -> None:
    """Refuse, untouched, a file that is not an Optuna journal: every complete line one JSON record with an op_code.

    Only a journal may have a cut-off last record set aside: a SQLite file or a
    text file that happens not to end in a newline would otherwise lose its end.
    A journal's first line tells it from other files; when its end is cut off,
    every complete record must parse before anything is moved.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    except OSError as error:
        raise UserError(f"cannot open journal storage {path}: {error.strerror}") from None
    if size == 0:
        return
    whole = _ends_whole(path)
    try:
        with open(path, "rb") as journal:
            for number, line in enumerate(journal, start=1):
                if not line.endswith(b"\n"):
                    # A lone cut-off line is a journal's only when it starts as Optuna writes every record.
                    if number == 1 and not line.startswith(RECORD_START):
                        raise UserError(_not_a_journal(path, "it holds no complete journal record"))
                    break
                if not _is_record(line):
                    raise UserError(_not_a_journal(path, f"line {number} is not a journal record"))
                if whole:
                    break  # a whole file: its first record identifies it, Optuna reads the rest
    except OSError as error:
        raise UserError(f"cannot open journal storage {path}: {error.strerror}") from None


RECORD_START = b'{"op_code":'  # json.dumps of Optuna's journal records, op_code first, no spaces


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, not UTF-8
        return False
    return isinstance(record, dict) and "op_code" in record


def _not_a_journal(path: Path, why: str) -> str:
    return (f"journal:{path}: not an Optuna journal file ({why}); left untouched: set STORAGE=journal:PATH to the "
            "journal `make search` wrote, or to a new file")


def _torn_length(path: Path) -> int:
    """Bytes after the journal's last newline (0: it ends whole)."""
    if _ends_whole(path):
        return 0
    with open(path, "rb") as journal:
        end = journal.seek(0, os.SEEK_END)
        return end - _whole_length(journal)


def _rdb_storage(url: str, engine_kwargs: dict, kwargs: dict) -> RDBStorage:
    """RDBStorage, once more when another process was creating the same new database's tables meanwhile.

    Two runs started together on a new SQLite file (or PostgreSQL database) both
    create the schema; the slower one fails on a table or version row that the
    other has just written ("UNIQUE constraint failed: alembic_version...").
    Opened again, it finds the schema whole.
    """
    tries = 1
    while True:
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except sqlalchemy.exc.DBAPIError as error:
            raced = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error.orig)
            if not raced or tries == SCHEMA_RACE_TRIES:
                raise
        tries += 1
        time.sleep(0.5)


@contextmanager
def storage_failures(url: str):
    """A storage that fails mid-run (server gone, disk full) ends the command with one line, not a traceback.

    Every trial told before the failure is already committed; a trial in flight
    stays RUNNING and is failed and retried by the next run (heartbeat or pid).
    """
    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise UserError(storage_failure_message(url, error)) from None
    except OSError as error:  # journal storage writes the file itself
        if error.errno not in DISK_FULL:
            raise
        raise UserError(f"storage {redact(url)} failed ({error.strerror}); trials told before this are kept there: "
                        "free some space, then run the same command again to continue") from None


DAMAGE = ("malformed", "database corrupt")  # SQLite's words for a file whose pages no longer fit together


def _first_line(error: BaseException) -> str:
    """The first line of what went wrong: the driver's own message, not SQLAlchemy's or Optuna's wrapping of it."""
    cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ else error
    lines = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def _is_damage(detail: str) -> bool:
    return any(word in detail for word in DAMAGE)


def damaged_message(url: str, detail: str) -> str:
    return (f"storage {redact(url)} is damaged ({detail}); running again cannot repair it: restore the file from "
            "a backup, or set STORAGE=... to a new one")


def storage_failure_message(url: str, error: BaseException) -> str | None:
    """The one line for a storage error (None: not one): read-only, damaged, or gone mid-run."""
    if not isinstance(error, (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)):
        return None
    detail = _first_line(error)
    if "readonly database" in detail:  # Optuna's own message blames "invalid data ... exceeding max length"
        return (f"storage {redact(url)} is read-only ({detail}); make the file and its folder writable, "
                "or set STORAGE=... to another")
    if _is_damage(detail):
        return damaged_message(url, detail)
    return (f"storage {redact(url)} failed ({detail}); trials told "
            "before this are kept there: run the same command again to continue")


def set_aside_torn_record(path: Path) -> Path | None:
    """Move a journal's cut-off last record to a side file, which is returned (None: the journal is whole).

    A kill or a full disk mid-write leaves the last line without its newline.
    Optuna reads past it, but appends the next record onto it, and from then on
    every read of the journal fails ("Expecting ':' delimiter"): the study is lost.
    Writers append under Optuna's lock file, so a cut line seen while holding
    that lock is one whose writer is gone.
    """
    if _ends_whole(path):
        return None
    lock = JournalFileSymlinkLock(str(path))  # the lock JournalFileBackend takes by default
    lock.acquire()
    try:
        with open(path, "r+b") as journal:
            whole = _whole_length(journal)
            journal.seek(whole)
            torn = journal.read()
            if not torn:
                return None
            side = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            side.write_bytes(torn)  # first, so a failing truncate loses nothing
            journal.truncate(whole)
    finally:
        lock.release()
    print(f"note: {path} ended in a cut-off record ({len(torn)} bytes, from a crash or a full disk mid-write); "
          f"moved it to {side}; the complete records are kept", file=sys.stderr)
    return side


def _ends_whole(path: Path) -> bool:
    """Empty, missing, or ending in a newline; cheap, and taken without the lock (a writer may be mid-line)."""
    try:
        with open(path, "rb") as journal:
            if journal.seek(0, os.SEEK_END) == 0:
                return True
            journal.seek(-1, os.SEEK_END)
            return journal.read(1) == b"\n"
    except FileNotFoundError:
        return True


def _whole_length(journal) -> int:
    """Bytes up to and including the last newline."""
    end = journal.seek(0, os.SEEK_END)
    while end > 0:
        start = max(0, end - 65536)
        journal.seek(start)
        cut = journal.read(end - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if url.startswith(("sqlite:", "journal:")):  # a file path, whose '@' is no password separator
        return url
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
    path = storage_file(url)
    if path is not None and not path.is_file():  # reading must not leave an empty storage behind a typo
        raise UserError(f"no storage file at {path}; run `make search` first, or set STORAGE=... to the one it wrote")
    storage = open_storage(url, heartbeat=False, read_only=True)
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


# --- trials whose worker died -------------------------------------------------

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
