"""The split every stage trains and is judged on: drawn from a data folder, corrected and cached.

Two ways to draw it from an image tree. As the folder is (no counts): every
image of train/ is used; dev is val/ when the tree has one, else a stratified
DEV_FRACTION of each class's train/ images; test is test/ when there is one,
else the same share held out of train/, which no trial sees. By counts (the
user's problem): the shared data is balanced CIFAR-10 (5000/1000 per class);
the user's problem was train 80% car / 12% truck / 8% cat and an imbalanced
dev set, which the counts rebuild deterministically, plus a balanced held-out
test set drawn from `test/` disjoint from dev.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_path, write_json
from .corrections import apply_corrections
from .errors import DataError
from .sources import (DEFAULT_CLASSES, LabeledImages, SourceListing, array_file, is_image_tree, list_source,
                      read_array_splits, read_images)

# Counts of the user's report: 5000 train images at 80/12/8 %, dev 503/51/71.
# The balanced test split is ours: 400 per class keeps it disjoint from dev
# inside CIFAR's 1000 test images per class.
USER_TRAIN_COUNTS = (4000, 600, 400)
USER_DEV_COUNTS = (503, 51, 71)
USER_TEST_COUNTS = (400, 400, 400)
SPLIT_NAMES = ("train", "dev", "test")
COUNT_FIELDS = ("train_counts", "dev_counts", "test_counts")
# As the folder is: the share of each class's train/ images held out as dev (and as test, without a test/
# folder). 15 % keeps the user's dev share (625 of 5625 images, 11 %) and leaves a 50-image class 7 or 8.
DEV_FRACTION = 0.15
HELD_OUT_FOLDERS = {"dev": "val", "test": "test"}  # the tree folder a held-out split is, when the tree has one
RECORD_KEYS = ("data_summary", "split_cache_key", "corrections_digest")  # Splits.record(), as a study keeps it
CACHE_FORMAT = 1
STALE_TMP_SECONDS = 600  # a cache temporary untouched this long lost its writer (a live one takes about a second)


@dataclass
class DataConfig:
    """Where the images come from and how the user's split is drawn from them."""

    source: Path
    classes: tuple[str, ...] = DEFAULT_CLASSES
    train_counts: tuple[int, ...] | None = USER_TRAIN_COUNTS  # all three None: the folder as it is
    dev_counts: tuple[int, ...] | None = USER_DEV_COUNTS
    test_counts: tuple[int, ...] | None = USER_TEST_COUNTS
    seed: int = 0
    image_size: int = 32
    trust_pickle: bool = False
    corrections: Path | None = None
    dev_fraction: float = DEV_FRACTION  # as the folder is: the share of train/ held out as dev (and test)

    @property
    def as_is(self) -> bool:
        """The folder as it is: every image, no counts."""
        return self.train_counts is None

    def __post_init__(self):
        self.source = Path(self.source)
        self.classes = tuple(self.classes)
        if len({getattr(self, name) is None for name in COUNT_FIELDS}) > 1:
            raise DataError("train, dev and test counts go together: give all three, or none for the folder as it is")
        if not 0 < self.dev_fraction <= 0.5:
            raise DataError(f"dev fraction {self.dev_fraction}: expected a share of train/ above 0 and at most 0.5")
        for name in COUNT_FIELDS if not self.as_is else ():
            counts = tuple(int(c) for c in getattr(self, name))
            if len(counts) != len(self.classes):
                raise DataError(f"{name} {counts} has {len(counts)} entries for {len(self.classes)} classes ({','.join(self.classes)})")
            if any(c < 0 for c in counts):
                raise DataError(f"{name} {counts} has a negative count")
            setattr(self, name, counts)


@dataclass
class Splits:
    classes: tuple[str, ...]
    train: LabeledImages
    dev: LabeledImages
    test: LabeledImages | None = None
    source: str = ""
    cache_path: Path | None = None
    cache_key: str = ""  # what prepare_splits keyed the cache by: source, settings, file listing, corrections
    corrections_digest: str | None = None  # sha256 of the corrections file applied, None without one

    def named(self) -> dict[str, LabeledImages]:
        return {n: s for n, s in (("train", self.train), ("dev", self.dev), ("test", self.test)) if s is not None}

    def record(self) -> dict:
        """What identifies this split for a later stage to compare (RECORD_KEYS): counts, cache key, corrections."""
        return dict(zip(RECORD_KEYS, (self.summary(), self.cache_key, self.corrections_digest)))

    def summary(self) -> dict:
        return {
            "classes": list(self.classes),
            "source": self.source,
            "splits": {name: {c: int(n) for c, n in zip(self.classes, split.counts(len(self.classes)))}
                       for name, split in self.named().items()},
        }


def imbalance_line(summary: dict) -> str:
    """The train split's imbalance: its largest class against its smallest."""
    train = summary["splits"]["train"]
    most, least = max(train, key=train.get), min(train, key=train.get)
    ratio = f"{train[most] / train[least]:.3g}:1" if train[least] else "inf"
    return f"imbalance: {ratio} in train ({most} {train[most]}, {least} {train[least]})"


def format_summary(summary: dict) -> str:
    classes = summary["classes"]
    width = max(6, *(len(c) for c in classes))
    lines = [f"{'split':<6}" + "".join(f"{c:>{width + 2}}" for c in classes) + f"{'total':>{width + 2}}"]
    for name, counts in summary["splits"].items():
        row = [counts[c] for c in classes]
        lines.append(f"{name:<6}" + "".join(f"{n:>{width + 2}}" for n in row) + f"{sum(row):>{width + 2}}")
    return "\n".join(lines)


# --- building: source folder -> images per class -> split -> cache ---------

def prepare_splits(config: DataConfig, cache_dir: Path | None) -> Splits:
    """Train/dev/test for a config, from the cache when the source and settings are unchanged.

    The source folder is listed once (cnnlib.sources.list_source); that
    listing keys the cache, and on a miss the split is drawn from it, read,
    corrected and cached.
    """
    source = list_source(config.source, config.classes)
    digest = _file_digest(config.corrections) if config.corrections else None
    key = _cache_key(config, source.fingerprint(), digest)
    cache_path = Path(cache_dir) / f"split-{key}.npz" if cache_dir else None
    splits = _load_cache(cache_path) if cache_path and cache_path.is_file() else None
    if splits is None:
        splits = _draw_from_tree(config, source) if source.is_tree else _read_array_files(config, source)
        require_every_class(splits, ("train", "dev"), config)
        if config.corrections:
            splits = apply_corrections(splits, config.corrections)
            require_every_class(splits, ("train", "dev"), config, f"{config.corrections}: after these corrections")
        if cache_path:
            _remove_stale_temporaries(cache_path.parent)
            _save_cache(splits, cache_path)
            splits.cache_path = cache_path
    splits.cache_key, splits.corrections_digest = key, digest
    return splits


def _draw_from_tree(config: DataConfig, source: SourceListing) -> Splits:
    """Per class, the split's files (by counts, or the folder as it is); only the drawn images are read."""
    root = source.root
    rng = np.random.default_rng(config.seed)
    chosen = {name: ([], []) for name in SPLIT_NAMES}
    draw = _as_is if config.as_is else _by_counts
    for label, name in enumerate(config.classes):
        for split, files in zip(SPLIT_NAMES, draw(config, source, label, rng)):
            chosen[split][0].extend(files)
            chosen[split][1].extend([label] * len(files))
    parts = {s: read_images(paths, labels, root, config.image_size) for s, (paths, labels) in chosen.items()}
    return Splits(config.classes, parts["train"], parts["dev"], parts["test"], str(root))


def _by_counts(config: DataConfig, source: SourceListing, label: int, rng) -> tuple[list[Path], ...]:
    """train drawn from train/, dev and a disjoint test from test/, at the configured counts."""
    name, root = config.classes[label], source.root
    if "test" not in source.tree:
        raise DataError(f"{root / 'test'}: folder not found; the split counts draw dev and test from test/ "
                        "(leave TRAIN_COUNTS, DEV_COUNTS and TEST_COUNTS unset to use the folder as it is)")
    (train,) = _take(source.tree["train"][name], [config.train_counts[label]], rng, root / "train" / name)
    dev, test = _take(source.tree["test"][name], [config.dev_counts[label], config.test_counts[label]], rng,
                      root / "test" / name)
    return train, dev, test


def _as_is(config: DataConfig, source: SourceListing, label: int, rng) -> tuple[list[Path], ...]:
    """Every image of the class: dev is val/ (else a stratified share of train/), test is test/ (else the same).

    A class too small to give each split an image is one line naming it, its
    count and the minimum, before anything is read or written.
    """
    name, tree = config.classes[label], source.tree
    files, where = tree["train"][name], source.root / "train" / name
    sliced = [split for split in ("dev", "test") if HELD_OUT_FOLDERS[split] not in tree]
    if len(files) < 1 + len(sliced):
        uses = ", ".join(["one to train on"] + [f"one for {split}" for split in sliced])
        raise DataError(f"{where}: {len(files)} image(s), but a class needs at least {1 + len(sliced)} in train/ "
                        f"({uses}); add images, or leave the class out with CLASSES")
    held = max(1, min(round(config.dev_fraction * len(files)), (len(files) - 1) // max(1, len(sliced))))
    *taken, train = _take(files, [held] * len(sliced) + [len(files) - held * len(sliced)], rng, where)
    drawn = dict(zip(sliced, taken))
    dev, test = (drawn[s] if s in drawn else tree[HELD_OUT_FOLDERS[s]][name] for s in ("dev", "test"))
    return train, dev, test


def _read_array_files(config: DataConfig, source: SourceListing) -> Splits:
    """train/dev (and test, when there) as the files hold them."""
    parts = read_array_splits(source, config.classes, config.trust_pickle)
    return Splits(config.classes, parts["train"], parts["dev"], parts["test"], str(config.source))


def _take(files: list[Path], counts: Sequence[int], rng: np.random.Generator, where: Path) -> list[list[Path]]:
    """Disjoint random draws of the given sizes from one class's files."""
    if sum(counts) > len(files):
        needed = f"{' + '.join(map(str, counts))} = {sum(counts)}" if len(counts) > 1 else str(sum(counts))
        raise DataError(f"{where}: {len(files)} images, but the split needs {needed}")
    order = rng.permutation(len(files))
    out, start = [], 0
    for n in counts:
        out.append(sorted(files[i] for i in order[start:start + n]))
        start += n
    return out


# --- the cache: keyed by the source listing and the settings -------------

def _cache_key(config: DataConfig, listing, corrections_digest: str | None) -> str:
    settings = asdict(config)
    if not config.as_is:
        del settings["dev_fraction"]  # unused by counts: the caches and study records of counted splits keep their key
    settings["source"] = str(Path(config.source).resolve())
    settings["corrections"] = corrections_digest
    settings["trust_pickle"] = None  # how we were allowed to read does not change the content
    blob = json.dumps({"format": CACHE_FORMAT, "settings": settings, "listing": listing}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None


def _save_cache(splits: Splits, path: Path) -> None:
    arrays = {}
    for name, split in splits.named().items():
        arrays[f"{name}_images"] = split.images
        arrays[f"{name}_labels"] = split.labels
        arrays[f"{name}_ids"] = split.ids
    arrays["classes"] = np.array(splits.classes, dtype=str)
    arrays["source"] = np.array(splits.source, dtype=str)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a crash never leaves a cache that loads half
        np.savez(handle, **arrays)


def _load_cache(path: Path) -> Splits | None:
    """The cached split; None when the file is damaged (e.g. truncated): it is rebuilt, never trusted."""
    try:
        with np.load(path, allow_pickle=False) as a:
            parts = {name: LabeledImages(a[f"{name}_images"], a[f"{name}_labels"], a[f"{name}_ids"])
                     if f"{name}_images" in a.files else None for name in SPLIT_NAMES}
            return Splits(tuple(a["classes"].tolist()), parts["train"], parts["dev"], parts["test"],
                          str(a["source"]), path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def require_every_class(splits: Splits, names: Sequence[str], config: DataConfig, blame: str | None = None) -> None:
    """Each named split must hold every class; `blame` (default: "<the split's source>:") starts the message.

    Macro accuracy averages the classes a split has: a class missing from dev
    would silently drop out of the number every trial is judged by, one missing
    from train would never be learned, and an empty split has no number at all.
    """
    for name in names:
        split = getattr(splits, name)
        missing = [c for c, n in zip(splits.classes, split.counts(len(splits.classes))) if n == 0]
        if missing:
            if blame is None and not is_image_tree(config.source):
                blame = f"{array_file(config.source, name)}:"
            elif blame is None:
                counts = "" if config.as_is else f" (--{name}-counts {','.join(map(str, getattr(config, f'{name}_counts')))})"
                blame = f"{config.source}{counts}:"
            raise DataError(f"{blame} the {name} split has no {', '.join(map(repr, missing))} image; "
                            "every class needs at least one there")


def _remove_stale_temporaries(cache_dir: Path) -> None:
    """A kill during a cache write leaves its `.split-*.tmp` (about 10 MB) behind; nothing else would remove it."""
    for tmp in cache_dir.glob(".split-*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()
        except FileNotFoundError:
            pass  # another build removed it first


def write_summary(splits: Splits, path: Path) -> dict:
    summary = splits.summary()
    write_json(path, summary)
    return summary
