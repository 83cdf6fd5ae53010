"""Every next step a run prints is a command that works as printed, with every setting the run used.

The hints are printed the way the run was started: `make <target> VAR=...`
under make, `cnn-hpo <target> --flag ...` (or `python -m study ...`)
otherwise. The end-to-end tests follow them as a user would, on a tree of
three other classes (airplane, ship, bird) in a storage outside RESULTS.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import STUDY_ENV, build_image_tree, run_cli
from study import cli
from study.search import hints

ROOT = Path(__file__).resolve().parents[1]
OTHER = ("airplane", "ship", "bird")
COUNTS = {"TRAIN_COUNTS": "12,8,6", "DEV_COUNTS": "4,4,3", "TEST_COUNTS": "4,4,4"}
# Two epochs: every trial completes (no pruner, and a collapse needs three epochs), so `final` has one to retrain.
TWO_EPOCHS = """\
description: two quick epochs, for following the printed steps
sampler: {name: TPESampler, seed: 0}
params:
  optimizer: adam
  lr: {type: float, low: 2.0e-3, high: 5.0e-3, log: true}
  batch_size: 8
  epochs: 2
  imbalance: weighted_loss
"""


def other_tree(root: Path, train: int, test: int) -> Path:
    """An image tree of airplane/ship/bird folders (the test images of car/truck/cat, renamed: learnable)."""
    build_image_tree(root, {c: train for c in ("car", "truck", "cat")}, {c: test for c in ("car", "truck", "cat")})
    for split in ("train", "test"):
        for old, new in zip(("car", "truck", "cat"), OTHER):
            (root / split / old).rename(root / split / new)
    return root

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


# --- how one command is written ------------------------------------------------------

def test_a_make_hint_carries_each_setting_that_is_not_the_default():
    settings = {"STUDY": "s", "STORAGE": "sqlite:////r/optuna.db", "RESULTS": "/r", "DATA": "/d", "CLASSES": "a,b,c",
                "TRAIN_COUNTS": (1, 2, 3), "DEV_COUNTS": None, "SPLIT_SEED": 0, "TRUST_PICKLE": False, "DEVICE": "auto"}
    assert hints.command("final", settings, via_make=True) == \
        "make final STUDY=s RESULTS=/r DATA=/d CLASSES=a,b,c TRAIN_COUNTS=1,2,3"


def test_a_storage_elsewhere_is_carried_and_one_inside_results_is_not():
    inside = {"STORAGE": "sqlite:///results/optuna.db", "RESULTS": "results"}
    elsewhere = {"STORAGE": "sqlite:////db/x.db", "RESULTS": "results"}
    assert hints.command("dashboard", inside, via_make=True) == "make dashboard"
    assert hints.command("dashboard", elsewhere, via_make=True) == "make dashboard STORAGE=sqlite:////db/x.db"


def test_a_command_line_hint_uses_the_program_the_user_started(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/cnn-hpo", "search"])
    settings = {"STUDY": "my study", "TRUST_PICKLE": True, "DEV_COUNTS": (3, 2, 1)}
    assert hints.command("export", settings, via_make=False) == \
        "cnn-hpo export --study 'my study' --trust-pickle --dev-counts 3,2,1"


def test_values_with_spaces_stay_one_word_for_make():
    assert shlex.split(hints.command("final", {"DATA": "/my tree"}, via_make=True)) == ["make", "final", "DATA=/my tree"]


def test_a_storage_password_is_never_printed():
    settings = {"STORAGE": "postgresql+psycopg2://ann:s3cret@db.example/hpo"}
    line = hints.command("export", settings, via_make=True)
    assert "s3cret" not in line and "STORAGE=postgresql+psycopg2://ann@db.example/hpo" in line
    assert hints.has_password(settings)


# --- following them ----------------------------------------------------------------------

def hint_lines(out: str) -> dict[str, str]:
    """'continue this study:  make search ...' -> {'continue this study': 'make search ...'}."""
    found = {}
    for line in out.splitlines():
        match = re.match(r"^(continue this study|browse it|export CSVs|retrain the best|plot it|evaluate it):\s+(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def follow(hint: str, monkeypatch, *extra: str, **extra_env: str):
    """Run a printed command in this process as the shell would: make's VAR=value words become the
    environment (as the Makefile exports them), a cnn-hpo/python -m study line becomes argv."""
    words = shlex.split(hint)
    for name in STUDY_ENV:
        monkeypatch.delenv(name, raising=False)
    if words[0] == "make":
        target, assignments = words[1], words[2:]
        for word in assignments:
            name, value = word.split("=", 1)
            monkeypatch.setenv(name, value)
        argv = [target]
    else:
        argv = words[3:] if words[:3] == ["python", "-m", "study"] else words[1:]
    for name, value in extra_env.items():
        monkeypatch.setenv(name, value)
    return run_cli(*argv, *extra)


@pytest.fixture
def tree(tmp_path) -> Path:
    return other_tree(tmp_path / "my tree", 14, 10)


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "two-epochs.yaml"
    path.write_text(TWO_EPOCHS)
    return path


@pytest.mark.parametrize("via_make", [True, False], ids=["make", "command-line"])
def test_every_printed_step_after_a_search_works_as_printed(via_make, tree, space, tmp_path, monkeypatch):
    results, storage = tmp_path / "results", f"sqlite:///{tmp_path / 'db' / 'hpo.db'}"
    if via_make:
        monkeypatch.setenv("MAKELEVEL", "1")
    else:  # `make test` itself runs under make: the command-line case must not inherit it
        for name in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS"):
            monkeypatch.delenv(name, raising=False)
    code, out, err = run_cli("search", "--space", space, "--study", "birds", "--storage", storage,
                             "--results", results, "--data", tree, "--classes", "ship,bird,airplane",
                             "--trials", "2", "--device", "cpu", *[f"--{k.lower().replace('_', '-')}={v}" for k, v in COUNTS.items()])
    assert code == 0, err
    steps = hint_lines(out)
    assert set(steps) == {"continue this study", "browse it", "export CSVs", "retrain the best"}, out
    for step in steps.values():
        assert step.startswith("make " if via_make else "python -m study ")
        assert "hpo.db" in step, f"{step!r} would open another storage"
    for step in ("continue this study", "retrain the best"):
        for value in ("ship,bird,airplane", "12,8,6", "4,4,3", str(tree), str(results)):
            assert value in steps[step], (step, value)

    code, out, err = follow(steps["continue this study"], monkeypatch)
    assert code == 0, err
    assert "study 'birds': 4 finished trials (2 added by this run)" in out

    code, out, err = follow(steps["export CSVs"], monkeypatch)
    assert code == 0, err
    assert (results / "birds" / "trials.csv").is_file()
    code, out, err = follow(hint_lines(out)["plot it"], monkeypatch, "--no-png")
    assert code == 0, err
    assert (results / "birds" / "plots" / "index.html").is_file()

    code, out, err = follow(steps["retrain the best"], monkeypatch, "--no-png", SEEDS="1", EPSILONS="0,0.1")
    assert code == 0, err
    assert "classes: 0 ship, 1 bird, 2 airplane" in out
    assert (results / "final" / "birds" / "report.md").is_file()
    code, out, err = follow(hint_lines(out)["evaluate it"], monkeypatch)
    assert code == 0, err
    assert "test:" in out and "ship" in out


def test_final_uses_the_class_order_recorded_on_the_study(tree, space, tmp_path):
    """Without CLASSES, `make final` reads the search's order from the study, not from the folders."""
    results = tmp_path / "results"
    counts = [f"--{k.lower().replace('_', '-')}={v}" for k, v in COUNTS.items()]
    code, _, err = run_cli("search", "--space", space, "--trials", "1", "--results", results, "--data", tree,
                           "--classes", "ship,bird,airplane", "--device", "cpu", *counts)
    assert code == 0, err
    code, out, err = run_cli("final", "--results", results, "--data", tree, "--seeds", "1", "--epsilons", "0",
                             "--no-png", "--device", "cpu", *counts)
    assert code == 0, err
    assert "classes: 0 ship, 1 bird, 2 airplane (as recorded on the study)" in out


# --- make, for real ------------------------------------------------------------------------

def make(*words: str, cwd: Path) -> subprocess.CompletedProcess:
    """`make <words>` in the checkout, as a user types it (without the one-time .venv setup)."""
    env = {k: v for k, v in os.environ.items() if k not in STUDY_ENV + ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed",
                           f"PY={sys.executable}", *words], capture_output=True, text=True, timeout=900, env=env, cwd=cwd)


@pytest.mark.slow
def test_make_search_on_three_other_classes_then_the_steps_it_printed(tmp_path):
    tree = other_tree(tmp_path / "cifar-other", 30, 20)
    space = tmp_path / "two-epochs.yaml"
    space.write_text(TWO_EPOCHS)
    results = tmp_path / "results"
    searched = make("search", f"DATA={tree}", "CLASSES=airplane,ship,bird", "TRAIN_COUNTS=30,20,10",
                    "DEV_COUNTS=10,6,4", "TEST_COUNTS=8,8,8", f"SPACE={space}", "TRIALS=2", f"RESULTS={results}",
                    "DEVICE=cpu", cwd=tmp_path)
    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]
    assert "classes: 0 airplane, 1 ship, 2 bird (from CLASSES)" in searched.stdout
    assert "epoch 1/" in searched.stderr
    steps = hint_lines(searched.stdout)
    for step in ("export CSVs", "retrain the best"):
        words = shlex.split(steps[step])[1:]  # after "make"
        done = make(*words, *(["SEEDS=1", "EPSILONS=0,0.05"] if step == "retrain the best" else []), cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if step == "export CSVs":
            plotted = make(*shlex.split(hint_lines(done.stdout)["plot it"])[1:], cwd=tmp_path)
            assert plotted.returncode == 0, plotted.stdout[-3000:] + plotted.stderr[-3000:]
    assert (results / "two-epochs" / "plots" / "index.html").is_file()
    assert (results / "final" / "two-epochs" / "report.md").is_file()
    assert optuna.load_study(study_name="two-epochs", storage=f"sqlite:///{results / 'optuna.db'}").user_attrs["classes"] \
        == ["airplane", "ship", "bird"]
