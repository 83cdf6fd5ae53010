"""The next-step commands a run prints: each works when pasted back, with every setting the run used.

A command is printed the way this one was started: `make final STUDY=...`
under make (whose variables these are), else `cnn-hpo final --study ...` (or
`python -m study final ...`). A setting is left out only when its value is
what the next command would pick by itself; everything else is carried, so
following a hint never opens another study or another split.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..lifetime import program_name
from ..options import default_data, default_storage
from .storage_url import redact


@dataclass(frozen=True)
class Setting:
    variable: str  # Makefile and environment name
    flag: str  # command-line option
    attr: str  # where argparse keeps it
    default: object = None  # what a command picks by itself (callables: from the other settings)


SETTINGS = {s.variable: s for s in (
    Setting("SPACE", "--space", "space", "search_spaces/default.yaml"),
    Setting("STUDY", "--study", "study"),
    Setting("STORAGE", "--storage", "storage", lambda values: default_storage(values.get("RESULTS") or "results")),
    Setting("RESULTS", "--results", "results", "results"),
    Setting("DATA", "--data", "data", lambda values: default_data()),
    Setting("CLASSES", "--classes", "classes"),
    Setting("TRAIN_COUNTS", "--train-counts", "train_counts"),
    Setting("DEV_COUNTS", "--dev-counts", "dev_counts"),
    Setting("TEST_COUNTS", "--test-counts", "test_counts"),
    Setting("SPLIT_SEED", "--split-seed", "split_seed", 0),
    Setting("TRUST_PICKLE", "--trust-pickle", "trust_pickle", False),
    Setting("CORRECTIONS", "--corrections", "corrections"),
    Setting("DEVICE", "--device", "device", "auto"),
    Setting("TRIALS", "--trials", "trials"),
    Setting("TIMEOUT", "--timeout", "timeout"),
    Setting("WORKERS", "--workers", "workers", 1),
    Setting("FUSE", "--fuse", "fuse"),  # its default depends on the device: carried only when given
    Setting("CHECKPOINT", "--checkpoint", "checkpoint"),
    Setting("SPLIT", "--split", "split", "dev"),
    Setting("CSV", "--csv", "csv"),
)}
DATA_SETTINGS = ("DATA", "CLASSES", "TRAIN_COUNTS", "DEV_COUNTS", "TEST_COUNTS", "SPLIT_SEED", "TRUST_PICKLE",
                 "CORRECTIONS")
PATH_SETTINGS = {"DATA", "RESULTS", "SPACE", "CORRECTIONS", "CHECKPOINT", "CSV"}


def settings_of(args, *names: str, **values) -> dict:
    """The named settings as this run used them (`values` add or override), for `command`."""
    found = {name: getattr(args, SETTINGS[name].attr, None) for name in names}
    found.update(values)
    return found


def _same(name: str, value, default) -> bool:
    if value is None or default is None:
        return value is None
    if name == "SPACE":  # `smoke`, `smoke.yaml` and `search_spaces/smoke.yaml` are one file
        from .space_file import find_space  # noqa: PLC0415 - only search hints carry a space

        return find_space(value).resolve() == find_space(default).resolve()
    if name in PATH_SETTINGS:
        return Path(str(value)).resolve() == Path(str(default)).resolve()
    return str(value) == str(default)


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def has_password(settings: dict) -> bool:
    storage = settings.get("STORAGE")
    return bool(storage) and redact(str(storage)) != str(storage)


def _without_password(url: str) -> str:
    """user:secret@host -> user@host: the driver then reads the password from PGPASSWORD or ~/.pgpass."""
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':')[0]}@{host}"


def command(target: str, settings: dict, via_make: bool | None = None) -> str:
    """`make <target> VAR=value ...` or `cnn-hpo <target> --flag value ...`, defaults left out."""
    via_make = "MAKELEVEL" in os.environ if via_make is None else via_make
    kept = {}
    for name, value in settings.items():
        default = SETTINGS[name].default
        default = default(settings) if callable(default) else default
        if value is False or _same(name, value, default):
            continue
        kept[name] = _without_password(str(value)) if name == "STORAGE" and has_password(settings) else value
    if via_make:
        words = ["make", target] + [f"{name}={'1' if value is True else _text(value)}" for name, value in kept.items()]
    else:
        words = [*program_name().split(), target]
        for name, value in kept.items():
            words += [SETTINGS[name].flag] if value is True else [SETTINGS[name].flag, _text(value)]
    return " ".join(shlex.quote(w) for w in words)
