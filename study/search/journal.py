"""Journal storage (`journal:PATH`): recognising a journal file, and setting aside a cut-off last record.

A journal is one JSON record a line, appended by every worker under Optuna's
lock file. A kill or a full disk mid-write leaves a last line without its
newline, which would ruin the study at the next append; only a file that is
surely a journal has such a line moved aside, so no other file loses its end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from ..errors import UserError

RECORD_START = b'{"op_code":'  # json.dumps of Optuna's journal records, op_code first, no spaces


def open_journal(path: Path, read_only: bool) -> JournalStorage:
    """The journal at `path`, its cut-off last record set aside first (only noted when `read_only`)."""
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
