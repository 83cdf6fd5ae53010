"""A SQLite storage file, checked untouched before Optuna opens it.

Optuna writes to whatever it opens (its tables, a study), so a damaged file or
one that is not an Optuna storage is refused here, read through a read-only
connection, before any write can spread the damage or touch a stranger's database.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import UserError
from .storage_errors import damaged_message, first_line, is_damage
from .storage_url import redact

SQLITE_BUSY_TIMEOUT = 60  # seconds a writer waits for SQLite's lock instead of failing "database is locked"


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
        detail = first_line(error)
        if is_damage(detail):
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
