"""Horizontally fused training: K trial configs stepped as one wide network.

The seed CNN is far too small to fill a device (or even two CPU cores) with
one trial. HFTA (Wang et al., MLSys 2021) trains K copies of a model as one
wider model; this module does that for `SeedCNN`. This module holds the stacked step
only: batch order, augmentation, evaluation and stopping are the one loop's
(cnnlib.training.train_members), the same loop a single trial runs.

- The K members' weights live in one (K, P) tensor, one row per member (P =
  one SeedCNN's parameter count). The forward splits it into per-layer views:
  conv1 becomes one convolution with K x 6 output channels (the input batch is
  shared, so it is read once), conv2 one grouped convolution (groups=K), the
  linear layers batched matmuls. Channels-last, as in the unfused loop.
  `torch.func.vmap` over `functional_call` was measured too and was 4.4x
  slower per member on this CPU (K=16, batch 32, 1 thread): grouped convs it is.
- Pooling comes before ReLU here (the unfused net does ReLU then pool): both
  are monotone so the values are identical, and ReLU and its backward then run
  on a quarter of the elements (~1.2x per step at K=16 on the CPU).
- Each conv's bias is added after its pool, not inside the conv: a bias is
  constant over a pooling window and rounding is monotone, so
  max(a + b, c + b) is max(a, c) + b in floats too, and the values are the
  same bits. The bias gradient then sums the pooled gradient, a quarter of
  conv1's 9.6 MB output gradient at K=16 that oneDNN would read once more.
  (Where a + b and c + b round to one float but a != c, the pool may pass
  the gradient to the other of the two: a rounding-level difference.)
- Each member keeps its own optimizer (SGD with or without Nesterov, Adam,
  AdamW), lr and schedule, momentum, weight decay, loss (class weights,
  logit adjustment, label smoothing), dropout rate and seed. The optimizers
  step the stacked rows (SGD members first, so each kind is one contiguous
  block of rows): on the CPU torch's fused optimizer kernel once per row, on
  a GPU the math of torch.optim's SGD, Adam and AdamW written out on the whole
  block, a handful of launches per step for all members (StackedOptimizer).
  Each member's lr follows its own schedule table (cnnlib.schedules), one
  column per step.
- Members' losses are summed for one backward; the sum's gradient is 1 for
  every member, so members never touch each other's gradients (a member
  going NaN leaves the others untouched).
- A member that stops is cut out of the stacked rows at the end of the
  epoch: it stops costing compute.
- On the CPU a large group runs as several stacked passes of at most 16
  members per batch (MEMBERS_PER_PASS): the batch is still shared, and a
  pass of 16 fits the caches that one of 64 overflows. The passes step at
  the same time, one thread each with one intra-op thread, one pass per
  torch thread, where that measured faster (`concurrent_passes_pay`: batch
  <= 32, no augmentation, 8+ members a pass): 16 members on 2 cores are two
  passes of 8 side by side, re-split evenly when stopping leaves them uneven.

A member's own seed sets its initial weights (the same weights the unfused
run starts from) and its dropout masks. On the CPU the masks are drawn member
by member from a generator that continues the global RNG stream right after
that member's init, which is what the unfused run's dropout draws from: the
same bits. On CUDA the unfused run's dropout is a fused Philox kernel that
cannot be replayed per member, so all masks come from one draw per layer (a
group generator seeded with the first member's seed): statistically the
same, not bitwise.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .config import TrainConfig
from .metrics import Evaluation
from .passes import CONCURRENT_MIN_MEMBERS, _Pass, _PassWorker, _step_passes, concurrent_passes_pay, evaluate_members

# Members per stacked forward/backward pass, by device type (None: all of them).
# On the 2-core CPU a pass of 16 costs 15-20 % less CPU time per member than
# one of 64 (whose 38 MB conv1 activations miss the cache and are fresh pages
# every step); GPUs want the widest pass.
MEMBERS_PER_PASS = {"cpu": 16}
# Trials per fused group when a search does not say (FUSE): as wide as measurably pays.
# 2-core CPU, torch 2.14.1, batch 32 (`make bench --fused-ks`): K=16 trains 2.0-2.6x the
# trial-epochs/s of unfused trials, K=64 no more than K=16. H200 (torch 2.11): K=64 25.6x.
GROUP_SIZE = {"cpu": 16, "cuda": 64}
# Arithmetic of the stacked training step: fp32, or bf16 autocast (AMX-BF16 CPUs, GPUs).
PRECISIONS = ("fp32", "bf16")


class StackedStep:
    """The step of a fused group: its members split over passes that each take every batch.

    The interface the one loop drives (ModuleStep has the same): `members`,
    `start_epoch`, `step`, `train_loss_sums`, `evaluate`, `model`, `keep`,
    `close`.

    On the CPU the passes step at the same time, one thread each with one
    intra-op thread (pass_threads of them; by default torch's thread count
    where `concurrent_passes_pay`, else one pass using every intra-op thread):
    a group of 16 on 2 cores is two passes of 8 side by side rather than one
    pass of 16 whose every op is split over both cores. About a tenth of a
    step is serial (Python, small ops, the dropout draws) and one pass's
    serial part now overlaps the other's kernels. `step` hands the batch to
    the pass threads and returns, so the loop makes the next batch meanwhile;
    the loss sums, evaluation, models and `keep` wait for them. When
    stopping leaves the passes uneven, `keep` re-splits the members evenly
    (`_rebalance`); a pass left alone steps in the caller's thread with all
    its intra-op threads.
    """

    def __init__(self, configs: Sequence[TrainConfig], data, steps_per_epoch: int,
                 make_model: Callable[[TrainConfig], nn.Module], members_per_pass: int | None = None,
                 precision: str = "fp32", graphs: bool = False, pass_threads: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        unsupported = sorted({c.model for c in configs} - {"seed_cnn"})
        if unsupported:
            raise ValueError(f"fused training is written for the seed CNN; model {unsupported[0]!r} trains one at a time")
        per_pass = members_per_pass or MEMBERS_PER_PASS.get(data.device.type) or len(configs)
        if per_pass < 1:
            raise ValueError(f"members_per_pass must be at least 1, got {members_per_pass}")
        if pass_threads is not None and pass_threads < 1:
            raise ValueError(f"pass_threads must be at least 1, got {pass_threads}")
        if data.device.type != "cpu":
            threads = 1
        elif pass_threads is not None:
            threads = pass_threads
        else:
            threads = torch.get_num_threads() if concurrent_passes_pay(configs) else 1
        self.make_model, self.configs, self.per_pass = make_model, list(configs), per_pass
        # Equal-sized passes (K=20 with 16 per pass: 10 + 10, not 16 + 4), at least one per pass thread.
        n_passes = max(math.ceil(len(configs) / per_pass), min(threads, len(configs)))
        bounds = [round(i * len(configs) / n_passes) for i in range(n_passes + 1)]
        self.passes = [_Pass(list(range(a, b)), configs, data, steps_per_epoch, configs[0].seed, precision, graphs)
                       for a, b in zip(bounds, bounds[1:])]
        self.workers = [_PassWorker() for _ in range(min(threads, n_passes))] if threads > 1 and n_passes > 1 else []
        self.forced = pass_threads is not None  # asked for: concurrent whatever the group (tests, A/Bs)

    @property
    def members(self) -> list[int]:
        return sorted(m for group in self.passes for m in group.members)

    def _concurrent(self) -> bool:
        return bool(self.workers) and len(self.passes) > 1

    def _dispatch(self, job: Callable[[list[_Pass]], None]) -> None:
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
        for group in self.passes:
            group.start_epoch()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self._concurrent():
            self._dispatch(lambda mine: _step_passes(mine, x, y))
        else:
            _step_passes(self.passes, x, y)

    def train_loss_sums(self) -> dict[int, float]:
        self._wait()
        return {m: t for group in self.passes for m, t in zip(group.members, group.total.tolist())}

    def evaluate(self, split, classes) -> dict[int, Evaluation]:
        out = {}

        def evaluate_passes(mine: list[_Pass]) -> None:
            for group in mine:
                out.update(zip(group.members, evaluate_members(group.net, split, classes, group.loss)))

        self._wait()
        if self._concurrent():
            self._dispatch(evaluate_passes)
            self._wait()
        else:
            evaluate_passes(self.passes)
        return out

    def model(self, member: int) -> nn.Module:
        self._wait()
        for group in self.passes:
            if member in group.members:
                with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the caller's RNG
                    fresh = self.make_model(self.configs[member])
                return group.net.to_model(group.members.index(member), fresh)
        raise KeyError(member)

    def keep(self, members: set[int]) -> None:
        """Drop every member not in `members` (stopped members stop costing compute)."""
        self._wait()
        for group in self.passes:
            rows = [row for row, m in enumerate(group.members) if m in members]
            if not rows:
                group.members.clear()
            elif len(rows) != len(group.members):
                group.keep(rows)
        self.passes = [group for group in self.passes if group.members]
        self._rebalance()

    def _rebalance(self) -> None:
        """Concurrent passes: re-split the members evenly when stopping left the passes uneven.

        The slowest pass sets a step's time: 6 and 2 members left would take the time of 6.
        Members keep their weights and state (their training goes on as it would have).
        """
        if not self.workers or not self.passes:
            return
        sizes = [len(group.members) for group in self.passes]
        total = sum(sizes)
        concurrent = min(len(self.workers), total if self.forced else total // CONCURRENT_MIN_MEMBERS)
        wanted = max(math.ceil(total / self.per_pass), concurrent, 1)
        if len(sizes) == wanted and max(sizes) - min(sizes) <= 1:
            return
        merged = _Pass.merged(self.passes)
        bounds = [round(i * total / wanted) for i in range(wanted + 1)]
        self.passes = [merged.take(list(range(a, b))) for a, b in zip(bounds, bounds[1:])]

    def close(self) -> None:
        """Let the pass threads go (the loop calls it when the group is done, or on an error)."""
        workers, self.workers = self.workers, []
        for worker in workers:
            worker.close()
