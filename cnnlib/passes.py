"""A pass: members that run one stacked forward/backward together, and the threads that step passes side by side."""

from __future__ import annotations

import copy
import queue
import threading
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .losses import MemberLoss
from .member_dropout import MemberDropout
from .metrics import Evaluation
from .model import SeedCNN
from .stacked_model import EVAL_ACTIVATION_FLOATS, EVAL_ACTIVATION_FLOATS_DEFAULT, LAYOUT, StackedSeedCNN
from .stacked_optimizer import StackedOptimizer


@torch.inference_mode()
def evaluate_members(net: StackedSeedCNN, split, classes, loss: MemberLoss) -> list[Evaluation]:
    """cnnlib.training.evaluate for every member at once (dropout off); split: a DeviceSplit."""
    k, n = net.k, len(classes)
    device = net.flat.device
    numerator = torch.zeros(k, device=device)
    denominator = torch.zeros(k, device=device)
    counts = torch.zeros(k * n * n, dtype=torch.long, device=device)
    offsets = (torch.arange(k, device=device) * n * n).view(-1, 1)
    per_image = net.shapes[0][0] * (split.x.shape[2] - net.shapes[0][2] + 1) * (split.x.shape[3] - net.shapes[0][3] + 1)
    floats = EVAL_ACTIVATION_FLOATS.get(device.type, EVAL_ACTIVATION_FLOATS_DEFAULT)
    chunk = max(1, floats // (k * per_image))
    for start in range(0, len(split), chunk):
        x, y = split.x[start:start + chunk], split.y[start:start + chunk]
        logits = net(x)
        num, den = loss.sums(logits, y)
        numerator += num
        denominator += den
        counts += torch.bincount((offsets + y * n + logits.argmax(2)).reshape(-1), minlength=k * n * n)
    losses = (numerator / denominator).tolist() if len(split) else [float("nan")] * k
    matrices = counts.view(k, n, n).cpu().numpy()
    return [Evaluation(tuple(classes), matrices[row].copy(), losses[row]) for row in range(k)]



# Eager steps before a pass captures its CUDA graph (torch.cuda.graphs' whole-network example warms up 3).
GRAPH_WARMUP_STEPS = 3


def can_capture(device: torch.device, dropout: "MemberDropout") -> bool:
    """CUDA graphs need CUDA, and dropout's generator must be one a graph can carry (register_generator_state)."""
    if device.type != "cuda":
        return False  # the CPU fallback: the same eager step
    return not dropout.active or (not dropout.exact and hasattr(torch.cuda.CUDAGraph, "register_generator_state"))


def _init_member(config: TrainConfig, n_classes: int, image_size: int) -> tuple[SeedCNN, torch.Tensor]:
    """The initial weights the unfused run starts from, and the RNG state its dropout then draws from."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(config.seed)  # what torch.manual_seed does on the CPU
        model = SeedCNN(n_classes, config.dropout, image_size)
        return model, torch.get_rng_state()


class _Pass:
    """Members that run one stacked forward/backward together: network, optimizer, dropout, loss.

    graphs (CUDA only): after GRAPH_WARMUP_STEPS eager steps, capture one
    whole step (forward, backward, optimizer) as a CUDA graph and replay it
    for every later full batch: one launch a step instead of a few hundred,
    and no Python in between. The batch is copied into the graph's static
    input; a short last batch runs eagerly; a member leaving re-captures.
    """

    def __init__(self, members: list[int], configs: Sequence[TrainConfig], data, steps_per_epoch: int,
                 group_seed: int, precision: str = "fp32", graphs: bool = False):
        # Rows: SGD members first (stable), so each optimizer kind is one block of rows.
        self.members = sorted(members, key=lambda i: configs[i].optimizer != "sgd")
        chosen = [configs[i] for i in self.members]
        inits = [_init_member(c, data.n_classes, data.image_size) for c in chosen]
        self.net = StackedSeedCNN.from_models([model for model, _ in inits], data.device)
        self.optimizer = StackedOptimizer(chosen, self.net.flat.shape[1], data.device, steps_per_epoch)
        self.widths = [self.net.shapes[LAYOUT.index(name)][1] for name in ("classifier.1.weight", "classifier.4.weight")]
        # Exact masks are drawn an epoch ahead: every train image passes each dropout layer once an epoch.
        self.dropout = MemberDropout([c.dropout for c in chosen], [state for _, state in inits], group_seed,
                                     data.device, ahead=len(data.train.y) * sum(self.widths))
        self.loss = MemberLoss(chosen, data.train.y, data.n_classes)
        self.total = None
        self.graphs = graphs and can_capture(data.device, self.dropout)
        # A captured graph must not hold autocast's cached weight casts from outside it.
        self.autocast = dict(device_type=data.device.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                             cache_enabled=not self.graphs)
        self.graph, self.side, self.full_batch, self.eager_steps = None, None, 0, 0

    def start_epoch(self) -> None:
        # The graph adds into this very tensor: zero it in place while the members stay the same.
        if self.total is None or self.total.shape[0] != len(self.members):
            self.total = torch.zeros(len(self.members), device=self.net.flat.device)
        else:
            self.total.zero_()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.graphs:
            return self.eager_step(x, y)
        self.full_batch = self.full_batch or x.shape[0]  # an epoch's first batch is a full one
        full = x.shape[0] == self.full_batch
        if full and self.graph is not None:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
        elif full and self.eager_steps >= GRAPH_WARMUP_STEPS:
            self.capture(x, y)
        else:
            # Warm-up on a side stream, as torch.cuda.graphs asks: lazy initialisations
            # (cuBLAS handles, autograd's streams) must not happen during capture.
            self.side = self.side or torch.cuda.Stream(self.net.flat.device)
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.eager_step(x, y)
            torch.cuda.current_stream().wait_stream(self.side)
            self.eager_steps += 1

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Record one step on static copies of this batch, then replay it: capturing runs nothing."""
        self.static_x, self.static_y = x.clone(), y.clone()
        self.net.flat.grad = None  # backward then writes the graph's own gradient buffer, replay after replay
        graph = torch.cuda.CUDAGraph()
        if self.dropout.active:
            graph.register_generator_state(self.dropout.generator)
        with torch.cuda.graph(graph):
            self.eager_step(self.static_x, self.static_y)
        self.graph = graph
        graph.replay()

    def eager_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # bf16: convolutions and matmuls in bfloat16 (fp32 weights stay the optimizer's master copy);
        # the loss and its softmax in fp32.
        with torch.autocast(**self.autocast):
            logits = self.net(x, self.dropout.masks(x.shape[0], self.widths))
        losses = self.loss(logits.float(), y)
        self.net.flat.grad = None
        losses.sum().backward()  # d(sum)/d(loss_k) = 1: each member gets exactly its own gradient
        self.optimizer.step(self.net.flat, self.net.flat.grad)
        self.total += losses.detach() * x.shape[0]

    def keep(self, rows: list[int]) -> None:
        rows = sorted(rows)  # rows stay SGD-first
        self.graph = None  # it points at the old rows; the next full batch captures again (no warm-up needed)
        self.net.select(rows)
        self.optimizer.select(rows)
        self.dropout.select(rows)
        self.loss.select(rows)
        self.members = [self.members[row] for row in rows]

    def take(self, rows: list[int]) -> "_Pass":
        """A new pass of these rows, with their weights and state; this one is left as it was."""
        other = copy.copy(self)
        for name in ("net", "optimizer", "dropout", "loss"):
            setattr(other, name, copy.copy(getattr(self, name)))  # select() replaces what it changes
        # Stepped in place every step: each pass its own.
        other.optimizer.adam_step = self.optimizer.adam_step.clone()
        other.optimizer.step_index = self.optimizer.step_index.clone()
        other.members, other.total, other.graph, other.side = list(self.members), None, None, None
        other.keep(rows)
        return other

    @staticmethod
    def merged(passes: list["_Pass"]) -> "_Pass":
        """One pass holding every member of these (between epochs, on the CPU): rows and state, SGD rows first."""
        first = passes[0]
        if not all(g.dropout.exact for g in passes) or any(g.graphs for g in passes):
            raise ValueError("only the CPU's passes (exact dropout, no CUDA graphs) can be merged")
        splits = [g.optimizer.n_sgd for g in passes]

        def rows(get):  # every pass's per-member rows, the SGD members of all passes first
            parts = [get(g) for g in passes]
            return [part[:s] for part, s in zip(parts, splits)] + [part[s:] for part, s in zip(parts, splits)]

        def cat(get):
            return torch.cat(rows(get))

        def join(get):
            return [item for part in rows(get) for item in part]

        out = first.take(list(range(len(first.members))))
        out.members = join(lambda g: g.members)
        out.net.flat = cat(lambda g: g.net.flat.detach()).requires_grad_(True)
        optimizer = out.optimizer
        width = max(g.optimizer.lr64.shape[1] for g in passes)  # each pass's table spans its own longest member
        optimizer.lr64 = cat(lambda g: F.pad(g.optimizer.lr64, (0, width - g.optimizer.lr64.shape[1])))
        optimizer.lr32 = optimizer.lr64.float()
        for name in ("coupled_decay", "decoupled_decay", "momentum", "nesterov"):
            setattr(optimizer, name, cat(lambda g, name=name: getattr(g.optimizer, name)))
        for name in ("any_coupled", "any_decoupled", "any_nesterov"):
            setattr(optimizer, name, any(getattr(g.optimizer, name) for g in passes))
        optimizer.configs = join(lambda g: g.optimizer.configs)
        optimizer.n_sgd = sum(splits)
        for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):  # SGD-only and Adam-only rows already
            setattr(optimizer, name, torch.cat([getattr(g.optimizer, name) for g in passes]))
        dropout = out.dropout
        dropout.rates = join(lambda g: g.dropout.rates)
        dropout.generators = join(lambda g: g.dropout.generators)
        dropout.drawn = cat(lambda g: g.dropout.drawn)
        dropout.scale = dropout._scale()
        loss = out.loss
        loss.weight = cat(lambda g: g.loss.weight)
        if any(g.loss.offset is not None for g in passes):  # None: every member's offsets are zero
            loss.offset = cat(lambda g: torch.zeros_like(g.loss.weight) if g.loss.offset is None else g.loss.offset)
        if any(g.loss.smoothing is not None for g in passes):
            loss.smoothing = cat(lambda g: torch.zeros(len(g.members), device=g.loss.weight.device)
                                 if g.loss.smoothing is None else g.loss.smoothing)
        return out


class _PassWorker:
    """A thread that runs the jobs given to it in order, with one intra-op thread (see StackedStep).

    A job that raises is kept: later jobs are skipped (they would step a
    network in an unknown state) and `wait` raises it in the caller's thread.
    After `close` the jobs still queued are skipped too (the loop stopped:
    an error or an interrupt between two batches).
    """

    def __init__(self):
        # Unbounded: the loop makes a whole epoch's batches (at most one copy of the train split) and
        # then waits. Bounded at 4, the loop woke up for every batch and its OpenMP threads spun after
        # each index_select, on the cores the passes run on: 0.92x the one-pass step instead of 1.11x.
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
# augmentation (the loop's batched crop/flip/jitter then competes with the pass threads for the
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
    augmented = first.crop or first.flip or first.jitter
    return (threads > 1 and not augmented and first.batch_size <= CONCURRENT_MAX_BATCH
            and len(configs) >= threads * CONCURRENT_MIN_MEMBERS)


def _step_passes(passes: list["_Pass"], x: torch.Tensor, y: torch.Tensor) -> None:
    for group in passes:
        group.step(x, y)

