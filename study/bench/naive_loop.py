"""The reference the project loop is measured against: training as tutorials write it.

A `torch.utils.data.Dataset` hands out one uint8 HWC image at a time through
per-sample torchvision transforms (ToTensor, then Normalize to [-1, 1], the
user's course normalization); a shuffling `DataLoader` collates batches on the
host and each batch is moved to the device; the running loss is read with
`.item()` every step and dev is evaluated batch by batch the same way.

The same function is trained as in the project loop. `SeedCNN` normalizes
inside `forward` (it takes [0, 1] pixels) while the tutorial normalizes in the
transform, so the naive model is a `SeedCNN` whose built-in mean/std buffers
are set to 0/1 (identity): Normalize(0.5, 0.5) in the transform then does
exactly what the project model does inside. Weights come from the same
`torch.manual_seed(seed)` followed by the same constructor, so both loops start
from identical weights; the loss, optimizer and hyperparameters come from the
same `TrainConfig`. Only the batch order (DataLoader shuffle vs. the project's
on-device `randperm`) and the loops' speed differ.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import transforms

from cnnlib.config import TrainConfig
from cnnlib.device import resolve_device
from cnnlib.errors import DivergedError
from cnnlib.losses import class_weights, make_criterion
from cnnlib.metrics import Evaluation
from cnnlib.model import INPUT_MEAN, INPUT_STD, SeedCNN
from cnnlib.sources import LabeledImages
from cnnlib.splits import Splits
from cnnlib.training import EpochStats, TrainResult


class ImageDataset(Dataset):
    """One (C, H, W) float tensor and its label per `__getitem__`, transformed on the host."""

    def __init__(self, split: LabeledImages, transform: Callable):
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.labels[index])


def make_transform(config: TrainConfig, train: bool) -> transforms.Compose:
    steps: list = [transforms.ToTensor()]  # uint8 HWC -> float CHW in [0, 1]
    if train and config.flip:
        steps.append(transforms.RandomHorizontalFlip())
    if train and config.jitter:
        steps.append(transforms.ColorJitter(brightness=config.jitter, contrast=config.jitter, saturation=config.jitter))
    steps.append(transforms.Normalize(INPUT_MEAN, INPUT_STD))
    return transforms.Compose(steps)


def make_naive_model(n_classes: int, config: TrainConfig, image_size: int, device) -> nn.Module:
    """SeedCNN with its built-in normalization switched off: the transform already normalized."""
    model = SeedCNN(n_classes, config.dropout, image_size)
    model.mean.zero_()
    model.std.fill_(1.0)
    return model.to(device)


def make_loaders(config: TrainConfig, splits: Splits, workers: int = 0) -> tuple[DataLoader, DataLoader]:
    train_set = ImageDataset(splits.train, make_transform(config, train=True))
    dev_set = ImageDataset(splits.dev, make_transform(config, train=False))
    generator = torch.Generator().manual_seed(config.seed)
    if config.imbalance == "weighted_sampler":
        labels = torch.from_numpy(splits.train.labels)
        weights = class_weights(labels, len(splits.classes))[labels]
        sampler = WeightedRandomSampler(weights.double(), len(labels), replacement=True, generator=generator)
        train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, num_workers=workers)
    else:
        train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator,
                                  num_workers=workers)
    dev_loader = DataLoader(dev_set, batch_size=config.batch_size, shuffle=False, num_workers=workers)
    return train_loader, dev_loader


def evaluate_naive(model: nn.Module, loader: DataLoader, classes, criterion: nn.Module, device) -> Evaluation:
    n = len(classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    total_loss, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total_loss += criterion(logits, y).item() * len(y)
            count += len(y)
            for true, pred in zip(y.tolist(), logits.argmax(1).tolist()):
                matrix[true, pred] += 1
    return Evaluation(tuple(classes), matrix, total_loss / count if count else float("nan"))


def tutorial_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The config's SGD (Nesterov or not), Adam or AdamW from torch.optim, called as a tutorial calls it."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def naive_train_epochs(config: TrainConfig, splits: Splits, device="auto", workers: int = 0) -> Iterator[TrainResult]:
    """Train like a tutorial, yielding the growing TrainResult after each epoch (the bench interleaves loops)."""
    device = resolve_device(device)
    torch.manual_seed(config.seed)
    n_classes = len(splits.classes)
    model = make_naive_model(n_classes, config, splits.train.images.shape[1], device)
    optimizer = tutorial_optimizer(model, config)
    criterion = make_criterion(config, torch.from_numpy(splits.train.labels).to(device), n_classes)
    train_loader, dev_loader = make_loaders(config, splits, workers)
    result = TrainResult(model, config, device=str(device))
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        running, seen = 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(y)
            seen += len(y)
        train_loss = running / seen
        if not math.isfinite(train_loss):
            raise DivergedError(epoch, train_loss)
        dev = evaluate_naive(model, dev_loader, splits.classes, criterion, device)
        result.history.append(EpochStats(epoch, train_loss, dev.loss, dev, time.perf_counter() - epoch_start))
        result.seconds = time.perf_counter() - started
        yield result


def train_naive(config: TrainConfig, splits: Splits, device="auto", workers: int = 0) -> TrainResult:
    result = None
    for result in naive_train_epochs(config, splits, device, workers):
        pass
    return result
