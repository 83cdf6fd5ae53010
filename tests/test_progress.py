"""A long run is never silent: per-epoch progress inside trials, seeds and folds, and the time budget left.

On a terminal, progress is one bar redrawn in place; in a log, a line every
few epochs; never both. It goes to stderr, so stdout keeps results and hints.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import optuna
import pytest

from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData
from conftest import build_image_tree, run_cli
from study.audit import command as audit
from study.final import retrain as final_retrain
from study.search import trial_lines
from study.progress import Progress

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_bar_redrawn_in_place_and_erased_at_the_end():
    out = Terminal()
    progress = Progress(stream=out)
    for epoch in range(1, 6):
        progress.epoch("trial 3", epoch, 5, 0.5)
    text = out.getvalue()
    assert "\n" not in text, "a bar never scrolls the terminal"
    assert text.count("\r") >= 5 and "trial 3 [" in text and "epoch 5/5, dev macro 0.500" in text
    assert text.endswith("\r\x1b[K"), "a finished bar is erased"


def test_a_bar_cut_short_by_pruning_is_erased_before_the_next_line():
    out = Terminal()
    progress = Progress(stream=out)
    progress.epoch("trial 4", 2, 10, 0.4)
    progress.clear()
    assert out.getvalue().endswith("\r\x1b[K")
    progress.clear()  # nothing drawn: nothing written
    assert out.getvalue().count("\x1b[K") == 2


def test_a_log_gets_about_ten_lines_per_run_and_no_bar():
    out = io.StringIO()
    progress = Progress(stream=out)
    for epoch in range(1, 101):
        progress.epoch("seed 0", epoch, 100, 0.5)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 10 <= len(lines) <= 11, lines
    assert lines[0].startswith("seed 0: epoch 1/100, dev macro 0.500")
    assert lines[-1].startswith("seed 0: epoch 100/100") and "s/epoch" in lines[-1]


def test_a_short_run_in_a_log_gets_a_line_per_epoch():
    out = io.StringIO()
    progress = Progress(stream=out, prefix="[w1] ")
    for epoch in range(1, 4):
        progress.epoch("trial 0", epoch, 3, 0.25)
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == \
        ["[w1] trial 0: epoch 1/3", "[w1] trial 0: epoch 2/3", "[w1] trial 0: epoch 3/3"]


# --- the run's progress line: the time budget ---------------------------------------

def test_the_run_line_shows_the_time_budget_left():
    assert trial_lines.budget_text(1000.0, 1000.0 + 780, now=1000.0 + 270) == \
        "4.5 min elapsed, 8.5 min of 13.0 left"
    assert trial_lines.budget_text(1000.0, 1000.0 + 780, now=1000.0 + 800).endswith("time budget used up")
    assert trial_lines.budget_text(1000.0, float("inf"), now=1000.0 + 60) == "1.0 min elapsed"


def test_a_trial_line_without_trials_shows_the_time_left():
    trial = optuna.trial.create_trial(params={"lr": 0.01}, distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)},
                                      value=0.5)
    import time
    started = time.time() - 270
    line = trial_lines.format_trial_line(trial, 1, None, started, "", deadline=started + 780)
    assert "1 finished this run, 4.5 min elapsed, 8.5 min of 13.0 left" in line


# --- inside trials, seeds and folds ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = build_image_tree(tmp_path_factory.mktemp("progress") / "tree", {c: 10 for c in ("car", "truck", "cat")},
                            {c: 6 for c in ("car", "truck", "cat")})
    splits = prepare_splits(DataConfig(root, train_counts=(10, 6, 4), dev_counts=(3, 3, 3), test_counts=(3, 3, 3)), None)
    return root, splits


def test_search_reports_epochs_inside_each_trial(tiny_data, tmp_path):
    root, _ = tiny_data
    code, out, err = run_cli("search", "--space", "smoke", "--trials", "2", "--data", root, "--results", tmp_path,
                             "--device", "cpu", "--train-counts", "10,6,4", "--dev-counts", "3,3,3",
                             "--test-counts", "3,3,3")
    assert code == 0, err
    assert "trial 0: epoch 1/" in err and "trial 1: epoch 1/" in err
    assert "epoch 1/" not in out, "progress stays on stderr"


def test_final_reports_epochs_while_each_seed_trains(tiny_data, tmp_path, capsys):
    _, splits = tiny_data
    config = TrainConfig(epochs=2, batch_size=8)
    final_retrain.retrain_seeds([final_retrain.Retrain("", config, tmp_path / ".partial", {"test": 1})], DeviceData(splits, "cpu"), 2)
    err = capsys.readouterr().err
    assert "seed 0: epoch 1/2" in err and "seed 1: epoch 2/2" in err


def test_audit_reports_epochs_while_each_fold_trains(tiny_data, capsys):
    _, splits = tiny_data
    config = TrainConfig.from_dict({**audit.RECIPES["seed_cnn"], "epochs": 2})
    fold_of = audit.stratified_folds(splits.train.labels, 2, 0)
    audit.out_of_fold_probabilities(splits.train, splits.classes, fold_of, config, "cpu")
    err = capsys.readouterr().err
    assert "fold 1/2: epoch 1/2" in err and "fold 2/2: epoch 2/2" in err


def test_audit_reports_epochs_and_in_sample_agreement_while_its_model_trains(tiny_data, capsys):
    _, splits = tiny_data
    config = TrainConfig.from_dict({**audit.RECIPES["seed_cnn"], "epochs": 2})
    audit.training_dynamics_probabilities(splits.train, splits.classes, config, device="cpu")
    err = capsys.readouterr().err
    assert "model: epoch 1/2, in-sample macro" in err and "model: epoch 2/2, in-sample macro" in err
