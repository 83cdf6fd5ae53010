"""Opening a study's storage from a URL (SQLite, PostgreSQL, MySQL... or `journal:PATH`), with Optuna's crash handling on.

Each kind of trouble has its own module: what the URL names (`storage_url`),
a SQLite file checked before any write (`sqlite_file`), a journal's cut-off
record (`journal`), one-line failures (`storage_errors`), and trials whose
worker died (`trial_claims`, whose heartbeats an opened storage writes).
"""

from __future__ import annotations

import time

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage

from ..errors import UserError
from ..options import default_storage
from .journal import open_journal
from .sqlite_file import SQLITE_BUSY_TIMEOUT, check_sqlite_storage
from .storage_errors import damaged_message, first_line, is_damage
from .storage_url import is_in_memory, redact, storage_file
from .trial_claims import heartbeat_settings

SCHEMA_RACE_TRIES = 3  # opens of a new database whose tables another process is creating at the same moment


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
        return open_journal(path, read_only)
    if path is not None:
        check_sqlite_storage(url, path, read_only)
    engine_kwargs = {}
    if path is not None:
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    if url.startswith("postgresql"):
        engine_kwargs = {"pool_pre_ping": True}  # reconnect after a server restart instead of failing
    kwargs = heartbeat_settings() if heartbeat else {}
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
        detail = first_line(error)
        raise UserError(damaged_message(url, detail) if is_damage(detail)
                        else f"cannot open storage {redact(url)}: {detail}") from None


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
