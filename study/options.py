"""Command-line options shared by every command, and the one way data is loaded from them.

Each option mirrors a Makefile variable (DATA, RESULTS, DEVICE, ...), so the
Makefile passes them through the environment and a user can also call
`cnn-hpo` directly. A variable's value is parsed by the same argparse type as
its flag, so a typo in either is one line (`error: ... TRIALS='abc' ...`).
Defaults do not depend on the working directory: the shared data is found
beside the project checkout, search spaces in the package.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from cnnlib.device import cpu_threads
from cnnlib.sources import infer_classes, parse_classes
from cnnlib.splits import (DataConfig, Splits, prepare_splits, require_every_class, USER_DEV_COUNTS, USER_TEST_COUNTS,
                           USER_TRAIN_COUNTS)

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

def choose_cpu_threads(device, processes: int = 1) -> tuple[int, str]:
    """Torch CPU threads per process: THREADS, or chosen by load (cnnlib.device.cpu_threads); (1, "") off the CPU."""
    if getattr(device, "type", device) != "cpu":
        return 1, ""
    text = env("THREADS")
    if text is not None and not (text.isdigit() and int(text) >= 1):
        raise UserError(f"THREADS {text!r}: expected a whole number >= 1")
    threads, why = cpu_threads(int(text) if text else None, processes)
    if text and threads < int(text):
        print(f"note: {why}", file=sys.stderr)
    return threads, why


def use_cpu_threads(device, processes: int = 1) -> str:
    """Set torch's CPU threads for this process (THREADS, or chosen by load) and say what was chosen.

    Every command that trains calls it: torch's default (one thread per core) on a
    busy 2-core machine made `make final` take 25 s per epoch instead of ~2 (its
    OpenMP threads wait for each other; see cnnlib.device.cpu_threads).
    """
    threads, why = choose_cpu_threads(device, processes)
    if not why:
        return ""
    torch.set_num_threads(threads)
    return f"{threads} thread(s): {why}"


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


# --- the data ---------------------------------------------------------------------------------

def data_classes(args: argparse.Namespace) -> tuple[str, ...]:
    return parse_classes(args.classes) if args.classes else infer_classes(Path(args.data))


def describe_classes(args: argparse.Namespace, classes) -> str:
    """One line that states the class order in use and where it came from."""
    labels = ", ".join(f"{i} {c}" for i, c in enumerate(classes))
    if args.classes:
        return f"classes: {labels} (from CLASSES)"
    return f"classes: {labels} (from the folder names of {args.data}; set CLASSES=... to choose another order)"


def data_config(args: argparse.Namespace) -> DataConfig:
    classes = data_classes(args)
    defaults = {"train": USER_TRAIN_COUNTS, "dev": USER_DEV_COUNTS, "test": USER_TEST_COUNTS}
    chosen = {}
    for split, default in defaults.items():
        given = getattr(args, f"{split}_counts")
        if given is None and len(classes) != len(default):
            raise UserError(f"{len(classes)} classes ({','.join(classes)}): give the images per class with "
                            f"TRAIN_COUNTS, DEV_COUNTS and TEST_COUNTS (--train-counts ...), "
                            f"e.g. TRAIN_COUNTS={','.join(['100'] * len(classes))}")
        chosen[split] = default if given is None else given
    return DataConfig(
        source=Path(args.data), classes=classes,
        train_counts=chosen["train"], dev_counts=chosen["dev"], test_counts=chosen["test"],
        seed=args.split_seed, trust_pickle=args.trust_pickle,
        corrections=Path(args.corrections) if args.corrections else None,
    )


def load_splits(args: argparse.Namespace) -> Splits:
    """The user's split for these options, built once and cached under RESULTS/data.

    Every split a command can be judged on holds every class: a test split
    without cats would report a macro accuracy over two classes, and an empty
    one no number at all (nan). train and dev are checked where they are built.
    """
    config = data_config(args)
    splits = prepare_splits(config, Path(args.results) / "data")
    if splits.test is not None:
        require_every_class(splits, ("test",), config)
    return splits


def _split_text(summary: dict) -> str:
    """'train 4000/600/400, dev 503/51/71, test 400/400/400' in the class order."""
    classes = summary.get("classes") or []
    return ", ".join(f"{name} {'/'.join(str(counts.get(c, 0)) for c in classes)}"
                     for name, counts in (summary.get("splits") or {}).items())


def check_recorded_data(study, splits, corrections: str | None = None,
                        fix: str = "pass the same DATA, CLASSES, *_COUNTS, SPLIT_SEED and CORRECTIONS as the search"
                        ) -> None:
    """Refuse data options that give another split than the one the study recorded (studies that recorded
    nothing, from before, are taken as they are): its trials' scores say nothing about another split."""
    attrs = study.user_attrs
    if "corrections_digest" in attrs and attrs["corrections_digest"] != splits.corrections_digest:
        def name(digest):
            return f"corrections sha256 {digest[:12]}" if digest else "no corrections"
        raise UserError(f"study {study.study_name!r} was searched with {name(attrs['corrections_digest'])}, but "
                        f"CORRECTIONS={corrections or '(empty)'} is {name(splits.corrections_digest)}; {fix}")
    summary = attrs.get("data_summary")
    now = splits.summary()
    if isinstance(summary, dict) and (summary.get("classes"), summary.get("splits")) != (now["classes"], now["splits"]):
        raise UserError(f"study {study.study_name!r} was searched on split {_split_text(summary)} "
                        f"({','.join(summary.get('classes') or [])}), but the data options give "
                        f"{_split_text(now)} ({','.join(now['classes'])}); {fix}")
    key = attrs.get("split_cache_key")
    if key and key != splits.cache_key:
        raise UserError(f"study {study.study_name!r} was searched on split cache key {key}, but the data options "
                        f"give {splits.cache_key} (same class counts, other images or source); {fix}")
