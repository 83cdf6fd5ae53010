"""A data folder: what it holds, listed once, and how its images are read (an image tree, .npz, a legacy pickle).

`list_source` lists the folder once (SourceListing): an image tree's files
per split folder and class, or its array files. An image tree's drawn files
are read with `read_images`; an array folder's splits are read as its files
hold them (`read_array_splits`). Drawing the user's split from a listing is
cnnlib/splits.py. Every reader returns a `LabeledImages`: uint8 HWC images, int64 labels in the
configured class order, and a string id per image (a path relative to the
source, or `file.npz#index`) so that audits and corrections can name images.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError, UntrustedPickleError

DEFAULT_CLASSES = ("car", "truck", "cat")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
TRUST_PICKLE_HINT = (
    "unpickling can run arbitrary code, so pickles load only when you trust the file: "
    "pass --trust-pickle (make: TRUST_PICKLE=1), or convert it to .npz once"
)


@dataclass
class LabeledImages:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, index into the class order
    ids: np.ndarray  # (N,) str

    def __post_init__(self):
        if not (len(self.images) == len(self.labels) == len(self.ids)):
            raise DataError(f"images ({len(self.images)}), labels ({len(self.labels)}) and ids ({len(self.ids)}) differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self, n_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=n_classes)

    def subset(self, index) -> "LabeledImages":
        return LabeledImages(self.images[index], self.labels[index], self.ids[index])


def parse_classes(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'car,truck,cat' -> ('car', 'truck', 'cat'); order defines the labels."""
    if text is None or text == "":
        return DEFAULT_CLASSES
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text)]
    if any(not c for c in names) or len(set(names)) != len(names) or len(names) < 2:
        raise DataError(f"class list {text!r} must name at least two distinct, non-empty classes")
    return tuple(names)


def infer_classes(source: Path) -> tuple[str, ...]:
    """The class order when none is given: the folder names of an image tree's train/, sorted.

    Sorted, so that the same tree gives the same labels on every machine; the
    user's own car/truck/cat keep their report's order (car 0, truck 1, cat 2),
    which their counts and earlier studies assume. Array files carry labels
    without names, so they keep that order too.
    """
    train = Path(source) / "train"
    if not train.is_dir():
        return DEFAULT_CLASSES
    names = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if set(names) == set(DEFAULT_CLASSES):
        return DEFAULT_CLASSES
    if len(names) < 2:
        raise DataError(f"{train}: found {len(names)} class folder(s) ({', '.join(names) or 'none'}); "
                        "an image tree needs one folder per class, at least two")
    return tuple(names)


# --- the source folder, listed once --------------------------------------

ARRAY_SUFFIXES = (".npz", ".pickle", ".pkl")
MIN_IMAGE_SIZE = 16  # the seed CNN's two 5x5-conv + 2x2-pool stages leave nothing of less (model.flat_features)
SPLIT_FILES = ("train", "dev", "test")  # the array files a folder may hold; test is optional


def is_image_tree(source: Path) -> bool:
    return (source / "train").is_dir()  # val/ and test/ are optional: the folder as it is slices them from train/


def array_file(source: Path, split: str) -> Path | None:
    """source/<split>.npz (or .pickle, .pkl), the first that exists."""
    for suffix in ARRAY_SUFFIXES:
        if (source / f"{split}{suffix}").is_file():
            return source / f"{split}{suffix}"
    return None


@dataclass
class SourceListing:
    """What a data folder holds, listed once: an image tree's files per split folder and class, or its array files.
    The cache key is made from it and the split drawn from it, so the folder is walked once."""

    root: Path
    tree: dict[str, dict[str, list[Path]]] | None  # {"train": {class: files}, "test": {...}}; None for array files
    arrays: dict[str, Path | None]  # {"train": path or None, "dev": ..., "test": ...}; empty for an image tree

    @property
    def is_tree(self) -> bool:
        return self.tree is not None

    def files(self) -> list[Path]:
        if self.tree is not None:
            return [path for folder in self.tree.values() for paths in folder.values() for path in paths]
        return [path for path in self.arrays.values() if path]

    def fingerprint(self) -> list[tuple[str, int, int]]:
        return file_fingerprint(self.files())


def list_source(root: Path, classes: Sequence[str]) -> SourceListing:
    """The data folder's listing: an image tree (train/, and val/ and test/ when there, a folder per class) or array files."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data folder not found (set DATA=... to an image tree or a folder with train/dev .npz)")
    if not root.is_dir():
        raise DataError(f"{root}: DATA must be a folder (an image tree with train/ and test/, or one with train.npz and dev.npz)")
    if is_image_tree(root):
        return SourceListing(root, {split: list_class_folders(root / split, classes)
                                    for split in ("train", "val", "test") if (root / split).is_dir()}, {})
    return SourceListing(root, None, {split: array_file(root, split) for split in SPLIT_FILES})


# --- image-folder trees ---------------------------------------------------

def class_folder_problem(split_dir: Path, classes: Sequence[str]) -> str | None:
    """What does not match between a class order and a split's class folders (None: nothing), naming no option:
    the caller names the one that set the order. A missing class comes first: `car,truck,dog` is about `dog`."""
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    missing = [name for name in classes if name not in folders]
    if missing:
        which = f"class {missing[0]} has" if len(missing) == 1 else f"classes {', '.join(missing)} have"
        return (f"{split_dir / missing[0]}: class folder missing: {which} no folder in {split_dir} (class order "
                f"{','.join(classes)}; its folders: {', '.join(folders) or 'none'})")
    unknown = [name for name in folders if name not in classes]
    return (f"{split_dir}: class folder(s) {', '.join(unknown)} not in the configured class order "
            f"({','.join(classes)})") if unknown else None


def list_class_folders(split_dir: Path, classes: Sequence[str]) -> dict[str, list[Path]]:
    """Image files per class, sorted by name; every folder must be a known, non-empty class."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found (expected one sub-folder per class: {', '.join(classes)})")
    problem = class_folder_problem(split_dir, classes)
    if problem:
        raise DataError(f"{problem}; CLASSES=... (--classes) must name the class folders")
    files = {}
    for name in classes:
        folder = split_dir / name
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{folder}: class folder holds no .jpg/.jpeg/.png images")
        broken = next((p for p in found if not p.is_file()), None)  # is_file follows links; False for a dead or looping one
        if broken is not None:
            what = "symbolic link whose target is missing or loops" if broken.is_symlink() else "not a file"
            raise DataError(f"{broken}: {what}; remove it or make it an image")
        files[name] = found
    return files


def read_image(path: Path, image_size: int = 32) -> np.ndarray:
    """One RGB image as (H, W, 3) uint8; corrupt, truncated, oversized or wrong-size files name themselves."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a stderr line, then gigabytes
            image = Image.open(path)
        with image:
            if image.size != (image_size, image_size):  # before decoding: the header alone says
                raise DataError(f"{path}: image is {image.size[0]}x{image.size[1]}, expected {image_size}x{image_size}")
            image.load()
            return _rgb_pixels(image)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path}: refusing to decode a decompression bomb ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from None


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8. 16-bit greyscale (mode I;16) keeps its top 8 bits, as Pillow does for 16-bit RGB:
    its convert("RGB") would clip at 255 and turn all but the darkest pixels white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_images(paths: Sequence[Path], labels: Sequence[int], root: Path, image_size: int = 32) -> LabeledImages:
    images = np.stack([read_image(p, image_size) for p in paths]) if paths else np.zeros((0, image_size, image_size, 3), np.uint8)
    ids = np.array([p.relative_to(root).as_posix() for p in paths], dtype=str)
    return LabeledImages(images, np.asarray(labels, dtype=np.int64), ids)


def read_image_folder(split_dir: Path, classes: Sequence[str], image_size: int = 32) -> LabeledImages:
    """Every image of a class-per-folder tree (torchvision's ImageFolder layout)."""
    files = list_class_folders(Path(split_dir), classes)
    paths = [p for c in classes for p in files[c]]
    labels = [i for i, c in enumerate(classes) for _ in files[c]]
    return read_images(paths, labels, Path(split_dir).parent, image_size)


# --- arrays ---------------------------------------------------------------

def _check_arrays(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], where: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{where}: images have shape {images.shape}, expected (N, H, W, 3)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{where}: labels have shape {labels.shape}, expected ({len(images)},)")
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        raise DataError(f"{where}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range "
                        f"for {len(classes)} classes ({','.join(classes)})")


def read_npz(path: Path, classes: Sequence[str]) -> LabeledImages:
    """A .npz with `images` (N, H, W, 3) uint8 and integer `labels`; pickled objects refused."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # np.load would try it as .npy or as a pickle
        raise DataError(f"{path}: not a readable .npz (not the zip archive numpy.savez writes: truncated, "
                        "or another format renamed)")
    try:
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as archive:
            missing = {"images", "labels"} - set(archive.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(sorted(missing))}; found {', '.join(archive.files)}")
            images, labels = archive["images"], archive["labels"]
            ids = archive["ids"] if "ids" in archive.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # a truncated .npz is a BadZipFile
        raise DataError(f"{path}: not a readable .npz ({error})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images are {images.dtype}, expected uint8 pixels 0..255")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels are {labels.dtype}, expected integers")
    labels = labels.astype(np.int64)
    _check_arrays(images, labels, classes, str(path))
    if ids is None:
        ids = np.array([f"{path.name}#{i}" for i in range(len(labels))], dtype=str)
    _check_ids(ids, len(labels), str(path))
    return LabeledImages(images, labels, ids.astype(str))


def _check_npz_sizes(path: Path) -> None:
    """Each array's header must not claim more bytes than the archive holds for it.

    numpy allocates what a .npy header claims before reading a byte: a crafted
    header claiming petabytes fails with MemoryError, or first swaps the machine.
    """
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    continue  # np.load judges other versions itself
                shape, _, dtype = read_header(handle)
                claimed, held = math.prod(shape) * dtype.itemsize, member.file_size - handle.tell()
            if claimed > held:
                raise DataError(f"{path}: array {member.filename.removesuffix('.npy')!r} claims shape {shape} "
                                f"({claimed:,} bytes) but the file holds {held:,} bytes for it")


def _check_ids(ids: np.ndarray, count: int, where: str) -> None:
    """One id per image, each naming one image: a correction of a shared id would change only one of them."""
    if ids.shape != (count,):
        raise DataError(f"{where}: ids have shape {ids.shape}, expected ({count},)")
    values, counts = np.unique(ids.astype(str), return_counts=True)
    repeated = [f"{v!r} ({n} images)" for v, n in zip(values.tolist(), counts.tolist()) if n > 1]
    if repeated:
        raise DataError(f"{where}: ids must be unique, but {len(repeated)} repeat: {', '.join(repeated[:3])}"
                        f"{' ...' if len(repeated) > 3 else ''}")


def _to_uint8_hwc(image, where: str) -> np.ndarray:
    """Legacy images: CHW floats in [-1, 1] (Normalize(0.5, 0.5) tensors) or HWC uint8 arrays."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.dtype == np.uint8:
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        return array
    if array.ndim == 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise DataError(f"{where}: image of shape {array.shape}, expected CHW or HWC with 3 channels")
    if array.min() < -1.001 or array.max() > 1.001:
        raise DataError(f"{where}: float image outside [-1, 1] (min {array.min():.3f}, max {array.max():.3f})")
    return np.clip(np.round((array + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _stack(images: list[np.ndarray], path: Path) -> np.ndarray:
    """One array from per-image arrays; the first image whose shape differs is named."""
    odd = next((i for i, x in enumerate(images) if x.shape != images[0].shape), None)
    if odd is not None:
        raise DataError(f"{path}[{odd}]: image of shape {images[odd].shape}, but image 0 is {images[0].shape}")
    return np.stack(images)


def read_pickle(path: Path, classes: Sequence[str], trust: bool = False) -> LabeledImages:
    """The user's legacy pickle: a list of (image, label) pairs, or a dict with data/labels."""
    path = Path(path)
    if not trust:
        raise UntrustedPickleError(f"{path}: refusing to unpickle: {TRUST_PICKLE_HINT}")
    # Said every time: running a file's code is never silent, even when it was allowed.
    print(f"note: unpickling {path} as trusted (TRUST_PICKLE / --trust-pickle): a pickle can run any code it "
          "holds; convert it to .npz once to stop needing that", file=sys.stderr, flush=True)
    try:
        with open(path, "rb") as handle:
            content = pickle.load(handle)  # noqa: S301 - only with explicit trust
    except Exception as error:  # a pickle can raise anything
        raise DataError(f"{path}: cannot unpickle ({type(error).__name__}: {error})") from None
    if isinstance(content, dict):
        keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}
        if "data" not in keys or "labels" not in keys:
            raise DataError(f"{path}: dict pickle needs 'data' and 'labels' keys, found {sorted(map(str, keys))}")
        data = np.asarray(keys["data"])
        if data.ndim == 2 and data.shape[1] % 3 == 0:  # CIFAR's flat rows: R plane, G plane, B plane
            side = int(round((data.shape[1] // 3) ** 0.5))
            data = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
        images = _stack([_to_uint8_hwc(x, f"{path}[{i}]") for i, x in enumerate(data)], path) if len(data) else data
        labels = np.asarray(keys["labels"], dtype=np.int64)
    elif isinstance(content, (list, tuple)):
        try:
            images = _stack([_to_uint8_hwc(pair[0], f"{path}[{i}]") for i, pair in enumerate(content)], path)
            labels = np.asarray([int(pair[1]) for pair in content], dtype=np.int64)
        except (TypeError, IndexError) as error:
            raise DataError(f"{path}: expected a list of (image, label) pairs ({error})") from None
    else:
        raise DataError(f"{path}: unpickled a {type(content).__name__}; expected a list of (image, label) pairs or a dict")
    _check_arrays(images, labels, classes, str(path))
    ids = np.array([f"{path.name}#{i}" for i in range(len(labels))], dtype=str)
    return LabeledImages(images, labels, ids)


def read_array_file(path: Path, classes: Sequence[str], trust_pickle: bool = False) -> LabeledImages:
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return read_npz(path, classes)
    if suffix in (".pickle", ".pkl"):
        return read_pickle(path, classes, trust_pickle)
    raise DataError(f"{path}: unknown data file type {suffix!r} (expected .npz, .pickle or .pkl)")


def read_array_splits(listing: SourceListing, classes: Sequence[str], trust_pickle: bool = False
                      ) -> dict[str, LabeledImages | None]:
    """train/dev (and test, when there) as an array folder's files hold them; every split of one square size."""
    parts = {}
    for split in SPLIT_FILES:
        path = listing.arrays[split]
        if path is None and split != "test":
            raise DataError(f"{listing.root}: no {split}.npz / {split}.pickle found "
                            "(a data folder is either an image tree with train/ and test/, or holds train.* and dev.* files)")
        parts[split] = read_array_file(path, classes, trust_pickle) if path else None
        _check_image_shape(parts[split], path, parts["train"], listing.arrays["train"])
    return parts


def _check_image_shape(part: LabeledImages | None, path: Path, train: LabeledImages, train_path: Path) -> None:
    """One model sees every split: the images must be square and the same size in all of them."""
    if part is None or not len(part):
        return
    height, width = part.images.shape[1:3]
    if height != width:
        raise DataError(f"{path}: images are {width}x{height}; the seed CNN needs square images")
    if height < MIN_IMAGE_SIZE:
        raise DataError(f"{path}: images are {width}x{height}; the seed CNN needs at least "
                        f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}")
    if len(train) and part.images.shape[1:3] != train.images.shape[1:3]:
        raise DataError(f"{path}: images are {width}x{height}, but {train_path} has "
                        f"{train.images.shape[2]}x{train.images.shape[1]}; every split needs one size")


def file_fingerprint(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(name, size, mtime) per file: cheap, and changes whenever a file is replaced."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return out
