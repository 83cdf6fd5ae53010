"""How `make audit` gives every audited image predicted probabilities: training dynamics or out of fold.

- training_dynamics: one model trains on every image, and each image's
  probabilities are its softmax at its own visits during the last `window`
  of the epochs (DynamicsRecorder, train's on_batch).
- out_of_fold: K-fold cross-validation, each image predicted by the fold
  model that never saw it.
Also here: pooling the audited splits, flipping labels on purpose (the
audit's own check), and the warning for models that agree with the given
labels no better than chance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from cnnlib.config import TrainConfig
from cnnlib.device import resolve_device
from cnnlib.folds import pooled
from cnnlib.folds import stratified_folds as folds_of
from cnnlib.metrics import confusion_matrix, macro_accuracy
from cnnlib.sources import LabeledImages
from cnnlib.splits import Splits
from cnnlib.training import DeviceData, predict_logits, train

from .. import lifetime, progress
from ..errors import UserError

# training_dynamics averages each image's at-visit softmax over this share of the last epochs.
# small_vgg, 30 epochs, the user's train+dev with 100 flips (draws 0/1/2, model seed = draw):
# top-100 hits 79/76/85 averaging the last quarter, 76/76/84 the last half, 74/77/83 all epochs,
# 75/79/83 the final model's own predictions.
DYNAMICS_WINDOW = 0.25
# Below a quarter of the way from chance (1/K) to perfect, the audit's models barely agree
# with the given labels and the suspects list is mostly noise (0.5 macro for 3 classes).
NEAR_CHANCE_FRACTION = 0.25


# --- pooling, flipping, folds -------------------------------------------------

@dataclass
class Pool:
    """The audited images of several splits side by side, remembering where each came from."""

    images: LabeledImages
    split: np.ndarray  # (N,) split name per image


def pool_splits(splits: Splits, names: Sequence[str]) -> Pool:
    available = splits.named()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UserError(f"--splits: {', '.join(unknown)} not available (have {', '.join(available)})")
    parts = [available[n] for n in names]
    split = np.concatenate([np.full(len(p), n, dtype=object) for n, p in zip(names, parts)]).astype(str)
    return Pool(pooled(parts), split)


def flip_labels(labels: np.ndarray, candidates: np.ndarray, count: int, n_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Give `count` randomly chosen candidates a uniformly random *other* label: known label noise."""
    if count > len(candidates):
        raise UserError(f"cannot flip {count} labels among {len(candidates)} images")
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    flipped = labels.copy()
    flipped[chosen] = (labels[chosen] + rng.integers(1, n_classes, size=count)) % n_classes
    return flipped, chosen


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per image (cnnlib.folds); too many folds for the rarest class is a user error."""
    try:
        return folds_of(labels, folds, seed)
    except ValueError as error:
        raise UserError(f"--folds {folds}: {error}") from None


# --- the two methods -----------------------------------------------------------

def predict_probabilities(model: torch.nn.Module, x: torch.Tensor, mirror: bool = True) -> torch.Tensor:
    """Softmax probabilities; with `mirror`, averaged with the mirrored images' (the model trained on both)."""
    probs = torch.softmax(predict_logits(model, x).double(), dim=1)
    if mirror:
        probs = (probs + torch.softmax(predict_logits(model, x.flip(3)).double(), dim=1)) / 2
    return probs


def out_of_fold_probabilities(images: LabeledImages, classes: Sequence[str], fold_of: np.ndarray,
                              config: TrainConfig, device="auto",
                              log: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, list[dict]]:
    """Softmax probabilities for every image from the fold model that held it out.

    The held-out fold is the training run's "dev" split, so train()'s per-epoch
    evaluation reports how well each fold model agrees with the given labels.
    """
    device = resolve_device(device)
    probs = np.zeros((len(images), len(classes)), dtype=np.float64)
    stats, folds, started = [], int(fold_of.max()) + 1, time.perf_counter()
    for k in range(folds):
        held_out = fold_of == k
        fold = Splits(tuple(classes), images.subset(~held_out), images.subset(held_out))
        data = DeviceData(fold, device)
        label = f"fold {k + 1}/{int(fold_of.max()) + 1}"

        def on_epoch(stats, label=label) -> None:
            lifetime.check_interrupt()
            progress.epoch(label, stats.epoch, config.epochs, stats.dev_macro_accuracy)

        result = train(config, data, device, on_epoch=on_epoch)
        probs[held_out] = predict_probabilities(result.model, data.dev.x, mirror=config.flip).cpu().numpy()
        dev = result.dev
        stats.append({"fold": k, "train_images": int((~held_out).sum()), "held_out_images": int(held_out.sum()),
                      "held_out_macro_accuracy": dev.macro_accuracy, "held_out_per_class": dev.per_class,
                      "seconds": round(result.seconds, 2)})
        elapsed = time.perf_counter() - started
        left = f"; about {progress.minutes(elapsed / (k + 1) * (folds - k - 1))} left" if k + 1 < folds else ""
        log(f"fold {k + 1}/{folds}: held-out macro accuracy {dev.macro_accuracy:.3f} "
            f"(vs given labels), {result.seconds:.0f}s{left}")
    return probs, stats


class DynamicsRecorder:
    """Each image's softmax at its training visits, summed over the window's epochs (train_group_epochs' on_batch).

    It also counts the at-visit predictions of every epoch against the given
    labels: the in-sample agreement that progress shows while the model trains.
    """

    def __init__(self, labels: torch.Tensor, n_classes: int, first_epoch: int):
        self.labels, self.n_classes, self.first_epoch = labels, n_classes, first_epoch
        self.sums = torch.zeros(len(labels), n_classes, dtype=torch.float64, device=labels.device)
        self.visits = torch.zeros(len(labels), dtype=torch.float64, device=labels.device)
        self.counts = torch.zeros(n_classes * n_classes, dtype=torch.long, device=labels.device)

    def __call__(self, epoch: int, index: torch.Tensor, logits: torch.Tensor) -> None:
        y = self.labels.index_select(0, index)
        self.counts += torch.bincount(y * self.n_classes + logits.argmax(1), minlength=self.n_classes ** 2)
        if epoch >= self.first_epoch:
            self.sums.index_add_(0, index, torch.softmax(logits.double(), dim=1))
            self.visits.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def epoch_macro_accuracy(self) -> float:
        """Macro accuracy of this epoch's at-visit predictions against the given labels; starts the next epoch's count."""
        macro = macro_accuracy(self.counts.view(self.n_classes, self.n_classes).cpu().numpy())
        self.counts.zero_()  # after: on the CPU .numpy() shares the tensor's memory
        return macro

    def probabilities(self) -> np.ndarray:
        """Mean softmax per image over its window visits (uniform for an image never visited)."""
        visits = self.visits.clamp(min=1).unsqueeze(1)
        probs = torch.where(self.visits.unsqueeze(1) > 0, self.sums / visits, 1.0 / self.n_classes)
        return probs.cpu().numpy()


def window_start(epochs: int, window: float) -> int:
    """First epoch (1-based) of the last `window` share of `epochs`: at least the last epoch."""
    if not 0 < window <= 1:
        raise UserError(f"--window {window}: the share of last epochs to average must be in (0, 1]")
    return epochs - max(1, round(window * epochs)) + 1


def training_dynamics_probabilities(images: LabeledImages, classes: Sequence[str], config: TrainConfig,
                                    window: float = DYNAMICS_WINDOW, device="auto",
                                    log: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, list[dict]]:
    """Each image's mean softmax at its visits during the last `window` of one training run on all of them."""
    device = resolve_device(device)
    nothing = images.subset(np.zeros(len(images), dtype=bool))  # no held-out split: every image trains
    data = DeviceData(Splits(tuple(classes), images, nothing), device)
    first = window_start(config.epochs, window)
    recorder = DynamicsRecorder(data.train.y, len(classes), first)

    def on_epoch(stats) -> None:
        lifetime.check_interrupt()
        progress.epoch("model", stats.epoch, config.epochs, recorder.epoch_macro_accuracy(), metric="in-sample macro")

    result = train(config, data, device, on_epoch=on_epoch, on_batch=recorder)
    probs = recorder.probabilities()
    log(f"trained on {len(images)} images in {result.seconds:.0f}s; probabilities averaged over epochs "
        f"{first}-{config.epochs}")
    return probs, [{"train_images": len(images), "window_epochs": [first, config.epochs],
                    "seconds": round(result.seconds, 2)}]


# --- agreement with the given labels -------------------------------------------


def agreement_macro_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro accuracy of the predicted probabilities' argmax against the given labels."""
    return macro_accuracy(confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1]))


def near_chance(macro: float, n_classes: int) -> bool:
    """True when macro accuracy is within NEAR_CHANCE_FRACTION of the way from chance (1/K) to 1."""
    chance = 1.0 / n_classes
    return not macro >= chance + NEAR_CHANCE_FRACTION * (1.0 - chance)  # NaN counts as near chance


def chance_warning(macro: float, n_classes: int) -> str | None:
    """The one warning for audit models near chance (see near_chance), else None.

    Confident learning then ranks images by the models' bias (every cat "-> car"), not by their labels.
    """
    if not near_chance(macro, n_classes):
        return None
    return (f"audit models near chance: macro accuracy {macro:.3f} against the given labels, a constant guess "
            f"scores {1 / n_classes:.3f} with {n_classes} classes; the suspects reflect the models' bias, not label "
            "errors (check the data and labels, or train longer with --epochs)")
