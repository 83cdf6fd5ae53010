"""Data flows one way: a later stage reads what an earlier one recorded, never reconstructs it.

The search records on the study what it ran on (split summary, split cache key,
corrections digest, the space file's text); `make export` writes those beside
the CSVs; `make plots` reads the space's log scales from there; `make final`
refuses a split other than the recorded one.
"""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest

from cnnlib.splits import DataConfig, prepare_splits
from study.errors import UserError
from study.records import check_recorded_data
from study.report.export import export_study
from study.report.figures import recorded_log_scales
from study.report.optuna_figures import rebuild_study

COUNTS = {"train_counts": (4, 4, 4), "dev_counts": (2, 2, 2), "test_counts": (2, 2, 2)}
SPACE_TEXT = """# a space file, comments and all
params:
  lr: {type: float, low: 1.0e-3, high: 2.0e-3, log: true}
  dropout: {type: float, low: 0.01, high: 0.4}
"""

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def splits_for(image_tree, tmp_path):
    """splits_for(corrections=None, **counts): the split of one small image tree, as the search would build it."""
    root = image_tree()

    def make(corrections=None, **counts):
        config = DataConfig(root, **{**COUNTS, **counts}, corrections=corrections)
        return prepare_splits(config, tmp_path / "cache")

    return make


def searched_on(splits) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for name, value in splits.record().items():  # what study_setup.record_data stores on a new study
        study.set_user_attr(name, value)
    return study


def test_final_refuses_corrections_other_than_the_studys_naming_both(splits_for, tmp_path):
    plain = splits_for()
    corrections = tmp_path / "corrections.csv"
    corrections.write_text(f"id,new_label\n{plain.train.ids[0]},truck\n")
    corrected = splits_for(corrections)
    with pytest.raises(UserError) as refused:
        check_recorded_data(searched_on(plain), corrected, str(corrections))
    message = str(refused.value)
    assert "no corrections" in message and corrected.corrections_digest[:12] in message
    assert str(corrections) in message and "\n" not in message


def test_final_refuses_a_split_with_other_counts_naming_both(splits_for):
    study = searched_on(splits_for())
    with pytest.raises(UserError) as refused:
        check_recorded_data(study, splits_for(dev_counts=(1, 2, 2)))
    message = str(refused.value)
    assert "dev 2/2/2" in message and "dev 1/2/2" in message and "\n" not in message


def test_final_takes_the_recorded_split_and_an_older_study_that_recorded_none(splits_for):
    splits = splits_for()
    check_recorded_data(searched_on(splits), splits)
    check_recorded_data(optuna.create_study(), splits)  # a study from before the record


def test_export_writes_the_recorded_split_and_the_space_file_beside_the_csvs(splits_for, tmp_path):
    splits = splits_for()
    study = searched_on(splits)
    study.set_user_attr("space_text", SPACE_TEXT)
    paths = export_study(study, tmp_path / "results")
    assert json.loads(paths["record"].read_text()) == json.loads(json.dumps(splits.record()))
    assert paths["record"].parent == paths["trials"].parent == paths["space"].parent
    assert paths["space"].read_text() == SPACE_TEXT
    data = pd.read_csv(paths["data"])
    assert data[data["split"] == "dev"]["count"].tolist() == [2, 2, 2]
    assert set(data["split"]) == {"train", "dev", "test"}


def test_plots_take_each_params_scale_from_the_recorded_space_not_from_its_values(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE_TEXT)
    # lr spans 2x (a guess says linear) but was sampled on a log scale; dropout spans 40x (a guess says log) but not.
    trials = pd.DataFrame({"number": [0, 1, 2], "state": ["COMPLETE"] * 3, "value": [0.5, 0.6, 0.7],
                           "params_lr": [1.0e-3, 1.5e-3, 2.0e-3], "params_dropout": [0.01, 0.2, 0.4]})
    guessed = rebuild_study(trials, ["value"]).trials[0].distributions
    assert (guessed["lr"].log, guessed["dropout"].log) == (False, True)  # what the values alone suggest
    recorded = rebuild_study(trials, ["value"], recorded_log_scales(tmp_path)).trials[0].distributions
    assert (recorded["lr"].log, recorded["dropout"].log) == (True, False)
