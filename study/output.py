"""The output toolkit: every command writes its files through these.

- Writes are write-then-rename (cnnlib.atomic): a crash leaves the old file or none.
- A run gets a fresh folder (or file) of its own, named by time: two runs never share one.
- A study name becomes a folder name that no other study name maps to.
- Figures: plotly.js once per output folder, beside the HTML figures that load it
  with <script src="plotly.min.js">; PNG copies through kaleido when it can start
  a headless Chromium.

Embedding plotly.js made every figure ~4.6 MB (three figures of `make final`:
14 MB); one copy per folder keeps each HTML file to its own data (kilobytes) and
still opens offline, from file://, with no server or network, as long as the
folder is copied whole.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

from cnnlib.atomic import (FILE_MODE, atomic_path, json_safe, kind_of, write_atomic,  # noqa: F401 - the toolkit's writes
                           write_json)

from .errors import UserError

BUNDLE = "plotly.min.js"
PNG_TIMEOUT = 180  # seconds for all PNGs of one call; kaleido drives a headless Chromium that can hang on a broken install
DEBIAN_CHROMIUM = "/usr/bin/chromium"
# kaleido's own text for it names a Python call and its CLI; what a user of `make` needs is this.
NO_CHROME = ("no Chrome or Chromium on this machine, so the figures are HTML only; for PNGs install Chromium "
             "(apt-get install chromium, as .ci/system-deps does) and run the command again")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a name that is its own folder name


# --- files ------------------------------------------------------------------------

def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A CSV of `header` and `rows`, written then renamed: lines end in \n, a NaN is an empty cell (as pandas writes)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(["" if isinstance(v, float) and math.isnan(v) else v for v in row] for row in rows)
    return Path(path)


# --- places the user names for outputs --------------------------------------------------

def unwritable(folder: Path) -> str | None:
    """Why this user cannot make files in an existing `folder` (None: it can). Root passes every permission
    check but still cannot write a read-only mount, which access() reports too."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "is on a read-only file system" if read_only else "is not writable by this user"


def check_output_place(named: str, text: str, folder: bool) -> Path:
    """A path the user gave for an output (`folder`: a folder to write into, else a file to replace), checked
    before any work: what is there must be of that kind (a link is fine: a write replaces the link itself),
    and the nearest existing folder writable."""
    path, wanted = Path(text), f"a {'folder' if folder else 'regular file'} or a path to create one at"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise UserError(f"{named} {text!r} runs through a file; expected {wanted}") from None
    if mode is not None and not stat.S_ISLNK(mode) and not (stat.S_ISDIR if folder else stat.S_ISREG)(mode):
        raise UserError(f"{named} {text!r} is {'a file' if stat.S_ISREG(mode) else kind_of(mode)}; expected {wanted}")
    nearest = next(place for place in (path.absolute(), *path.absolute().parents) if place.is_dir())
    problem = unwritable(nearest)
    if problem:
        raise UserError(f"{named} {text!r}: {nearest} {problem}")
    return path


def output_place(named: str, folder: bool):
    """argparse type of an option that names an output folder or file outside RESULTS (check_output_place)."""
    def parse(text: str) -> Path:
        try:
            return check_output_place(named, text, folder)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


# --- names and run folders -------------------------------------------------------------

def is_plain_name(name: str) -> bool:
    return bool(PLAIN_NAME.fullmatch(name))


def check_output_name(option: str, name: str) -> str:
    """A run or output name given by the user, as it may become a folder or file inside RESULTS.

    Only a plain name (no '/', no leading '.', hence no '..' and no absolute
    path) stays inside RESULTS; a study name is made safe by safe_name instead.
    """
    if not is_plain_name(name) or len(name) > 100:
        raise UserError(f"{option} {name!r}: use letters, digits, '.', '_' and '-' only, at most 100, starting "
                        "with a letter or digit (it becomes a folder name inside RESULTS)")
    return name


def output_name(option: str):
    """argparse type of an option that names an output folder (check_output_name), checked before any work."""
    def parse(text: str) -> str:
        try:
            return check_output_name(option, text)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def safe_name(name: str, reserved: Iterable[str] = ()) -> str:
    """`name` itself when it is a plain folder name (at most 100 characters, not reserved), else a safe form plus a hash.

    Replacing unsafe characters alone maps `a/b` and `a_b` to one folder, where
    one's files replace the other's. The hash keeps names apart; the `+`
    before it is never in a plain name, so no plain name can take that folder.
    """
    if is_plain_name(name) and len(name) <= 100 and name not in set(reserved):
        return name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "study"
    return f"{safe}+{hashlib.sha256(name.encode()).hexdigest()[:10]}"


RESULTS_FOLDERS = {"data", "runs", "final", "bench", "audit", "artifacts"}  # what commands other than export write in RESULTS


def study_folder(results: Path, study_name: str) -> Path:
    """RESULTS/<study>: the name itself when it is a plain folder name, else a safe form of it plus a hash."""
    return Path(results) / safe_name(study_name, RESULTS_FOLDERS)


def _fresh(parent: Path, stem: str | None, suffix: str, make) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    base = stem if stem is not None else time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        path = parent / (f"{base}{suffix}" if attempt == 1 else f"{base}-{attempt}{suffix}")
        try:
            make(path)
            return path
        except FileExistsError:
            continue  # another run started in the same second
    raise UserError(f"{parent}: no free name for {base}{suffix}")


def fresh_folder(parent: Path, stem: str | None = None) -> Path:
    """parent/<stem> (default: the time, YYYYmmdd-HHMMSS), else <stem>-2, -3, ...: created now, never shared."""
    return _fresh(Path(parent), stem, "", Path.mkdir)


def fresh_file(parent: Path, stem: str, suffix: str) -> Path:
    """parent/<stem><suffix>, else <stem>-2<suffix>, ...: reserved now (empty), for a run's copy that later runs keep."""
    return _fresh(Path(parent), stem, suffix, lambda path: path.touch(exist_ok=False))


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# --- figures ---------------------------------------------------------------------------

def write_bundle(folder: Path) -> str:
    """Write folder/plotly.min.js unless an identical copy is there; returns the src to use."""
    import plotly  # noqa: PLC0415 - only figure writers need it

    text = plotly.offline.get_plotlyjs()
    path = Path(folder) / BUNDLE
    if not path.is_file() or path.stat().st_size != len(text.encode()) or path.read_text() != text:
        write_atomic(path, text)
    return BUNDLE


def write_html(fig, path: Path) -> Path:
    """A whole HTML page of one figure, loading plotly.js from the copy beside it."""
    path = Path(path)
    return write_atomic(path, fig.to_html(include_plotlyjs=write_bundle(path.parent), full_html=True))


def write_pngs(figures: dict[Path, object], width: int | None = None, scale: float = 1,
               timeout: float = PNG_TIMEOUT) -> str | None:
    """PNG copies of {path: figure} through kaleido, one browser session for all; None, or why there are none.

    Never raises: PNGs are optional, the HTML is the product. Chromium's start
    (~5 s) dominates, hence one call for all figures. Heights are the figures'
    own (460 px when unset); `width` None takes each figure's own too.
    """
    if not figures:
        return None
    if Path(DEBIAN_CHROMIUM).exists():  # kaleido (choreographer) looks for Chrome first; point it at Debian's
        os.environ.setdefault("BROWSER_PATH", DEBIAN_CHROMIUM)
    paths, figs = list(figures), list(figures.values())
    outcome = {}

    def export():
        try:
            import kaleido  # noqa: PLC0415 - optional extra

            size = [{"width": width, "height": int(f.layout.height or 460)} if width is not None else {} for f in figs]
            kaleido.write_fig_from_object_sync(
                [{"fig": f, "path": path, "opts": {"format": "png", "scale": scale, **extra}}
                 for f, path, extra in zip(figs, paths, size)],
                kopts={"timeout": timeout})
            missing = [Path(path).name for path in paths if not Path(path).is_file()]
            if missing:
                raise RuntimeError(f"kaleido wrote no {', '.join(missing)}")
        except Exception as error:  # noqa: BLE001 - no kaleido, no Chromium, a browser crash
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            outcome["error"] = (NO_CHROME if type(error).__name__ == "ChromeNotFoundError"
                                else f"{type(error).__name__}: {first[:200]}")

    worker = threading.Thread(target=export, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"kaleido did not finish in {timeout:g} s"
    if "error" in outcome:
        for path in paths:  # none half-written beside the HTML
            Path(path).unlink(missing_ok=True)
        return outcome["error"]
    for path in paths:
        if Path(path).is_file():
            os.chmod(path, FILE_MODE)
    return None


# --- one run per output folder, and the records it resumes from -----------------------------

@contextmanager
def sole_writer(folder: Path, results: Path, command: str):
    """Hold `folder` for this run: another run of `command` on it meanwhile stops in one line naming this one's pid.

    Two runs on one folder share its work folders and each other's half-made
    outputs. The lock is an flock on a file under RESULTS/.locks, which the
    kernel releases when its process ends however it ends, so a killed run
    never leaves the folder locked; the file stays (removing it would let two
    runs lock two different files).
    """
    lock = Path(results) / ".locks" / f"{Path(folder).parent.name}-{Path(folder).name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError as error:
        raise UserError(f"RESULTS={str(results)!r}: cannot create the lock file {lock} ({error.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder}/ is being written by another {command} (pid {_holder(handle)}); one "
                            f"{command} per output folder at a time: wait for it to end, or stop it, and run this "
                            "again") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def _holder(handle) -> str:
    """The pid the lock's holder wrote, which it does just after taking the lock."""
    for _ in range(20):
        handle.seek(0)
        text = handle.read().strip()
        if text.isdigit():
            return text
        time.sleep(0.05)
    return "unknown"


def read_record(path: Path, parse=lambda data: data, redo: str = "its part is done again"):
    """`parse` of the JSON resume record at `path`; None when the record is damaged (cut short, not JSON, or
    lacking what `parse` needs): it is then set aside as <name>.damaged with a one-line note, and the caller
    does its part again. A killed run, a full disk or a hand edit must cost that part, not every rerun."""
    path = Path(path)
    try:
        return parse(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:  # JSONDecodeError is a ValueError
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        print(f"note: {path} is a damaged resume record ({_damage(error)}); set aside as {aside.name}, {redo}",
              file=sys.stderr, flush=True)
        return None


def _damage(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"not whole JSON: {error.msg} at line {error.lineno}"
    if isinstance(error, KeyError):
        return f"no {error.args[0]!r} entry"
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def claim_partial(folder: Path, fingerprint: dict) -> None:
    """Make `folder` hold the finished parts of this work only: a folder left by other work (another
    trial, config, data or fold count: another fingerprint; or one whose fingerprint is damaged) is
    emptied, then the fingerprint is written."""
    marker = folder / "fingerprint.json"
    if folder.exists() and (not marker.is_file() or read_record(marker, redo=f"the parts in {folder.name}/ are "
                                                                             "done again") != json_safe(fingerprint)):
        shutil.rmtree(folder)
    write_json(marker, fingerprint)
