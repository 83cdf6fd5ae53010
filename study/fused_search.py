"""FUSE=K: the trials asked together are trained as fused groups (cnnlib.fused).

Members of a group must share one batch per step, so they are grouped by
batch size, imbalance method and augmentation (cnnlib.fused.group_configs).
Epochs need not match: a shorter member leaves the group after its own last
epoch, exactly as if it had been trained alone. Each member reports and is pruned alone, and is recorded by the
same `finish_trial` as an unfused trial, so export, plots, dashboard and
`make final` cannot tell how a trial was trained.
"""

from __future__ import annotations

from contextlib import ExitStack
import optuna
from optuna.trial import TrialState

from cnnlib.fused import group_configs, train_fused
from cnnlib.training import DeviceData

from .objective import EpochReporter, Heartbeat, finish_trial, start_trial, tell
from .space import SearchSpace


def run_trials_fused(study: optuna.Study, trials: list[optuna.Trial], space: SearchSpace, data: DeviceData):
    """Train and tell the asked trials in fused groups; returns their FrozenTrials."""
    frozen, told = [], set()
    with ExitStack() as stack:
        for trial in trials:
            stack.enter_context(Heartbeat(study._storage, trial._trial_id))
        configs = {}
        for i, trial in enumerate(trials):
            try:
                configs[i] = start_trial(trial, space, data)
            except Exception as error:  # noqa: BLE001 - recorded on the trial
                frozen.append(finish_trial(study, trial, space, data, EpochReporter(trial, False), None, error))
                told.add(i)
        order = list(configs)
        try:
            for group in group_configs([configs[i] for i in order]):
                members = [order[g] for g in group]
                frozen.extend(_train_group(study, [trials[m] for m in members], [configs[m] for m in members],
                                           space, data))
                told.update(members)
        except KeyboardInterrupt as interrupt:
            for i, trial in enumerate(trials):
                if i not in told:
                    trial.set_user_attr("fail_reason", f"interrupted ({str(interrupt) or 'SIGINT'}) during fused training")
                    tell(study, trial, state=TrialState.FAIL)
            raise
    return frozen


def _train_group(study, trials, configs, space, data):
    can_prune = len(space.objectives) == 1
    reporters = [EpochReporter(trial, can_prune) for trial in trials]
    numbers = [trial.number for trial in trials]
    for trial in trials:
        trial.set_user_attr("fused_with", numbers)

    try:
        results = train_fused(configs, data, on_epoch=lambda member, stats: reporters[member](stats))
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - the whole group failed; each trial records why
        results, errors = [None] * len(trials), [error] * len(trials)
    else:
        errors = [r.error for r in results]
    return [finish_trial(study, trial, space, data, reporter, None if error else result, error)
            for trial, reporter, result, error in zip(trials, reporters, results, errors)]
