"""The training step: one step implementation for a group of K >= 1 trial configs.

The seed CNN is far too small to fill a device (or even two CPU cores) with
one trial, so the step trains a group of configs as one stacked network
(cnnlib.stacked_model), HFTA-style; a lone trial is a group of one through
the same code. Batch order, augmentation, evaluation and stopping are the
loop's (cnnlib.training); this module holds what one step of the group does.

- Each member keeps its own optimizer (SGD with or without Nesterov, Adam,
  AdamW), lr and schedule, momentum, weight decay, loss (class weights,
  logit adjustment, label smoothing), dropout rate and seed, as rows of the
  stacked tensors (cnnlib.stacked_optimizer, cnnlib.losses.MemberLoss,
  cnnlib.member_dropout). Each member's lr follows its own schedule table
  (cnnlib.schedules), one column per step.
- A member that stops is cut out of the stacked rows at the end of the
  epoch (`keep`): it stops costing compute.
- On the CPU a large group runs as several stacked passes of at most 16
  members per batch (MEMBERS_PER_PASS): the batch is still shared, and a
  pass of 16 fits the caches that one of 64 overflows. The passes step at
  the same time, one thread each with one intra-op thread, one pass per
  torch thread, where that measured faster (`concurrent_passes_pay`: batch
  <= 32, no augmentation, 8+ members a pass): 16 members on 2 cores are two
  passes of 8 side by side, re-split evenly when stopping leaves them uneven.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .config import TrainConfig
from .metrics import Evaluation
from .passes import CONCURRENT_MIN_MEMBERS, Pass, PassWorker, concurrent_passes_pay, evaluate_members, step_passes
from .stacked_model import CHANNELS_LAST, make_model
from .tta import VIEW_COUNTS

# Members per stacked forward/backward pass, by device type (None: all of them).
# On the 2-core CPU a pass of 16 costs 15-20 % less CPU time per member than
# one of 64 (whose 38 MB conv1 activations miss the cache and are fresh pages
# every step); GPUs want the widest pass.
MEMBERS_PER_PASS = {"cpu": 16}
# Trials per group when a search does not say (FUSE): as wide as measurably pays.
# 2-core CPU, torch 2.14.1, batch 32 (`make bench --fused-ks`): K=16 trains 2.0-2.6x the
# trial-epochs/s of one trial at a time, K=64 no more than K=16. H200 (torch 2.11): K=64 25.6x.
GROUP_SIZE = {"cpu": 16, "cuda": 64}
# Arithmetic of the step: fp32, or bf16 autocast (AMX-BF16 CPUs, GPUs).
PRECISIONS = ("fp32", "bf16")


def pass_threads_for(configs: Sequence[TrainConfig], device: torch.device, pass_threads: int | None) -> int:
    """How many threads step passes at the same time: asked for, or where `concurrent_passes_pay`."""
    if pass_threads is not None and pass_threads < 1:
        raise ValueError(f"pass_threads must be at least 1, got {pass_threads}")
    if device.type != "cpu":
        return 1
    if pass_threads is not None:
        return pass_threads
    return torch.get_num_threads() if concurrent_passes_pay(configs) else 1


class StackedStep:
    """The step of a group of K >= 1 configs: its members split over passes that each take every batch.

    What the loop drives: `members`, `start_epoch`, `step`, `train_loss_sums`,
    `evaluate`, `model`, `keep`, `close`.

    On the CPU the passes step at the same time, one thread each with one
    intra-op thread (pass_threads of them; by default torch's thread count
    where `concurrent_passes_pay`, else one pass using every intra-op thread):
    a group of 16 on 2 cores is two passes of 8 side by side rather than one
    pass of 16 whose every op is split over both cores. About a tenth of a
    step is serial (Python, small ops, the dropout draws) and one pass's
    serial part overlaps the other's kernels. `step` hands the batch to
    the pass threads and returns, so the loop makes the next batch meanwhile;
    the loss sums, evaluation, models and `keep` wait for them. When
    stopping leaves the passes uneven, `keep` re-splits the members evenly
    (`_rebalance`); a pass left alone steps in the caller's thread with all
    its intra-op threads.
    """

    def __init__(self, configs: Sequence[TrainConfig], data, steps_per_epoch: int, *,
                 members_per_pass: int | None = None, precision: str = "fp32", graphs: bool = False,
                 pass_threads: int | None = None, optimizer_kernels: str | None = None,
                 channels_last: bool = CHANNELS_LAST):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if len(configs) > 1 and any(c.model != "seed_cnn" for c in configs):
            raise ValueError(f"only the seed CNN trains as a stacked group; model "
                             f"{next(c.model for c in configs if c.model != 'seed_cnn')!r} trains one at a time")
        per_pass = members_per_pass or MEMBERS_PER_PASS.get(data.device.type) or len(configs)
        if per_pass < 1:
            raise ValueError(f"members_per_pass must be at least 1, got {members_per_pass}")
        threads = pass_threads_for(configs, data.device, pass_threads)
        self.configs, self.per_pass, self.data, self.channels_last = list(configs), per_pass, data, channels_last
        # Equal-sized passes (K=20 with 16 per pass: 10 + 10, not 16 + 4), at least one per pass thread.
        n_passes = max(math.ceil(len(configs) / per_pass), min(threads, len(configs)))
        bounds = [round(i * len(configs) / n_passes) for i in range(n_passes + 1)]
        self.passes = [Pass(list(range(a, b)), configs, data, steps_per_epoch, configs[0].seed, precision, graphs,
                            optimizer_kernels, channels_last) for a, b in zip(bounds, bounds[1:])]
        self.workers = [PassWorker() for _ in range(min(threads, n_passes))] if threads > 1 and n_passes > 1 else []
        self.forced = pass_threads is not None  # asked for: concurrent whatever the group (tests, A/Bs)

    @property
    def members(self) -> list[int]:
        return sorted(m for pass_ in self.passes for m in pass_.members)

    def _concurrent(self) -> bool:
        return bool(self.workers) and len(self.passes) > 1

    def _dispatch(self, job: Callable[[list[Pass]], None]) -> None:
        """Worker i runs job(its passes: every len(workers)-th one from the i-th)."""
        for i, worker in enumerate(self.workers):
            mine = self.passes[i::len(self.workers)]
            if mine:
                worker.submit(lambda mine=mine: job(mine))

    def _wait(self) -> None:
        for worker in self.workers:
            worker.wait()

    def start_epoch(self) -> None:
        self._wait()
        for pass_ in self.passes:
            pass_.start_epoch()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One optimizer step of every member on this batch.

        Returns the members' logits (K, B, C) from this step's forward
        (detached) when the group is one pass, as a lone trial always is;
        None for several passes (they may still be running).
        """
        if self._concurrent():
            self._dispatch(lambda mine: step_passes(mine, x, y))
            return None
        logits = step_passes(self.passes, x, y)
        return logits if len(self.passes) == 1 else None

    def train_loss_sums(self) -> dict[int, float]:
        self._wait()
        return {m: t for pass_ in self.passes for m, t in zip(pass_.members, pass_.total.tolist())}

    def evaluate(self, split, classes, plain: set[int] | None = None) -> dict[int, Evaluation]:
        """Every member on `split`, as its config evaluates it (test-time views); the members in `plain` with one
        view. Each member pays for its own views only (cnnlib.passes.evaluate_members)."""
        out, plain = {}, plain or set()

        def evaluate_passes(mine: list[Pass]) -> None:
            for pass_ in mine:
                views = [1 if m in plain else VIEW_COUNTS[self.configs[m].tta] for m in pass_.members]
                out.update(zip(pass_.members, evaluate_members(pass_.evaluated_net(), split, classes, pass_.loss,
                                                               views)))

        self._wait()
        if self._concurrent():
            self._dispatch(evaluate_passes)
            self._wait()
        else:
            evaluate_passes(self.passes)
        return out

    def model(self, member: int) -> nn.Module:
        """The member's weights (its average where it averages) as a fresh model of its architecture."""
        self._wait()
        data = self.data
        for pass_ in self.passes:
            if member in pass_.members:
                with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the caller's RNG
                    fresh = make_model(data.n_classes, self.configs[member], data.image_size, data.device,
                                       self.channels_last)
                return pass_.evaluated_net().to_model(pass_.members.index(member), fresh)
        raise KeyError(member)

    def keep(self, members: set[int]) -> None:
        """Drop every member not in `members` (stopped members stop costing compute)."""
        self._wait()
        for pass_ in self.passes:
            rows = [row for row, m in enumerate(pass_.members) if m in members]
            if not rows:
                pass_.members.clear()
            elif len(rows) != len(pass_.members):
                pass_.select(rows)
        self.passes = [pass_ for pass_ in self.passes if pass_.members]
        self._rebalance()

    def _rebalance(self) -> None:
        """Concurrent passes: re-split the members evenly when stopping left the passes uneven.

        The slowest pass sets a step's time: 6 and 2 members left would take the time of 6.
        Members keep their weights and state (their training goes on as it would have).
        """
        if not self.workers or not self.passes:
            return
        sizes = [len(pass_.members) for pass_ in self.passes]
        total = sum(sizes)
        concurrent = min(len(self.workers), total if self.forced else total // CONCURRENT_MIN_MEMBERS)
        wanted = max(math.ceil(total / self.per_pass), concurrent, 1)
        if len(sizes) == wanted and max(sizes) - min(sizes) <= 1:
            return
        merged = Pass.merged(self.passes)
        bounds = [round(i * total / wanted) for i in range(wanted + 1)]
        self.passes = [merged.take(list(range(a, b))) for a, b in zip(bounds, bounds[1:])]

    def close(self) -> None:
        """Let the pass threads go (the loop calls it when the group is done, or on an error)."""
        workers, self.workers = self.workers, []
        for worker in workers:
            worker.close()
