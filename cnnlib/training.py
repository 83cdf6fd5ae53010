"""Training the seed CNN from a plain config: the hot path of every trial.

The data lives on the device as one float tensor per split; an epoch is a
`randperm` (or a weighted `multinomial` draw) and index slices of it. No
DataLoader, no per-sample Python, no `.item()` per step: the only host syncs
are one per epoch (divergence check and the epoch callback).
This module knows nothing of Optuna; `on_epoch` is how a study listens and
stops a run (pruning).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .augment import augment_batch
from .device import resolve_device
from .errors import DivergedError
from .metrics import Evaluation
from .model import SeedCNN
from .sources import LabeledImages
from .splits import Splits

OPTIMIZERS = ("sgd", "adam")
IMBALANCE_METHODS = ("weighted_loss", "weighted_sampler", "none")
# Channels-last weights (oneDNN NHWC convolutions). A first quick probe found ~1.5x
# on the 2-core CPU; `make bench` (`--levers`, 1 thread, machine shared with other
# jobs) later measured no clear difference: CPU time per epoch 0.97x, wall 0.85-1.01x.
# Kept on until a quiet-machine measurement says otherwise.
CHANNELS_LAST = True
EVAL_BATCH = 4096


@dataclass
class TrainConfig:
    """Every knob of one training run; defaults are the user's final recipe (report table 4)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-2
    batch_size: int = 32
    epochs: int = 100
    imbalance: str = "weighted_loss"  # beat the weighted sampler in the user's report
    dropout: float = 0.1
    flip: bool = False  # the user tried no augmentation in the final model
    jitter: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.optimizer = str(self.optimizer).lower()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.imbalance not in IMBALANCE_METHODS:
            raise ValueError(f"imbalance {self.imbalance!r} is not one of {', '.join(IMBALANCE_METHODS)}")
        checks = [("lr", self.lr > 0), ("batch_size", int(self.batch_size) >= 1), ("epochs", int(self.epochs) >= 1),
                  ("weight_decay", self.weight_decay >= 0), ("momentum", 0 <= self.momentum < 1),
                  ("jitter", 0 <= self.jitter < 1), ("dropout", 0 <= self.dropout < 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        self.batch_size, self.epochs, self.seed = int(self.batch_size), int(self.epochs), int(self.seed)
        self.lr, self.momentum, self.weight_decay = float(self.lr), float(self.momentum), float(self.weight_decay)
        self.dropout, self.jitter, self.flip = float(self.dropout), float(self.jitter), bool(self.flip)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


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


class DeviceSplit:
    """One split as device tensors: NCHW float images in [0, 1] and int64 labels."""

    def __init__(self, split: LabeledImages, device: torch.device):
        images = torch.from_numpy(np.ascontiguousarray(split.images)).to(device)
        # uint8 NHWC -> float NCHW view with channels-last strides: no copy of layout.
        self.x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if not CHANNELS_LAST:
            self.x = self.x.contiguous()
        self.y = torch.from_numpy(split.labels).to(device)

    def __len__(self) -> int:
        return self.y.shape[0]


class DeviceData:
    """Train and dev (and test) resident on the device, built once and shared by many trials."""

    def __init__(self, splits: Splits, device: torch.device | str = "auto"):
        self.device = resolve_device(device)
        self.classes = tuple(splits.classes)
        self.train = DeviceSplit(splits.train, self.device)
        self.dev = DeviceSplit(splits.dev, self.device)
        self.test = DeviceSplit(splits.test, self.device) if splits.test is not None else None
        self.image_size = splits.train.images.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, N / (K * n_c): 1 for a balanced set, large for rare classes."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    return labels.numel() / (n_classes * counts.clamp(min=1))


def make_model(n_classes: int, config: TrainConfig, image_size: int, device) -> nn.Module:
    model = SeedCNN(n_classes, config.dropout, image_size).to(device)
    return model.to(memory_format=torch.channels_last) if CHANNELS_LAST else model


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD with the fused kernel (one op per step for all parameters, CPU and CUDA).

    On the 2-core CPU the fused Adam step took 0.29 ms against foreach's 0.63 ms, and a
    batch-32 epoch 1.14x less CPU time (`make bench --levers`, 1 thread, 8 epochs).
    Same seed, same result: the fused kernels are deterministic. Devices without
    a fused kernel get foreach.
    """
    if config.optimizer == "sgd":
        make = lambda **kw: torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,  # noqa: E731
                                            weight_decay=config.weight_decay, **kw)
    else:
        make = lambda **kw: torch.optim.Adam(model.parameters(), lr=config.lr,  # noqa: E731
                                             weight_decay=config.weight_decay, **kw)
    try:
        return make(fused=True)
    except (RuntimeError, ValueError):
        return make(foreach=True)


def make_criterion(config: TrainConfig, train_labels: torch.Tensor, n_classes: int) -> nn.Module:
    weights = class_weights(train_labels, n_classes) if config.imbalance == "weighted_loss" else None
    return nn.CrossEntropyLoss(weight=weights)


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
    out = torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)]) if x.shape[0] else \
        torch.zeros(0, model.classifier[-1].out_features, device=x.device)
    model.train(was_training)
    return out


def evaluate(model: nn.Module, split: DeviceSplit, classes, criterion: nn.Module | None = None) -> Evaluation:
    """Macro/per-class accuracy and confusion matrix of a model on one device split (dropout off)."""
    logits = predict_logits(model, split.x)
    n = len(classes)
    matrix = torch.bincount(split.y * n + logits.argmax(1), minlength=n * n).reshape(n, n)
    loss = criterion(logits, split.y).item() if criterion is not None and len(split) else float("nan")
    return Evaluation(tuple(classes), matrix.cpu().numpy(), loss)


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Same seed, same device, same result: seeds everything and pins cuDNN to deterministic kernels.

    cuDNN's default convolution backward may accumulate with atomics (run-to-run
    differences); its deterministic kernels cost nothing measurable for this net.
    """
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)  # weights and dropout masks
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)  # batch order and augmentation
    return generator


def train_epochs(config: TrainConfig, data: DeviceData | Splits, device="auto",
                 order_seed: int | None = None) -> Iterator[TrainResult]:
    """Train the seed CNN one epoch per step, yielding the growing TrainResult after each epoch.

    `train` runs this to the end; `make bench` steps it in turn with the naive
    loop so that both see the same background load.
    Raises DivergedError when the training loss is not finite: a NaN model is
    never returned as if it were a result.
    """
    if not isinstance(data, DeviceData):
        data = DeviceData(data, device)
    device = data.device
    generator = seed_everything(config.seed, device)
    if order_seed is not None:  # a fused group's batch order (cnnlib.fused): its first member's seed
        generator.manual_seed(order_seed)
    model = make_model(data.n_classes, config, data.image_size, device)
    optimizer = make_optimizer(model, config)
    criterion = make_criterion(config, data.train.y, data.n_classes)
    train_x, train_y, n = data.train.x, data.train.y, len(data.train)
    result = TrainResult(model, config, device=str(device))
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        order = epoch_order(n, train_y, data.n_classes, config.imbalance, generator)
        total = torch.zeros((), device=device)
        for start in range(0, n, config.batch_size):
            index = order[start:start + config.batch_size]
            x = train_x.index_select(0, index)
            if config.flip or config.jitter:
                x = augment_batch(x, config.flip, config.jitter, generator)
            loss = criterion(model(x), train_y.index_select(0, index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * index.numel()
        train_loss = total.item() / n
        if not math.isfinite(train_loss):
            raise DivergedError(epoch, train_loss)
        dev = evaluate(model, data.dev, data.classes, criterion)
        result.history.append(EpochStats(epoch, train_loss, dev.loss, dev, time.perf_counter() - epoch_start))
        result.seconds = time.perf_counter() - started
        yield result


def train(config: TrainConfig, data: DeviceData | Splits, device="auto",
          on_epoch: Callable[[EpochStats], bool | None] | None = None, order_seed: int | None = None) -> TrainResult:
    """Train the seed CNN; `on_epoch` is called after every epoch and may return True to stop.

    Raises DivergedError when the training loss is not finite: a NaN model is
    never returned as if it were a result.
    """
    for result in train_epochs(config, data, device, order_seed):
        if on_epoch is not None and on_epoch(result.history[-1]):
            result.stopped_early = True
            break
    return result
