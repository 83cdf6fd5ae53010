"""Horizontally fused training: K trial configs stepped as one wide network.

The seed CNN is far too small to fill a device (or even two CPU cores) with
one trial. HFTA (Wang et al., MLSys 2021) trains K copies of a model as one
wider model; this module does that for `SeedCNN`. It holds the stacked step
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

import copy
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .losses import loss_sums, loss_terms
from .metrics import Evaluation
from .model import SeedCNN
from .schedules import lr_factors

# torch.optim.Adam's defaults, which make_optimizer uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Dev evaluation runs in chunks so that the widest activation (conv1's K x 6
# channels) stays under this many floats, by device type: K=64 would need 750 MB
# for the 625 dev images at once. On the CPU a chunk whose activations stay
# within a few caches' worth is faster: 2-core CPU, torch 2.14.1, K=16, the 625
# dev images, 2 threads, medians of 9 alternating runs: 246 ms in chunks of 445
# images (1 << 25 floats), 139 ms in chunks of 111 (1 << 23), 145-152 ms for 48-89.
EVAL_ACTIVATION_FLOATS = {"cpu": 1 << 23}
EVAL_ACTIVATION_FLOATS_DEFAULT = 1 << 25  # 128 MiB
# Members per stacked forward/backward pass, by device type (None: all of them).
# On the 2-core CPU a pass of 16 costs 15-20 % less CPU time per member than
# one of 64 (whose 38 MB conv1 activations miss the cache and are fresh pages
# every step); GPUs want the widest pass.
MEMBERS_PER_PASS = {"cpu": 16}
# Trials per fused group when a search does not say (FUSE): as wide as measurably pays.
# 2-core CPU, torch 2.14.1, batch 32 (`make bench --fused-ks`): K=16 trains 2.0-2.6x the
# trial-epochs/s of unfused trials, K=64 no more than K=16. H200 (torch 2.11): K=64 25.6x.
GROUP_SIZE = {"cpu": 16, "cuda": 64}
CHANNELS_LAST = torch.channels_last
# Arithmetic of the stacked training step: fp32, or bf16 autocast (AMX-BF16 CPUs, GPUs).
PRECISIONS = ("fp32", "bf16")
# SeedCNN's parameters in `parameters()` order; the fused forward is written
# against exactly this layout.
LAYOUT = ("features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
          "classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias",
          "classifier.7.weight", "classifier.7.bias")
# Linear weights are stored transposed, (in, out): the batched matmuls then read
# them as they are and their gradients arrive in the stored layout (no copies).
TRANSPOSED = frozenset({"classifier.1.weight", "classifier.4.weight", "classifier.7.weight"})


# --- the stacked network --------------------------------------------------------

class StackedSeedCNN:
    """K SeedCNNs as one network; `flat` (K, P) holds member k's parameters in row k.

    `flat` is the only leaf: the forward splits it into per-layer views, whose
    backward is a single concatenation into one (K, P) gradient, the layout
    the optimizer updates in a few whole-block operations. A row holds the
    member's parameters in LAYOUT order, linear weights transposed.
    """

    def __init__(self, flat: torch.Tensor, shapes: list[torch.Size], mean: torch.Tensor, std: torch.Tensor):
        self.flat = flat.detach().requires_grad_(True)
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.mean, self.std = mean, std

    @classmethod
    def from_models(cls, models: Sequence[SeedCNN], device) -> "StackedSeedCNN":
        names = tuple(name for name, _ in models[0].named_parameters())
        if names != LAYOUT:
            raise NotImplementedError(f"fused training is written for SeedCNN's layers {LAYOUT}, "
                                      f"but cnnlib.model.SeedCNN now has {names}")
        shapes = [p.shape[::-1] if name in TRANSPOSED else p.shape for name, p in models[0].named_parameters()]
        flat = torch.stack([torch.cat([(p.t() if name in TRANSPOSED else p).detach().reshape(-1)
                                       for name, p in m.named_parameters()]) for m in models])
        return cls(flat.to(device), shapes, models[0].mean.to(device), models[0].std.to(device))

    @property
    def k(self) -> int:
        return self.flat.shape[0]

    def weights(self) -> list[torch.Tensor]:
        return [piece.view(self.k, *shape) for piece, shape in zip(self.flat.split(self.sizes, 1), self.shapes)]

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1], shared by all members -> logits (K, B, n_classes).

        masks: the two dropout layers' (K, B, width) multipliers, or None (eval / no dropout).
        """
        k, b = self.k, x.shape[0]
        w1, b1, w2, b2, f1, c1, f2, c2, f3, c3 = self.weights()
        h = (x - self.mean) / self.std
        # Channels-last weights make oneDNN run channels-last whatever the batch's layout
        # (index_select hands back NCHW): pooling 10x and the whole step 2.4x faster on the CPU (K=16).
        # Each conv's bias is added after its pool (see the module docstring): the same values.
        h = F.conv2d(h, w1.reshape(-1, *w1.shape[2:]).contiguous(memory_format=CHANNELS_LAST))
        h = F.relu_(F.max_pool2d(h, 2) + b1.reshape(1, -1, 1, 1))
        h = F.conv2d(h, w2.reshape(-1, *w2.shape[2:]).contiguous(memory_format=CHANNELS_LAST), groups=k)
        h = F.relu_(F.max_pool2d(h, 2) + b2.reshape(1, -1, 1, 1))
        # (B, K*16, s, s) -> (K, B, 16*s*s): member k's features in nn.Flatten's (c, y, x) order.
        h = h.reshape(b, k, -1).transpose(0, 1)
        h = F.relu(torch.baddbmm(c1.unsqueeze(1), h, f1))
        if masks is not None:
            h = h * masks[0]
        h = F.relu(torch.baddbmm(c2.unsqueeze(1), h, f2))
        if masks is not None:
            h = h * masks[1]
        return torch.baddbmm(c3.unsqueeze(1), h, f3)

    def __call__(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self.forward(x, masks)

    def select(self, rows: list[int]) -> None:
        """Keep only these members (a stopped member stops costing compute)."""
        index = torch.tensor(rows, device=self.flat.device)
        self.flat = self.flat.detach().index_select(0, index).requires_grad_(True)

    def to_model(self, row: int, model: SeedCNN) -> SeedCNN:
        """Copy member `row`'s weights into `model` (a fresh SeedCNN in the unfused layout) and return it."""
        with torch.no_grad():
            for (name, param), piece, shape in zip(model.named_parameters(), self.flat[row].split(self.sizes),
                                                   self.shapes):
                piece = piece.view(shape)
                param.copy_(piece.t() if name in TRANSPOSED else piece)
        return model


# --- per-member optimizers on stacked rows ---------------------------------------

# How the stacked optimizer steps its rows, by device type: "rows" runs torch's own fused
# optimizer kernel once per member; "block" runs each formula once over all rows (a
# handful of launches per step whatever K: what a launch-bound GPU wants; measured on the
# H200 at K=64 with torch 2.11, 46 trial-epochs/s). 2-core CPU, torch 2.14.1, K=16, batch
# 32, 2 threads, one process, alternating: the optimizer alone 5.2 ms a step (block) against
# 0.55-0.85 ms (rows); a whole fused epoch, dev evaluation included, 4.24 against 3.77 s
# (1.13x, median of 7 epochs each).
OPTIMIZER_KERNELS = {"cpu": "rows"}


class StackedOptimizer:
    """SGD (Nesterov or not), Adam and AdamW with per-row settings on (K, P) rows; SGD rows come first.

    kernels "rows" (the CPU's): each row is stepped by torch's fused optimizer
    kernel (`_fused_sgd_`, `_fused_adam_`, `_fused_adamw_`: what torch.optim
    runs with fused=True, as the unfused loop does) on views of the stacked
    rows, with that member's lr, momentum, Nesterov flag and weight decay:
    one pass over its row instead of one per formula. kernels "block" (other
    devices): the same math written out on the whole block, per-row settings
    as columns, operation by operation as torch.optim's foreach Adam and SGD.
    Differences between the two and torch.optim are rounding-level
    (tests/test_fused.py states the tolerance). `lr_table[k, s]` is member
    k's lr at step s (its lr times its schedule's factor), so the lr costs one
    column gather per step.

    The step count lives on the device (`step_index`, and the float copy
    the Adam kernels read), and so does everything computed from it (the lr column, Adam's
    bias corrections): a step reads no Python number that changes between
    steps, so a CUDA graph captured once replays every later step as it is
    (_Pass.capture).
    """

    def __init__(self, configs: Sequence[TrainConfig], n_params: int, device, steps_per_epoch: int = 1,
                 kernels: str | None = None):
        kinds = [c.optimizer for c in configs]
        self.n_sgd = kinds.count("sgd")
        if kinds != sorted(kinds, key=lambda kind: kind != "sgd"):
            raise ValueError(f"SGD members must come first, got {kinds}")
        device = torch.device(device)
        self.kernels = kernels or OPTIMIZER_KERNELS.get(device.type, "block")
        if self.kernels not in ("rows", "block"):
            raise ValueError(f"kernels must be 'rows' or 'block', got {self.kernels!r}")

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)

        total = [c.epochs * steps_per_epoch for c in configs]
        width = max(total)
        table = torch.stack([F.pad(lr_factors(c, n) * c.lr, (0, width - n), value=0.0) for c, n in zip(configs, total)])
        self.lr64 = table.to(device)  # the kernels and Adam's step size take the lr in double, as torch.optim does
        self.lr32 = self.lr64.float()
        self.configs = list(configs)
        # L2 (added to the gradient) for SGD and Adam; decoupled (p *= 1 - lr * wd) for AdamW.
        self.coupled_decay = column([0.0 if c.optimizer == "adamw" else c.weight_decay for c in configs])
        self.decoupled_decay = column([c.weight_decay if c.optimizer == "adamw" else 0.0 for c in configs],
                                      torch.float64)
        self.any_coupled = any(c.weight_decay and c.optimizer != "adamw" for c in configs)
        self.any_decoupled = any(c.weight_decay and c.optimizer == "adamw" for c in configs)
        self.momentum = column([c.momentum for c in configs])
        self.nesterov = column([c.optimizer == "sgd" and c.nesterov for c in configs], torch.bool)
        self.any_nesterov = any(c.optimizer == "sgd" and c.nesterov for c in configs)
        n_adam = len(configs) - self.n_sgd
        # Zero momentum buffers: the first step's buf = momentum * 0 + grad is torch.optim's buf = grad.
        self.momentum_buffer = torch.zeros(self.n_sgd, n_params, device=device)
        self.exp_avg = torch.zeros(n_adam, n_params, device=device)
        self.exp_avg_sq = torch.zeros(n_adam, n_params, device=device)
        # Adam's step count for the kernels (float, as torch.optim keeps it): members step together, so one.
        self.adam_step = torch.zeros((), device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # steps taken so far

    @torch.no_grad()
    def step(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        if self.kernels == "rows":
            self._step_rows(params, grads)
        else:
            self._step_block(params, grads)

    def _step_rows(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        lrs = self.lr64.index_select(1, self.step_index).view(-1).unbind(0)
        self.step_index += 1
        self.adam_step += 1  # torch.optim advances the count before the kernel reads it
        s = self.n_sgd
        # Rows as views, one unbind per tensor: K selects each cost more than the small kernels they feed.
        rows = zip(self.configs, params.unbind(0), grads.unbind(0), lrs)
        momenta, exp_avgs, exp_avg_sqs = self.momentum_buffer.unbind(0), self.exp_avg.unbind(0), self.exp_avg_sq.unbind(0)
        for row, (c, param, grad, lr) in enumerate(rows):
            if row < s:
                buffers = [momenta[row]] if c.momentum else []  # the kernel wants none without momentum
                torch._fused_sgd_([param], [grad], buffers, weight_decay=c.weight_decay, momentum=c.momentum, lr=lr,
                                  dampening=0.0, nesterov=c.nesterov, maximize=False, is_first_step=False)
            else:
                kernel = torch._fused_adamw_ if c.optimizer == "adamw" else torch._fused_adam_
                kernel([param], [grad], [exp_avgs[row - s]], [exp_avg_sqs[row - s]], [], [self.adam_step], lr=lr,
                       beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], weight_decay=c.weight_decay, eps=ADAM_EPS,
                       amsgrad=False, maximize=False)

    def _step_block(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        lr32, lr64 = self.lr32.index_select(1, self.step_index), self.lr64.index_select(1, self.step_index)
        self.step_index += 1
        s = self.n_sgd
        if self.any_coupled:
            grads = torch.addcmul(grads, params, self.coupled_decay)  # L2: grad + wd * p
        if s:
            # torch.optim.SGD: buf = momentum * buf + grad (buf starts as grad: 0 * m + g == g);
            # Nesterov steps along grad + momentum * buf, plain SGD along buf.
            g = grads[:s]
            self.momentum_buffer.mul_(self.momentum[:s]).add_(g)
            direction = self.momentum_buffer
            if self.any_nesterov:
                direction = torch.where(self.nesterov[:s], torch.addcmul(g, self.momentum_buffer, self.momentum[:s]),
                                        self.momentum_buffer)
            params[:s].addcmul_(direction, lr32[:s], value=-1)
        if s < params.shape[0]:
            beta1, beta2 = ADAM_BETAS
            g = grads[s:]
            if self.any_decoupled:  # torch.optim.AdamW: p *= 1 - lr * wd, before the moments
                params[s:].mul_((1 - lr64[s:] * self.decoupled_decay[s:]).float())
            self.exp_avg.lerp_(g, 1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            steps = self.step_index.double()  # float64, as torch.optim's Python-float bias corrections
            bias_correction1 = 1 - beta1 ** steps
            bias_correction2_sqrt = (1 - beta2 ** steps).sqrt_()
            step_size = (lr64[s:] / bias_correction1).neg_().float()
            denom = self.exp_avg_sq.sqrt().div_(bias_correction2_sqrt.float()).add_(ADAM_EPS)
            params[s:].add_(self.exp_avg.mul(step_size).div_(denom))  # addcdiv's (value * m) / denom

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.lr32.device)
        sgd = [r for r in rows if r < self.n_sgd]
        adam = [r - self.n_sgd for r in rows if r >= self.n_sgd]
        self.momentum_buffer = self.momentum_buffer[sgd]
        self.exp_avg, self.exp_avg_sq = self.exp_avg[adam], self.exp_avg_sq[adam]
        for name in ("lr32", "lr64", "coupled_decay", "decoupled_decay", "momentum", "nesterov"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.configs = [self.configs[r] for r in rows]
        self.n_sgd = len(sgd)


# --- dropout and loss -------------------------------------------------------------

class MemberDropout:
    """Each member's dropout masks, as multipliers (mask / keep) for the stacked activations.

    exact (the default on the CPU): member by member from generators holding
    `rng_states` (CPU RNG states), bit for bit the masks of the unfused run.
    Otherwise one draw per layer for all members from a generator seeded
    with `group_seed` (the default on CUDA, where exact is not possible).

    The exact masks are drawn ahead, `ahead` draws per member at a time
    (what _Pass asks for: one epoch's), the members' generators in parallel
    threads. The CPU's bernoulli_ is a serial loop over one generator: drawn
    step by step, the 32 calls per step at K=16 ran on one core while the
    other waited (1.6 ms of a 24 ms step). One call fills a member's stream
    in the order the unfused run draws it (each layer's batch x width, layer
    after layer, step after step), so slices of it are the same bits.
    """

    def __init__(self, rates: list[float], rng_states: list[torch.Tensor], group_seed: int, device,
                 exact: bool | None = None, ahead: int = 1 << 16):
        self.rates = list(rates)
        self.device = torch.device(device)
        self.exact = self.device.type == "cpu" if exact is None else exact
        if self.exact:
            self.generators = []
            for state in rng_states:
                generator = torch.Generator()
                generator.set_state(state)
                self.generators.append(generator)
            self.ahead = max(1, ahead)
            self.drawn = torch.empty(len(self.rates), 0, dtype=torch.uint8)  # row k: member k's next draws
            self.scale = self._scale()
        else:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(group_seed)
            self.keep = torch.tensor([1 - p for p in rates], device=device).view(-1, 1, 1)

    @property
    def active(self) -> bool:
        return any(self.rates)

    def masks(self, batch: int, widths: Sequence[int]) -> list[torch.Tensor] | None:
        if not self.active:
            return None
        if not self.exact:
            return [self._batched_mask(batch, width) for width in widths]
        need = batch * sum(widths)
        if self.drawn.shape[1] < need:
            self._draw(max(need, self.ahead))
        masks, start = [], 0
        for width in widths:
            kept = self.drawn[:, start:start + batch * width].view(-1, batch, width)
            masks.append(kept.to(torch.float32).mul_(self.scale).to(self.device))
            start += batch * width
        self.drawn = self.drawn[:, need:]
        return masks

    def _batched_mask(self, batch: int, width: int) -> torch.Tensor:
        u = torch.rand(len(self.rates), batch, width, generator=self.generator, device=self.device)
        return (u < self.keep).float().div_(self.keep)

    def _scale(self) -> torch.Tensor:
        # The unfused F.dropout: empty_like(x).bernoulli_(1 - p).div_(1 - p), so a kept unit is
        # multiplied by float32(1) / float32(1 - p); p == 0 draws nothing and keeps every unit.
        return torch.tensor([1.0] * len(self.rates)).div_(torch.tensor([1 - p for p in self.rates])).view(-1, 1, 1)

    def _draw(self, count: int) -> None:
        """Append `count` draws to every member's stream, the members' generators in parallel."""
        fresh = torch.ones(len(self.rates), count, dtype=torch.uint8)

        def draw(row: int) -> None:
            if self.rates[row] > 0:
                fresh[row].bernoulli_(1 - self.rates[row], generator=self.generators[row])

        rows = range(len(self.rates))
        workers = min(torch.get_num_threads(), len(self.rates))
        if workers > 1:  # each generator is drawn by one thread, in order: the same bits whatever the timing
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(draw, rows))
        else:
            for row in rows:
                draw(row)
        self.drawn = torch.cat([self.drawn, fresh], 1) if self.drawn.shape[1] else fresh

    def select(self, rows: list[int]) -> None:
        self.rates = [self.rates[r] for r in rows]
        if self.exact:
            self.generators = [self.generators[r] for r in rows]
            self.drawn = self.drawn[rows]
            self.scale = self._scale()
        else:
            self.keep = self.keep[rows]


class MemberLoss:
    """Each member's training loss terms as stacked rows: class weights, logit offsets, smoothing."""

    def __init__(self, configs: Sequence[TrainConfig], train_labels: torch.Tensor, n_classes: int):
        terms = [loss_terms(c, train_labels, n_classes) for c in configs]
        self.weight = torch.stack([w for w, _ in terms])
        self.offset = torch.stack([o for _, o in terms]) if any(c.imbalance == "logit_adjusted" for c in configs) \
            else None
        self.smoothing = torch.tensor([c.label_smoothing for c in configs], device=train_labels.device) \
            if any(c.label_smoothing for c in configs) else None

    def sums(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_sums(logits, y, self.weight, self.offset, self.smoothing)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        numerator, denominator = self.sums(logits, y)
        return numerator / denominator

    def select(self, rows: list[int]) -> None:
        self.weight = self.weight[rows]
        self.offset = None if self.offset is None else self.offset[rows]
        self.smoothing = None if self.smoothing is None else self.smoothing[rows]


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


# --- the stacked step: what the one loop calls for a fused group -----------------------

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
