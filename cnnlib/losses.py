"""The training loss of every imbalance method, for one model and for a stacked group.

All methods are one formula: cross-entropy of `logits + offset` with class
weights `weight` and label smoothing, exactly as `F.cross_entropy` defines it:
- weighted_loss: weight = inverse class frequency, offset 0 (the user's choice);
- logit_adjusted: weight 1, offset = tau * log(prior) (Menon et al., ICLR 2021;
  tau = 1 is the balanced softmax). The model is evaluated on its raw logits:
  the offset only changes what training rewards, so rare classes get a wider
  margin;
- weighted_sampler and none: weight 1, offset 0 (the sampler balances the batches).
The stacked form (`loss_sums`) computes the same numbers for K members at once,
so a member of a stacked group trains on the loss ClassificationLoss gives its model alone.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, N / (K * n_c): 1 for a balanced set, large for rare classes."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    return labels.numel() / (n_classes * counts.clamp(min=1))


def loss_terms(config: TrainConfig, train_labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, offset), each (n_classes,), of this config's loss on these training labels."""
    device = train_labels.device
    weight = (class_weights(train_labels, n_classes) if config.imbalance == "weighted_loss"
              else torch.ones(n_classes, device=device))
    offset = torch.zeros(n_classes, device=device)
    if config.imbalance == "logit_adjusted":
        prior = torch.bincount(train_labels, minlength=n_classes).float().clamp(min=1) / train_labels.numel()
        offset = config.tau * prior.log()
    return weight, offset


class ClassificationLoss(nn.Module):
    """Cross-entropy of logits + offset with class weights and label smoothing (mean over the batch)."""

    def __init__(self, weight: torch.Tensor | None, offset: torch.Tensor | None, label_smoothing: float = 0.0):
        super().__init__()
        self.weight, self.offset, self.label_smoothing = weight, offset, label_smoothing

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.offset is not None:
            logits = logits + self.offset
        return F.cross_entropy(logits, y, weight=self.weight, label_smoothing=self.label_smoothing)


def make_criterion(config: TrainConfig, train_labels: torch.Tensor, n_classes: int) -> ClassificationLoss:
    weight, offset = loss_terms(config, train_labels, n_classes)
    return ClassificationLoss(weight if config.imbalance == "weighted_loss" else None,
                              offset if config.imbalance == "logit_adjusted" else None, config.label_smoothing)


def loss_sums(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor | None = None,
              smoothing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member, numerator and denominator of its mean loss: logits (K, B, C), y (B,),
    weight and offset (K, C), smoothing (K,); None skips the offset or the smoothing (no work, no sync).

    F.cross_entropy's weighted mean with smoothing eps is
    [(1 - eps) * sum_i w_yi * -log p_yi + eps / C * sum_i sum_c w_c * -log p_c] / sum_i w_yi;
    both sums share the denominator, so chunks of a split add up.
    """
    k, _, n_classes = logits.shape
    log_p = torch.log_softmax(logits if offset is None else logits + offset.unsqueeze(1), dim=2)
    picked = log_p.gather(2, y.view(1, -1, 1).expand(k, -1, 1)).squeeze(2)
    w = weight[:, y]
    numerator = -(w * picked).sum(1)
    if smoothing is not None:
        smoothing = smoothing.view(-1)
        smooth = -(log_p * weight.unsqueeze(1)).sum((1, 2))
        numerator = (1 - smoothing) * numerator + smoothing / n_classes * smooth
    return numerator, w.sum(1)


def member_losses(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, offset: torch.Tensor | None = None,
                  smoothing: torch.Tensor | None = None) -> torch.Tensor:
    """Each member's ClassificationLoss, shape (K,)."""
    numerator, denominator = loss_sums(logits, y, weight, offset, smoothing)
    return numerator / denominator


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

    @classmethod
    def concat(cls, parts: list["MemberLoss"]) -> "MemberLoss":
        """The rows of every part, part after part (a part's None offsets or smoothing are zeros)."""
        out = copy.copy(parts[0])
        out.weight = torch.cat([part.weight for part in parts])
        if any(part.offset is not None for part in parts):
            out.offset = torch.cat([torch.zeros_like(part.weight) if part.offset is None else part.offset
                                    for part in parts])
        if any(part.smoothing is not None for part in parts):
            out.smoothing = torch.cat([part.weight.new_zeros(len(part.weight)) if part.smoothing is None
                                       else part.smoothing for part in parts])
        return out

