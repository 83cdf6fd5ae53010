"""Build (or load from cache) the user's imbalanced split and write RESULTS/data/summary.json."""

from __future__ import annotations

from pathlib import Path

from cnnlib.splits import format_summary, write_summary

from .options import add_common_options, add_data_options, describe_classes, load_splits


def add_arguments(parser) -> None:
    add_data_options(parser)
    add_common_options(parser)


def run(args) -> int:
    splits = load_splits(args)
    path = Path(args.results) / "data" / "summary.json"
    summary = write_summary(splits, path)
    print(describe_classes(args, splits.classes))
    print(format_summary(summary))
    print(f"source: {splits.source}\ncache:  {splits.cache_path}\nwrote:  {path}")
    return 0
