"""Command-line options shared by every command, and the one way data is loaded from them.

Each option mirrors a Makefile variable (DATA, RESULTS, DEVICE, ...), so the
Makefile passes them through and a user can also call `python -m study` directly.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cnnlib.sources import parse_classes
from cnnlib.splits import DataConfig, Splits, prepare_splits, USER_DEV_COUNTS, USER_TEST_COUNTS, USER_TRAIN_COUNTS

DEFAULT_DATA = "../shared/data/cifar10-cars-trucks-cats"
DEFAULT_STORAGE = "sqlite:///results/optuna.db"


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"counts must be comma-separated integers, got {text!r}") from None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=os.environ.get("DATA", DEFAULT_DATA),
                       help="image tree with train/ and test/, or a folder with train/dev(/test) .npz or .pickle files")
    group.add_argument("--classes", default="car,truck,cat", help="class order; defines labels 0, 1, 2, ...")
    group.add_argument("--train-counts", type=_counts, default=USER_TRAIN_COUNTS, help="train images per class")
    group.add_argument("--dev-counts", type=_counts, default=USER_DEV_COUNTS, help="dev images per class")
    group.add_argument("--test-counts", type=_counts, default=USER_TEST_COUNTS, help="held-out test images per class")
    group.add_argument("--split-seed", type=int, default=0, help="seed of the split draw")
    group.add_argument("--trust-pickle", action="store_true", default=env_flag("TRUST_PICKLE"),
                       help="allow loading .pickle data (unpickling can run code; env TRUST_PICKLE=1)")
    group.add_argument("--corrections", default=os.environ.get("CORRECTIONS") or None,
                       help="corrections.csv of reviewed labels (id,new_label or drop) applied to every split")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=os.environ.get("RESULTS", "results"), help="output folder")
    parser.add_argument("--device", default=os.environ.get("DEVICE", "auto"), help="auto (cuda if present), cpu, cuda, cuda:1")


def add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", default=os.environ.get("STUDY") or None, help="study name (default: the space file's name)")
    parser.add_argument("--storage", default=os.environ.get("STORAGE") or DEFAULT_STORAGE,
                        help="Optuna storage URL: sqlite:///..., postgresql+psycopg2://..., or journal:PATH")


def data_config(args: argparse.Namespace) -> DataConfig:
    classes = parse_classes(args.classes)
    defaults = len(classes) == 3
    def counts(value, default):
        if value == default and not defaults:
            raise SystemExit(f"error: with {len(classes)} classes, give --train-counts/--dev-counts/--test-counts explicitly")
        return value
    return DataConfig(
        source=Path(args.data), classes=classes,
        train_counts=counts(args.train_counts, USER_TRAIN_COUNTS),
        dev_counts=counts(args.dev_counts, USER_DEV_COUNTS),
        test_counts=counts(args.test_counts, USER_TEST_COUNTS),
        seed=args.split_seed, trust_pickle=args.trust_pickle,
        corrections=Path(args.corrections) if args.corrections else None,
    )


def load_splits(args: argparse.Namespace) -> Splits:
    """The user's split for these options, built once and cached under RESULTS/data."""
    return prepare_splits(data_config(args), Path(args.results) / "data")
