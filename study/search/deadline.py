"""The run's one deadline (TIMEOUT), as every worker applies it: which group may start, which epoch is the last.

TIMEOUT is the time the run's trials may train. A trial still training when
another epoch would end past the deadline stops after the epoch it is in and
is told PRUNED with `stopped: deadline` (objective.EpochReporter), unless
its remaining epochs end within the run's grace past the deadline (a trial
at epoch 98 of 100 finishes); a group
starts only while there is time left for the epochs a trial needs before the
pruner judges it (the space's `n_warmup_steps`, at least one), at the
slowest group epoch this worker has seen in this run, checked again once
its trials are asked; those epochs may use the grace too. A trial stopped
before them anyway is told FAIL, not PRUNED (objective.cut_before_warmup).
The deadline is a `time.time()`, the same in every worker process of the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .space import SearchSpace


@dataclass
class Deadline:
    at: float = math.inf  # time.time() by which the run's training must have stopped
    warmup_epochs: int = 1  # epochs a trial trains before the pruner may judge it, at least 1
    epoch_seconds: float | None = None  # the slowest group epoch seen so far (None: no group has trained yet)
    # Seconds to record, tell and report one trial after its group trained (results, artifacts, note), and
    # once per group, for the first telling's imports and the run's closing lines. Until a group has been
    # told, guesses above what was seen on the 2-core CPU under other jobs' load (small data, n=1 each):
    # 13 s to tell a fused group of 16 cut by the deadline; 2 s for one trial, then 3 s from the run's
    # summary to the process's end.
    tell_seconds: float = 1.0
    tell_seconds_seen: float = 0.0
    closing_seconds: float = 2.0
    grace: float = 0.0  # seconds past `at` in which a trial may still finish its last epochs (plan.FINISH_GRACE)
    _trained_at: float | None = field(default=None, repr=False)

    @classmethod
    def for_space(cls, at: float, space: SearchSpace, grace: float = 0.0) -> Deadline:
        warmup = int((space.pruner or {}).get("n_warmup_steps") or 0)
        return cls(at, max(1, warmup), grace=grace)

    def left(self, now: float | None = None) -> float:
        return self.at - (time.time() if now is None else now)

    def room_for_group(self, group_size: int = 1, now: float | None = None) -> bool:
        """Whether a group may start: time left for its warm-up epochs (once an epoch's length is known)
        and for telling its trials."""
        left = self.left(now) - self.telling(group_size)
        if left <= 0:
            return False
        return self.epoch_seconds is None or left >= self.warmup_epochs * self.epoch_seconds

    def group_that_fits(self, size: int, now: float | None = None) -> int:
        """The most trials, up to `size`, that may start as one group now (0: none may)."""
        return next((k for k in range(size, 0, -1) if self.room_for_group(k, now)), 0)

    def stops_after(self, epoch_seconds: float, group_size: int = 1, now: float | None = None,
                    epochs_left: int | None = None) -> bool:
        """Whether a trial stops after this epoch: another as long, then telling its group, would end past the deadline,
        and its `epochs_left` would not all end within the grace after it.

        A group's trials are recorded and told together once its last member stops,
        so the whole group's telling is kept free before the deadline.
        """
        left, telling = self.left(now), self.telling(group_size)
        if left >= epoch_seconds + telling:
            return False
        return epochs_left is None or left + self.grace < epochs_left * epoch_seconds + telling

    def telling(self, group_size: int) -> float:
        """Seconds kept free to tell a group of this size and close the run."""
        return self.closing_seconds + group_size * self.tell_seconds

    def trained(self) -> None:
        """A group's training has ended; its telling starts (see told)."""
        self._trained_at = time.time()

    def told(self, trials: int) -> None:
        """A group's `trials` are told and reported: learn what telling one trial costs."""
        if trials and self._trained_at is not None:
            self.tell_seconds_seen = max(self.tell_seconds_seen, (time.time() - self._trained_at) / trials)
            self.tell_seconds = self.tell_seconds_seen  # the guess gives way to the slowest telling seen
        self._trained_at = None

    def observe(self, results) -> None:
        """Learn a group's epoch length from its members' histories (cnnlib MemberResult)."""
        seconds = [stats.seconds for result in results if result is not None for stats in result.history]
        if seconds:
            self.epoch_seconds = max(self.epoch_seconds or 0.0, max(seconds))

