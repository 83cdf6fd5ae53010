"""One worker's loop: ask trials under the study's lock, train them, tell them, until the quota or the deadline.

Every worker, the search process itself when WORKERS=1, runs this loop on the
shared storage. Before each ask it fails the trials of workers that died, so
their params are retried; under the lock the ask is sized to the room left in
this run's quota and to the time left before the run's deadline.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from cnnlib.device import resolve_device
from cnnlib.training import DeviceData

from .. import lifetime, progress
from ..data import load_splits
from ..records import FINISHED, STOPPED_BY_DEADLINE
from .artifacts import note_outcome
from .deadline import Deadline
from .locks import file_lock, lock_path
from .objective import run_trials
from .plan import RUN_ATTR, RunPlan, count_states
from .space import SearchSpace
from .storage import open_storage
from .study_setup import create_study
from .trial_claims import claim_trial, fail_dead_local_trials, fail_unclaimed_trials
from .trial_lines import format_trial_line

# We drive heartbeats ourselves around ask/tell (objective.Heartbeat) and print our own trial lines.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)

POLL_SECONDS = 2.0


def ask_trials(study: optuna.Study, space: SearchSpace, count: int) -> list[optuna.Trial]:
    """Ask `count` trials that can train as one fused group.

    The first trial (a waiting warm-start point, or the sampler's pick) leads;
    the others are asked with the leader's batch settings fixed
    (SearchSpace.shared_params, through Optuna's PartialFixedSampler), so
    they share its batches and fill its group instead of scattering over
    batch size x augmentation. A waiting enqueued point is always taken as
    it is, whatever the leader's settings.
    """
    leader = study.ask()
    trials = [leader]
    if count > 1:
        try:
            space.suggest(leader)  # define-by-run: the leader's params exist once suggested (run_trials reads them back)
        except Exception:  # noqa: BLE001 - an impossible config; run_trials records why
            return trials + [study.ask() for _ in range(count - 1)]
        fixed, sampler = space.shared_params(leader.params), study.sampler
        if fixed:
            study.sampler = optuna.samplers.PartialFixedSampler(fixed, sampler)
        try:
            for _ in range(count - 1):
                trials.append(study.ask())
                try:  # now, while the fixing sampler is in place: a param is drawn when first suggested
                    space.suggest(trials[-1])
                except Exception:  # noqa: BLE001 - an impossible config; run_trials records why
                    pass
        finally:
            study.sampler = sampler
    return trials


def worker_loop(args, space: SearchSpace, plan: RunPlan, worker: str = "") -> int:
    """Ask, train and tell trials until this run has added `plan.trials` finished trials or time is up.

    Each process builds its own sampler; it seeds every trial from the trial's
    number (SearchSpace.make_sampler), so no two workers, runs or machines draw
    the same stream.
    """
    storage = open_storage(args.storage)
    study = create_study(args, space, storage)
    target, deadline = plan.trials, Deadline.for_space(plan.deadline, space, plan.grace)
    data = DeviceData(load_splits(args), resolve_device(args.device))
    lock = lock_path(args.storage, study.study_name, Path(args.results))
    failures = 0
    run_total = None if target == float("inf") else int(target)
    while True:
        lifetime.check_interrupt()  # a SIGTERM swallowed while waiting or telling: no new trial is asked
        with file_lock(lock):
            # Under the lock: two local workers never both fail, and both re-queue, one dead worker's trial.
            optuna.storages.fail_stale_trials(study)
            fail_dead_local_trials(study)  # journal storage: no heartbeat, so check this machine's pids
            fail_unclaimed_trials(study)  # RUNNING without an owner: study.ask() failed after storing it
            finished, running = count_states(study, plan.run_id)
            room = target - finished - running
            count = deadline.group_that_fits(int(min(plan.fuse, room))) if room >= 1 else 0
            trials = ask_trials(study, space, count) if count else []
            for trial in trials:
                claim_trial(study, trial)
                trial.set_user_attr(RUN_ATTR, plan.run_id)  # a retried trial carried its first run's id
        if not trials:
            if finished >= target or not deadline.group_that_fits(1):
                return 0
            time.sleep(POLL_SECONDS)  # others' trials are in flight; one may still die and need a retry
            continue
        def report(group: list) -> None:
            """One line per trial as soon as its fused group is told (not when the whole ask is)."""
            nonlocal failures
            progress.clear()
            # A fused group is told all at once: count its members one by one, so each line shows its own step.
            done = count_states(study, plan.run_id)[0] - sum(f.state in FINISHED for f in group)
            for frozen in group:
                if frozen.user_attrs.get("stopped") != STOPPED_BY_DEADLINE:  # untrained, not failing
                    failures = failures + 1 if frozen.state == TrialState.FAIL else 0
                done += frozen.state in FINISHED
                note_outcome(study, frozen)  # a pruned or failed trial's dashboard note says so, and why
                print(format_trial_line(frozen, done, run_total, plan.started, worker, plan.deadline), flush=True)

        results = run_trials(study, trials, space, data, on_told=report, deadline=deadline)
        frozen = results[-1]
        if failures >= plan.max_failures:
            print(f"{worker}stopping: {failures} trials failed in a row; last reason: {frozen.user_attrs.get('fail_reason')}",
                  file=sys.stderr, flush=True)
            return 3
