"""A pass: members that run one stacked forward/backward together, and the threads that step passes side by side.

A pass holds its members' network (cnnlib.stacked_model), optimizer
(cnnlib.stacked_optimizer), dropout (cnnlib.member_dropout) and loss
(cnnlib.losses.MemberLoss), each with one row per member, and steps them
together: one forward for all members on the shared batch, the members'
losses summed for one backward (the sum's gradient is 1 for every member, so
members never touch each other's gradients, and a member going NaN leaves
the others untouched), one optimizer step over the rows.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Callable, Sequence

import torch

from .config import TrainConfig
from .losses import MemberLoss
from .member_dropout import MemberDropout
from .metrics import Evaluation
from .stacked_model import CHANNELS_LAST, stack_members
from .stacked_optimizer import StackedOptimizer
from .tta import log_mean_softmax
from .weight_average import WeightAverage


@torch.inference_mode()
def evaluate_members(net, split, classes, loss: MemberLoss, views: list[int] | None = None) -> list[Evaluation]:
    """cnnlib.training.evaluate for every member of a pass at once (dropout off); split: a DeviceSplit.

    views: each member's test-time augmentation views (cnnlib.tta.VIEW_COUNTS); None: one each.
    Members with different counts are evaluated as sub-passes, one per count, so each pays for
    its own views only: a plain member beside one with ten views costs one forward, not ten.
    """
    views = views or [1] * net.k
    if len(set(views)) > 1:
        return _evaluate_by_view_count(net, split, classes, loss, views)
    k, n = net.k, len(classes)
    device = net.flat.device
    numerator = torch.zeros(k, device=device)
    denominator = torch.zeros(k, device=device)
    counts = torch.zeros(k * n * n, dtype=torch.long, device=device)
    offsets = (torch.arange(k, device=device) * n * n).view(-1, 1)
    chunk = net.eval_chunk(split.x)
    net.train(False)
    try:
        for start in range(0, len(split), chunk):
            x, y = split.x[start:start + chunk], split.y[start:start + chunk]
            logits = log_mean_softmax(net, x, views[0])
            num, den = loss.sums(logits, y)
            numerator += num
            denominator += den
            counts += torch.bincount((offsets + y * n + logits.argmax(2)).reshape(-1), minlength=k * n * n)
    finally:
        net.train(True)
    losses = (numerator / denominator).tolist() if len(split) else [float("nan")] * k
    matrices = counts.view(k, n, n).cpu().numpy()
    return [Evaluation(tuple(classes), matrices[row].copy(), losses[row]) for row in range(k)]


def _evaluate_by_view_count(net, split, classes, loss: MemberLoss, views: list[int]) -> list[Evaluation]:
    out: list[Evaluation | None] = [None] * len(views)
    for count in sorted(set(views)):
        rows = [row for row, v in enumerate(views) if v == count]
        sub_net, sub_loss = copy.copy(net), copy.copy(loss)  # select() replaces their tensors, not these
        sub_net.select(rows)
        sub_loss.select(rows)
        for row, evaluation in zip(rows, evaluate_members(sub_net, split, classes, sub_loss, [count] * len(rows))):
            out[row] = evaluation
    return out


# Eager steps before a pass captures its CUDA graph (torch.cuda.graphs' whole-network example warms up 3).
GRAPH_WARMUP_STEPS = 3


def can_capture(device: torch.device, dropout: "MemberDropout") -> bool:
    """CUDA graphs need CUDA, and dropout's generator must be one a graph can carry (register_generator_state)."""
    if device.type != "cuda":
        return False  # the CPU fallback: the same eager step
    return not dropout.active or (not dropout.exact and hasattr(torch.cuda.CUDAGraph, "register_generator_state"))


class Pass:
    """Members that run one stacked forward/backward together: network, optimizer, dropout, loss.

    graphs (CUDA only): after GRAPH_WARMUP_STEPS eager steps, capture one
    whole step (forward, backward, optimizer) as a CUDA graph and replay it
    for every later full batch: one launch a step instead of a few hundred,
    and no Python in between. The batch is copied into the graph's static
    input; a short last batch runs eagerly; a member leaving re-captures.
    """

    # What holds a row per member: `select` and `merged` carry every one of them.
    PARTS = ("net", "optimizer", "dropout", "loss")

    def __init__(self, members: list[int], configs: Sequence[TrainConfig], data, steps_per_epoch: int,
                 group_seed: int, precision: str = "fp32", graphs: bool = False, optimizer_kernels: str | None = None,
                 channels_last: bool = CHANNELS_LAST):
        # Rows: SGD members first (stable), so each optimizer kind is one block of rows.
        self.members = sorted(members, key=lambda i: configs[i].optimizer != "sgd")
        chosen = [configs[i] for i in self.members]
        self.net, rng_states = stack_members(chosen, data.n_classes, data.image_size, data.device, channels_last)
        self.optimizer = StackedOptimizer(chosen, self.net.flat.shape[1], data.device, steps_per_epoch,
                                          optimizer_kernels)
        self.widths = self.net.dropout_widths
        # A network without dropout widths applies its module's own dropout layers: no masks to draw.
        rates = [c.dropout for c in chosen] if self.widths else [0.0] * len(chosen)
        # Exact masks are drawn an epoch ahead: every train image passes each dropout layer once an epoch.
        self.dropout = MemberDropout(rates, rng_states, group_seed, data.device,
                                     ahead=len(data.train.y) * sum(self.widths))
        self.loss = MemberLoss(chosen, data.train.y, data.n_classes)
        # Averaged weights when any member of the group averages (every pass then has them, so passes merge);
        # None keeps a group without averaging exactly what it was.
        self.average = WeightAverage([c.ema for c in chosen], self.net.flat) if any(c.ema for c in configs) else None
        self.total = None
        self.graphs = graphs and can_capture(data.device, self.dropout)
        # A captured graph must not hold autocast's cached weight casts from outside it.
        self.autocast = dict(device_type=data.device.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                             cache_enabled=not self.graphs)
        self.graph, self.side, self.full_batch, self.eager_steps = None, None, 0, 0
        self.static_logits = None

    def start_epoch(self) -> None:
        # The graph adds into this very tensor: zero it in place while the members stay the same.
        if self.total is None or self.total.shape[0] != len(self.members):
            self.total = torch.zeros(len(self.members), device=self.net.flat.device)
        else:
            self.total.zero_()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step of every member on this batch; returns the members' logits (K, B, C) from its forward (detached)."""
        if not self.graphs:
            return self.eager_step(x, y)
        self.full_batch = self.full_batch or x.shape[0]  # an epoch's first batch is a full one
        full = x.shape[0] == self.full_batch
        if full and self.graph is not None:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            return self.static_logits
        if full and self.eager_steps >= GRAPH_WARMUP_STEPS:
            return self.capture(x, y)
        else:
            # Warm-up on a side stream, as torch.cuda.graphs asks: lazy initialisations
            # (cuBLAS handles, autograd's streams) must not happen during capture.
            self.side = self.side or torch.cuda.Stream(self.net.flat.device)
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                logits = self.eager_step(x, y)
            torch.cuda.current_stream().wait_stream(self.side)
            self.eager_steps += 1
            return logits

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Record one step on static copies of this batch, then replay it: capturing runs nothing."""
        self.static_x, self.static_y = x.clone(), y.clone()
        self.net.flat.grad = None  # backward then writes the graph's own gradient buffer, replay after replay
        graph = torch.cuda.CUDAGraph()
        if self.dropout.active:
            graph.register_generator_state(self.dropout.generator)
        with torch.cuda.graph(graph):
            self.static_logits = self.eager_step(self.static_x, self.static_y)
        self.graph = graph
        graph.replay()
        return self.static_logits

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # bf16: convolutions and matmuls in bfloat16 (fp32 weights stay the optimizer's master copy);
        # the loss and its softmax in fp32.
        with torch.autocast(**self.autocast):
            logits = self.net(x, self.dropout.masks(x.shape[0], self.widths))
        losses = self.loss(logits.float(), y)
        self.net.flat.grad = None
        losses.sum().backward()  # d(sum)/d(loss_k) = 1: each member gets exactly its own gradient
        self.optimizer.step(self.net.flat, self.net.flat.grad)
        if self.average is not None:
            self.average.update(self.net.flat)
        self.total += losses.detach() * x.shape[0]
        return logits.detach()

    def select(self, rows: list[int]) -> None:
        """Keep only these rows' members, in this order (SGD rows first); a stopped member stops costing compute."""
        self.graph = None  # it points at the old rows; the next full batch captures again (no warm-up needed)
        for name in self.PARTS:
            getattr(self, name).select(rows)
        if self.average is not None:
            self.average.select(rows)
        self.members = [self.members[row] for row in rows]

    def evaluated_net(self):
        """The network that evaluation and the checkpoint see: the members' averaged weights where they average."""
        if self.average is None:
            return self.net
        net = copy.copy(self.net)
        net.flat = self.average.average
        return net

    def take(self, rows: list[int]) -> "Pass":
        """A new pass of these rows, with their weights and state; this one is left as it was."""
        other = copy.copy(self)
        for name in self.PARTS:
            setattr(other, name, copy.copy(getattr(self, name)))  # select() replaces what it changes
        # Stepped in place every step: each pass its own.
        other.optimizer.adam_step = self.optimizer.adam_step.clone()
        other.optimizer.step_index = self.optimizer.step_index.clone()
        other.average = None if self.average is None else self.average.copy()
        other.members, other.total, other.graph, other.side = list(self.members), None, None, None
        other.select(rows)
        return other

    @staticmethod
    def merged(passes: list["Pass"]) -> "Pass":
        """One pass holding every member of these (between epochs, on the CPU): rows and state, SGD rows first."""
        if any(p.graphs for p in passes):
            raise ValueError("passes that replay CUDA graphs cannot be merged")
        out = passes[0].take(list(range(len(passes[0].members))))
        for name in Pass.PARTS:
            parts = [getattr(p, name) for p in passes]
            setattr(out, name, type(parts[0]).concat(parts))
        if out.average is not None:  # every pass of a group averages, or none does
            out.average = WeightAverage.concat([p.average for p in passes])
        out.members = [m for p in passes for m in p.members]
        configs = out.optimizer.configs
        out.select(sorted(range(len(configs)), key=lambda row: configs[row].optimizer != "sgd"))
        return out


class PassWorker:
    """A thread that runs the jobs given to it in order, with one intra-op thread (see StackedStep).

    A job that raises is kept: later jobs are skipped (they would step a
    network in an unknown state) and `wait` raises it in the caller's thread.
    After `close` the jobs still queued are skipped too (the loop stopped:
    an error or an interrupt between two batches).
    """

    def __init__(self):
        # Unbounded: the loop makes a whole epoch's batches (at most one copy of the train split) and
        # then waits. Bounded at 4, the loop wakes up for every batch and its OpenMP threads spin after
        # each index_select, on the cores the passes run on: 0.92x the one-pass step against 1.11x
        # unbounded (2-core CPU, torch 2.14.1, K=16, batch 32, one run).
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="fused-pass", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # This thread's own OpenMP and MKL thread counts (the caller's stay as they are).
        torch.set_num_threads(1)
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None and not self.closed:
                    job()
            except BaseException as error:  # noqa: BLE001 - handed to the caller by wait()
                self.error = error
            finally:
                self.jobs.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.put(job)

    def wait(self) -> None:
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        self.closed = True
        self.jobs.put(None)


# Concurrent passes pay where a step's serial part is a large share of it: small batches, no
# augmentation (the loop's batched crop/flip/jitter/cutout then competes with the pass threads for the
# cores), enough members per pass. Whole fused epochs, real data, one process, one pass (2
# intra-op threads) and concurrent passes alternating, 2-core CPU, torch 2.14.1, median paired
# ratio: K=16 batch 32 1.19x (1.11x in another run), with crop 4 + flip 1.01x; batch 64 1.03x,
# with crop + flip 0.98x; K=4 batch 64 with crop + flip 0.82x. By default a group's passes step
# at the same time only where the first row holds: no augmentation, batch <= 32, 8 or more
# members per pass (and `keep` merges them back into one pass below that).
CONCURRENT_MAX_BATCH = 32
CONCURRENT_MIN_MEMBERS = 8


def concurrent_passes_pay(configs: Sequence[TrainConfig]) -> bool:
    """The measured case (see CONCURRENT_MAX_BATCH): members share batch size and augmentation."""
    first = configs[0]
    threads = torch.get_num_threads()
    augmented = first.augments
    return (threads > 1 and not augmented and first.batch_size <= CONCURRENT_MAX_BATCH
            and len(configs) >= threads * CONCURRENT_MIN_MEMBERS)


def step_passes(passes: list[Pass], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Step each pass on this batch; returns the last pass's logits."""
    for pass_ in passes:
        logits = pass_.step(x, y)
    return logits

