"""The one training loop: one trial, or a fused group of trials, from plain configs.

The data lives on the device as one float tensor per split; an epoch is a
`randperm` (or a weighted `multinomial` draw) and index slices of it, with
augmentation batched on the device. No DataLoader, no per-sample Python, no
`.item()` per step: the only host syncs are once per epoch (train losses for
the divergence check, dev evaluation, the epoch callback).

`train_members` owns batch order, slicing, augmentation, divergence, dev
evaluation and stopping for K >= 1 members, and steps either
- ModuleStep: one nn.Module with torch.optim (fused kernels), the fast path for K = 1, or
- cnnlib.fused.StackedStep: K seed CNNs as one stacked network with per-member rows.
`train` (one config) and `train_fused` (a group) are thin views of it.
This module knows nothing of Optuna; `on_epoch` is how a study listens and
stops a member (pruning).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .augment import augment_batch
from .config import IMBALANCE_METHODS, OPTIMIZERS, SCHEDULES, SHARED, TrainConfig, check_roles, group_key  # noqa: F401
from .device import resolve_device
from .errors import DivergedError
from .step import StackedStep
from .losses import class_weights, make_criterion  # noqa: F401 - part of this module's interface
from .metrics import Evaluation
from .model import MODELS
from .schedules import lr_factors, steps_per_epoch
from .sources import LabeledImages
from .splits import Splits

# Channels-last weights (oneDNN NHWC convolutions): 1.46x per training step at batch 32
# (2.63 ms against 3.84 ms) on the quiet 2-core CPU, torch 2.14.1, 1 thread, one run.
# (`make bench --levers` on the same machine while other jobs shared it, 1 thread, one
# run: CPU time per epoch 0.97x, wall 0.85-1.01x; a busy machine hides the difference.)
# For comparison, same quiet machine and torch, one run: bf16 autocast 1.30x per step at
# batch 32 and 1.90x at batch 128 (not used here).
CHANNELS_LAST = True
EVAL_BATCH = 4096


@dataclass(frozen=True)
class LoopOptions:
    """The loop's speed levers, one field each; the defaults are what ships (`make bench --levers` A/Bs them).

    None of them changes what a config learns, only how fast: they are not
    TrainConfig fields and no study records them.
    """

    channels_last: bool = CHANNELS_LAST  # model weights (and DeviceData's layout) in NHWC
    optimizer: str = "fused"  # make_optimizer's implementation: fused, foreach or default
    cudnn_benchmark: bool = False  # CUDA: let cuDNN time its (deterministic) kernels and keep the fastest
    # The stacked step's arithmetic: fp32, or bf16 autocast (fp32 master weights, fp32 loss).
    # bf16 is slower on the 2-core AMX-BF16 CPU for the fused seed CNN (K=16, 1 thread, CPU time
    # per step, torch 2.14.1, one interleaved run: 0.80x at batch 32, 0.87x at batch 128; conv1
    # 1.35x and the grouped conv2 2.3x slower in bf16): its convs are too narrow for AMX tiles.
    precision: str = "fp32"
    # CUDA: capture the stacked step once per pass and replay it (cnnlib.fused._Pass); the CPU
    # ignores it. Off until a GPU run measures it: built and unit-tested on the CPU fallback only.
    cuda_graphs: bool = False
    # CPU: a fused group's passes step at the same time, this many threads of one intra-op thread
    # each (cnnlib.fused.StackedStep; None: torch's thread count where cnnlib.fused.concurrent_passes_pay,
    # else 1: one pass whose ops use every thread).
    pass_threads: int | None = None


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    dev_loss: float
    dev: Evaluation
    seconds: float

    @property
    def dev_macro_accuracy(self) -> float:
        return self.dev.macro_accuracy


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    history: list[EpochStats] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def dev(self) -> Evaluation:
        return self.history[-1].dev


@dataclass
class MemberResult(TrainResult):
    """A member's TrainResult; `error` is set (and `model` is None) when that member diverged.

    A fused group cannot raise for one member without killing the others, so
    the error is handed back here; `train` raises it. `history` then holds the
    epochs before the divergence. `seconds` is the wall time from the group's
    start to this member's last epoch (shared with the other members).
    """

    error: DivergedError | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


class DeviceSplit:
    """One split as device tensors: NCHW float images in [0, 1] and int64 labels."""

    def __init__(self, split: LabeledImages, device: torch.device, channels_last: bool = CHANNELS_LAST):
        images = torch.from_numpy(np.ascontiguousarray(split.images)).to(device)
        # uint8 NHWC -> float NCHW view with channels-last strides: no copy of layout.
        self.x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if not channels_last:
            self.x = self.x.contiguous()
        self.y = torch.from_numpy(split.labels).to(device)

    def __len__(self) -> int:
        return self.y.shape[0]


class DeviceData:
    """Train and dev (and test) resident on the device, built once and shared by many trials."""

    def __init__(self, splits: Splits, device: torch.device | str = "auto", channels_last: bool = CHANNELS_LAST):
        self.device = resolve_device(device)
        self.classes = tuple(splits.classes)
        self.train = DeviceSplit(splits.train, self.device, channels_last)
        self.dev = DeviceSplit(splits.dev, self.device, channels_last)
        self.test = DeviceSplit(splits.test, self.device, channels_last) if splits.test is not None else None
        self.image_size = splits.train.images.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def make_model(n_classes: int, config: TrainConfig, image_size: int, device,
               channels_last: bool = CHANNELS_LAST) -> nn.Module:
    model = MODELS[config.model](n_classes, config.dropout, image_size).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def make_optimizer(model: nn.Module, config: TrainConfig, implementation: str = "fused") -> torch.optim.Optimizer:
    """SGD (Nesterov or not), Adam or AdamW from torch.optim, with the fused kernel by default.

    The fused kernel is one op per step for all parameters (CPU and CUDA). On the
    2-core CPU the fused Adam step took 0.29 ms against foreach's 0.63 ms, and a
    batch-32 epoch 1.14x less CPU time (`make bench --levers`, 1 thread, 8 epochs).
    Same seed, same result: the fused kernels are deterministic. Devices without
    a fused kernel get foreach. `implementation` "foreach" or "default" (torch's
    own choice, as a tutorial calls it) is for the benchmark's baselines.
    """
    params = list(model.parameters())
    if config.optimizer == "sgd":
        make = lambda **kw: torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,  # noqa: E731
                                            nesterov=config.nesterov, weight_decay=config.weight_decay, **kw)
    else:
        kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        make = lambda **kw: kind(params, lr=config.lr, weight_decay=config.weight_decay, **kw)  # noqa: E731
    if implementation == "default":
        return make()
    if implementation == "foreach":
        return make(foreach=True)
    try:
        return make(fused=True)
    except (RuntimeError, ValueError):
        return make(foreach=True)


def epoch_order(n: int, labels: torch.Tensor, n_classes: int, imbalance: str, generator: torch.Generator) -> torch.Tensor:
    """Sample indices for one epoch: a permutation, or an inverse-frequency draw with replacement."""
    if imbalance == "weighted_sampler":
        per_sample = class_weights(labels, n_classes)[labels]
        return torch.multinomial(per_sample, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator, device=labels.device)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    was_training = model.training
    model.eval()
    if x.shape[0]:
        out = torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    else:
        out = model(torch.zeros(1, *x.shape[1:], device=x.device))[:0]
    model.train(was_training)
    return out


def evaluate(model: nn.Module, split: DeviceSplit, classes, criterion: nn.Module | None = None) -> Evaluation:
    """Macro/per-class accuracy and confusion matrix of a model on one device split (dropout off)."""
    logits = predict_logits(model, split.x)
    n = len(classes)
    matrix = torch.bincount(split.y * n + logits.argmax(1), minlength=n * n).reshape(n, n)
    loss = criterion(logits, split.y).item() if criterion is not None and len(split) else float("nan")
    return Evaluation(tuple(classes), matrix.cpu().numpy(), loss)


def seed_everything(seed: int, device: torch.device, cudnn_benchmark: bool = False) -> torch.Generator:
    """Same seed, same device, same result: seeds everything and pins cuDNN to deterministic kernels.

    cuDNN's default convolution backward may accumulate with atomics (run-to-run
    differences); its deterministic kernels cost nothing measurable for this net.
    """
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(seed)  # weights and dropout masks
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)  # batch order and augmentation
    return generator


# --- the per-model step (K = 1) -------------------------------------------------------

class ModuleStep:
    """One nn.Module, its torch.optim optimizer, LambdaLR schedule and loss: the fast path for one trial.

    Same interface as cnnlib.fused.StackedStep, for the one loop to drive.
    """

    def __init__(self, config: TrainConfig, data: DeviceData, steps: int, options: LoopOptions = LoopOptions()):
        torch.manual_seed(config.seed)  # weights and dropout masks
        self.net = make_model(data.n_classes, config, data.image_size, data.device, options.channels_last)
        self.optimizer = make_optimizer(self.net, config, options.optimizer)
        factors = lr_factors(config, config.epochs * steps).tolist()
        self.scheduler = None if config.schedule == "constant" and not config.warmup else \
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: factors[min(step, len(factors) - 1)])
        self.criterion = make_criterion(config, data.train.y, data.n_classes)
        self.members, self.device = [0], data.device
        self.total = None

    def start_epoch(self) -> None:
        self.net.train()
        self.total = torch.zeros((), device=self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the batch's logits from this step's forward (detached)."""
        logits = self.net(x)
        loss = self.criterion(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.total += loss.detach() * x.shape[0]
        return logits.detach()

    def train_loss_sums(self) -> dict[int, float]:
        return {0: self.total.item()} if self.members else {}

    def evaluate(self, split: DeviceSplit, classes) -> dict[int, Evaluation]:
        return {0: evaluate(self.net, split, classes, self.criterion)} if self.members else {}

    def model(self, member: int) -> nn.Module:
        return self.net

    def keep(self, members: set[int]) -> None:
        self.members = [m for m in self.members if m in members]

    def close(self) -> None:
        pass


# --- groups ------------------------------------------------------------------------------

def group_configs(configs: Sequence[TrainConfig], max_size: int | None = None) -> list[list[int]]:
    """Indices into `configs`, split into fusable groups (equal `group_key`) of at most `max_size`.

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
    """Members must agree on every SHARED setting (and on using a weighted sampler)."""
    if not configs:
        raise ValueError("training needs at least one config")
    check_roles(type(configs[0]))
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        for name in SHARED:
            if getattr(config, name) != getattr(first, name):
                raise ValueError(
                    f"config {index} has {name}={getattr(config, name)!r} but config 0 has "
                    f"{getattr(first, name)!r}; fused members must share {', '.join(SHARED)} "
                    "(split them with cnnlib.training.group_configs)")
        if (config.imbalance == "weighted_sampler") != (first.imbalance == "weighted_sampler"):
            raise ValueError(f"config {index} has imbalance={config.imbalance!r} but config 0 has "
                             f"{first.imbalance!r}; a weighted sampler draws other batches, so all members "
                             "or none must use it")


# --- the loop ---------------------------------------------------------------------------------

def train_members(configs: Sequence[TrainConfig], data: DeviceData | Splits,
                  on_epoch: Callable[[int, EpochStats], bool | None] | None = None, *, fused: bool | None = None,
                  members_per_pass: int | None = None, order_seed: int | None = None,
                  options: LoopOptions = LoopOptions(),
                  on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                  ) -> Iterator[list[MemberResult]]:
    """Train every config, one epoch per step, yielding all members' results after each epoch.

    Members share each batch: its order and augmentation come from a generator
    seeded with `order_seed`, by default the first member's seed. A member's
    own seed sets its initial weights and dropout masks.

    `on_epoch(i, stats)` is called after every epoch for each member still
    training, in member order; returning True stops member i alone (it stops
    costing compute), as does reaching its own `epochs` (then `stopped_early`
    stays False). A member whose training loss is not finite at the end of an
    epoch gets `error=DivergedError(...)`, no model and no callback; the others
    go on. An exception from `on_epoch` ends the whole group.

    fused: True steps the stacked network (cnnlib.fused), False the module
    (K = 1 only); default: the module for one config, stacked for several.
    members_per_pass: members per stacked forward pass (all still share every batch).
    options: the speed levers (LoopOptions); the defaults are what ships.
    on_batch(epoch, index, logits): after every step of the per-model step
    (one config), the batch's positions in the train split and the logits
    its training forward gave (augmented, train mode, before the update):
    what the label audit's training dynamics average. The stacked step does
    not hand its logits out, so a fused group refuses it.
    """
    configs = list(configs)
    check_group(configs)
    fused = len(configs) > 1 if fused is None else fused
    if not fused and len(configs) > 1:
        raise ValueError(f"the per-model step trains one config, got {len(configs)}; use fused=True")
    if on_batch is not None and fused:
        raise ValueError("on_batch records one model's training predictions; train the config alone (fused=False)")
    if not isinstance(data, DeviceData):
        data = DeviceData(data)
    device, shared = data.device, configs[0]
    generator = seed_everything(shared.seed, device, options.cudnn_benchmark)
    if order_seed is not None:
        generator.manual_seed(order_seed)
    train_x, train_y, n = data.train.x, data.train.y, len(data.train)
    steps = steps_per_epoch(n, shared.batch_size)
    if fused:
        stepper = StackedStep(configs, data, steps,
                              lambda c: make_model(data.n_classes, c, data.image_size, device, options.channels_last),
                              members_per_pass, options.precision, options.cuda_graphs, options.pass_threads)
    else:
        if options.precision != "fp32":
            raise ValueError(f"precision {options.precision!r} is a lever of the stacked step only; use fused=True")
        stepper = ModuleStep(shared, data, steps, options)
    augment = shared.crop or shared.flip or shared.jitter
    results = [MemberResult(None, config, device=str(device)) for config in configs]
    started = time.perf_counter()
    try:
        for epoch in range(1, max(c.epochs for c in configs) + 1):
            if device.type == "cuda":  # process-wide: set each epoch, so runs stepped in turn keep their own
                torch.backends.cudnn.benchmark = options.cudnn_benchmark
            epoch_start = time.perf_counter()
            order = epoch_order(n, train_y, data.n_classes, shared.imbalance, generator)
            stepper.start_epoch()
            for start in range(0, n, shared.batch_size):
                index = order[start:start + shared.batch_size]
                x = train_x.index_select(0, index)
                if augment:
                    x = augment_batch(x, shared.crop, shared.flip, shared.jitter, generator)
                logits = stepper.step(x, train_y.index_select(0, index))
                if on_batch is not None:
                    on_batch(epoch, index, logits)
            sums = stepper.train_loss_sums()
            devs = stepper.evaluate(data.dev, data.classes)
            seconds = time.perf_counter() - epoch_start
            still = set()
            for member in sorted(sums):  # callbacks in member order
                result, train_loss = results[member], sums[member] / n
                result.seconds = time.perf_counter() - started
                if not math.isfinite(train_loss):
                    result.error = DivergedError(epoch, train_loss)
                    continue
                stats = EpochStats(epoch, train_loss, devs[member].loss, devs[member], seconds)
                result.history.append(stats)
                if on_epoch is not None and on_epoch(member, stats):
                    result.stopped_early = True
                if result.stopped_early or epoch == configs[member].epochs:
                    result.model = stepper.model(member)
                else:
                    still.add(member)
            yield results
            stepper.keep(still)
            if not stepper.members:
                break
    finally:
        stepper.close()  # a fused group's pass threads go with it


def train_epochs(config: TrainConfig, data: DeviceData | Splits, device="auto", order_seed: int | None = None,
                 options: LoopOptions = LoopOptions()) -> Iterator[TrainResult]:
    """`train`, one epoch per step (`make bench` steps it in turn with the naive loop, and A/Bs `options`)."""
    if not isinstance(data, DeviceData):
        data = DeviceData(data, device, options.channels_last)
    for results in train_members([config], data, fused=False, order_seed=order_seed, options=options):
        if results[0].error is not None:
            raise results[0].error
        yield results[0]


def train(config: TrainConfig, data: DeviceData | Splits, device="auto",
          on_epoch: Callable[[EpochStats], bool | None] | None = None, order_seed: int | None = None,
          on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> TrainResult:
    """Train one config; `on_epoch` is called after every epoch and may return True to stop.

    Raises DivergedError when the training loss is not finite: a NaN model is
    never returned as if it were a result. on_batch: see train_members.
    """
    if not isinstance(data, DeviceData):
        data = DeviceData(data, device)
    result = None
    for results in train_members([config], data, None if on_epoch is None else lambda _, stats: on_epoch(stats),
                                 fused=False, order_seed=order_seed, on_batch=on_batch):
        result = results[0]
    if result.error is not None:
        raise result.error
    return result


def train_group(configs: Sequence[TrainConfig], data: DeviceData | Splits,
                on_epoch: Callable[[int, EpochStats], bool | None] | None = None, fused: bool | None = None,
                members_per_pass: int | None = None) -> list[MemberResult]:
    """train_members to the end: result i belongs to configs[i]; one config trains alone, several fused."""
    results = []
    for results in train_members(configs, data, on_epoch, fused=fused, members_per_pass=members_per_pass):
        pass
    return results


def train_fused_epochs(configs: Sequence[TrainConfig], data: DeviceData | Splits,
                       on_epoch: Callable[[int, EpochStats], bool | None] | None = None,
                       members_per_pass: int | None = None,
                       options: LoopOptions = LoopOptions()) -> Iterator[list[MemberResult]]:
    """A group as one stacked network, one epoch per step (even for K = 1: the benchmark's fused K=1)."""
    return train_members(configs, data, on_epoch, fused=True, members_per_pass=members_per_pass, options=options)


def train_fused(configs: Sequence[TrainConfig], data: DeviceData | Splits,
                on_epoch: Callable[[int, EpochStats], bool | None] | None = None,
                members_per_pass: int | None = None) -> list[MemberResult]:
    """Train all configs as one fused group, even one config; result i belongs to configs[i] (see train_members)."""
    return train_group(configs, data, on_epoch, fused=True, members_per_pass=members_per_pass)
