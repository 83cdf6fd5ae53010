"""`make search FUSE=K`: trials trained together look exactly like trials trained alone."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from test_search import CONTRACT_ATTRS, FINISHED, search, small_data, sqlite_url, trials_of  # noqa: F401 - fixture

DEV_SIZE = 90


@pytest.fixture(scope="module")
def fused_and_plain(small_data, tmp_path_factory):  # noqa: F811
    """The same smoke study twice: FUSE=4 and unfused, five trials each, same sampler seed."""
    studies = {}
    for fuse in (4, 1):
        folder = tmp_path_factory.mktemp(f"fuse{fuse}")
        storage = sqlite_url(folder)
        assert search(small_data, folder, storage, "--trials", "5", "--fuse", str(fuse)) == 0
        studies[fuse] = trials_of(storage, "smoke")
    return studies


def test_a_fused_study_finishes_exactly_the_requested_trials(fused_and_plain):
    trials = fused_and_plain[4]
    assert sum(t.state in FINISHED for t in trials) == 5
    assert len({t.number for t in trials}) == len(trials)


def test_trials_asked_together_are_trained_as_one_group(fused_and_plain):
    groups = [t.user_attrs.get("fused_with") for t in fused_and_plain[4]]
    assert any(group and len(group) > 1 for group in groups)


def test_fused_trials_carry_the_same_attributes_as_unfused_ones(fused_and_plain):
    for fused, plain in zip(fused_and_plain[4], fused_and_plain[1]):
        if fused.state == TrialState.COMPLETE and plain.state == TrialState.COMPLETE:
            assert CONTRACT_ATTRS <= set(fused.user_attrs)
            assert set(plain.user_attrs) - set(fused.user_attrs) == set()
            assert sum(map(sum, fused.user_attrs["dev_confusion_matrix"])) == DEV_SIZE


def test_a_fused_member_runs_its_own_number_of_epochs(fused_and_plain):
    for trial in fused_and_plain[4]:
        if trial.state == TrialState.COMPLETE:
            assert trial.user_attrs["epochs_run"] == trial.params["epochs"]
            assert len(trial.intermediate_values) == trial.params["epochs"]


def test_the_first_fused_trial_matches_its_unfused_twin(fused_and_plain):
    """Trial 0 has the same params in both studies (same sampler seed) and leads its group's batch order."""
    fused, plain = fused_and_plain[4][0], fused_and_plain[1][0]
    assert fused.params == plain.params
    assert fused.value == pytest.approx(plain.value, abs=0.03)


def test_trials_asked_together_share_the_leaders_batch_settings_so_one_group_fills(fused_and_plain):
    # smoke.yaml samples batch_size from [128, 256]: left to the sampler, four asks would
    # split into two groups about half the time. The first ask leads; the others copy it.
    first_four = fused_and_plain[4][:4]
    assert len({t.params["batch_size"] for t in first_four}) == 1
    assert all(t.user_attrs["fused_with"] == [0, 1, 2, 3] for t in first_four)
    assert len({t.params["lr"] for t in first_four}) == 4  # the rest is still the sampler's


def test_fuse_defaults_to_the_devices_group_size(small_data, tmp_path, capsys):  # noqa: F811
    from cnnlib.fused import GROUP_SIZE

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert search(small_data, tmp_path, storage, "--trials", "2", "--device", "cpu") == 0
    trials = trials_of(storage, "smoke")
    assert GROUP_SIZE["cpu"] >= 2 and trials[0].user_attrs["fused_with"] == [0, 1]
    assert search(small_data, tmp_path, storage, "--trials", "2", "--fuse", "1") == 0
    assert "fused_with" not in trials_of(storage, "smoke")[2].user_attrs
