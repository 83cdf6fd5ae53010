"""TIMEOUT is kept: a search ends within 1.1 x TIMEOUT plus its set-up, however long its trials would train.

Each search here asks for trials of 5000 epochs on the small real draw (a second or so an epoch for
a fused group), so only the deadline can end it. The trials it stops are PRUNED with `stopped:
deadline` and keep every epoch they reported; `make final` never takes one for a finished trial.
The searches run as subprocesses with a time limit, so a search that overruns fails the test
instead of training for hours.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from study.errors import UserError
from study.final.choice import choose_trial, top_trials, warm_start_trials
from test_search import SMOKE, small_data, sqlite_url, subprocess_env, trials_of, write_space  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in

TIMEOUT = 60  # seconds: the 10 % margin then covers the process's own end (~3 s on 2 busy cores)
SETUP_LIMIT = 180  # seconds a search may take to start its first trial before the test gives up on it

# Far longer than TIMEOUT at any speed; the pruner never judges (no trial completes), so only the deadline stops.
LONG_TRIALS = """\
    objective: dev_macro_accuracy
    sampler: {name: TPESampler, seed: 0, constant_liar: true}
    pruner: {name: MedianPruner, n_startup_trials: 100, n_warmup_steps: 1}
    params:
      optimizer: adam
      lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
      weight_decay: 0.0
      batch_size: 64
      epochs: 5000
      imbalance: weighted_loss
    enqueue:
      - {lr: 5.0e-3}
    """


def timed_search(data, results, *extra: str, timeout: int = TIMEOUT) -> tuple[float, float, list, str]:
    """`python -m study search` over LONG_TRIALS: (set-up seconds until its first trial started, total seconds,
    its trials, its stdout)."""
    space = write_space(results, LONG_TRIALS, "long")
    url = sqlite_url(results)
    command = [sys.executable, "-m", "study", "search", "--space", str(space), "--storage", url, "--data", str(data),
               "--results", str(results), "--device", "cpu", "--timeout", str(timeout), *extra]
    began, clock = datetime.now(), time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=SETUP_LIMIT + 1.5 * timeout,
                          env=subprocess_env(), cwd=results)
    total = time.monotonic() - clock
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = trials_of(url, "long")
    setup = (min(t.datetime_start for t in trials if t.datetime_start) - began).total_seconds()
    return setup, total, trials, done.stdout


def started(trials: list) -> list:
    """The trials a run trained: not a warm-start point the deadline cut (it waits again, queued for the next run),
    nor one asked just before the deadline whose group had no room left (FAIL, never trained: on a busy CPU the
    second worker's ask can take that long)."""
    return [t for t in trials if t.state != TrialState.WAITING
            and not t.user_attrs.get("fail_reason", "").startswith("not trained")]


def assert_budget_kept(setup: float, total: float, timeout: int = TIMEOUT) -> None:
    print(f"set-up {setup:.1f} s, total {total:.1f} s, TIMEOUT {timeout} s")
    assert total <= setup + 1.1 * timeout, f"took {total:.1f} s: set-up {setup:.1f} s + 1.1 x {timeout} s exceeded"


def assert_cut_by_the_deadline(trials: list) -> None:
    """Every trial the run started was stopped by the deadline: PRUNED, its epochs and last value kept."""
    trials = started(trials)
    assert trials and {t.state for t in trials} == {TrialState.PRUNED}, [(t.number, t.state) for t in trials]
    for trial in trials:
        attrs = trial.user_attrs
        assert attrs["stopped"] == "deadline" and "deadline" in attrs["pruned_reason"], attrs.get("pruned_reason")
        epochs = attrs["epochs_run"]
        assert 1 <= epochs < 5000
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
        assert trial.value == trial.intermediate_values[epochs]  # Optuna's value of a pruned trial: its last report
        assert attrs["curve_dev_macro_accuracy"][-1] == trial.value


@pytest.mark.slow
def test_a_fused_search_stops_its_group_at_the_deadline(small_data, tmp_path):
    setup, total, trials, out = timed_search(small_data, tmp_path)  # FUSE's CPU default: 16 trials as one group

    assert_budget_kept(setup, total)
    assert_cut_by_the_deadline(trials)
    assert len(trials[0].user_attrs["fused_with"]) == 16
    assert "then stops the trials still training (PRUNED)" in out.splitlines()[0]
    assert f"{len(started(trials))} of them stopped by the deadline (PRUNED)" in out


@pytest.fixture(scope="module")
def one_at_a_time(small_data, tmp_path_factory):
    """One FUSE=1 search over LONG_TRIALS, shared by the tests that read it."""
    results = tmp_path_factory.mktemp("one-at-a-time")
    return results, timed_search(small_data, results, "--fuse", "1")


@pytest.mark.slow
def test_a_one_trial_at_a_time_search_stops_its_trial_at_the_deadline(one_at_a_time):
    _, (setup, total, trials, out) = one_at_a_time

    assert_budget_kept(setup, total)
    assert_cut_by_the_deadline(trials)
    assert len(started(trials)) == 1 and "fused_with" not in trials[0].user_attrs


@pytest.mark.slow
def test_every_worker_stops_at_the_one_deadline_of_the_run(small_data, tmp_path):
    setup, total, trials, out = timed_search(small_data, tmp_path, "--workers", "2", "--fuse", "4")

    assert_budget_kept(setup, total)
    assert_cut_by_the_deadline(trials)
    groups = {tuple(t.user_attrs.get("fused_with", [t.number])) for t in started(trials)}
    assert len(groups) >= 2, groups  # both workers trained, and both stopped


@pytest.mark.slow
def test_make_final_never_takes_a_trial_the_deadline_cut_short(one_at_a_time):
    results, (_, _, trials, _) = one_at_a_time
    study = optuna.load_study(study_name="long", storage=sqlite_url(results))
    cut, = started(trials)

    assert top_trials(study, 3) == [] and warm_start_trials(study, []) == []
    with pytest.raises(UserError, match="no finished trial"):
        choose_trial(study)
    with pytest.raises(UserError, match=f"trial {cut.number} of study 'long' is PRUNED, not COMPLETE"):
        choose_trial(study, cut.number)


@pytest.mark.slow
def test_a_warm_start_point_the_deadline_cut_is_queued_again_for_the_next_run(one_at_a_time):
    _, (_, _, trials, _) = one_at_a_time
    cut, again = trials

    assert cut.user_attrs["warm_start_point"] == 0 and cut.user_attrs["stopped"] == "deadline"
    assert again.state == TrialState.WAITING and again.user_attrs["warm_start_point"] == 0
    assert again.system_attrs["fixed_params"] == {"lr": 5.0e-3}


# Every epoch 4 s longer (slept inside the epoch, so the run measures it), in every process of the test.
SLOW_EPOCHS = """\
import time
import cnnlib.training

_real_train_epoch = cnnlib.training.train_epoch


def train_epoch(*args, **kwargs):
    time.sleep(4)
    return _real_train_epoch(*args, **kwargs)


cnnlib.training.train_epoch = train_epoch
"""


@pytest.mark.slow
def test_trials_the_deadline_stops_before_the_pruners_warm_up_are_failed_not_pruned(small_data, tmp_path):
    """4 s epochs, a pruner that waits 3 epochs, 14 s to train: the first group starts before any epoch is measured
    and is stopped after epoch 1 or 2. A value after 1 epoch of 3 must not enter the sampler's history as PRUNED."""
    from test_reliability import inject  # noqa: PLC0415

    space = write_space(tmp_path, """\
        sampler: {name: TPESampler, seed: 0}
        pruner: {name: MedianPruner, n_startup_trials: 0, n_warmup_steps: 3}
        params: {optimizer: adam, lr: {type: float, low: 1.0e-3, high: 1.0e-2}, batch_size: 128, epochs: 1000}
        """, "warm")
    url = sqlite_url(tmp_path)
    command = [sys.executable, "-m", "study", "search", "--space", str(space), "--storage", url, "--data",
               str(small_data), "--results", str(tmp_path), "--device", "cpu", "--timeout", "14", "--fuse", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SETUP_LIMIT + 60, cwd=tmp_path,
                          env=subprocess_env(**inject(tmp_path / "inject", SLOW_EPOCHS)))

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = trials_of(url, "warm")
    assert len(trials) == 2 and {t.state for t in trials} == {TrialState.FAIL}, [(t.number, t.state) for t in trials]
    for trial in trials:
        assert trial.user_attrs["stopped"] == "deadline" and trial.user_attrs["epochs_run"] in (1, 2)
        assert "before the 3 epochs the pruner waits for" in trial.user_attrs["fail_reason"]
    assert "2 stopped by the deadline before the pruner's warm-up (FAIL)" in done.stdout


# --- which group starts, which epoch is the last ------------------------------------------------

def test_a_trial_stops_when_another_epoch_and_telling_its_group_would_end_past_the_deadline():
    from study.search.deadline import Deadline  # noqa: PLC0415

    deadline = Deadline(at=1000.0, tell_seconds=1.0, closing_seconds=2.0)
    assert not deadline.stops_after(epoch_seconds=5.0, group_size=3, now=990.0)  # 5 + 3 x 1 + 2 <= 10 left
    assert deadline.stops_after(epoch_seconds=5.0, group_size=4, now=990.0)  # 5 + 4 x 1 + 2 > 10 left


def test_a_trial_whose_last_epochs_end_within_the_grace_finishes_them():
    from study.search.deadline import Deadline  # noqa: PLC0415
    from study.search.plan import FINISH_GRACE, Limits, plan_run  # noqa: PLC0415

    deadline = Deadline(at=1000.0, tell_seconds=1.0, closing_seconds=2.0, grace=20.0)
    # 10 s left: another 5 s epoch and telling 4 trials (6 s) would end past it ...
    assert not deadline.stops_after(5.0, group_size=4, now=990.0, epochs_left=2)  # 2 x 5 + 6 <= 10 + 20
    assert not deadline.stops_after(5.0, group_size=4, now=1005.0, epochs_left=1)  # past `at`, within the grace
    assert deadline.stops_after(5.0, group_size=4, now=990.0, epochs_left=5)  # 5 x 5 + 6 > 10 + 20: cut now
    assert deadline.stops_after(5.0, group_size=4, now=990.0)  # epochs left unknown: cut
    plan, _ = plan_run(Limits(None, None, 780, "TIMEOUT"), 1, 1, "cpu")
    assert plan.grace == FINISH_GRACE * 780 and FINISH_GRACE <= 0.05


def test_a_group_starts_only_with_room_for_its_warm_up_epochs_and_its_telling():
    from study.search.deadline import Deadline  # noqa: PLC0415

    deadline = Deadline(at=1000.0, warmup_epochs=15, tell_seconds=1.0, closing_seconds=0.0)
    assert deadline.room_for_group(16, now=980.0)  # no epoch measured yet: it starts with time left to tell it
    assert not deadline.room_for_group(16, now=990.0)
    assert not deadline.room_for_group(16, now=1000.0)
    deadline.epoch_seconds = 4.0
    assert deadline.room_for_group(16, now=1000.0 - 15 * 4 - 16)
    assert not deadline.room_for_group(16, now=1000.0 - 15 * 4 - 15)
    assert deadline.group_that_fits(16, now=1000.0 - 15 * 4 - 10) == 10  # a smaller group still fits
    assert deadline.group_that_fits(16, now=1000.0 - 15 * 4) == 0


def test_a_group_whose_warm_up_no_longer_fits_once_asked_is_told_fail_untrained(real_data, tmp_path):
    """The worker sized its ask to the time left before asking; asking 16 trials takes time. At the start,
    a group without room left for its warm-up epochs is not trained to be cut after one of them."""
    from cnnlib.splits import DataConfig, prepare_splits  # noqa: PLC0415
    from cnnlib.training import DeviceData  # noqa: PLC0415
    from study.search.deadline import Deadline  # noqa: PLC0415
    from study.search.objective import run_trials  # noqa: PLC0415
    from study.search.space_file import load_space  # noqa: PLC0415

    space = load_space(write_space(tmp_path, """\
        pruner: {name: MedianPruner, n_warmup_steps: 3}
        params: {optimizer: adam, lr: {type: float, low: 1.0e-3, high: 1.0e-2}, batch_size: 32, epochs: 20}
        """, "warm"))
    data = DeviceData(prepare_splits(DataConfig(real_data, train_counts=(20, 10, 10), dev_counts=(10, 10, 10),
                                                test_counts=(0, 0, 0)), tmp_path / "cache"), "cpu")
    study = optuna.create_study(direction="maximize", pruner=space.make_pruner())
    asked = [study.ask() for _ in range(2)]
    deadline = Deadline(at=time.time() + 12, warmup_epochs=3, epoch_seconds=4.0, tell_seconds=0.5,
                        closing_seconds=1.0)  # 3 x 4 s of warm-up and 2 s of telling: 14 s, 12 left

    told = run_trials(study, asked, space, data, deadline=deadline)

    assert [t.state for t in told] == [TrialState.FAIL] * 2
    assert all(t.user_attrs["fail_reason"].startswith("not trained") and not t.intermediate_values for t in told)


def test_epochs_before_the_pruners_warm_up_may_use_the_grace():
    """A trial of a group started with room for its warm-up reaches it though an epoch ran a little long."""
    from cnnlib.metrics import Evaluation  # noqa: PLC0415
    from cnnlib.training import EpochStats  # noqa: PLC0415
    from study.search.deadline import Deadline  # noqa: PLC0415
    from study.search.objective import EpochReporter  # noqa: PLC0415

    def after_epoch_1(grace: float) -> EpochReporter:
        trial = SimpleNamespace(number=0, report=lambda value, step: None, should_prune=lambda: False)
        deadline = Deadline(at=time.time() + 3, warmup_epochs=3, tell_seconds=1.0, closing_seconds=0.0, grace=grace)
        reporter = EpochReporter(trial, can_prune=True, epochs=100, deadline=deadline)
        learning = Evaluation(("a", "b"), np.array([[5, 1], [1, 5]]))
        reporter(EpochStats(1, 1.0, 1.0, learning, 2.5))  # 3 s left: not for another 2.5 s epoch and 1 s to tell
        return reporter

    assert after_epoch_1(grace=5.0).pruned_at is None  # its 2 warm-up epochs and telling end within the grace
    cut = after_epoch_1(grace=0.0)
    assert cut.pruned_at == 1 and cut.cut_before_warmup  # told FAIL, not PRUNED (finish_trial)


def test_the_warm_up_a_group_needs_is_the_pruners_n_warmup_steps(tmp_path):
    from study.search.deadline import Deadline  # noqa: PLC0415
    from study.search.space_file import load_space  # noqa: PLC0415

    assert Deadline.for_space(0.0, load_space("default")).warmup_epochs == 15
    assert Deadline.for_space(0.0, load_space(SMOKE)).warmup_epochs == 1
    no_pruner = write_space(tmp_path, "params: {epochs: 2}\n", "no_pruner")
    assert Deadline.for_space(0.0, load_space(no_pruner)).warmup_epochs == 1


def test_a_run_ends_early_when_no_group_has_room_for_its_warm_up(small_data, tmp_path):
    """Trials of 2 epochs, a pruner that waits 10^8 epochs: after the first trial, no other could reach its warm-up."""
    space = write_space(tmp_path, """\
        pruner: {name: MedianPruner, n_startup_trials: 1, n_warmup_steps: 100000000}
        params: {optimizer: adam, lr: {type: float, low: 1.0e-3, high: 1.0e-2}, batch_size: 128, epochs: 2}
        """, "warm")
    from test_search import search  # noqa: PLC0415

    clock = time.monotonic()
    assert search(small_data, tmp_path, sqlite_url(tmp_path), "--timeout", "600", "--fuse", "1", space=space) == 0

    assert time.monotonic() - clock < 120
    assert [t.state for t in trials_of(sqlite_url(tmp_path), "warm")] == [TrialState.COMPLETE]


# --- what make final may retrain ------------------------------------------------------------------

def _study_with(*trials) -> optuna.Study:
    from optuna.distributions import FloatDistribution  # noqa: PLC0415
    from optuna.trial import create_trial  # noqa: PLC0415

    study = optuna.create_study(direction="maximize")
    for state, value, reported, stopped in trials:
        study.add_trial(create_trial(
            state=state, value=value, intermediate_values={epoch: value for epoch in range(reported)},
            user_attrs={"config": {"epochs": 10}, **({"stopped": stopped} if stopped else {})},
            params={"lr": 0.1}, distributions={"lr": FloatDistribution(0.01, 1.0)}))
    return study


def test_a_trial_the_deadline_stopped_nearly_done_is_a_candidate_of_make_final():
    study = _study_with((TrialState.COMPLETE, 0.80, 10, None),
                        (TrialState.PRUNED, 0.90, 9, "deadline"),  # 9 of 10 epochs: its config is ranked
                        (TrialState.PRUNED, 0.95, 3, "deadline"),  # 3 of 10: too short to rank
                        (TrialState.PRUNED, 0.99, 9, "pruner"))  # the pruner's verdict stands
    assert [t.number for t in top_trials(study, 5)] == [1, 0]
    best, why = choose_trial(study)
    assert best.number == 1 and "1 the deadline stopped nearly done" in why
    assert choose_trial(study, 1)[0].number == 1
    with pytest.raises(UserError, match="trial 2 of study .* is PRUNED, not COMPLETE"):
        choose_trial(study, 2)
