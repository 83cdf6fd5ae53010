"""The user's split as the data options give it, and `make data`, which builds it.

Every command loads its split here (load_splits): built from DATA, CLASSES,
*_COUNTS, SPLIT_SEED and CORRECTIONS once, and cached under RESULTS/data.
`make data` builds (or reuses from the cache) that split and writes
RESULTS/data/summary.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnlib.sources import infer_classes, parse_classes
from cnnlib.splits import (DEV_FRACTION, HELD_OUT_FOLDERS, DataConfig, Splits, USER_DEV_COUNTS, USER_TEST_COUNTS,
                           USER_TRAIN_COUNTS, format_summary, imbalance_line, prepare_splits, require_every_class,
                           write_summary)

from .errors import UserError
from .options import add_common_options, add_data_options, is_user_data


# --- the split the data options give ---------------------------------------------------

def data_classes(args: argparse.Namespace) -> tuple[str, ...]:
    return parse_classes(args.classes) if args.classes else infer_classes(Path(args.data))


def describe_classes(args: argparse.Namespace, classes) -> str:
    """One line that states the class order in use and where it came from."""
    labels = ", ".join(f"{i} {c}" for i, c in enumerate(classes))
    if args.classes:
        return f"classes: {labels} (from CLASSES)"
    return f"classes: {labels} (from the folder names of {args.data}; set CLASSES=... to choose another order)"


def data_config(args: argparse.Namespace) -> DataConfig:
    """The split the options ask for: by counts when any *_COUNTS is given or COUNTS is user (the default for the
    shared folder the user's problem is rebuilt from), else the folder as it is."""
    classes = data_classes(args)
    defaults = {"train": USER_TRAIN_COUNTS, "dev": USER_DEV_COUNTS, "test": USER_TEST_COUNTS}
    chosen = {}
    mode = getattr(args, "counts", None) or ("user" if is_user_data(args.data) else "all")
    if mode == "all" and all(getattr(args, f"{split}_counts") is None for split in defaults):
        defaults = dict.fromkeys(defaults)  # the folder as it is
    for split, default in defaults.items():
        given = getattr(args, f"{split}_counts")
        if given is None and default is not None and len(classes) != len(default):
            raise UserError(f"{len(classes)} classes ({','.join(classes)}): give the images per class with "
                            f"TRAIN_COUNTS, DEV_COUNTS and TEST_COUNTS (--train-counts ...), "
                            f"e.g. TRAIN_COUNTS={','.join(['100'] * len(classes))}, or leave them and COUNTS unset "
                            "to use the folder as it is")
        chosen[split] = default if given is None else given
    return DataConfig(
        source=Path(args.data), classes=classes,
        train_counts=chosen["train"], dev_counts=chosen["dev"], test_counts=chosen["test"],
        seed=args.split_seed, trust_pickle=args.trust_pickle,
        dev_fraction=getattr(args, "dev_fraction", None) or DEV_FRACTION,
        corrections=Path(args.corrections) if args.corrections else None,
    )


def describe_split(splits: Splits, config: DataConfig) -> str:
    """Images per class in each split, the train imbalance, and where dev and test came from."""
    if not config.as_is:
        origin = "drawn by the split counts (train from train/, dev and test from test/)"
    else:
        listed = {p.name for p in config.source.iterdir() if p.is_dir()} if config.source.is_dir() else set()
        origin = "; ".join(f"{split}: {folder}/" if folder in listed else
                           f"{split}: {config.dev_fraction:.0%} of each class's train/ (DEV_FRACTION)"
                           for split, folder in HELD_OUT_FOLDERS.items())
        origin = f"the folder as it is, every image ({origin})"
    summary = splits.summary()
    return f"{format_summary(summary)}\n{imbalance_line(summary)}; split: {origin}"


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


# --- the command ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_data_options(parser)
    add_common_options(parser)


def run(args) -> int:
    splits = load_splits(args)
    path = Path(args.results) / "data" / "summary.json"
    write_summary(splits, path)
    print(describe_classes(args, splits.classes))
    print(describe_split(splits, data_config(args)))
    print(f"source: {splits.source}\ncache:  {splits.cache_path}\nwrote:  {path}")
    return 0
