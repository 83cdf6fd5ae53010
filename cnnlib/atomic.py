"""Write-then-rename, the one way every output file is written.

A crash, a kill or a full disk mid-write leaves the old file (or none) under
the real name, never half a file that a later run would trust.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import OutputError


def _file_mode() -> int:
    """What a plain open() would create under the current umask (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def check_replaceable(path: Path) -> None:
    """A target that exists must be a regular file, or a link (the rename replaces the link, never what it
    points to). Renaming onto a device or a named pipe would put a regular file in its place: as root,
    `--json /dev/null` would replace the system's /dev/null."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputError(path, f"{path} is {kind_of(mode)}, not a regular file: refusing to replace it")


@contextmanager
def atomic_path(path: Path):
    """Yields a temporary path beside `path`; renamed onto it only if the block succeeds."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        check_replaceable(path)  # again: the block may have run for minutes
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, content: str | bytes) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return Path(path)


def json_safe(value):
    """NaN (a class absent from a split) becomes null; numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data) -> Path:
    return write_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
