"""Every command, handed a bad value the way `make` hands it one, stops before any work with one line.

The table runs the real entry point (`python -m study <command>`, the
Makefile's variables in the environment) and asserts, for each bad value:
exit code 2, one stderr line that names the option and the value, no
traceback, nothing written outside RESULTS, and every input (the study's
storage included) byte-identical afterwards. Nothing trains: each case is
refused before its data is read, or right after a tiny split is built.

test_bad_input.py covers bad files (images, space files, CSVs, checkpoints);
the behaviours behind the table rows that need more than one line to show
are specified below it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import sqlite3
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from cnnlib import device as device_module
from cnnlib.checkpoint import save_checkpoint
from cnnlib.ensemble import Ensemble
from cnnlib.model import SeedCNN
from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.config import TrainConfig
from conftest import build_image_tree, run_cli
from study import output
from study.search import storage as storage_module
from test_bad_input import assert_one_line_error
from test_search import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("car", "truck", "cat")
COUNTS = {"TRAIN_COUNTS": "6,6,6", "DEV_COUNTS": "3,3,3", "TEST_COUNTS": "3,3,3"}
TORN = b'{"op_code": 5, "sta'  # a journal record cut mid-write (kill -9, a full disk)

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


# --- the inputs every case gets a copy of -------------------------------------------------

def study_with_one_trial(url: str, name: str = "s", **attrs) -> optuna.Study:
    """A study as `make search` leaves it, without training: one finished trial that carries its config."""
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5,
                                              user_attrs={"config": TrainConfig(epochs=1).to_dict(),
                                                          "classes": list(CLASSES)}))
    return study


def damage(path: Path) -> None:
    """Garbage over the middle of a SQLite file: its pages no longer fit together."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(bytes(range(256)) * 32)


def other_application_database(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        connection.execute("INSERT INTO notes (text) VALUES ('not a study')")
    connection.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-values-inputs")
    build_image_tree(folder / "data", {c: 6 for c in CLASSES}, {c: 6 for c in CLASSES})
    study_with_one_trial(f"sqlite:///{folder / 'study.db'}")
    shutil.copy(folder / "study.db", folder / "damaged.db")
    damage(folder / "damaged.db")
    other_application_database(folder / "notes.db")
    (folder / "notes.txt").write_text("first line\nlast line without its newline")
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 16 + b"\x00\x01")
    (folder / "huge_epochs.yaml").write_text("params:\n  epochs: 100000000000\n")
    (folder / "huge_range.yaml").write_text("params:\n  epochs: {type: int, low: 2, high: 100000000000000}\n")
    (folder / "fixed.yaml").write_text("params:\n  epochs: 1\n")
    save_checkpoint(folder / "model.pt", SeedCNN(), TrainConfig(epochs=1), CLASSES)
    three = save_checkpoint(folder / "members-edited.pt", Ensemble([SeedCNN() for _ in range(3)]), TrainConfig(epochs=1),
                            CLASSES)
    payload = torch.load(three, weights_only=True)
    torch.save({**payload, "members": 4}, three)
    # Every car image of train but one is drawn at TRAIN_COUNTS=5,6,6; the file corrects them all.
    (folder / "undrawn.csv").write_text("id,new_label\n" + "".join(f"train/car/{i:04d}.png,car\n" for i in range(6)))
    two = optuna.create_study(study_name="robust", storage=f"sqlite:///{folder / 'two.db'}",
                              directions=["maximize", "maximize"])
    with warnings.catch_warnings():  # Optuna calls set_metric_names experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        two.set_metric_names(["dev_macro_accuracy", "robust_macro_accuracy"])
    return folder


# --- the table -----------------------------------------------------------------------------

# id: (command, extra arguments, environment, what the one line must name). In arguments and
# values, {inputs} is the case's copy of the inputs (with a named pipe, `pipe`, and where this user may
# make one, a character device, `device`), {results} its RESULTS folder and {readonly} an empty
# read-only file system.
DATA = {"DATA": "{inputs}/data", **COUNTS}
STORED = {"STORAGE": "sqlite:///{inputs}/study.db"}
MODEL = {"CHECKPOINT": "{inputs}/model.pt", **DATA}
CASES = {
    # search
    "search TRIALS text": ("search", [], {"TRIALS": "abc", **DATA}, ["TRIALS", "'abc'"]),
    "search FUSE huge": ("search", [], {"FUSE": "100000", **DATA}, ["FUSE", "'100000'", "<= 256"]),
    "search epochs 1e11": ("search", [], {"SPACE": "{inputs}/huge_epochs.yaml", **DATA},
                           ["params.epochs", "100000000000", "1 to 10000"]),
    "search epochs range to 1e14": ("search", [], {"SPACE": "{inputs}/huge_range.yaml", **DATA},
                                    ["params.epochs", "100000000000000", "1 to 10000"]),
    "search in-memory sqlite:///": ("search", [], {"STORAGE": "sqlite:///", "SPACE": "smoke", **DATA},
                                    ["STORAGE='sqlite:///'", "in-memory"]),
    "search in-memory sqlite://": ("search", [], {"STORAGE": "sqlite://", "SPACE": "smoke", **DATA},
                                   ["STORAGE='sqlite://'", "in-memory"]),
    "search a SQLite file as a journal": ("search", [], {"STORAGE": "journal:{inputs}/study.db", "SPACE": "smoke", **DATA},
                                          ["journal:{inputs}/study.db", "not an Optuna journal"]),
    "search a damaged SQLite file": ("search", [], {"STORAGE": "sqlite:///{inputs}/damaged.db", "SPACE": "smoke", **DATA},
                                     ["sqlite:///{inputs}/damaged.db", "is damaged"]),
    "search DEVICE mps": ("search", [], {"DEVICE": "mps", "SPACE": "smoke", **DATA}, ["DEVICE='mps'"]),
    "search RESULTS a file": ("search", [], {"RESULTS": "{inputs}/notes.txt", "SPACE": "smoke", **DATA},
                              ["RESULTS='{inputs}/notes.txt'", "is a file"]),
    "search RESULTS read-only": ("search", [], {"RESULTS": "{readonly}", "SPACE": "smoke", **DATA},
                                 ["RESULTS='{readonly}'", "read-only file system"]),
    # data
    "data no car in test": ("data", [], {**DATA, "TEST_COUNTS": "0,3,3"}, ["--test-counts 0,3,3", "'car'"]),
    "data empty test": ("data", [], {**DATA, "TEST_COUNTS": "0,0,0"}, ["--test-counts 0,0,0", "'car', 'truck', 'cat'"]),
    "data CLASSES with a class that has no folder": ("data", [], {**DATA, "CLASSES": "car,truck,dog"},
                                                     ["CLASSES", "class dog has no folder", "its folders: car, cat, truck"]),
    "data CORRECTIONS of an image the split did not draw": (
        "data", [], {**DATA, "TRAIN_COUNTS": "5,6,6", "CORRECTIONS": "{inputs}/undrawn.csv"},
        ["{inputs}/undrawn.csv", "is an image of {inputs}/data, but the split did not draw it"]),
    "data RESULTS through a file": ("data", [], {"RESULTS": "{inputs}/notes.txt/results", **DATA},
                                    ["RESULTS='{inputs}/notes.txt/results'", "file {inputs}/notes.txt"]),
    # train
    "train SEEDS huge": ("train", [], {"SEEDS": "100000", "SPACE": "{inputs}/fixed.yaml", **DATA}, ["SEEDS", "'100000'"]),
    "train SEEDS text": ("train", [], {"SEEDS": "abc", **DATA}, ["SEEDS", "'abc'"]),
    "train --name escaping": ("train", ["--name", "../escaped"], {"SPACE": "{inputs}/fixed.yaml", **DATA},
                              ["--name", "'../escaped'"]),
    "train --name absolute": ("train", ["--name", "{inputs}/run"], {"SPACE": "{inputs}/fixed.yaml", **DATA},
                              ["--name", "'{inputs}/run'"]),
    "train --epochs huge": ("train", ["--epochs", "100000000000"], {"SPACE": "{inputs}/fixed.yaml", **DATA},
                            ["--epochs", "'100000000000'"]),
    # evaluate
    "evaluate SPLIT valid": ("evaluate", [], {"SPLIT": "valid", "CHECKPOINT": "{inputs}/model.pt", **DATA},
                             ["SPLIT", "'valid'", "train, dev or test"]),
    "evaluate an empty test split": ("evaluate", [], {"SPLIT": "test", "CHECKPOINT": "{inputs}/model.pt", **DATA,
                                                      "TEST_COUNTS": "0,0,0"}, ["--test-counts 0,0,0"]),
    "evaluate test without cars": ("evaluate", [], {"SPLIT": "test", "CHECKPOINT": "{inputs}/model.pt", **DATA,
                                                    "TEST_COUNTS": "0,3,3"}, ["--test-counts 0,3,3", "'car'"]),
    "evaluate CLASSES not the checkpoint's": ("evaluate", [], {"CLASSES": "car,truck", "CHECKPOINT": "{inputs}/model.pt",
                                                               **DATA}, ["CLASSES='car,truck'", "car,truck,cat"]),
    "evaluate a text file as the checkpoint": ("evaluate", [], {"CHECKPOINT": "{inputs}/notes.txt", **DATA},
                                               ["{inputs}/notes.txt: not a loadable checkpoint",
                                                "not the zip archive torch.save writes (it begins b'first line"]),
    "evaluate an ensemble whose members were edited": ("evaluate", [], {"CHECKPOINT": "{inputs}/members-edited.pt",
                                                                        **DATA},
                                                       ["{inputs}/members-edited.pt", "'members' entry says 4",
                                                        "those of 3"]),
    "evaluate DEVICE xpu": ("evaluate", [], {"DEVICE": "xpu", "CHECKPOINT": "{inputs}/model.pt", **DATA}, ["DEVICE='xpu'"]),
    "evaluate RESULTS read-only": ("evaluate", [], {"RESULTS": "{readonly}", **MODEL},
                                   ["RESULTS='{readonly}'", "Read-only file system"]),
    "evaluate --json a folder": ("evaluate", ["--json", "{inputs}/data"], MODEL, ["--json", "'{inputs}/data'", "a folder"]),
    "evaluate EVAL_JSON a named pipe": ("evaluate", [], {"EVAL_JSON": "{inputs}/pipe", **MODEL},
                                        ["EVAL_JSON", "'{inputs}/pipe'", "named pipe"]),
    "evaluate --json a device": ("evaluate", ["--json", "{inputs}/device"], MODEL,
                                 ["--json", "'{inputs}/device'", "character device"]),
    "evaluate --json read-only": ("evaluate", ["--json", "{readonly}/eval.json"], MODEL,
                                  ["--json", "'{readonly}/eval.json'", "read-only file system"]),
    # export: reads the storage, never writes it
    "export a SQLite file as a journal": ("export", [], {"STORAGE": "journal:{inputs}/study.db"},
                                          ["journal:{inputs}/study.db", "not an Optuna journal"]),
    "export a text file as a journal": ("export", [], {"STORAGE": "journal:{inputs}/notes.txt"},
                                        ["journal:{inputs}/notes.txt", "not an Optuna journal"]),
    "export a binary file as a journal": ("export", [], {"STORAGE": "journal:{inputs}/blob.bin"},
                                          ["journal:{inputs}/blob.bin", "not an Optuna journal"]),
    "export a damaged SQLite file": ("export", [], {"STORAGE": "sqlite:///{inputs}/damaged.db"},
                                     ["sqlite:///{inputs}/damaged.db", "is damaged"]),
    "export another program's SQLite file": ("export", [], {"STORAGE": "sqlite:///{inputs}/notes.db"},
                                             ["sqlite:///{inputs}/notes.db", "no Optuna tables"]),
    "export in-memory": ("export", [], {"STORAGE": "sqlite://"}, ["STORAGE='sqlite://'"]),
    "export an unknown STUDY": ("export", [], {"STUDY": "nope", **STORED}, ["'nope'"]),
    "export RESULTS read-only": ("export", [], {"RESULTS": "{readonly}", **STORED},
                                 ["RESULTS='{readonly}'", "read-only file system"]),
    # plots
    "plots CSV missing": ("plots", ["--no-png"], {"CSV": "{inputs}/missing.csv"}, ["{inputs}/missing.csv"]),
    "plots --out a file": ("plots", ["--no-png", "--out", "{inputs}/notes.txt"], {}, ["--out", "'{inputs}/notes.txt'",
                                                                                      "is a file"]),
    "plots PLOTS_OUT a device": ("plots", ["--no-png"], {"PLOTS_OUT": "{inputs}/device"},
                                 ["PLOTS_OUT", "'{inputs}/device'", "character device"]),
    "plots --out a named pipe": ("plots", ["--no-png", "--out", "{inputs}/pipe"], {},
                                 ["--out", "'{inputs}/pipe'", "named pipe"]),
    "plots --out read-only": ("plots", ["--no-png", "--out", "{readonly}/plots"], {},
                              ["--out", "'{readonly}/plots'", "read-only file system"]),
    # final
    "final SEEDS huge": ("final", [], {"SEEDS": "100000", **STORED, **DATA}, ["SEEDS", "'100000'"]),
    "final TRIAL text": ("final", [], {"TRIAL": "best", **STORED, **DATA}, ["TRIAL", "'best'"]),
    "final ATTACK unknown": ("final", [], {"ATTACK": "xyz", **STORED, **DATA}, ["ATTACK", "'xyz'"]),
    "final DEVICE mps": ("final", [], {"DEVICE": "mps", **STORED, **DATA}, ["DEVICE='mps'"]),
    "final a SQLite file as a journal": ("final", [], {"STORAGE": "journal:{inputs}/study.db", **DATA},
                                         ["journal:{inputs}/study.db", "not an Optuna journal"]),
    "final an empty test split": ("final", ["--no-png"], {**STORED, **DATA, "TEST_COUNTS": "0,0,0", "DEVICE": "cpu"},
                                  ["--test-counts 0,0,0"]),
    "final RESULTS read-only": ("final", ["--no-png"], {"RESULTS": "{readonly}/results", **STORED, **DATA},
                                ["RESULTS='{readonly}/results'", "read-only file system"]),
    "final a two-objective study": ("final", [], {"STORAGE": "sqlite:///{inputs}/two.db", "STUDY": "robust", **DATA},
                                    ["study 'robust' has 2 objectives", "dev_macro_accuracy, robust_macro_accuracy"]),
    # dashboard
    "dashboard PORT 0": ("dashboard", [], {"PORT": "0", **STORED}, ["PORT", "'0'"]),
    "dashboard a SQLite file as a journal": ("dashboard", [], {"STORAGE": "journal:{inputs}/study.db"},
                                             ["journal:{inputs}/study.db", "not an Optuna journal"]),
    "dashboard a damaged SQLite file": ("dashboard", [], {"STORAGE": "sqlite:///{inputs}/damaged.db"}, ["is damaged"]),
    # audit
    "audit FLIP_COUNT negative": ("audit", [], {"FLIP_COUNT": "-5", **DATA}, ["FLIP_COUNT", "'-5'"]),
    "audit --top negative": ("audit", ["--top", "-1"], DATA, ["--top", "'-1'"]),
    "audit --flip-fraction 1.5": ("audit", ["--flip-fraction", "1.5"], DATA, ["--flip-fraction", "'1.5'"]),
    "audit --epochs huge": ("audit", ["--epochs", "100000000000"], DATA, ["--epochs", "'100000000000'"]),
    "audit --run escaping": ("audit", ["--run", "../../escaped"], DATA, ["--run", "'../../escaped'"]),
    "audit --run absolute": ("audit", ["--run", "{inputs}/audit-here"], DATA, ["--run", "'{inputs}/audit-here'"]),
    "audit AUDIT_METHOD unknown": ("audit", [], {"AUDIT_METHOD": "vote", **DATA}, ["AUDIT_METHOD", "'vote'"]),
    "audit SEED text": ("audit", [], {"SEED": "abc", **DATA}, ["SEED", "'abc'"]),
    # benches
    "bench THREADS 0": ("bench", [], {"THREADS": "0", **DATA}, ["THREADS", "'0'"]),
    "hpo-bench SEARCH_SEEDS huge": ("hpo-bench", [], {"SEARCH_SEEDS": "100000", **DATA}, ["SEARCH_SEEDS", "'100000'"]),
    "hpo-bench DATASETS with a class that has no folder": ("hpo-bench", [], {"DATASETS": "{inputs}/data:car,truck,dog",
                                                                              **COUNTS},
                                                           ["DATASETS", "'{inputs}/data:car,truck,dog'",
                                                            "class dog has no folder", "its folders: car, cat, truck"]),
}


def files_of(folder: Path, skip: Path) -> dict[str, str]:
    """Every file under `folder` but those under `skip`, with a digest of its bytes (of a pipe or a device:
    its kind and number, as reading one would block or read the device)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if skip in path.parents or path == skip or path.is_dir():
            continue
        info = path.lstat()
        found[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest()
                                                if stat.S_ISREG(info.st_mode) else f"{info.st_mode:o} {info.st_rdev}")
    return found


def make_special_files(folder: Path) -> None:
    """A named pipe and, where this user may make one, a character device in the case's own inputs (copytree
    copies neither, and no case may point at a system device). Major 1, minor 3 is what /dev/null is: a
    write that got through would vanish."""
    os.mkfifo(folder / "pipe")
    with contextlib.suppress(PermissionError):
        os.mknod(folder / "device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))


# Each case is its own process, as `python -m study` is: its own environment, working folder and
# stdout/stderr, its exit code the process's. They are forked from one interpreter that imported
# every command's modules once: a fresh `python -m study` spends 2-4 s importing torch, optuna
# and plotly, which for 50 cases on a 2-core CI machine was over 3 minutes of the budget.
CASE_SECONDS = 60
FORK_SERVER = r"""
import json, os, signal, sys, traceback
CASE_SECONDS = int(sys.argv[1])
from study import cli
for name in cli.COMMANDS:
    cli._load(name)
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.alarm(CASE_SECONDS)  # a case that starts training by mistake fails here instead of holding up CI
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["out"]), (2, request["err"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(handle, fd)
            os.close(handle)
        try:
            code = cli.main(request["argv"])
        except SystemExit as stop:
            code = stop.code
            if isinstance(code, str):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


def run_case(server: subprocess.Popen, base: Path, inputs: Path, read_only: Path | None, case_id: str) -> dict:
    command, arguments, environment, _ = CASES[case_id]
    parent = base / hashlib.sha256(case_id.encode()).hexdigest()[:10]
    shutil.copytree(inputs, parent / "inputs")
    make_special_files(parent / "inputs")
    results, streams = parent / "results", base / f"{parent.name}.streams"
    streams.mkdir()
    case_text = repr(CASES[case_id])
    if "{readonly}" in case_text and read_only is None:
        return {"skip": "this machine lets no test mount a read-only file system (root with CAP_SYS_ADMIN can)"}
    if "{inputs}/device" in case_text and not (parent / "inputs" / "device").exists():
        return {"skip": "this user may not make a device node (root can)"}

    def fill(text: str) -> str:
        return (text.replace("{inputs}", str(parent / "inputs")).replace("{results}", str(results))
                .replace("{readonly}", str(read_only)))

    env = subprocess_env(RESULTS=str(results), DEVICE="cpu")
    env.update({name: fill(value) for name, value in environment.items()})
    before = files_of(parent, results)
    request = {"argv": [command, *map(fill, arguments)], "env": env, "cwd": str(parent),
               "out": str(streams / "stdout"), "err": str(streams / "stderr")}
    server.stdin.write(json.dumps(request) + "\n")
    server.stdin.flush()
    code = int(server.stdout.readline())
    return {"code": code, "out": (streams / "stdout").read_text(), "err": (streams / "stderr").read_text(),
            "fill": fill, "before": before, "after": files_of(parent, results)}


@pytest.fixture(scope="module")
def outcomes(inputs, read_only_folder, tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("bad-values")
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(CASE_SECONDS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=subprocess_env(), cwd=base)
    try:
        assert server.stdout.readline().strip() == "ready"
        return {case_id: run_case(server, base, inputs, read_only_folder, case_id) for case_id in CASES}
    finally:
        server.stdin.close()
        server.wait(timeout=60)


@pytest.mark.parametrize("case_id", CASES)
def test_a_bad_value_stops_the_command_with_one_line_naming_it_and_writes_nothing_outside_results(outcomes, case_id):
    outcome = outcomes[case_id]
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    culprits = [outcome["fill"](text) for text in CASES[case_id][3]]

    assert_one_line_error((outcome["code"], outcome["out"], outcome["err"]), *culprits)
    assert outcome["after"] == outcome["before"]  # inputs, storage included, byte for byte; no file beside them


def test_a_class_order_from_datasets_is_blamed_on_datasets_not_on_classes(outcomes):
    assert "CLASSES" not in outcomes["hpo-bench DATASETS with a class that has no folder"]["err"]


def test_a_bad_value_read_by_the_real_python_m_study_is_one_line(inputs, tmp_path):
    """The table's processes are forked; this one is `python -m study` as `make evaluate` starts it."""
    env = subprocess_env(SPLIT="valid", CHECKPOINT=str(inputs / "model.pt"), RESULTS=str(tmp_path / "results"))
    done = subprocess.run([sys.executable, "-m", "study", "evaluate"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)

    assert_one_line_error((done.returncode, done.stdout, done.stderr), "SPLIT / --split 'valid'")
    assert not (tmp_path / "results").exists()


# --- the behaviours behind some rows -------------------------------------------------------------

def test_a_torn_journal_is_read_but_not_repaired_by_a_reading_command(tmp_path):
    journal = tmp_path / "journal.log"
    study_with_one_trial(storage_module.open_storage(f"journal:{journal}"))
    with open(journal, "ab") as handle:
        handle.write(TORN)
    before = journal.read_bytes()

    code, _, err = run_cli("export", "--storage", f"journal:{journal}", "--results", tmp_path / "results")

    assert code == 0, err
    assert journal.read_bytes() == before and not list(tmp_path.glob("journal.log.torn-*"))
    assert f"note: {journal} ends in a cut-off record ({len(TORN)} bytes" in err
    assert (tmp_path / "results" / "s" / "trials.csv").is_file()


def test_a_file_that_is_no_journal_is_never_cut_even_by_a_command_that_writes(tmp_path):
    database = tmp_path / "optuna.db"
    study_with_one_trial(f"sqlite:///{database}")
    before = database.read_bytes()

    with pytest.raises(Exception, match="not an Optuna journal file"):
        storage_module.open_storage(f"journal:{database}")

    assert database.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    connection.close()


def test_a_reading_command_adds_no_tables_to_another_programs_database(tmp_path):
    database = tmp_path / "notes.db"
    other_application_database(database)
    before = database.read_bytes()

    assert_one_line_error(run_cli("export", "--storage", f"sqlite:///{database}", "--results", tmp_path / "r"),
                          "holds no study yet", "no Optuna tables")

    assert database.read_bytes() == before


def test_a_damaged_storage_is_named_damaged_and_never_advised_to_be_run_again(inputs, tmp_path):
    database = tmp_path / "damaged.db"
    shutil.copy(inputs / "damaged.db", database)

    message = assert_one_line_error(run_cli("export", "--storage", f"sqlite:///{database}", "--results", tmp_path / "r"),
                                    f"storage sqlite:///{database} is damaged")

    assert "run the same command again" not in message


def test_continuing_a_search_on_another_split_is_refused_before_training(inputs, tmp_path):
    """Its trials would be ranked beside trials scored on another dev set; make final refuses such a study too."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = DataConfig(inputs / "data", train_counts=(6, 6, 6), dev_counts=(3, 3, 3), test_counts=(3, 3, 3))
    study_with_one_trial(url, "smoke", classes=list(CLASSES), **prepare_splits(config, None).record())

    message = assert_one_line_error(run_cli("search", "--space", "smoke", "--storage", url, "--data", inputs / "data",
                                            "--results", tmp_path / "results", "--device", "cpu", "--trials", "1",
                                            "--train-counts", "6,6,6", "--dev-counts", "3,2,3", "--test-counts", "3,3,3"),
                                    "study 'smoke' was searched on split", "dev 3/2/3", "new STUDY name")

    assert "note:" not in message
    assert len(optuna.load_study(study_name="smoke", storage=url).get_trials()) == 1


def test_unpickling_a_trusted_pickle_says_so(tmp_path, capsys):
    folder = tmp_path / "pickles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("dev", 3)):
        pairs = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), i % 3) for i in range(n)]
        (folder / f"{name}.pickle").write_bytes(pickle.dumps(pairs))

    code, _, err = run_cli("data", "--data", folder, "--results", tmp_path / "results", "--trust-pickle")

    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: unpickling")]
    assert len(notes) == 2 and str(folder / "train.pickle") in notes[0] and "TRUST_PICKLE" in notes[0]


def test_threads_above_the_core_count_are_capped_with_a_note(monkeypatch, capsys):
    from study.threads import choose_cpu_threads  # noqa: PLC0415

    monkeypatch.setenv("THREADS", "1000")
    threads, why = choose_cpu_threads("cpu")

    assert threads == (os.cpu_count() or 1)
    assert capsys.readouterr().err.strip() == f"note: {why}" and "THREADS=1000 capped" in why


def test_without_chrome_the_figures_are_said_to_be_html_in_one_line(tmp_path, monkeypatch):
    """kaleido's own text names a Python call and its CLI, and reached report.md and the console as it was."""
    import kaleido  # noqa: PLC0415
    import plotly.graph_objects as go  # noqa: PLC0415
    from choreographer.errors import ChromeNotFoundError  # noqa: PLC0415

    def no_chrome(*args, **kwargs):
        raise ChromeNotFoundError("Kaleido v1 and later requires Chrome to be installed. To install Chrome, use the "
                                  "CLI command `kaleido_get_chrome`, or from Python, use `kaleido.get_chrome_sync()`.")

    monkeypatch.setattr(kaleido, "write_fig_from_object_sync", no_chrome)

    why = output.write_pngs({tmp_path / "figure.png": go.Figure()})

    assert why == output.NO_CHROME and "\n" not in why
    assert "HTML" in why and "apt-get install chromium" in why and "kaleido_get_chrome" not in why
    assert not (tmp_path / "figure.png").exists()


@pytest.mark.parametrize("kind", ["mps", "xpu"])
def test_a_device_this_machine_lacks_is_refused_by_name(kind, monkeypatch):
    monkeypatch.setattr(device_module.torch.backends, "mps", None, raising=False)
    monkeypatch.setattr(device_module.torch, "xpu", None, raising=False)

    with pytest.raises(device_module.DeviceError, match=f"DEVICE='{kind}': this machine has no {kind} device"):
        device_module.resolve_device(kind)
