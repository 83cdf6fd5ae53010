"""Command-line options shared by every command: their types, defaults and groups.

Each option mirrors a Makefile variable (DATA, RESULTS, DEVICE, ...), so the
Makefile passes them through the environment and a user can also call
`cnn-hpo` directly. A variable's value is parsed by the same argparse type as
its flag, so a typo in either is one line (`error: ... TRIALS='abc' ...`).
Defaults do not depend on the working directory: the shared data is found
beside the project checkout, search spaces in the package. The split the
data options give is loaded in data.py; THREADS is read in threads.py.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from cnnlib.splits import DEV_FRACTION, USER_DEV_COUNTS, USER_TEST_COUNTS, USER_TRAIN_COUNTS

from .errors import UserError
from .output import unwritable

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path("shared") / "data" / "cifar10-cars-trucks-cats"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def default_data() -> str:
    """The shared data beside the checkout (from any working directory), else ../shared, else ./data."""
    for candidate in (PROJECT_ROOT.parent / SHARED_DATA, Path("..") / SHARED_DATA):
        if candidate.is_dir():
            return str(candidate)
    return "data"


STORAGE_FILE = "optuna.db"  # the default study database, inside RESULTS
# Most models trained together as one fused group (SEEDS of a config, FUSE trials of a search):
# memory grows with each. Reports use 3-10 seeds and the widest default group is 64 (cuda);
# SEEDS=100000 was accepted and would have tried to hold 100000 models at once.
MAX_GROUP = 256


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{path}"


def default_storage(results: str | Path) -> str:
    """SQLite inside RESULTS (the Makefile leaves STORAGE empty for this): a study lives beside its outputs."""
    return sqlite_url(Path(results) / STORAGE_FILE)


# --- value types: each names its variable, so `make X=typo` reads like `--x typo` -----------

def whole_number(variable: str, minimum: int = 0, maximum: int | None = None):
    """argparse type for a whole number in [minimum, maximum]; its error names the Makefile variable."""
    def parse(text) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise argparse.ArgumentTypeError(f"{variable}={text!r}: expected a whole number {bounds}")
        return value
    return parse


def fraction(variable: str):
    """argparse type for a share in [0, 1); its error names the option and the value."""
    def parse(text) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            value = None
        if value is None or not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"{variable}={text!r}: expected a number from 0 to below 1")
        return value
    return parse


# The words a Makefile variable may say on or off with (env_flag, switch).
ON_WORDS = ("1", "true", "yes", "on")
OFF_WORDS = ("0", "false", "no", "off")


def switch(variable: str):
    """argparse type for on/off (ON_WORDS, OFF_WORDS); its error names the variable."""
    def parse(text) -> bool:
        word = str(text).strip().lower()
        if word in ON_WORDS:
            return True
        if word in OFF_WORDS:
            return False
        raise argparse.ArgumentTypeError(f"{variable}={text!r}: expected 1 (on) or 0 (off)")
    return parse


def is_user_data(data: str | Path) -> bool:
    """Whether DATA is the shared balanced folder the user's problem is rebuilt from (by their counts)."""
    shared = [c for c in (PROJECT_ROOT.parent / SHARED_DATA, Path("..") / SHARED_DATA) if c.is_dir()]
    return any(Path(data).resolve() == c.resolve() for c in shared)


def share(variable: str):
    """argparse type of a share of a split, above 0 and at most a half."""
    def parse(text) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 < value <= 0.5:
            raise argparse.ArgumentTypeError(f"{variable}={text!r}: expected a share above 0 and at most 0.5, e.g. 0.15")
        return value
    return parse


def counts(variable: str):
    def parse(text) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in str(text).split(","))
        except ValueError:
            values = ()
        if not values or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"{variable}={text!r}: expected comma-separated image counts "
                                             "per class, e.g. 4000,600,400")
        return values
    return parse


def device_name(text: str) -> str:
    """Only the form is checked here (no torch import); whether that device exists, when it is opened."""
    if not DEVICE_PATTERN.fullmatch(str(text).strip()):
        raise argparse.ArgumentTypeError(f"DEVICE={text!r}: expected auto, cpu, cuda or cuda:N")
    return str(text).strip()


def check_results_folder(results: str | Path, writes: bool = True) -> None:
    """RESULTS is a folder, or a path where one can be made: not a file, nor a path through one; and, for a
    command that `writes` there, on a file system this user can write."""
    path = Path(results)
    for place in (path, *path.parents):
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                where = "is a file" if place == path else f"runs through the file {place}"
                raise UserError(f"RESULTS={str(results)!r} {where}; expected a folder (or a path to create one at)")
            problem = unwritable(place) if writes else None
            if problem:
                where = "" if place == path else f" (its nearest existing folder {place})"
                raise UserError(f"RESULTS={str(results)!r}{where} {problem}; expected a folder this user can write")
            return


def env(name: str, fallback=None):
    """The environment's value of a Makefile variable, None (or the fallback) when unset or empty."""
    return os.environ.get(name) or fallback


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ON_WORDS


# --- option groups ----------------------------------------------------------------------------


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=env("DATA", default_data()),
                       help="image tree with train/<class>/ and test/<class>/, or a folder with train/dev(/test) "
                            ".npz or .pickle files (env DATA)")
    group.add_argument("--classes", default=env("CLASSES"),
                       help="class order, comma-separated; defines labels 0, 1, 2, ... (env CLASSES; default: the "
                            "folder names of DATA/train in sorted order, car,truck,cat for the user's data)")
    for split, defaults in (("train", USER_TRAIN_COUNTS), ("dev", USER_DEV_COUNTS), ("test", USER_TEST_COUNTS)):
        variable = f"{split.upper()}_COUNTS"
        group.add_argument(f"--{split}-counts", type=counts(variable), default=env(variable),
                           help=f"{split} images per class, in class order (env {variable}; default for three "
                                f"classes: {','.join(map(str, defaults))})")
    group.add_argument("--counts", choices=("user", "all"), default=env("COUNTS"),
                       help="without *_COUNTS: 'all' uses the folder as it is (every train/ image; dev is val/, else a "
                            "stratified DEV_FRACTION of train/; test is test/, else the same share of train/), 'user' "
                            "rebuilds the user's 80/12/8 split from a three-class folder (env COUNTS; default: user for "
                            "the shared cars/trucks/cats folder, all for any other)")
    group.add_argument("--dev-fraction", type=share("DEV_FRACTION"), default=env("DEV_FRACTION", str(DEV_FRACTION)),
                       help="the folder as it is: the share of each class's train/ images held out as dev when there "
                            "is no val/, and as test when there is no test/ (env DEV_FRACTION)")
    group.add_argument("--split-seed", type=whole_number("SPLIT_SEED"), default=env("SPLIT_SEED", "0"),
                       help="seed of the split draw (env SPLIT_SEED)")
    group.add_argument("--trust-pickle", action="store_true", default=env_flag("TRUST_PICKLE"),
                       help="allow loading .pickle data (unpickling can run code; env TRUST_PICKLE=1)")
    group.add_argument("--corrections", default=env("CORRECTIONS"),
                       help="corrections.csv of reviewed labels (id,new_label or drop) applied to every split "
                            "(env CORRECTIONS)")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=env("RESULTS", "results"), help="output folder (env RESULTS)")
    parser.add_argument("--device", type=device_name, default=env("DEVICE", "auto"),
                        help="auto (cuda if present, else cpu), cpu, cuda or cuda:N (env DEVICE)")


def add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", default=env("STUDY"), help="study name (env STUDY; default: the space file's name)")
    add_storage_option(parser)


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=env("STORAGE"),
                        help="Optuna storage URL: sqlite:///..., postgresql+psycopg2://..., or journal:PATH "
                             f"(env STORAGE; default: {default_storage('RESULTS')})")
