"""`make search FUSE=K`: trials trained together look exactly like trials trained alone."""

from __future__ import annotations

import textwrap
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


def test_trials_asked_together_share_the_leaders_batch_settings_so_one_group_fills(small_data, tmp_path):  # noqa: F811
    # Left to the sampler, six asks over 4 batch sizes x 3 crops x 2 flips would scatter over
    # several groups; the first ask leads and the others copy its batch settings.
    space = tmp_path / "wide.yaml"
    space.write_text(textwrap.dedent("""\
        sampler: {name: TPESampler, seed: 3, multivariate: true, group: true, constant_liar: true}
        params:
          lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
          batch_size: {type: categorical, choices: [128, 160, 192, 256]}
          crop: {type: categorical, choices: [0, 1, 2]}
          flip: {type: categorical, choices: [true, false]}
          epochs: 1
        """))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert search(small_data, tmp_path, storage, "--trials", "6", "--fuse", "6", space=space) == 0
    trials = trials_of(storage, "wide")
    assert len({(t.params["batch_size"], t.params["crop"], t.params["flip"]) for t in trials}) == 1
    assert all(t.user_attrs["fused_with"] == list(range(6)) for t in trials)
    assert len({t.params["lr"] for t in trials}) == 6  # the rest is still the sampler's


def test_fuse_defaults_to_the_devices_group_size(small_data, tmp_path, capsys):  # noqa: F811
    from cnnlib.step import GROUP_SIZE

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert search(small_data, tmp_path, storage, "--trials", "2", "--device", "cpu") == 0
    trials = trials_of(storage, "smoke")
    assert GROUP_SIZE["cpu"] >= 2 and trials[0].user_attrs["fused_with"] == [0, 1]
    assert search(small_data, tmp_path, storage, "--trials", "2", "--fuse", "1") == 0
    assert "fused_with" not in trials_of(storage, "smoke")[2].user_attrs


def test_a_groups_trial_lines_are_printed_when_it_is_told_not_when_the_whole_ask_is(
        small_data, tmp_path, monkeypatch, capsys):  # noqa: F811
    # Two enqueued points with other batch sizes: one ask, two fused groups trained one after the other.
    space = tmp_path / "two-groups.yaml"
    space.write_text(textwrap.dedent("""\
        sampler: {name: RandomSampler, seed: 0}
        enqueue:
          - {batch_size: 64}
          - {batch_size: 128}
        params:
          lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
          batch_size: {type: categorical, choices: [64, 128]}
          epochs: 1
        """))
    from study.search import objective
    real, seen = objective._train_group, []

    def recording(study, trials, *args):
        seen.append(("train", [t.number for t in trials], capsys.readouterr().out))
        return real(study, trials, *args)

    monkeypatch.setattr(objective, "_train_group", recording)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert search(small_data, tmp_path, storage, "--trials", "2", "--fuse", "2", space=space) == 0
    assert [numbers for _, numbers, _ in seen] == [[0], [1]]
    # When the second group starts training, the first group's trial line is already out.
    assert "trial    0 COMPLETE" in seen[1][2] and "trial    1 " not in seen[1][2]
