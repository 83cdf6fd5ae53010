"""`python -m study train` end to end on a tiny tree: the run folder, its files, and never overwriting."""

from __future__ import annotations

import csv
import json
import time

import pytest

from cnnlib.checkpoint import load_checkpoint

from conftest import run_cli

CLASSES = ("car", "truck", "cat")


def train_cli(tiny_inputs, results, *more):
    base, space, options = tiny_inputs
    return run_cli("train", "--space", space, "--results", results, "--device", "cpu", *options, *more)


@pytest.mark.slow
def test_train_writes_metrics_with_dev_test_and_train_blocks(tiny_run):
    run_dir, _ = tiny_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split, n in (("dev", 9), ("test", 12), ("train", 20)):
        block = metrics[split]
        assert 0 <= block["macro_accuracy"] <= 1
        assert set(block["per_class"]) == set(CLASSES)
        assert len(block["confusion_matrix"]) == 3 and sum(map(sum, block["confusion_matrix"])) == n
    assert metrics["classes"] == list(CLASSES)
    assert metrics["config"]["epochs"] == 2 and metrics["config"]["lr"] == 3e-3
    assert metrics["epochs_run"] == 2 and metrics["seconds_per_epoch"] > 0 and metrics["device"] == "cpu"
    assert metrics["majority_baseline"]["dev"]["per_class"] == {"car": 1.0, "truck": 0.0, "cat": 0.0}
    assert metrics["data"]["splits"]["train"] == {"car": 10, "truck": 6, "cat": 4}


@pytest.mark.slow
def test_train_writes_history_and_a_loadable_checkpoint_that_agrees_with_metrics(tiny_run):
    run_dir, _ = tiny_run
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "dev_loss", "dev_macro_accuracy", "dev_car", "dev_truck", "dev_cat", "seconds"} <= set(rows[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert float(rows[-1]["dev_macro_accuracy"]) == pytest.approx(metrics["dev"]["macro_accuracy"], abs=1e-6)
    model, config, classes, extra = load_checkpoint(run_dir / "model.pt")
    assert classes == CLASSES and config.epochs == 2 and extra["run"] == "first"
    assert sorted(p.name for p in run_dir.iterdir()) == ["history.csv", "metrics.json", "model.pt"]  # no .tmp left


@pytest.mark.slow
def test_train_prints_one_line_per_epoch_and_the_final_evaluations(tiny_run):
    _, out = tiny_run
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and epochs[0].startswith("epoch 1/2  train loss ")
    assert "dev macro" in epochs[0] and epochs[0].endswith("s")
    for title in ("dev:", "test:", "train:"):
        assert title in out.splitlines()
    assert "majority-class baseline (dev): macro accuracy 33.3%" in out


@pytest.mark.slow
def test_an_existing_run_name_is_never_overwritten_without_the_flag(tiny_inputs, tiny_run):
    run_dir, _ = tiny_run
    before = (run_dir / "metrics.json").read_bytes()
    code, _, err = train_cli(tiny_inputs, run_dir.parent.parent, "--name", "first")
    assert code == 2 and "run folder exists" in err and "--overwrite" in err
    assert (run_dir / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_overwrite_replaces_a_named_run(tiny_inputs, tmp_path):
    assert train_cli(tiny_inputs, tmp_path, "--name", "again", "--epochs", "1")[0] == 0
    code, _, err = train_cli(tiny_inputs, tmp_path, "--name", "again", "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "runs" / "again" / "metrics.json").read_text())["epochs_run"] == 2


@pytest.mark.slow
def test_default_names_are_the_space_and_a_timestamp_and_never_collide(tiny_inputs, tmp_path):
    for _ in range(2):
        assert train_cli(tiny_inputs, tmp_path, "--epochs", "1")[0] == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(names) == 2
    stamp = time.strftime("%Y%m%d")
    assert all(name.startswith(f"tiny-{stamp}-") for name in names)


def test_a_space_with_ranges_is_refused_before_training(tiny_inputs, tmp_path):
    space = tmp_path / "ranged.yaml"
    space.write_text("params:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    code, _, err = run_cli("train", "--space", str(space), "--results", str(tmp_path), *tiny_inputs[2])
    assert code == 2 and "ranged.yaml" in err and "lr" in err and "all fixed" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_failed_run_leaves_no_empty_folder(tiny_inputs, tmp_path):
    base, space, options = tiny_inputs
    code, _, err = run_cli("train", "--space", str(space), "--results", str(tmp_path), "--device", "cpu",
                           "--data", str(base / "missing"), "--name", "broken")
    assert code == 2 and "missing: data folder not found" in err
    assert not (tmp_path / "runs" / "broken").exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_run_names_must_be_plain_folder_names(tiny_inputs, tmp_path, name):
    code, _, err = train_cli(tiny_inputs, tmp_path, "--name", name)
    assert code == 2 and "--name" in err


@pytest.mark.slow
def test_train_with_several_seeds_reports_each_seed_and_keeps_the_median(tiny_inputs, tmp_path):
    code, out, _ = train_cli(tiny_inputs, tmp_path, "--name", "seeds", "--seeds", "3")
    assert code == 0 and "over 3 seeds" in out
    metrics = json.loads((tmp_path / "runs" / "seeds" / "metrics.json").read_text())
    rows = metrics["seeds"]["seeds"]
    first = rows[0]["seed"]
    assert [row["seed"] for row in rows] == [first, first + 1, first + 2] and metrics["config"]["seed"] in (
        first, first + 1, first + 2)
    devs = sorted(row["dev"]["macro_accuracy"] for row in rows)
    assert metrics["dev"]["macro_accuracy"] == pytest.approx(devs[1])  # the kept model is the median seed
    assert metrics["seeds"]["macro_accuracy"]["test"]["mean"] == pytest.approx(
        sum(row["test"]["macro_accuracy"] for row in rows) / 3)
    assert all(set(row["test"]["per_class"]) == set(CLASSES) and "train" not in row for row in rows)
    assert train_cli(tiny_inputs, tmp_path, "--name", "zero", "--seeds", "0")[0] == 2
