"""A storage that fails, told in one line: damaged, read-only, or gone mid-run (server down, disk full).

The line says what to do next; trials told before the failure are kept, so
the usual advice is to run the same command again once the cause is fixed.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager

import optuna
import sqlalchemy.exc

from ..errors import UserError
from .storage_url import redact

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write that stops part-way: the disk, a quota, a size limit
DAMAGE = ("malformed", "database corrupt")  # SQLite's words for a file whose pages no longer fit together


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


def first_line(error: BaseException) -> str:
    """The first line of what went wrong: the driver's own message, not SQLAlchemy's or Optuna's wrapping of it."""
    cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ else error
    lines = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def is_damage(detail: str) -> bool:
    return any(word in detail for word in DAMAGE)


def damaged_message(url: str, detail: str) -> str:
    return (f"storage {redact(url)} is damaged ({detail}); running again cannot repair it: restore the file from "
            "a backup, or set STORAGE=... to a new one")


def storage_failure_message(url: str, error: BaseException) -> str | None:
    """The one line for a storage error (None: not one): read-only, damaged, or gone mid-run."""
    if not isinstance(error, (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)):
        return None
    detail = first_line(error)
    if "readonly database" in detail:  # Optuna's own message blames "invalid data ... exceeding max length"
        return (f"storage {redact(url)} is read-only ({detail}); make the file and its folder writable, "
                "or set STORAGE=... to another")
    if is_damage(detail):
        return damaged_message(url, detail)
    return (f"storage {redact(url)} failed ({detail}); trials told "
            "before this are kept there: run the same command again to continue")
