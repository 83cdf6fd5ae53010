"""Shared fixtures: tiny image trees written into tmp_path, and the real shared data set.

Unit tests build their own small PNG/JPEG folders so that every file a test
reads is one it made; tests about the user's split read the real shared data
and fail (never skip) when it is missing, because a skipped check proves nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlib.device import flush_denormals, resolve_device
from cnnlib.sources import DEFAULT_CLASSES
from cnnlib.splits import DataConfig, prepare_splits

# The seed CNN's ops are too small to split across threads: on the 2-core machine with
# other work beside it, 3 epochs on 500 images took 0.4 s with 1 thread and 4.1 s with 2
# (oversubscribed spin-waits). Tests train many tiny models, so they use one thread.
TEST_THREADS = 1


def session_torch_state() -> None:
    """One thread, and denormals flushed as every command flushes them (before the first parallel op, so
    the threads torch starts later inherit it)."""
    torch.set_num_threads(TEST_THREADS)
    flush_denormals()


session_torch_state()

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("TEST_DATA") or ROOT.parent / "shared" / "data" / "cifar10-cars-trucks-cats")

# One mean colour per class (car reddish, truck greenish, cat bluish): the tiny
# trees are then learnable, so a training smoke test can tell a model from noise.
CLASS_TINTS = {"car": (200, 60, 60), "truck": (60, 200, 60), "cat": (60, 60, 200)}


def class_image(name: str, index: int, size: int = 32) -> np.ndarray:
    """A deterministic (size, size, 3) uint8 image: the class tint plus per-image noise."""
    rng = np.random.default_rng([zlib.crc32(name.encode()), index])
    tint = np.array(CLASS_TINTS.get(name, (128, 128, 128)), dtype=np.int16)
    noise = rng.integers(-40, 41, size=(size, size, 3), dtype=np.int16)
    return np.clip(tint + noise, 0, 255).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def build_image_tree(root: Path, train: dict[str, int], test: dict[str, int], suffix: str = ".png",
                     size: int = 32) -> Path:
    """root/{train,test}/<class>/NNNN<suffix>, the shared data's layout, with the given counts."""
    for split, counts in (("train", train), ("test", test)):
        for name, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            offset = 0 if split == "train" else 10_000
            for i in range(n):
                write_image(folder / f"{i:04d}{suffix}", class_image(name, offset + i, size))
    return root


@pytest.fixture
def image_tree(tmp_path):
    """Factory: image_tree(train={...}, test={...}, suffix='.png') -> root of a fresh tree in tmp_path."""
    made = []

    def make(train: dict[str, int] | None = None, test: dict[str, int] | None = None,
             suffix: str = ".png", size: int = 32) -> Path:
        root = tmp_path / f"tree{len(made)}"
        made.append(root)
        return build_image_tree(root, train or {c: 6 for c in DEFAULT_CLASSES},
                                test or {c: 6 for c in DEFAULT_CLASSES}, suffix, size)

    return make


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "train").is_dir() or not (REAL_DATA / "test").is_dir():
        pytest.fail(f"real data not found at {REAL_DATA} (expected train/ and test/ with car, truck, cat; "
                    "set TEST_DATA=... to point elsewhere)")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_splits(real_data, tmp_path_factory):
    """The user's default split of the real data, built once per test session (~3 s)."""
    return prepare_splits(DataConfig(real_data), tmp_path_factory.mktemp("split-cache"))


@pytest.fixture(scope="session")
def device():
    """Where training tests run: cuda when present (DEVICE=cpu forces the CPU), so both paths get tested."""
    return resolve_device(os.environ.get("DEVICE") or "auto")


# --- the study command line -----------------------------------------------

TINY_SPACE = """\
description: two quick epochs for tests
params:
  optimizer: adam
  lr: 3.0e-3
  weight_decay: 0.0
  batch_size: 8
  epochs: 2
  imbalance: weighted_loss
  seed: 1
"""


def run_cli(*argv) -> tuple[int, str, str]:
    """`python -m study ...` in-process: (exit code, stdout, stderr); an option argparse refuses exits 2 as there."""
    from study.cli import main  # noqa: PLC0415 - only the command tests need the CLI

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory):
    """(folder, fixed space file, data options): a tiny tree read with small per-class counts."""
    base = tmp_path_factory.mktemp("tiny")
    root = build_image_tree(base / "data", {c: 10 for c in DEFAULT_CLASSES}, {c: 8 for c in DEFAULT_CLASSES})
    space = base / "tiny.yaml"
    space.write_text(TINY_SPACE)
    options = ["--data", str(root), "--train-counts", "10,6,4", "--dev-counts", "4,3,2", "--test-counts", "4,4,4"]
    return base, space, options


@pytest.fixture(scope="session")
def tiny_run(tiny_inputs):
    """One `study train` run on the tiny tree: (run folder, its stdout)."""
    base, space, options = tiny_inputs
    results = base / "results"
    code, out, err = run_cli("train", "--space", space, "--results", results, "--device", "cpu", "--name", "first", *options)
    assert code == 0, err
    return results / "runs" / "first", out


# --- environment ----------------------------------------------------------------

# Variables the Makefile exports and the commands read as defaults: under `make test`
# they would leak into the studies and commands the tests run.
STUDY_ENV = ("DATA", "RESULTS", "DEVICE", "SPACE", "STUDY", "STORAGE", "TRIALS", "TIMEOUT", "WORKERS", "FUSE",
             "TRUST_PICKLE", "CORRECTIONS", "CSV", "HOST", "PORT", "CHECKPOINT", "SPLIT", "TRIAL", "SEEDS",
             "BUDGET", "SEARCH_SEEDS", "CLASSES", "TRAIN_COUNTS", "DEV_COUNTS", "TEST_COUNTS", "SPLIT_SEED",
             "FLIP_COUNT", "SEED", "AUDIT_METHOD", "THREADS", "METHODS", "DATASETS", "EVAL_JSON", "PLOTS_OUT",
             "FUSED_KS", "COUNTS", "DEV_FRACTION", "CANDIDATES", "FOLDS", "ENSEMBLE", "EPSILONS", "ATTACK", "TTA")


@pytest.fixture
def no_study_env(monkeypatch):
    """Modules that run commands use it (pytestmark) so only their own arguments count."""
    for name in STUDY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def read_only_folder(tmp_path_factory):
    """An empty read-only file system (a tmpfs mounted ro), or None where this machine lets no test mount one.

    chmod cannot stand in for it: root writes through every permission bit,
    but not through a read-only mount.
    """
    folder = tmp_path_factory.mktemp("read-only")
    mounted = (os.geteuid() == 0 and shutil.which("mount") is not None
               and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                  capture_output=True).returncode == 0)
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(autouse=True)
def same_torch_state():
    """Each test starts, and leaves, with the session's torch state, whatever an earlier test set.

    A command run in-process sets the threads by the machine's load (1 on a busy CPU, 2 or
    more on a quiet one) and flushes denormals in its own thread only; left behind, a
    fused-against-separate comparison (tests/test_fused.py) ran its separate runs on another
    thread count than its fused passes, and failed on a quiet machine only.
    """
    session_torch_state()
    yield
    session_torch_state()


@pytest.fixture
def restore_threads():
    """torch's thread count as it was before the test (tests set 1 or 2 to check what follows from it)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
