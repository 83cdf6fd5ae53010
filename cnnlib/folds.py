"""Stratified k-fold splits of labelled images: the label audit's out-of-fold models and make final's choice.

Every fold keeps the class mix, so the rare classes (51 trucks in the user's
dev split) reach each fold; one seed gives the same folds to every config
that is compared on them, so their per-fold differences pair image by image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .sources import LabeledImages
from .splits import Splits


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per image; raises ValueError when a class has fewer images than there are folds."""
    from sklearn.model_selection import StratifiedKFold  # noqa: PLC0415 - heavy import, only here

    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    if folds < 2 or smallest < folds:
        raise ValueError(f"need at least 2 folds and at most the smallest class size ({smallest})")
    fold_of = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[held_out] = k
    return fold_of


def pooled(parts: Sequence[LabeledImages]) -> LabeledImages:
    """Several splits' images one after another, in the order given."""
    return LabeledImages(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                         np.concatenate([p.ids for p in parts]))


def fold_split(splits: Splits, pool: LabeledImages, fold_of: np.ndarray, fold: int) -> Splits:
    """Train on every pooled image outside `fold`; the fold is the "dev" split; the test split stays as it is."""
    held_out = fold_of == fold
    return Splits(splits.classes, pool.subset(~held_out), pool.subset(held_out), splits.test,
                  source=splits.source, cache_key=splits.cache_key, corrections_digest=splits.corrections_digest)
