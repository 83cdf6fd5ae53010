"""Horizontally fused training: K trial configs trained as one wide network.

The seed CNN is far too small to fill a device (or even two CPU cores) with
one trial. HFTA (Wang et al., MLSys 2021) trains K copies of a model as one
wider model; this module does that for `SeedCNN`:

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
- Each member keeps its own optimizer type, lr, momentum, weight decay, loss
  weights, dropout rate and seed. SGD and Adam are written out on the stacked
  rows (SGD members first, so each kind is one contiguous block of rows) with
  the math of torch.optim.SGD (L2 decay added to the gradient, momentum
  buffer, no dampening, no Nesterov) and torch.optim.Adam (L2 decay added to
  the gradient, bias correction, eps 1e-8): a handful of launches per step
  for all members instead of one optimizer per trial.
- Members' losses are summed for one backward; the sum's gradient is 1 for
  every member, so members never touch each other's gradients (a member
  going NaN leaves the others untouched).
- A member that stops (its callback returned True, or it diverged) is cut
  out of the stacked rows at the end of the epoch: it stops costing compute.
- On the CPU a large group runs as several stacked passes of at most 16
  members per batch (MEMBERS_PER_PASS): the batch is still shared, and a
  pass of 16 fits the caches that one of 64 overflows.

What members share, and why (`SHARED_SETTINGS`): one batch of images per step.
The batch order (and flip/jitter draws) come from a generator seeded with the
FIRST member's seed; `train(config, data, order_seed=configs[0].seed)` replays
exactly that order for an unfused run of any member. A member's own seed sets
its initial weights (the same weights `train` starts from) and its dropout
masks. On the CPU the masks are drawn member by member from a generator that
continues the global RNG stream right after that member's init, which is what
the unfused run's dropout draws from: the same bits. On CUDA the unfused
run's dropout is a fused Philox kernel that cannot be replayed per member, so
all masks come from one draw per layer (a group generator seeded with the
first member's seed): statistically the same, not bitwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .augment import augment_batch
from .errors import DivergedError
from .metrics import Evaluation
from .model import SeedCNN
from .splits import Splits
from .training import (DeviceData, DeviceSplit, EpochStats, TrainConfig, TrainResult, epoch_order, make_criterion,
                       make_model)

# What decides the images of a step: members that differ in any of these cannot
# share a forward pass (flip/jitter change the input itself), so they go to
# separate groups. Epochs may differ: a member leaves the group after its last.
SHARED_SETTINGS = ("batch_size", "imbalance", "flip", "jitter")
# torch.optim.Adam's defaults, which make_optimizer uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Dev evaluation runs in chunks so that the widest activation (conv1's K x 6
# channels) stays under this many floats (128 MiB): K=64 would need 750 MB for
# the 625 dev images at once.
EVAL_ACTIVATION_FLOATS = 1 << 25
# Members per stacked forward/backward pass, by device type (None: all of them).
# On the 2-core CPU a pass of 16 costs 15-20 % less CPU time per member than
# one of 64 (whose 38 MB conv1 activations miss the cache and are fresh pages
# every step); GPUs want the widest pass.
MEMBERS_PER_PASS = {"cpu": 16}
CHANNELS_LAST = torch.channels_last
# SeedCNN's parameters in `parameters()` order; the fused forward is written
# against exactly this layout.
LAYOUT = ("features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
          "classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias",
          "classifier.7.weight", "classifier.7.bias")
# Linear weights are stored transposed, (in, out): the batched matmuls then read
# them as they are and their gradients arrive in the stored layout (no copies).
TRANSPOSED = frozenset({"classifier.1.weight", "classifier.4.weight", "classifier.7.weight"})


# --- groups -------------------------------------------------------------------

def group_key(config: TrainConfig) -> tuple:
    """Configs with equal keys can be trained in one fused group."""
    return tuple(getattr(config, name) for name in SHARED_SETTINGS)


def group_configs(configs: Sequence[TrainConfig], max_size: int | None = None) -> list[list[int]]:
    """Indices into `configs`, split into fusable groups of at most `max_size`.

    Groups come in order of their first member; members keep their input order.
    """
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    groups: dict[tuple, list[list[int]]] = {}
    for index, config in enumerate(configs):
        chunks = groups.setdefault(group_key(config), [[]])
        if max_size is not None and len(chunks[-1]) >= max_size:
            chunks.append([])
        chunks[-1].append(index)
    return [chunk for chunks in groups.values() for chunk in chunks]


def check_group(configs: Sequence[TrainConfig]) -> None:
    if not configs:
        raise ValueError("train_fused needs at least one config")
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        for name in SHARED_SETTINGS:
            if getattr(config, name) != getattr(first, name):
                raise ValueError(
                    f"config {index} has {name}={getattr(config, name)!r} but config 0 has "
                    f"{getattr(first, name)!r}; fused members must share {', '.join(SHARED_SETTINGS)} "
                    "(split them with cnnlib.fused.group_configs)")


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
        h = F.conv2d(h, w1.reshape(-1, *w1.shape[2:]).contiguous(memory_format=CHANNELS_LAST), b1.reshape(-1))
        h = F.relu(F.max_pool2d(h, 2))
        h = F.conv2d(h, w2.reshape(-1, *w2.shape[2:]).contiguous(memory_format=CHANNELS_LAST), b2.reshape(-1),
                     groups=k)
        h = F.relu(F.max_pool2d(h, 2))
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

    def to_model(self, row: int, config: TrainConfig, n_classes: int, image_size: int) -> SeedCNN:
        """Member `row` as the SeedCNN `train` would have returned (same layout, train mode)."""
        with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the caller's RNG
            model = make_model(n_classes, config, image_size, self.flat.device)
        with torch.no_grad():
            for (name, param), piece, shape in zip(model.named_parameters(), self.flat[row].split(self.sizes),
                                                   self.shapes):
                piece = piece.view(shape)
                param.copy_(piece.t() if name in TRANSPOSED else piece)
        return model


# --- per-member optimizers on stacked rows ---------------------------------------

class StackedOptimizer:
    """SGD and Adam with per-row hyperparameters on (K, P) rows; SGD rows come first.

    Mirrors torch.optim's foreach implementations operation by operation
    where per-row values allow it (see the module docstring); differences are
    rounding-level (tests/test_fused.py states the tolerance).
    """

    def __init__(self, configs: Sequence[TrainConfig], n_params: int, device):
        kinds = [c.optimizer for c in configs]
        self.n_sgd = kinds.count("sgd")
        if kinds != sorted(kinds, key=lambda kind: kind != "sgd"):
            raise ValueError(f"SGD members must come first, got {kinds}")

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)

        self.lr = column([c.lr for c in configs])
        self.lr64 = column([c.lr for c in configs], torch.float64)  # Adam's step size is computed in double
        self.weight_decay = column([c.weight_decay for c in configs])
        self.momentum = column([c.momentum for c in configs])
        self.any_decay = any(c.weight_decay for c in configs)
        n_adam = len(configs) - self.n_sgd
        self.momentum_buffer = torch.zeros(self.n_sgd, n_params, device=device)
        self.exp_avg = torch.zeros(n_adam, n_params, device=device)
        self.exp_avg_sq = torch.zeros(n_adam, n_params, device=device)
        self.steps = 0

    @torch.no_grad()
    def step(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        self.steps += 1
        s = self.n_sgd
        if self.any_decay:
            grads = torch.addcmul(grads, params, self.weight_decay)  # L2: grad + wd * p
        if s:
            # torch.optim.SGD: buf = momentum * buf + grad (buf starts as grad: 0 * m + g == g); p -= lr * buf.
            self.momentum_buffer.mul_(self.momentum[:s]).add_(grads[:s])
            params[:s].addcmul_(self.momentum_buffer, self.lr[:s], value=-1)
        if s < params.shape[0]:
            beta1, beta2 = ADAM_BETAS
            g = grads[s:]
            self.exp_avg.lerp_(g, 1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** self.steps
            bias_correction2_sqrt = (1 - beta2 ** self.steps) ** 0.5
            step_size = (self.lr64[s:] / bias_correction1).neg_().float()
            denom = self.exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(ADAM_EPS)
            params[s:].add_(self.exp_avg.mul(step_size).div_(denom))  # addcdiv's (value * m) / denom

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.lr.device)
        sgd = [r for r in rows if r < self.n_sgd]
        adam = [r - self.n_sgd for r in rows if r >= self.n_sgd]
        self.momentum_buffer = self.momentum_buffer[sgd]
        self.exp_avg, self.exp_avg_sq = self.exp_avg[adam], self.exp_avg_sq[adam]
        self.lr, self.lr64 = self.lr.index_select(0, index), self.lr64.index_select(0, index)
        self.weight_decay = self.weight_decay.index_select(0, index)
        self.momentum = self.momentum.index_select(0, index)
        self.n_sgd = len(sgd)


# --- dropout and loss -------------------------------------------------------------

class MemberDropout:
    """Each member's dropout masks, as multipliers (mask / keep) for the stacked activations.

    exact (the default on the CPU): member by member from generators holding
    `rng_states` (CPU RNG states), bit for bit the masks of the unfused run.
    Otherwise one draw per layer for all members from a generator seeded
    with `group_seed` (the default on CUDA, where exact is not possible).
    """

    def __init__(self, rates: list[float], rng_states: list[torch.Tensor], group_seed: int, device,
                 exact: bool | None = None):
        self.rates = list(rates)
        self.device = torch.device(device)
        self.exact = self.device.type == "cpu" if exact is None else exact
        if self.exact:
            self.generators = []
            for state in rng_states:
                generator = torch.Generator()
                generator.set_state(state)
                self.generators.append(generator)
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
        return [self._mask(batch, width) for width in widths]

    def _mask(self, batch: int, width: int) -> torch.Tensor:
        k = len(self.rates)
        if not self.exact:
            u = torch.rand(k, batch, width, generator=self.generator, device=self.device)
            return (u < self.keep).float().div_(self.keep)
        mask = torch.ones(k, batch, width)
        for row, (p, generator) in enumerate(zip(self.rates, self.generators)):
            if p > 0:  # the unfused F.dropout: empty_like(x).bernoulli_(1 - p).div_(1 - p); p == 0 draws nothing
                mask[row].bernoulli_(1 - p, generator=generator).div_(1 - p)
        return mask.to(self.device)

    def select(self, rows: list[int]) -> None:
        self.rates = [self.rates[r] for r in rows]
        if self.exact:
            self.generators = [self.generators[r] for r in rows]
        else:
            self.keep = self.keep[rows]


def weighted_nll_sums(logits: torch.Tensor, y: torch.Tensor,
                      weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member: sum of w_y * -log p_y and sum of w_y. logits (K, B, C), y (B,), weights (K, C)."""
    log_p = torch.log_softmax(logits, dim=2)
    picked = log_p.gather(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
    w = weights[:, y]
    return -(w * picked).sum(1), w.sum(1)


def member_losses(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """nn.CrossEntropyLoss(weight=w) of each member (weighted mean), shape (K,)."""
    numerator, denominator = weighted_nll_sums(logits, y, weights)
    return numerator / denominator


@torch.inference_mode()
def evaluate_members(net: StackedSeedCNN, split: DeviceSplit, classes, weights: torch.Tensor) -> list[Evaluation]:
    """cnnlib.training.evaluate for every member at once (dropout off)."""
    k, n = net.k, len(classes)
    device = net.flat.device
    numerator = torch.zeros(k, device=device)
    denominator = torch.zeros(k, device=device)
    counts = torch.zeros(k * n * n, dtype=torch.long, device=device)
    offsets = (torch.arange(k, device=device) * n * n).view(-1, 1)
    per_image = net.shapes[0][0] * (split.x.shape[2] - net.shapes[0][2] + 1) * (split.x.shape[3] - net.shapes[0][3] + 1)
    chunk = max(1, EVAL_ACTIVATION_FLOATS // (k * per_image))
    for start in range(0, len(split), chunk):
        x, y = split.x[start:start + chunk], split.y[start:start + chunk]
        logits = net(x)
        num, den = weighted_nll_sums(logits, y, weights)
        numerator += num
        denominator += den
        counts += torch.bincount((offsets + y * n + logits.argmax(2)).reshape(-1), minlength=k * n * n)
    losses = (numerator / denominator).tolist() if len(split) else [float("nan")] * k
    matrices = counts.view(k, n, n).cpu().numpy()
    return [Evaluation(tuple(classes), matrices[row].copy(), losses[row]) for row in range(k)]


# --- training ------------------------------------------------------------------------

@dataclass
class MemberResult(TrainResult):
    """A member's TrainResult; `error` is set (and `model` is None) when that member diverged.

    `train` raises DivergedError; a fused group cannot raise for one member
    without killing the others, so the error is handed back here instead.
    `history` then holds the epochs before the divergence. `seconds` is the
    wall time from the group's start to this member's last epoch (shared
    with the other members, not divided among them).
    """

    error: DivergedError | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def _init_member(config: TrainConfig, n_classes: int, image_size: int) -> tuple[SeedCNN, torch.Tensor]:
    """The initial weights `train` starts from, and the RNG state its dropout then draws from."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(config.seed)  # what torch.manual_seed does on the CPU
        model = SeedCNN(n_classes, config.dropout, image_size)
        return model, torch.get_rng_state()


def train_fused(configs: Sequence[TrainConfig], data: DeviceData | Splits,
                on_epoch: Callable[[int, EpochStats], bool | None] | None = None,
                members_per_pass: int | None = None) -> list[MemberResult]:
    """Train all configs as one fused group; result i belongs to configs[i].

    `on_epoch(i, stats)` is called after every epoch for each member still
    training, in member order; returning True stops member i alone (its
    rows leave the stacked network at the end of the epoch), as does
    reaching its own `epochs` (then `stopped_early` stays False). An exception
    from `on_epoch` ends the whole group (a study should return True to
    prune, not raise). A member whose training loss is not finite at the end
    of an epoch gets `error=DivergedError(...)`, no model, and no callback
    for that epoch; the others go on.

    members_per_pass: at most this many members share one forward/backward
    pass (all members still share every batch); default MEMBERS_PER_PASS
    for the device.
    """
    results = []
    for results in train_fused_epochs(configs, data, on_epoch, members_per_pass):
        pass
    return results


class _Pass:
    """Members that run one stacked forward/backward together: network, optimizer, dropout, loss weights."""

    def __init__(self, members: list[int], configs: Sequence[TrainConfig], data: DeviceData, group_seed: int):
        # Rows: SGD members first (stable), so each optimizer kind is one block of rows.
        self.members = sorted(members, key=lambda i: configs[i].optimizer != "sgd")
        chosen = [configs[i] for i in self.members]
        inits = [_init_member(c, data.n_classes, data.image_size) for c in chosen]
        self.net = StackedSeedCNN.from_models([model for model, _ in inits], data.device)
        self.optimizer = StackedOptimizer(chosen, self.net.flat.shape[1], data.device)
        self.dropout = MemberDropout([c.dropout for c in chosen], [state for _, state in inits], group_seed,
                                     data.device)
        self.weights = torch.stack([_loss_weights(c, data) for c in chosen])
        self.widths = [self.net.shapes[LAYOUT.index(name)][1] for name in ("classifier.1.weight", "classifier.4.weight")]
        self.total = None

    def start_epoch(self) -> None:
        self.total = torch.zeros(len(self.members), device=self.net.flat.device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        losses = member_losses(self.net(x, self.dropout.masks(x.shape[0], self.widths)), y, self.weights)
        self.net.flat.grad = None
        losses.sum().backward()  # d(sum)/d(loss_k) = 1: each member gets exactly its own gradient
        self.optimizer.step(self.net.flat, self.net.flat.grad)
        self.total += losses.detach() * x.shape[0]

    def keep(self, rows: list[int]) -> None:
        """Drop every member but these rows (stopped members stop costing compute)."""
        if len(rows) == len(self.members):
            return
        if not rows:
            self.members = []
            return
        rows = sorted(rows)  # rows stay SGD-first
        self.net.select(rows)
        self.optimizer.select(rows)
        self.dropout.select(rows)
        self.weights = self.weights[rows]
        self.members = [self.members[row] for row in rows]


def train_fused_epochs(configs: Sequence[TrainConfig], data: DeviceData | Splits,
                       on_epoch: Callable[[int, EpochStats], bool | None] | None = None,
                       members_per_pass: int | None = None) -> Iterator[list[MemberResult]]:
    """`train_fused` one epoch per step, yielding all members' results after each epoch.

    `make bench` steps it in turn with the unfused loops so that all see the same background load.
    """
    configs = list(configs)
    check_group(configs)
    if not isinstance(data, DeviceData):
        data = DeviceData(data)
    device, n_classes, image_size = data.device, data.n_classes, data.image_size
    per_pass = members_per_pass or MEMBERS_PER_PASS.get(device.type) or len(configs)
    if per_pass < 1:
        raise ValueError(f"members_per_pass must be at least 1, got {members_per_pass}")
    shared = configs[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(shared.seed)  # batch order and augmentation: the first member's seed
    # Equal-sized passes (K=20 with 16 per pass: 10 + 10, not 16 + 4).
    n_passes = math.ceil(len(configs) / per_pass)
    bounds = [round(i * len(configs) / n_passes) for i in range(n_passes + 1)]
    passes = [_Pass(list(range(a, b)), configs, data, shared.seed) for a, b in zip(bounds, bounds[1:])]

    results = [MemberResult(None, config, device=str(device)) for config in configs]
    train_x, train_y, n = data.train.x, data.train.y, len(data.train)
    started = time.perf_counter()
    for epoch in range(1, max(c.epochs for c in configs) + 1):
        epoch_start = time.perf_counter()
        order = epoch_order(n, train_y, n_classes, shared.imbalance, generator)
        for group in passes:
            group.start_epoch()
        for start in range(0, n, shared.batch_size):
            index = order[start:start + shared.batch_size]
            x = train_x.index_select(0, index)
            if shared.flip or shared.jitter:
                x = augment_batch(x, shared.flip, shared.jitter, generator)
            y = train_y.index_select(0, index)
            for group in passes:
                group.step(x, y)
        rows = {}  # member -> (pass, row, train loss, dev evaluation)
        for group in passes:
            devs = evaluate_members(group.net, data.dev, data.classes, group.weights)
            for row, (member, total) in enumerate(zip(group.members, group.total.tolist())):
                rows[member] = (group, row, total / n, devs[row])
        seconds = time.perf_counter() - epoch_start

        kept: dict[int, list[int]] = {id(group): [] for group in passes}
        for member in sorted(rows):  # callbacks in member order
            group, row, train_loss, dev = rows[member]
            result = results[member]
            result.seconds = time.perf_counter() - started
            if not math.isfinite(train_loss):
                result.error = DivergedError(epoch, train_loss)
                continue
            stats = EpochStats(epoch, train_loss, dev.loss, dev, seconds)
            result.history.append(stats)
            if on_epoch is not None and on_epoch(member, stats):
                result.stopped_early = True
            if result.stopped_early or epoch == configs[member].epochs:
                result.model = group.net.to_model(row, configs[member], n_classes, image_size)
            else:
                kept[id(group)].append(row)
        yield results
        for group in passes:
            group.keep(kept[id(group)])
        passes = [group for group in passes if group.members]
        if not passes:
            break


def _loss_weights(config: TrainConfig, data: DeviceData) -> torch.Tensor:
    """The class weights of the member's criterion (ones when it has none)."""
    criterion = make_criterion(config, data.train.y, data.n_classes)
    if criterion.weight is None:
        return torch.ones(data.n_classes, device=data.device)
    return criterion.weight.to(data.device)
