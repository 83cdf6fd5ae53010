"""`make export`: one CSV row per trial with Optuna's column names, one row per epoch, and the split's class counts.

The study here is real: a 4-trial smoke search on a small draw of the real
images (200/60/40 train, 50/20/20 dev), run once per test session and shared
with test_plots.py and test_dashboard.py, which import its fixture.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from study import cli
from study.report.export import export_study, study_folder, trials_table
from study.search.storage import open_storage
from conftest import STUDY_ENV

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
CLASSES = ("car", "truck", "cat")
TRAIN_COUNTS, DEV_COUNTS, TEST_COUNTS = (200, 60, 40), (50, 20, 20), (20, 20, 20)
SMOKE_TRIALS = 4
ISSUE_COLUMNS = ["number", "state", "value", "datetime_start", "datetime_complete", "duration",
                 "params_optimizer", "params_lr", "params_batch_size", "params_epochs", "params_weight_decay",
                 *(f"user_attrs_dev_acc_{c}" for c in CLASSES), "user_attrs_train_macro_accuracy",
                 "user_attrs_train_seconds", "user_attrs_device"]

optuna.logging.set_verbosity(optuna.logging.WARNING)
_BUILT: dict[str, SimpleNamespace] = {}  # one smoke study per session, whichever test module asks first


def build_smoke_study(real_data: Path, tmp_path_factory) -> SimpleNamespace:
    """Run `python -m study search` in-process once; later calls (from any test module) reuse it."""
    if "smoke" not in _BUILT:
        results = tmp_path_factory.mktemp("smoke-study")
        url = f"sqlite:///{results / 'optuna.db'}"
        with pytest.MonkeyPatch.context() as patch:
            for name in STUDY_ENV:
                patch.delenv(name, raising=False)
            code = cli.main(["search", "--space", str(SMOKE), "--storage", url, "--results", str(results),
                             "--trials", str(SMOKE_TRIALS), "--data", str(real_data), "--device", "auto",
                             "--train-counts", ",".join(map(str, TRAIN_COUNTS)),
                             "--dev-counts", ",".join(map(str, DEV_COUNTS)),
                             "--test-counts", ",".join(map(str, TEST_COUNTS))])
        assert code == 0, "the smoke search failed; see its output above"
        study = optuna.load_study(study_name="smoke", storage=url)
        _BUILT["smoke"] = SimpleNamespace(results=results, url=url, study=study, trials=study.get_trials())
    return _BUILT["smoke"]


@pytest.fixture(scope="session")
def smoke_study(real_data, tmp_path_factory) -> SimpleNamespace:
    return build_smoke_study(real_data, tmp_path_factory)


@pytest.fixture(scope="session")
def smoke_export(smoke_study) -> SimpleNamespace:
    """`python -m study export` of the smoke study, read back."""
    with pytest.MonkeyPatch.context() as patch:
        for name in STUDY_ENV:
            patch.delenv(name, raising=False)
        code = cli.main(["export", "--storage", smoke_study.url, "--results", str(smoke_study.results)])
    assert code == 0
    folder = smoke_study.results / "smoke"
    return SimpleNamespace(folder=folder, code=code, trials=pd.read_csv(folder / "trials.csv"),
                           epochs=pd.read_csv(folder / "epochs.csv"), data=pd.read_csv(folder / "data.csv"))


pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


# --- trials.csv -------------------------------------------------------------------

def test_trials_csv_has_one_row_per_trial(smoke_study, smoke_export):
    assert sorted(smoke_export.trials["number"]) == sorted(t.number for t in smoke_study.trials)
    assert len(smoke_study.trials) >= SMOKE_TRIALS


def test_trials_csv_has_the_columns_the_issue_lists(smoke_export):
    missing = [c for c in ISSUE_COLUMNS if c not in smoke_export.trials.columns]
    assert not missing, f"missing columns: {missing}"


def test_trials_csv_values_are_the_studys_values(smoke_study, smoke_export):
    rows = smoke_export.trials.set_index("number")
    for trial in smoke_study.trials:
        row = rows.loc[trial.number]
        assert row["state"] == trial.state.name
        if trial.state == TrialState.COMPLETE:
            assert row["value"] == pytest.approx(trial.value)
        for name in CLASSES:
            assert row[f"user_attrs_dev_acc_{name}"] == pytest.approx(trial.user_attrs["dev_per_class"][name])
        assert row["params_lr"] == pytest.approx(trial.params["lr"])
        assert row["user_attrs_config_imbalance"] == trial.user_attrs["config"]["imbalance"]  # fixed, not sampled


def test_duration_is_seconds_between_start_and_complete(smoke_export):
    trials = smoke_export.trials
    span = (pd.to_datetime(trials["datetime_complete"]) - pd.to_datetime(trials["datetime_start"])).dt.total_seconds()
    assert (trials["duration"] > 0).all()
    assert trials["duration"].to_numpy() == pytest.approx(span.to_numpy(), abs=1e-3)


def test_dev_confusion_matrix_is_flattened_with_the_dev_counts_as_row_sums(smoke_export):
    row = smoke_export.trials.iloc[0]
    for name, count in zip(CLASSES, DEV_COUNTS):
        assert sum(row[f"user_attrs_dev_cm_{name}_as_{p}"] for p in CLASSES) == count


def test_multi_objective_values_are_named_after_the_objectives():
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr("objectives", ["dev_macro_accuracy", "robust_macro_accuracy"])
    study.add_trial(optuna.trial.create_trial(values=[0.7, 0.4], params={"lr": 0.01},
                                              distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1)}))
    table = trials_table(study)
    assert table.loc[0, "values_dev_macro_accuracy"] == 0.7
    assert table.loc[0, "values_robust_macro_accuracy"] == 0.4


# --- epochs.csv ------------------------------------------------------------------

def test_epochs_csv_has_one_row_per_epoch_run(smoke_study, smoke_export):
    epochs = smoke_export.epochs
    for trial in smoke_study.trials:
        rows = epochs[epochs["trial"] == trial.number].sort_values("epoch")
        assert rows["epoch"].tolist() == list(range(1, trial.user_attrs["epochs_run"] + 1))
        assert rows["train_loss"].to_numpy() == pytest.approx(trial.user_attrs["curve_train_loss"])
        assert rows["dev_macro_accuracy"].to_numpy() == pytest.approx(trial.user_attrs["curve_dev_macro_accuracy"])


def test_epochs_csv_carries_each_trials_params_for_grouping(smoke_study, smoke_export):
    epochs = smoke_export.epochs
    for trial in smoke_study.trials:
        lrs = epochs.loc[epochs["trial"] == trial.number, "params_lr"].unique()
        assert lrs == pytest.approx([trial.params["lr"]])


# --- data.csv ---------------------------------------------------------------------

def test_data_csv_holds_the_class_counts_of_every_split(smoke_export):
    data = smoke_export.data
    counts = {(r.split, r["class"]): r["count"] for _, r in data.iterrows()}
    for split, expected in (("train", TRAIN_COUNTS), ("dev", DEV_COUNTS), ("test", TEST_COUNTS)):
        assert [counts[(split, c)] for c in CLASSES] == list(expected), split


def test_the_split_recorded_on_the_study_gives_data_csv_every_split(smoke_study, tmp_path):
    paths = export_study(smoke_study.study, tmp_path)  # tmp_path/data holds no split cache: the study's record
    data = pd.read_csv(paths["data"])
    assert set(data["split"]) == {"train", "dev", "test"} and set(data["source"]) == {"study attribute data_summary"}
    assert data[data["split"] == "dev"]["count"].tolist() == list(DEV_COUNTS)


def test_without_a_matching_split_data_csv_falls_back_to_the_dev_counts(smoke_study, tmp_path):
    older = optuna.create_study(study_name="smoke", direction="maximize")  # a study from before data_summary
    older.add_trials(smoke_study.study.get_trials())
    paths = export_study(older, tmp_path)  # tmp_path/data holds no split cache
    data = pd.read_csv(paths["data"])
    assert set(data["split"]) == {"dev"}
    assert data["count"].tolist() == list(DEV_COUNTS)


# --- the command ------------------------------------------------------------------

def test_export_writes_under_results_study(smoke_export):
    assert smoke_export.folder == study_folder(smoke_export.folder.parent, "smoke")
    assert {p.name for p in smoke_export.folder.glob("*.csv")} >= {"trials.csv", "epochs.csv", "data.csv"}


def test_an_unknown_study_is_a_one_line_error_naming_the_studies_held(smoke_study, capsys):
    code = cli.main(["export", "--storage", smoke_study.url, "--study", "nope", "--results", str(smoke_study.results)])
    err = capsys.readouterr().err
    assert code == 2
    assert "'nope'" in err and "smoke" in err and len(err.strip().splitlines()) == 1


def test_an_empty_storage_is_a_one_line_error(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    open_storage(url, heartbeat=False)  # tables, no study
    code = cli.main(["export", "--storage", url, "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "holds no study yet" in err


def test_a_missing_storage_file_is_an_error_and_is_not_created(tmp_path, capsys):
    code = cli.main(["export", "--storage", f"sqlite:///{tmp_path / 'typo.db'}", "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"no storage file at {tmp_path / 'typo.db'}" in err
    assert not (tmp_path / "typo.db").exists()


def test_study_names_become_safe_folder_names(tmp_path):
    assert study_folder(tmp_path, "smoke") == tmp_path / "smoke"  # a plain name is its own folder
    for name in ("../a b/c", "", "..", ".hidden", "x" * 300):
        folder = study_folder(tmp_path, name)
        assert folder.parent == tmp_path and not folder.name.startswith(".") and len(folder.name) <= 100, folder
    assert study_folder(tmp_path, "../a b/c").name.startswith("a_b_c+")


@pytest.mark.parametrize("names", [("a/b", "a_b"), ("a b", "a_b"), ("Ab", "Ab+" + "0" * 10), ("data", "runs")])
def test_two_study_names_never_share_a_folder(tmp_path, names):
    """`STUDY=a/b` and `STUDY=a_b` both wrote results/a_b/, and one's `make final` replaced the other's model.
    Names of folders other commands write under RESULTS (data, runs, ...) are not a study's either."""
    folders = [study_folder(tmp_path, name) for name in names]
    assert len(set(folders)) == 2
    assert not {f.name for f in folders} & {"data", "runs", "final", "bench", "audit", "artifacts"}


def test_final_writes_each_study_to_its_own_folder(tmp_path):
    from study.final.command import output_folder  # noqa: PLC0415

    assert output_folder(tmp_path, "a/b") != output_folder(tmp_path, "a_b")
    assert output_folder(tmp_path, "smoke") == tmp_path / "final" / "smoke"
