"""Any three (or more) classes, not only car/truck/cat: from folder names, from CLASSES, through make.

The trees here use airplane/bird/ship folders; their pixels carry no class
signal (the content does not matter, the names do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from cnnlib.sources import DEFAULT_CLASSES, infer_classes
from conftest import build_image_tree, run_cli

ROOT = Path(__file__).resolve().parents[1]
OTHER = ("airplane", "ship", "bird")  # as a user lists them; sorted they are airplane, bird, ship
COUNTS = ["--train-counts", "10,6,4", "--dev-counts", "3,3,2", "--test-counts", "3,3,3"]

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


@pytest.fixture
def other_tree(tmp_path) -> Path:
    return build_image_tree(tmp_path / "other", {c: 12 for c in OTHER}, {c: 8 for c in OTHER})


def test_classes_are_the_folder_names_in_sorted_order_and_the_output_says_so(other_tree, tmp_path):
    code, out, err = run_cli("data", "--data", other_tree, "--results", tmp_path / "r", *COUNTS)
    assert code == 0, err
    assert "classes: 0 airplane, 1 bird, 2 ship (from the folder names" in out
    summary = json.loads((tmp_path / "r" / "data" / "summary.json").read_text())
    assert summary["classes"] == ["airplane", "bird", "ship"]
    assert summary["splits"]["train"] == {"airplane": 10, "bird": 6, "ship": 4}


def test_the_users_own_tree_keeps_the_reports_class_order(image_tree):
    assert infer_classes(image_tree()) == DEFAULT_CLASSES == ("car", "truck", "cat")


def test_the_classes_variable_sets_the_order(other_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSES", "ship,bird,airplane")
    monkeypatch.setenv("TRAIN_COUNTS", "10,6,4")
    code, out, err = run_cli("data", "--data", other_tree, "--results", tmp_path / "r",
                             "--dev-counts", "3,3,2", "--test-counts", "3,3,3")
    assert code == 0, err
    assert "classes: 0 ship, 1 bird, 2 airplane (from CLASSES)" in out
    summary = json.loads((tmp_path / "r" / "data" / "summary.json").read_text())
    assert summary["splits"]["train"] == {"ship": 10, "bird": 6, "airplane": 4}


def test_four_classes_asked_at_the_users_counts_is_one_line_naming_the_count_variables(tmp_path):
    four = ("airplane", "bird", "ship", "frog")
    tree = build_image_tree(tmp_path / "four", {c: 4 for c in four}, {c: 4 for c in four})
    code, _, err = run_cli("data", "--data", tree, "--results", tmp_path / "r", "--counts", "user")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "TRAIN_COUNTS" in err and "4 classes (airplane,bird,frog,ship)" in err


def test_make_hands_classes_and_split_counts_to_the_command(tmp_path):
    """The Makefile exports CLASSES, TRAIN_COUNTS, DEV_COUNTS, TEST_COUNTS and SPLIT_SEED like every variable."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nenv\n")  # stands in for `python -m study data`: prints what it was given
    fake.chmod(0o755)
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", f"PY={fake}",
                           "data", "CLASSES=ship,bird,airplane", "TRAIN_COUNTS=10,6,4", "DEV_COUNTS=3,3,2",
                           "TEST_COUNTS=3,3,3", "SPLIT_SEED=7"],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")})
    assert done.returncode == 0, done.stderr
    given = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert given["CLASSES"] == "ship,bird,airplane" and given["TRAIN_COUNTS"] == "10,6,4"
    assert given["DEV_COUNTS"] == "3,3,2" and given["TEST_COUNTS"] == "3,3,3" and given["SPLIT_SEED"] == "7"


def test_search_states_the_classes_and_records_them_on_the_study(other_tree, tmp_path):
    results = tmp_path / "r"
    code, out, err = run_cli("search", "--space", "smoke", "--trials", "1", "--data", other_tree,
                             "--results", results, "--device", "cpu", *COUNTS)
    assert code == 0, err
    assert "classes: 0 airplane, 1 bird, 2 ship" in out
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{results / 'optuna.db'}")
    assert study.user_attrs["classes"] == ["airplane", "bird", "ship"]
    assert study.user_attrs["data_summary"]["splits"]["dev"] == {"airplane": 3, "bird": 3, "ship": 2}


def test_search_refuses_to_mix_class_orders_in_one_study(other_tree, tmp_path):
    results = tmp_path / "r"
    first = run_cli("search", "--space", "smoke", "--trials", "1", "--data", other_tree, "--results", results,
                    "--device", "cpu", *COUNTS)
    assert first[0] == 0, first[2]
    code, _, err = run_cli("search", "--space", "smoke", "--trials", "1", "--data", other_tree, "--results", results,
                           "--device", "cpu", "--classes", "ship,bird,airplane", *COUNTS)
    assert code == 2 and "airplane,bird,ship" in err and "ship,bird,airplane" in err, err


def test_the_confusion_matrix_keeps_long_class_names_apart():
    import numpy as np
    from cnnlib.metrics import Evaluation

    text = Evaluation(("ship", "bird", "airplane"), np.eye(3, dtype=int)).format()
    header = text.splitlines()[-4]
    assert header.split() == ["ship", "bird", "airplane"], header  # not run together: "    ship    birdairplane"
