"""What a search run sets out to do: its trial and time limits, fixed before the first trial, and its own trials.

A run counts only the trials it added (marked with its id, RUN_ATTR), so its
quota holds whatever other runs add to the same study meanwhile.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from ..records import FINISHED
from ..threads import choose_cpu_threads
from .space import SearchSpace

DEFAULT_TIMEOUT = 780  # seconds: with the set-up, a default run takes about 14 min
RUN_ATTR = "search_run"  # trial user attribute: the id of the run whose worker trained the trial

# A trial whose last epochs end within this share of TIMEOUT past the deadline finishes them instead of
# being cut: a default search on the 2-core CPU cut both enqueued 100-epoch recipes at epoch 98.
# The run still ends within 1.1 x TIMEOUT: half the allowance is left for telling and closing.
FINISH_GRACE = 0.05


@dataclass(frozen=True)
class RunPlan:
    """What this run set out to do, fixed before the first trial and handed to every worker process."""

    run_id: str  # marks this run's trials (RUN_ATTR): its quota counts them alone
    trials: float  # finished trials this run adds (inf: no trial limit)
    deadline: float  # time.time() by which every worker has stopped training (inf: none)
    started: float  # time.time() at the start of the run
    workers: int  # worker processes: WORKERS, capped at what can run
    max_failures: int  # trials failing in a row after which a worker stops
    fuse: int  # trials asked and trained together as one fused group
    threads: int  # torch CPU threads per worker process
    grace: float = 0.0  # seconds past the deadline in which a trial may finish its last epochs (Deadline.grace)


@dataclass(frozen=True)
class Limits:
    """The run's trial and time limits (None: no such limit), each with where it came from, for the first line."""

    trials: int | None
    trials_from: str | None
    timeout: int | None
    timeout_from: str | None


def choose_limits(args, space: SearchSpace, finished: int) -> Limits | None:
    """TRIALS and TIMEOUT, else the space's budget, else the default; None when a grid study has no point left.

    A grid study adds no more trials than it has points left, whatever TRIALS asks.
    """
    trials, trials_from = (args.trials, "TRIALS") if args.trials is not None else (space.budget.get("trials"),
                                                                                   "the space's budget")
    grid = space.grid_size()
    if grid is not None:
        remaining = max(0, grid - finished)
        if remaining == 0:
            return None
        if trials is None or remaining < trials:
            trials, trials_from = remaining, "the grid points left"
    timeout, timeout_from = ((args.timeout, "TIMEOUT") if args.timeout is not None
                             else (space.budget.get("timeout"), "the space's budget"))
    if timeout is None and trials is None:
        timeout, timeout_from = DEFAULT_TIMEOUT, "the default when neither TRIALS nor TIMEOUT is set"
    return Limits(trials, trials_from, timeout, timeout_from)


def plan_run(limits: Limits, workers: int, fuse: int, device) -> tuple[RunPlan, str]:
    """The plan every worker follows, and why its workers get the threads they do ("": no note)."""
    started = time.time()
    threads, why = choose_cpu_threads(device, workers)  # workers share the cores out
    trials, timeout = limits.trials, limits.timeout
    plan = RunPlan(run_id=secrets.token_hex(8), trials=trials if trials is not None else float("inf"),
                   deadline=started + timeout if timeout is not None else float("inf"), started=started,
                   workers=workers, max_failures=max(3, 2 * (trials or 5)), fuse=fuse, threads=threads,
                   grace=FINISH_GRACE * timeout if timeout is not None else 0.0)
    return plan, why


def describe_limits(trials: int | None, trials_from: str | None, timeout: int | None, timeout_from: str | None) -> str:
    """What ends the run, and where each limit comes from: 'up to 4 trials (TRIALS); no time limit'."""
    time_limit = None if timeout is None else (f"{timeout / 60:.1f} min ({timeout} s, {timeout_from}), then stops "
                                               f"the trials still training (PRUNED)")
    if trials is not None and time_limit:
        return f"up to {trials} trials ({trials_from}) and trains for up to {time_limit}"
    if trials is not None:
        return f"up to {trials} trials ({trials_from}); no time limit"
    if time_limit:
        return f"trials for up to {time_limit}; no trial limit"
    return "trials with no trial or time limit: it runs until stopped (Ctrl-C)"


def count_states(study: optuna.Study, run_id: str | None = None) -> tuple[int, int]:
    """(finished, running) trials of the study, or of one run (`run_id`) alone.

    A run counts its own trials, never the difference of two totals: runs started
    together on one storage (two `make search`, several machines) add trials meanwhile.
    """
    states = [t.state for t in study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
              if run_id is None or t.user_attrs.get(RUN_ATTR) == run_id]
    running = sum(s == TrialState.RUNNING for s in states)
    return len(states) - running, running
