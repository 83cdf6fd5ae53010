"""File locks that make a run's local workers take turns: creating a study, and "count, then ask".

A lock per study and storage, kept under RESULTS/.locks: two workers (or two
runs on this machine) never both see room for the last trial of a quota, nor
both queue a study's warm-start points.
"""

from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from pathlib import Path


def lock_path(url: str, study_name: str, results: Path) -> Path:
    """A per-study lock file for the local workers that share it."""
    digest = hashlib.sha256(f"{url}\n{study_name}".encode()).hexdigest()[:12]
    path = Path(results) / ".locks" / f"study-{digest}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def file_lock(path: Path):
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
