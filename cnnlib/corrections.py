"""Reviewed label fixes, applied wherever data is loaded (search, final, bench, audit).

A person confirms what `make audit` suspected by listing it in a CSV:

    id,new_label
    train/car/0042.jpg,truck
    test/cat/0007.jpg,drop

`id` is the image id the readers give (a path under the data folder, or
`file.npz#index`), `new_label` a class name or `drop`. Other columns (a note,
the audit's columns) are allowed and ignored, so a copy of `suspects.csv` with
a `new_label` column added is a valid file. Every line must name an image and a
class that exist: a typo that silently corrected nothing would leave the wrong
label in place while the user believes it fixed, so it is an error instead.
The file's hash is part of the split cache key (splits.py), so editing it
rebuilds the cached split.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .sources import IMAGE_SUFFIXES, LabeledImages

DROP = "drop"
REQUIRED_COLUMNS = ("id", "new_label")


@dataclass(frozen=True)
class Correction:
    image_id: str
    new_label: str  # a class name or DROP
    line: int  # 1-based line in the file, for error messages


def read_corrections(path: Path, classes) -> list[Correction]:
    """Parse and validate the file's rows against the class list (ids are checked when applied)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets like to prepend a BOM
    except OSError as error:
        raise DataError(f"{path}: cannot read corrections file ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: corrections file is not UTF-8 text ({error.reason})") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: corrections file is empty; expected a header line 'id,new_label'")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: line 1: header {','.join(header)!r} lacks column(s) {', '.join(missing)}; "
                        f"expected 'id,new_label'")
    id_col, label_col = header.index("id"), header.index("new_label")
    allowed = set(classes)
    corrections, seen = [], {}
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines separate review batches
        if len(row) <= max(id_col, label_col):
            raise DataError(f"{path}: line {line}: {len(row)} column(s), expected at least {len(header)} ({','.join(header)})")
        image_id, new_label = row[id_col].strip(), row[label_col].strip()
        if not image_id:
            raise DataError(f"{path}: line {line}: empty id")
        if new_label.lower() == DROP and DROP not in allowed:
            new_label = DROP
        elif new_label not in allowed:
            raise DataError(f"{path}: line {line}: new_label {new_label!r} for {image_id!r} is not a class "
                            f"({', '.join(classes)}) or '{DROP}'")
        if image_id in seen:
            raise DataError(f"{path}: line {line}: id {image_id!r} is already corrected on line {seen[image_id]}")
        seen[image_id] = line
        corrections.append(Correction(image_id, new_label, line))
    return corrections


def _apply(split: LabeledImages, corrections: list[Correction], classes) -> tuple[LabeledImages, set[str]]:
    position = {image_id: i for i, image_id in enumerate(split.ids.tolist())}
    labels = split.labels.copy()
    keep = np.ones(len(split), dtype=bool)
    found = set()
    for c in corrections:
        i = position.get(c.image_id)
        if i is None:
            continue
        found.add(c.image_id)
        if c.new_label == DROP:
            keep[i] = False
        else:
            labels[i] = classes.index(c.new_label)
    fixed = LabeledImages(split.images, labels, split.ids)
    return (fixed if keep.all() else fixed.subset(keep)), found


def apply_corrections(splits, path: Path):
    """A new Splits with the file's labels changed and `drop` images removed, in every split.

    Raises DataError naming the file and line of the first row whose id is in no split.
    """
    classes = tuple(splits.classes)
    corrections = read_corrections(path, classes)
    fixed, found = {}, {}
    for name, split in splits.named().items():
        fixed[name], hits = _apply(split, corrections, classes)
        for image_id in hits:
            found.setdefault(image_id, []).append(name)
    shared = next((c for c in corrections if len(found.get(c.image_id, ())) > 1), None)
    if shared is not None:  # e.g. train.npz and dev.npz that number their images 0, 1, ... alike
        raise DataError(f"{path}: line {shared.line}: id {shared.image_id!r} names an image in "
                        f"{' and one in '.join(found[shared.image_id])}; give the splits distinct ids")
    unknown = [c for c in corrections if c.image_id not in found]
    if unknown:
        c = unknown[0]
        example = next(iter(splits.train.ids.tolist()), "")
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        if _undrawn_image(splits.source, c.image_id):
            raise DataError(f"{path}: line {c.line}: id {c.image_id!r} is an image of {splits.source}, but the split "
                            f"did not draw it into train, dev or test{more}; the counts (TRAIN_COUNTS, DEV_COUNTS, "
                            "TEST_COUNTS) and SPLIT_SEED choose the images: remove the line or use the counts the "
                            "file was made with")
        raise DataError(f"{path}: line {c.line}: id {c.image_id!r} is not an image of any split{more}; "
                        f"ids look like {example!r} (see suspects.csv from make audit)")
    return dataclasses.replace(splits, train=fixed["train"], dev=fixed["dev"], test=fixed.get("test"))


def _undrawn_image(source: str, image_id: str) -> bool:
    """Whether `image_id` is an image file of the data folder `source` (ids are paths under it), which the split,
    a draw of some of them, may have left out."""
    if not source:
        return False
    root = Path(source)
    path = root / image_id
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False
    return inside and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
