"""The one training loop: a group of K >= 1 trial configs, epoch by epoch, from plain configs.

The data lives on the device as one float tensor per split; an epoch is a
`randperm` (or a weighted `multinomial` draw) and index slices of it, with
augmentation batched on the device. No DataLoader, no per-sample Python, no
`.item()` per step: the only host syncs are once per epoch (train losses for
the divergence check, dev evaluation, the epoch callback).

The loop owns batch order, slicing, augmentation, divergence, dev
evaluation and stopping; every step goes through cnnlib.step.StackedStep,
for a lone trial (a group of one) as for a group of 16. Entry points:
- `train_group_epochs`: a group, yielding every member's results after each epoch;
- `train_group`: the same to the end;
- `train`: one config to the end, raising DivergedError.
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
from .config import TrainConfig, check_group
from .device import resolve_device
from .errors import DivergedError
from .losses import class_weights
from .metrics import Evaluation
from .schedules import steps_per_epoch
from .sources import LabeledImages
from .splits import Splits
from .stacked_model import CHANNELS_LAST, EVAL_BATCH
from .step import StackedStep


@dataclass(frozen=True)
class LoopOptions:
    """The loop's speed levers, one field each; the defaults are what ships (`make bench --levers` A/Bs them).

    None of them changes what a config learns, only how fast: they are not
    TrainConfig fields and no study records them.
    """

    channels_last: bool = CHANNELS_LAST  # conv weights (and DeviceData's layout) in NHWC
    # cnnlib.stacked_optimizer's kernels: "rows" (torch's fused kernel per member), "block"
    # (each formula once over all rows), None: by device (OPTIMIZER_KERNELS).
    optimizer_kernels: str | None = None
    cudnn_benchmark: bool = False  # CUDA: let cuDNN time its (deterministic) kernels and keep the fastest
    # The step's arithmetic: fp32, or bf16 autocast (fp32 master weights, fp32 loss).
    # bf16 is slower on the 2-core AMX-BF16 CPU for the stacked seed CNN (K=16, 1 thread, CPU time
    # per step, torch 2.14.1, one interleaved run: 0.80x at batch 32, 0.87x at batch 128; conv1
    # 1.35x and the grouped conv2 2.3x slower in bf16): its convs are too narrow for AMX tiles.
    precision: str = "fp32"
    # CUDA: capture the step once per pass and replay it (cnnlib.passes.Pass); the CPU
    # ignores it. Off until a GPU run measures it: built and unit-tested on the CPU fallback only.
    cuda_graphs: bool = False
    # CPU: a group's passes step at the same time, this many threads of one intra-op thread each
    # (cnnlib.step.StackedStep; None: torch's thread count where cnnlib.passes.concurrent_passes_pay,
    # else 1: one pass whose ops use every thread).
    pass_threads: int | None = None


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    dev_loss: float
    dev: Evaluation | None  # as the config evaluates it; None where the loop did not (train_group_epochs' dev_epochs)
    seconds: float
    # The plain model (one view) where the loop evaluated it so (train_group_epochs' tta_epochs); else None.
    plain_dev: Evaluation | None = None

    @property
    def dev_macro_accuracy(self) -> float:
        return self.dev.macro_accuracy if self.dev is not None else math.nan

    @property
    def curve_dev(self) -> Evaluation | None:
        """One measure along every epoch: the plain model's where it was evaluated so, else the config's."""
        return self.plain_dev if self.plain_dev is not None else self.dev

    @property
    def curve_macro_accuracy(self) -> float:
        return self.curve_dev.macro_accuracy if self.curve_dev is not None else math.nan


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

    A group cannot raise for one member without killing the others, so the
    error is handed back here; `train` raises it. `history` then holds the
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


def epoch_order(n: int, labels: torch.Tensor, n_classes: int, imbalance: str, generator: torch.Generator) -> torch.Tensor:
    """Sample indices for one epoch: a permutation, or an inverse-frequency draw with replacement."""
    if imbalance == "weighted_sampler":
        per_sample = class_weights(labels, n_classes)[labels]
        return torch.multinomial(per_sample, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator, device=labels.device)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    """A model's logits for these images, in batches, dropout off."""
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


# --- the loop ---------------------------------------------------------------------------------

def epoch_batches(data: DeviceData, shared: TrainConfig, generator: torch.Generator
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch's batches as (positions in the train split, images, labels), the same for every member:
    the epoch's order sliced, each batch augmented on the device."""
    train, batch = data.train, shared.batch_size
    order = epoch_order(len(train), train.y, data.n_classes, shared.imbalance, generator)
    augment = shared.augments
    for start in range(0, len(train), batch):
        index = order[start:start + batch]
        x = train.x.index_select(0, index)
        if augment:
            x = augment_batch(x, shared.crop, shared.flip, shared.jitter, generator, shared.cutout)
        yield index, x, train.y.index_select(0, index)


def train_epoch(step: StackedStep, batches: Iterator, epoch: int,
                on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """Step every member through one epoch's batches."""
    step.start_epoch()
    for index, x, y in batches:
        logits = step.step(x, y)
        if on_batch is not None:
            on_batch(epoch, index, logits[0])


def record_epoch(step: StackedStep, data: DeviceData, results: list[MemberResult], epoch: int, seconds: float,
                 started: float, on_epoch: Callable[[int, EpochStats], bool | None] | None,
                 dev_epochs: int | None = None, tta_epochs: int | None = None) -> set[int]:
    """Each training member's epoch into its result: its losses and dev evaluation, its callback, and
    whether it goes on. Returns the members that keep training."""
    sums = step.train_loss_sums()

    def within(last: int | None, member: int) -> bool:
        return last is None or epoch > results[member].config.epochs - last

    due = {m for m in sums if within(dev_epochs, m)}
    devs, plains = {}, {}
    if due:
        viewing = {m for m in sums if results[m].config.tta != "none"}
        later = {m for m in viewing if not within(tta_epochs, m)}  # views come in their last epochs only
        first = step.evaluate(data.dev, data.classes, plain=later)
        devs = {m: first[m] for m in due - later}
        plains = {m: first[m] for m in due & later}
        if tta_epochs is not None and due & viewing - later:  # the plain curve goes on through the last epochs
            again = step.evaluate(data.dev, data.classes, plain=set(sums))
            plains.update({m: again[m] for m in due & viewing - later})
    keep = set()
    for member in sorted(sums):  # callbacks in member order
        result, train_loss = results[member], sums[member] / len(data.train)
        result.seconds = time.perf_counter() - started
        if not math.isfinite(train_loss):
            result.error = DivergedError(epoch, train_loss)
            continue
        dev = devs.get(member)
        stats = EpochStats(epoch, train_loss, dev.loss if dev is not None else math.nan, dev, seconds,
                           plains.get(member))
        result.history.append(stats)
        if on_epoch is not None and on_epoch(member, stats):
            result.stopped_early = True
        if result.stopped_early or epoch == result.config.epochs:
            result.model = step.model(member)
        else:
            keep.add(member)
    return keep


def start_group(configs: list[TrainConfig], data: DeviceData | Splits, options: LoopOptions,
                members_per_pass: int | None, order_seed: int | None,
                on_batch: Callable | None) -> tuple[DeviceData, torch.Generator, StackedStep]:
    """The group checked, its data on the device, the batch-order generator seeded, the step built."""
    check_group(configs)
    if on_batch is not None and len(configs) > 1:
        raise ValueError("on_batch records one model's training predictions; train the config alone")
    if not isinstance(data, DeviceData):
        data = DeviceData(data, channels_last=options.channels_last)
    shared = configs[0]
    generator = seed_everything(shared.seed, data.device, options.cudnn_benchmark)
    if order_seed is not None:
        generator.manual_seed(order_seed)
    step = StackedStep(configs, data, steps_per_epoch(len(data.train), shared.batch_size),
                       members_per_pass=members_per_pass, precision=options.precision, graphs=options.cuda_graphs,
                       pass_threads=options.pass_threads, optimizer_kernels=options.optimizer_kernels,
                       channels_last=options.channels_last)
    return data, generator, step


def train_group_epochs(configs: Sequence[TrainConfig], data: DeviceData | Splits,
                       on_epoch: Callable[[int, EpochStats], bool | None] | None = None, *,
                       members_per_pass: int | None = None, order_seed: int | None = None,
                       options: LoopOptions = LoopOptions(),
                       on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                       dev_epochs: int | None = None, tta_epochs: int | None = None,
                       ) -> Iterator[list[MemberResult]]:
    """Train a group of configs (one or more), yielding all members' results after each epoch.

    Members share each batch: its order and augmentation come from a generator
    seeded with `order_seed`, by default the first member's seed. A member's
    own seed sets its initial weights and dropout masks.

    `on_epoch(i, stats)` is called after every epoch for each member still
    training, in member order; returning True stops member i alone (it stops
    costing compute), as does reaching its own `epochs` (then `stopped_early`
    stays False). A member whose training loss is not finite at the end of an
    epoch gets `error=DivergedError(...)`, no model and no callback; the others
    go on. An exception from `on_epoch` ends the whole group.

    members_per_pass: members per stacked forward pass (all still share every batch).
    options: the speed levers (LoopOptions); the defaults are what ships.
    on_batch(epoch, index, logits): after every step of a group of one, the
    batch's positions in the train split and the logits its training forward
    gave (augmented, train mode, before the update): what the label audit's
    training dynamics average. A larger group refuses it.
    dev_epochs: evaluate dev only in each member's last `dev_epochs` epochs (None: every
    epoch); the other epochs' stats have `dev` None. A retrain that reads only its end
    skips the evaluations, which cost a third of an epoch with ten test-time views.
    tta_epochs: a member with test-time views is evaluated with them only in its last
    `tta_epochs` epochs; every evaluated epoch of it also gets the plain model's
    evaluation (`plain_dev`), so one curve runs through all of its epochs
    (`curve_macro_accuracy`). A search whose objective reads the last epochs
    pays for the views there alone.
    """
    configs = list(configs)
    data, generator, step = start_group(configs, data, options, members_per_pass, order_seed, on_batch)
    shared = configs[0]
    results = [MemberResult(None, config, device=str(data.device)) for config in configs]
    started = time.perf_counter()
    try:
        for epoch in range(1, max(c.epochs for c in configs) + 1):
            if data.device.type == "cuda":  # process-wide: set each epoch, so runs stepped in turn keep their own
                torch.backends.cudnn.benchmark = options.cudnn_benchmark
            epoch_start = time.perf_counter()
            train_epoch(step, epoch_batches(data, shared, generator), epoch, on_batch)
            keep = record_epoch(step, data, results, epoch, time.perf_counter() - epoch_start, started, on_epoch,
                                dev_epochs, tta_epochs)
            yield results
            step.keep(keep)
            if not step.members:
                break
    finally:
        step.close()  # the group's pass threads go with it


def train_group(configs: Sequence[TrainConfig], data: DeviceData | Splits,
                on_epoch: Callable[[int, EpochStats], bool | None] | None = None,
                members_per_pass: int | None = None, dev_epochs: int | None = None,
                tta_epochs: int | None = None) -> list[MemberResult]:
    """train_group_epochs to the end: result i belongs to configs[i]."""
    results = []
    for results in train_group_epochs(configs, data, on_epoch, members_per_pass=members_per_pass,
                                      dev_epochs=dev_epochs, tta_epochs=tta_epochs):
        pass
    return results


def train(config: TrainConfig, data: DeviceData | Splits, device="auto",
          on_epoch: Callable[[EpochStats], bool | None] | None = None, order_seed: int | None = None,
          on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> TrainResult:
    """Train one config to the end (a group of one); `on_epoch` is called after every epoch and may return True to stop.

    Raises DivergedError when the training loss is not finite: a NaN model is
    never returned as if it were a result. on_batch: see train_group_epochs.
    """
    if not isinstance(data, DeviceData):
        data = DeviceData(data, device)
    result = None
    for results in train_group_epochs([config], data, None if on_epoch is None else lambda _, stats: on_epoch(stats),
                                      order_seed=order_seed, on_batch=on_batch):
        result = results[0]
    if result.error is not None:
        raise result.error
    return result
