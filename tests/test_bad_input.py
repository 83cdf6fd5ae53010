"""Every bad input a user can hand the pipeline ends in one line, `error: <culprit>: <what was wrong>`, exit code 2.

The readers' own messages are specified in test_sources.py, test_space.py,
test_checkpoint.py and test_plots.py; here each mistake goes through the
command a user actually types (`python -m study <command>`), so a message that
a reader raises but a command lets escape as a traceback is caught too.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from cnnlib.checkpoint import FORMAT, save_checkpoint
from cnnlib.model import SeedCNN
from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.config import TrainConfig
from conftest import build_image_tree, class_image, run_cli, write_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("car", "truck", "cat")
# Counts that use every image of a 6-per-class tree, so every file is read.
TREE_COUNTS = ["--train-counts", "6,6,6", "--dev-counts", "3,3,3", "--test-counts", "3,3,3"]


pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


def assert_one_line_error(result, *culprits: str) -> str:
    """Exit code 2 and exactly one stderr line, `error: ...`, that names every culprit."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    return lines[0]


def tree(tmp_path: Path) -> Path:
    return build_image_tree(tmp_path / "data", {c: 6 for c in CLASSES}, {c: 6 for c in CLASSES})


def data_cli(tmp_path: Path, data: Path, *more):
    return run_cli("data", "--data", data, "--results", tmp_path / "results", *more)


# --- the image tree ---------------------------------------------------------------------

def corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:120])


def not_an_image(path: Path) -> None:
    path.write_text("these are notes someone saved with an image name\n")


def wrong_size(path: Path) -> None:
    write_image(path, np.zeros((40, 36, 3), np.uint8))


@pytest.mark.parametrize("damage, detail", [(corrupt, "cannot decode image"), (truncate, "cannot decode image"),
                                            (not_an_image, "cannot decode image"),
                                            (wrong_size, "image is 36x40, expected 32x32")],
                         ids=["corrupt", "truncated", "not-an-image", "wrong-size"])
def test_a_bad_file_in_the_image_tree_is_named(tmp_path, damage, detail):
    root = tree(tmp_path)
    bad = root / "test" / "truck" / "0004.png"
    damage(bad)

    message = assert_one_line_error(data_cli(tmp_path, root, *TREE_COUNTS), str(bad), detail)

    assert message.startswith(f"error: {bad}: ")
    assert not (tmp_path / "results" / "data").exists() or not list((tmp_path / "results" / "data").glob("split-*"))


def test_an_empty_class_folder_is_named(tmp_path):
    root = tree(tmp_path)
    for path in (root / "train" / "cat").iterdir():
        path.unlink()

    assert_one_line_error(data_cli(tmp_path, root, *TREE_COUNTS), f"{root / 'train' / 'cat'}: class folder holds no")


def test_a_class_folder_outside_the_configured_order_is_named(tmp_path):
    root = tree(tmp_path)
    write_image(root / "test" / "dog" / "0000.png", class_image("dog", 0))

    assert_one_line_error(data_cli(tmp_path, root, *TREE_COUNTS), "dog", "not in the configured class order (car,truck,cat)")


def test_a_configured_class_without_its_folder_is_named(tmp_path):
    root = tree(tmp_path)

    assert_one_line_error(data_cli(tmp_path, root, *TREE_COUNTS, "--classes", "car,truck,cat,ship",
                                   "--train-counts", "6,6,6,1", "--dev-counts", "3,3,3,1", "--test-counts", "3,3,3,1"),
                          f"{root / 'train' / 'ship'}: class folder missing")


def test_an_image_tree_read_by_the_real_python_m_study_prints_no_traceback(tmp_path):
    """The real entry point (`python -m study`, as `make data` runs it), not the in-process CLI."""
    root = tree(tmp_path)
    bad = root / "train" / "car" / "0001.png"
    truncate(bad)

    done = subprocess.run([sys.executable, "-m", "study", "data", "--data", str(root), "--results", str(tmp_path / "r"),
                           *TREE_COUNTS], capture_output=True, text=True, timeout=300, cwd=ROOT)

    assert_one_line_error((done.returncode, done.stdout, done.stderr), str(bad), "cannot decode image")


# --- .npz folders ----------------------------------------------------------------------------

def npz_folder(tmp_path: Path, train_labels=(0, 1, 2, 0, 1, 2), train_size: int = 32) -> Path:
    folder = tmp_path / "arrays"
    folder.mkdir(exist_ok=True)
    labels = np.asarray(train_labels)
    np.savez(folder / "train.npz", images=np.zeros((len(labels), train_size, train_size, 3), np.uint8), labels=labels)
    np.savez(folder / "dev.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2]))
    return folder


def test_an_npz_label_out_of_range_names_the_file_the_label_and_its_index(tmp_path):
    folder = npz_folder(tmp_path, train_labels=(0, 1, 2, 3, 1, 2))

    assert_one_line_error(data_cli(tmp_path, folder),
                          f"{folder / 'train.npz'}: label 3 at index 3 is out of range for 3 classes")


def test_npz_splits_of_different_image_sizes_are_named_before_training(tmp_path):
    """Otherwise training starts on 28x28 train images and crashes on the 32x32 dev set."""
    folder = npz_folder(tmp_path, train_size=28)

    assert_one_line_error(data_cli(tmp_path, folder), f"{folder / 'dev.npz'}: images are 32x32",
                          "train.npz has 28x28")


@pytest.mark.parametrize("content", [b"this is not an npz", np.zeros(3).tobytes()], ids=["text", "raw-bytes"])
def test_a_file_that_is_not_an_npz_is_named(tmp_path, content):
    folder = npz_folder(tmp_path)
    (folder / "train.npz").write_bytes(content)

    assert_one_line_error(data_cli(tmp_path, folder), f"{folder / 'train.npz'}: not a readable .npz")


def test_an_npy_array_renamed_to_npz_is_named(tmp_path):
    """np.load returns a bare array for it; the reader must not treat that as an archive."""
    folder = npz_folder(tmp_path)
    np.save(folder / "train.npy", np.zeros((6, 32, 32, 3), np.uint8))
    (folder / "train.npy").replace(folder / "train.npz")

    assert_one_line_error(data_cli(tmp_path, folder), f"{folder / 'train.npz'}: not a readable .npz")


# --- search-space files ----------------------------------------------------------------------

# 9 levels of 9 aliases in the description: ~500 bytes that a plain YAML loader turns into 9**9
# strings once the description is printed (the outside probe measured 118 s and 15.6 GB).
ALIAS_BOMB = ("description: [&a [x, x, x, x, x, x, x, x, x], "
              + ", ".join(f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8))
              + "]\nparams:\n  lr: 0.01\n")

BAD_SPACES = {
    "wrong type: text for an int": ("params:\n  epochs: {type: int, low: two, high: 4}\n",
                                    "params.epochs.low: expected an integer, got 'two'"),
    "wrong type: choices as text": ("params:\n  optimizer: {type: categorical, choices: sgd}\n",
                                    "params.optimizer.choices: expected a non-empty list"),
    "wrong type: params as a list": ("params:\n  - lr\n  - epochs\n", "params: missing or empty"),
    "wrong type: log as text": ("params:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: maybe}\n",
                                "params.lr.log: expected true or false"),
    "wrong type: budget as text": ("budget: {trials: many}\nparams:\n  lr: 0.01\n",
                                   "budget.trials: expected an integer"),
    "missing key: low": ("params:\n  lr: {type: float, high: 0.1}\n", "params.lr.low: a float range needs low and high"),
    "missing key: type": ("params:\n  lr: {low: 0.001, high: 0.1}\n", "params.lr.type: unknown type None"),
    "missing key: sampler name": ("sampler: {seed: 1}\nparams:\n  lr: 0.01\n", "sampler: expected {name: ..., <args>}"),
    "impossible: epochs 0": ("params:\n  epochs: {type: int, low: 0, high: 3}\n", "params.epochs: value 0 is not usable"),
    "impossible: momentum above 1": ("params:\n  momentum: {type: float, low: 0.5, high: 1.5}\n",
                                     "params.momentum: value 1.5 is not usable"),
    "impossible: step 0": ("params:\n  epochs: {type: int, low: 2, high: 4, step: 0}\n",
                           "params.epochs.step: must be > 0"),
    "impossible: infinite bound": ("params:\n  lr: {type: float, low: 1.0e-3, high: .inf, log: true}\n",
                                   "params.lr.high: expected a finite number"),
    "impossible: negative budget": ("budget: {trials: -3}\nparams:\n  lr: 0.01\n", "budget.trials: must be at least 1"),
    "not text": (b"\xff\xfe\x00\x01 binary", "not a UTF-8 text file"),
    # YAML that loads but means something other than what the file says
    "an alias": ("params:\n  lr: &rate 1.0e-3\n  weight_decay: *rate\n",
                 "line 3, column 17: alias *rate refused"),
    "an alias bomb": (ALIAS_BOMB, "line 1, column 51: alias *a refused"),
    "a duplicate key": ("params:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-1}\n  lr: 5\n",
                        "line 3, column 3: duplicate key 'lr' (first on line 2)"),
    "a duplicate top-level key": ("params:\n  lr: 0.01\nparams:\n  lr: 0.1\n",
                                  "line 3, column 1: duplicate key 'params' (first on line 1)"),
    "a boolean batch size": ("params:\n  batch_size: true\n", "params.batch_size: expected an integer, got True"),
    "a boolean epochs (yes)": ("params:\n  epochs: yes\n", "params.epochs: expected an integer, got True"),
    "a boolean among choices": ("params:\n  batch_size: {type: categorical, choices: [32, on]}\n",
                                "params.batch_size: expected an integer, got True"),
    "a boolean sampler seed": ("sampler: {name: TPESampler, seed: yes}\nparams:\n  lr: 0.01\n",
                               "sampler.seed: expected a number, got True"),
    "a boolean pruner warm-up": ("pruner: {name: MedianPruner, n_warmup_steps: on}\nparams:\n  lr: 0.01\n",
                                 "pruner.n_warmup_steps: expected a number, got True"),
    "a boolean robust epsilon": ("objective: [dev_macro_accuracy, robust_macro_accuracy]\nrobust: {epsilon: true}\n"
                                 "params:\n  lr: 0.01\n", "robust.epsilon"),
    "a fractional batch size": ("params:\n  batch_size: 32.5\n", "params.batch_size: expected an integer, got 32.5"),
    "infinite epochs": ("params:\n  epochs: .inf\n", "params.epochs: expected an integer, got inf"),
    "a not-a-number lr": ("params:\n  lr: .nan\n", "params.lr: expected a finite number, got nan"),
    "a private pruner function": ("pruner: {name: _filter_study}\nparams:\n  lr: 0.01\n",
                                  "pruner.name: '_filter_study' is not a public pruner class of optuna.pruners"),
    "a sampler module helper": ("sampler: {name: IntersectionSearchSpace}\nparams:\n  lr: 0.01\n",
                                "sampler.name: 'IntersectionSearchSpace' is not a public sampler class"),
    "a sampler that cannot propose": (
        "sampler: {name: PartialFixedSampler, fixed_params: {}, base_sampler: TPESampler}\n"
        "params:\n  lr: {type: float, low: 1.0e-3, high: 1.0e-1}\n",
        "sampler: cannot propose a trial"),
    "nesting too deep": ("params:\n  lr: " + "[" * 5000 + "]" * 5000 + "\n", "YAML nested too deeply"),
}


@pytest.mark.parametrize("content, detail", BAD_SPACES.values(), ids=BAD_SPACES.keys())
def test_a_bad_space_file_stops_search_before_data_or_storage_with_its_key(tmp_path, content, detail):
    space = tmp_path / "bad.yaml"
    space.write_bytes(content if isinstance(content, bytes) else content.encode())

    result = run_cli("search", "--space", space, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                     "--data", tmp_path / "no-data", "--results", tmp_path / "results", "--trials", "1")

    assert_one_line_error(result, f"error: {space}: {detail}")
    assert not (tmp_path / "optuna.db").exists()


def test_a_space_that_is_a_folder_is_named_as_a_folder(tmp_path):
    folder = tmp_path / "space.yaml"
    folder.mkdir()

    assert_one_line_error(run_cli("search", "--space", folder, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                                  "--data", tmp_path / "no-data", "--results", tmp_path / "results"),
                          f"error: {folder}: is a folder; expected a search-space YAML file")


# --- storages and studies --------------------------------------------------------------------

BAD_STORAGES = {
    "not a URL": ("nonsense", "storage URL 'nonsense' not understood"),
    "unknown scheme": ("redis://127.0.0.1:1", "not understood"),
    "driver not installed": ("mysql://me:secret@127.0.0.1:1/db", "needs a database driver that is not installed"),
    "server not there": ("postgresql+psycopg2://me:secret@127.0.0.1:1/db", "cannot open storage postgresql+psycopg2://me:***@"),
    "a file that is no database": ("sqlite:///{tmp}/notes.db", "file is not a database"),
    "a journal that is not there": ("journal:{tmp}/missing/journal.log", "no storage file at"),
}


@pytest.mark.parametrize("command", ["export", "final", "dashboard"])
@pytest.mark.parametrize("url, detail", BAD_STORAGES.values(), ids=BAD_STORAGES.keys())
def test_a_bad_storage_url_is_one_line_and_never_shows_the_password(tmp_path, command, url, detail):
    (tmp_path / "notes.db").write_text("not a database\n" * 200)
    url = url.format(tmp=tmp_path)
    more = {"export": ["--results", tmp_path], "final": ["--results", tmp_path, "--data", tmp_path],
            "dashboard": ["--port", "1"]}[command]

    message = assert_one_line_error(run_cli(command, "--storage", url, *more), detail)

    assert "secret" not in message
    assert not (tmp_path / "missing").exists()  # reading never creates a storage behind a typo


# --- CSVs for `make plots` ------------------------------------------------------------------

BAD_CSVS = {
    "text in the value column": ("number,state,value\n0,COMPLETE,0.61\n1,COMPLETE,abc\n",
                                 "row 3, column 'value': 'abc' is not a number"),
    "a row with extra fields": ("number,state,value\n0,COMPLETE,0.5,7,8\n1,COMPLETE,0.4\n",
                                "a row has more fields than the header"),
    "a trial number that is text": ("number,state,value\n0,COMPLETE,0.5\nx,COMPLETE,0.3\n",
                                    "row 3, column 'number': 'x' is not a number"),
    "an empty trial number": ("number,state,value\n,COMPLETE,0.5\n", "row 2, column 'number': empty"),
    "an unknown state": ("number,state,value\n0,DONE,0.5\n", "row 2, column 'state': 'DONE' is not a trial state"),
    "an empty file": ("", "not a readable CSV"),
}


@pytest.mark.parametrize("text, detail", BAD_CSVS.values(), ids=BAD_CSVS.keys())
def test_a_malformed_trials_csv_is_named_with_its_row_and_column(tmp_path, text, detail):
    csv = tmp_path / "trials.csv"
    csv.write_text(text)

    assert_one_line_error(run_cli("plots", "--csv", csv, "--no-png"), f"error: {csv}: ", detail)
    assert not (tmp_path / "plots").exists()


def test_a_malformed_epochs_csv_beside_a_good_trials_csv_is_named(tmp_path):
    (tmp_path / "trials.csv").write_text("number,state,value\n0,COMPLETE,0.5\n")
    (tmp_path / "epochs.csv").write_text(textwrap.dedent("""\
        trial,state,epoch,train_loss,dev_loss,dev_macro_accuracy
        0,COMPLETE,1,0.9,1.0,0.4
        0,COMPLETE,two,0.8,0.9,0.5
        """))

    assert_one_line_error(run_cli("plots", "--csv", tmp_path / "trials.csv", "--no-png"),
                          f"{tmp_path / 'epochs.csv'}: row 3, column 'epoch': 'two' is not a number")


# --- checkpoints ------------------------------------------------------------------------------

def write_foreign_checkpoint(path: Path, model: torch.nn.Module, classes=CLASSES, image_size: int = 32) -> Path:
    torch.save({"format": FORMAT, "state_dict": model.state_dict(), "config": TrainConfig().to_dict(),
                "classes": list(classes), "image_size": image_size, "extra": {}}, path)
    return path


@pytest.mark.parametrize("make", [
    lambda path: write_foreign_checkpoint(path, SeedCNN(n_classes=5)),
    lambda path: write_foreign_checkpoint(path, torch.nn.Sequential(torch.nn.Linear(3, 3))),
], ids=["five-class-weights", "another-network"])
def test_evaluate_refuses_a_checkpoint_of_another_model_shape_by_name(tmp_path, make):
    root = tree(tmp_path)
    checkpoint = make(tmp_path / "other.pt")

    assert_one_line_error(run_cli("evaluate", "--checkpoint", checkpoint, "--data", root, "--results", tmp_path,
                                  "--device", "cpu", *TREE_COUNTS),
                          f"{checkpoint}: weights do not fit the seed CNN for 3 classes")


def test_evaluate_refuses_a_model_trained_on_another_image_size(tmp_path):
    root = tree(tmp_path)
    checkpoint = save_checkpoint(tmp_path / "big.pt", SeedCNN(3, 0.1, image_size=64), TrainConfig(), CLASSES,
                                 image_size=64)

    assert_one_line_error(run_cli("evaluate", "--checkpoint", checkpoint, "--data", root, "--results", tmp_path,
                                  "--device", "cpu", *TREE_COUNTS),
                          f"{checkpoint}: model was trained on other image sizes; the dev images are 32x32")


# --- data that loaded but meant something else, or crashed later ---------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_a_decompression_bomb_png_is_named_not_decoded(tmp_path):
    """A 20000x20000 PNG header over a few bytes of data: Pillow refuses it with an exception of its own."""
    root = tree(tmp_path)
    bomb = root / "train" / "cat" / "0002.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + png_chunk(b"IEND", b""))

    assert_one_line_error(data_cli(tmp_path, root, *TREE_COUNTS), f"error: {bomb}: ", "decompression bomb")


@pytest.mark.parametrize("make_link", [lambda link: link.symlink_to(link.parent / "gone.png"),
                                       lambda link: link.symlink_to(link)], ids=["dangling", "loop"])
def test_a_broken_symbolic_link_in_a_class_folder_is_named(tmp_path, make_link):
    root = tree(tmp_path)
    link = root / "test" / "truck" / "0009.png"
    make_link(link)

    assert_one_line_error(data_cli(tmp_path, root, *TREE_COUNTS), f"error: {link}: symbolic link")


def test_an_npz_whose_images_are_too_small_for_the_cnn_is_named(tmp_path):
    folder = npz_folder(tmp_path, train_size=8)
    np.savez(folder / "dev.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.array([0, 1, 2]))

    assert_one_line_error(data_cli(tmp_path, folder), f"error: {folder / 'train.npz'}: images are 8x8",
                          "at least 16x16")


def test_an_npz_whose_header_claims_petabytes_is_named_before_anything_is_allocated(tmp_path):
    folder = npz_folder(tmp_path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10 ** 7, 10 ** 4, 10 ** 2, 3)})
    with zipfile.ZipFile(folder / "train.npz", "w") as archive:
        archive.writestr("images.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\x00" * 64)
        archive.writestr("labels.npy", npy_bytes(np.array([0, 1, 2])))

    assert_one_line_error(data_cli(tmp_path, folder), f"error: {folder / 'train.npz'}: array 'images' claims shape "
                                                      "(10000000, 10000, 100, 3)")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_npz_ids_that_repeat_are_refused_by_name(tmp_path):
    """A correction of a repeated id would change only one of the images that share it."""
    folder = npz_folder(tmp_path)
    np.savez(folder / "dev.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2]),
             ids=np.array(["a", "b", "a"]))

    assert_one_line_error(data_cli(tmp_path, folder), f"error: {folder / 'dev.npz'}: ids must be unique",
                          "'a' (2 images)")


@pytest.mark.parametrize("ids, shape", [(np.array([["a", "b"], ["c", "d"], ["e", "f"]]), "(3, 2)"),
                                        (np.array(["a", "b"]), "(2,)")], ids=["2-D", "too few"])
def test_npz_ids_of_the_wrong_shape_name_the_file(tmp_path, ids, shape):
    folder = npz_folder(tmp_path)
    np.savez(folder / "dev.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.array([0, 1, 2]), ids=ids)
    corrections = tmp_path / "corrections.csv"
    corrections.write_text("id,new_label\na,car\n")

    assert_one_line_error(data_cli(tmp_path, folder, "--corrections", corrections),
                          f"error: {folder / 'dev.npz'}: ids have shape {shape}, expected (3,)")


def test_asking_for_every_image_of_a_class_reads_plainly(tmp_path):
    root = tree(tmp_path)

    message = assert_one_line_error(data_cli(tmp_path, root, "--train-counts", "7,6,6", "--dev-counts", "3,3,3",
                                             "--test-counts", "3,3,3"), f"{root / 'train' / 'car'}: 6 images")

    assert message.endswith("6 images, but the split needs 7")


@pytest.mark.parametrize("counts, split, missing", [
    (["--train-counts", "6,6,0"], "train", "'cat'"),
    (["--dev-counts", "3,0,3"], "dev", "'truck'"),
    (["--dev-counts", "0,0,0"], "dev", "'car', 'truck', 'cat'"),
], ids=["no cat in train", "no truck in dev", "empty dev"])
def test_a_split_without_some_class_is_refused_naming_the_class_and_split(tmp_path, counts, split, missing):
    """Macro accuracy averages the classes a split has: a missing one would silently drop out of the number."""
    root = tree(tmp_path)
    options = dict(zip(TREE_COUNTS[::2], TREE_COUNTS[1::2]))
    options.update(dict(zip(counts[::2], counts[1::2])))

    assert_one_line_error(data_cli(tmp_path, root, *[x for pair in options.items() for x in pair]),
                          f"error: {root} (--{split}-counts ", f"the {split} split has no {missing} image")


def test_train_with_an_empty_train_split_is_one_line(tmp_path):
    root = tree(tmp_path)
    space = tmp_path / "fixed.yaml"
    space.write_text("params:\n  epochs: 1\n")

    assert_one_line_error(run_cli("train", "--space", space, "--data", root, "--results", tmp_path / "results",
                                  "--device", "cpu", "--train-counts", "0,0,0", "--dev-counts", "3,3,3",
                                  "--test-counts", "3,3,3"), "the train split has no 'car', 'truck', 'cat' image")


def test_corrections_that_drop_every_cat_from_dev_are_refused_naming_the_file(tmp_path):
    root = tree(tmp_path)
    plain = prepare_splits(DataConfig(root, train_counts=(6, 6, 6), dev_counts=(3, 3, 3), test_counts=(3, 3, 3)), None)
    cats = [i for i, label in zip(plain.dev.ids.tolist(), plain.dev.labels) if label == 2]
    corrections = tmp_path / "corrections.csv"
    corrections.write_text("id,new_label\n" + "".join(f"{i},drop\n" for i in cats))

    assert_one_line_error(data_cli(tmp_path, root, *TREE_COUNTS, "--corrections", corrections),
                          f"error: {corrections}: after these corrections the dev split has no 'cat' image")


def test_final_refuses_an_empty_test_split_before_training(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5,
                                              user_attrs={"config": TrainConfig(epochs=1).to_dict()}))
    root = tree(tmp_path)

    assert_one_line_error(run_cli("final", "--storage", url, "--data", root, "--results", tmp_path / "results",
                                  "--device", "cpu", "--seeds", "1", "--no-png", *TREE_COUNTS[:4],
                                  "--test-counts", "0,0,0"),
                          "the test split has no 'car', 'truck', 'cat' image")
    assert not (tmp_path / "results" / "final").exists()


def crafted_checkpoint(path: Path, **changes) -> Path:
    """A checkpoint of the right format whose entries were edited by hand (or by someone else)."""
    payload = {"format": FORMAT, "state_dict": SeedCNN().state_dict(), "config": TrainConfig().to_dict(),
               "classes": list(CLASSES), "image_size": 32, "extra": {}}
    for key, value in changes.items():
        if key == "config":
            payload["config"] = {**payload["config"], **value}
        else:
            payload[key] = value
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("changes, detail", [
    ({"image_size": 10 ** 6}, "weights do not fit the seed CNN for 3 classes (image_size 1000000"),
    ({"config": {"epochs": float("inf")}}, "checkpoint settings do not fit this code"),
    ({"classes": [1, 2, 3]}, "class names [1, 2, 3] are not two or more distinct names"),
    ({"classes": ["car", "car", "cat"]}, "class names ['car', 'car', 'cat'] are not two or more distinct names"),
], ids=["huge image size", "infinite epochs", "numbers as class names", "repeated class names"])
def test_evaluate_refuses_a_crafted_checkpoint_with_one_line(tmp_path, changes, detail):
    root = tree(tmp_path)
    checkpoint = crafted_checkpoint(tmp_path / "crafted.pt", **changes)

    assert_one_line_error(run_cli("evaluate", "--checkpoint", checkpoint, "--data", root, "--results", tmp_path,
                                  "--device", "cpu", *TREE_COUNTS), f"error: {checkpoint}: {detail}")
