"""What a study records for the dashboard and later stages: metric names, notes that say what happened to a
trial, and trial reports under RESULTS/artifacts wherever the database lives."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from optuna_dashboard import get_note

from conftest import build_image_tree, run_cli
from study.search.artifacts import attach_trial_artifacts, note_outcome, pruning_explanation

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("car", "truck", "cat")
COUNTS = ["--train-counts", "20,10,8", "--dev-counts", "6,4,4", "--test-counts", "4,4,4"]

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 3-trial smoke search whose SQLite file lives outside RESULTS, then its export."""
    base = tmp_path_factory.mktemp("records")
    tree = build_image_tree(base / "tree", {c: 24 for c in CLASSES}, {c: 12 for c in CLASSES})
    results, db = base / "results", base / "db" / "hpo.db"
    with pytest.MonkeyPatch.context() as patch:
        from conftest import STUDY_ENV
        for name in STUDY_ENV:
            patch.delenv(name, raising=False)
        code, out, err = run_cli("search", "--space", ROOT / "search_spaces" / "smoke.yaml", "--trials", "3", "--data", tree, "--results", results,
                                 "--storage", f"sqlite:///{db}", "--device", "cpu", *COUNTS)
        assert code == 0, err
        code, _, err = run_cli("export", "--storage", f"sqlite:///{db}", "--results", results)
        assert code == 0, err
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    return SimpleNamespace(study=study, results=results, db=db)


def test_the_study_names_its_metric_so_the_dashboard_axis_does_too(searched):
    assert searched.study.metric_names == ["dev_macro_accuracy"]


def test_the_export_keeps_its_value_column_for_a_named_metric(searched):
    trials = pd.read_csv(searched.results / "smoke" / "trials.csv")
    assert "value" in trials.columns and "value_dev_macro_accuracy" not in trials.columns


def test_trial_reports_go_under_results_artifacts_not_beside_the_database(searched):
    reports = sorted(p.name for p in (searched.results / "artifacts").rglob("*") if p.is_file())
    assert len(reports) == 2 * sum(t.state != TrialState.FAIL for t in searched.study.trials)
    assert not (searched.db.parent / "artifacts").exists()


# --- a pruned trial's note ------------------------------------------------------------------

def finished_attrs(accuracy: float) -> dict:
    return {"classes": list(CLASSES), "config": {"optimizer": "adam", "lr": 0.001, "epochs": 10},
            "dev_macro_accuracy": accuracy, "dev_per_class": {c: accuracy for c in CLASSES},
            "dev_confusion_matrix": [[5, 0, 0], [0, 5, 0], [0, 0, 5]], "train_macro_accuracy": accuracy,
            "train_per_class": {c: accuracy for c in CLASSES}, "curve_train_loss": [1.0, 0.9, 0.8],
            "curve_dev_loss": [1.0, 0.9, 0.8], "curve_dev_macro_accuracy": [0.30, 0.35, 0.34],
            "epochs_run": 3, "train_seconds": 1.0, "device": "cpu"}


def pruned_trial(tmp_path: Path):
    """Three complete trials at 0.6/0.7/0.8 by epoch 3, then one at 0.35 pruned there, as the search does it."""
    study = optuna.create_study(study_name="p", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1))
    for final in (0.6, 0.7, 0.8):
        study.add_trial(optuna.trial.create_trial(value=final, intermediate_values={1: 0.4, 2: 0.5, 3: final}))
    trial = study.ask()
    for step, value in ((1, 0.30), (2, 0.35), (3, 0.34)):
        trial.report(value, step)
    assert trial.should_prune()
    for key, value in finished_attrs(0.34).items():
        trial.set_user_attr(key, value)
    attach_trial_artifacts(study, trial, tmp_path)
    trial.set_user_attr("pruned_reason", "pruned by MedianPruner at epoch 3")
    return study, study.tell(trial, state=TrialState.PRUNED)


def test_a_pruned_trials_note_says_it_was_pruned_and_why(tmp_path):
    study, frozen = pruned_trial(tmp_path)
    note_outcome(study, frozen)
    note = get_note(SimpleNamespace(study=study, storage=study._storage, _trial_id=frozen._trial_id))
    first = note.splitlines()[0]
    assert first.startswith(f"### Trial {frozen.number}: PRUNED after epoch 3 of 10"), note
    assert "its best dev macro accuracy so far, 0.350, was below the median, 0.700, of the 3 complete trials" in note
    assert "| car |" in note, "the per-class table stays"


def test_the_explanation_names_the_pruner_and_the_numbers_it_compared(tmp_path):
    study, frozen = pruned_trial(tmp_path)
    assert pruning_explanation(study, frozen).startswith("Pruned by MedianPruner at epoch 3: its best")


def test_a_diverged_trial_is_explained_by_its_own_reason(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'd.db'}", direction="maximize")
    trial = study.ask()
    trial.set_user_attr("pruned_reason", "diverged: training loss became nan in epoch 2")
    frozen = study.tell(trial, state=TrialState.PRUNED)
    assert pruning_explanation(study, frozen) == "Diverged: training loss became nan in epoch 2."
    note_outcome(study, frozen)
    note = get_note(SimpleNamespace(study=study, storage=study._storage, _trial_id=frozen._trial_id))
    assert note.startswith(f"### Trial {frozen.number}: PRUNED\n") and "Diverged: training loss became nan" in note


def test_a_failed_trials_note_says_why_it_failed(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'f.db'}", direction="maximize")
    trial = study.ask()
    trial.set_user_attr("fail_reason", "out of memory: CUDA out of memory")
    frozen = study.tell(trial, state=TrialState.FAIL)
    note_outcome(study, frozen)
    note = get_note(SimpleNamespace(study=study, storage=study._storage, _trial_id=frozen._trial_id))
    assert note.startswith(f"### Trial {frozen.number}: FAILED") and "out of memory" in note
