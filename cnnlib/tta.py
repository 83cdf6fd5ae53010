"""Test-time augmentation: a prediction is the mean softmax over views of the image.

A config's `tta` names its views: `none` (the image alone: the model's own
logits, as without TTA), `flip` (and its mirror), `flip_translate` (and
both shifted by SHIFT pixels left, right, up and down, reflect-padded as the
training crop pads). Each mode's views are the first ones of the next
mode's, so members of a fused group with different modes share the
forwards they have in common (`log_mean_softmax` with per-member counts).

The output is the log of the mean softmax, computed as a logsumexp of the
views' log-softmaxes: its argmax is the averaged prediction, its softmax is
the averaged probabilities, and cross-entropy on it differentiates through
every view, so an attack on `TTAModel` attacks the model as it is evaluated.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .augment import reflect_index

# Pixels each translated view is shifted by: half the training crop (4), well inside what the net saw.
SHIFT = 2
# (mirrored, rows down, columns right) of each view; a mode uses the first VIEW_COUNTS[mode].
VIEWS = ((False, 0, 0), (True, 0, 0),
         (False, 0, SHIFT), (True, 0, SHIFT), (False, 0, -SHIFT), (True, 0, -SHIFT),
         (False, SHIFT, 0), (True, SHIFT, 0), (False, -SHIFT, 0), (True, -SHIFT, 0))
VIEW_COUNTS = {"none": 1, "flip": 2, "flip_translate": len(VIEWS)}
TTA_MODES = tuple(VIEW_COUNTS)


def check_mode(mode: str) -> str:
    mode = str(mode).lower()
    if mode not in VIEW_COUNTS:
        raise ValueError(f"tta {mode!r} is not one of {', '.join(TTA_MODES)}")
    return mode


def view(x: torch.Tensor, index: int) -> torch.Tensor:
    """View `index` of a batch (N, C, H, W): shifted with reflected borders, then mirrored if it says so."""
    mirrored, down, right = VIEWS[index]
    if down:
        x = x.index_select(2, reflect_index(torch.arange(x.shape[2], device=x.device) + down, x.shape[2]))
    if right:
        x = x.index_select(3, reflect_index(torch.arange(x.shape[3], device=x.device) + right, x.shape[3]))
    return x.flip(3) if mirrored else x


def log_mean_softmax(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     counts: int | list[int]) -> torch.Tensor:
    """log(mean over views of softmax(forward(view))), one forward per view.

    forward: images -> logits (B, C) for one model, or (K, B, C) for K members;
    counts: views per prediction, an int for one model, one per member for K.
    A row with one view gets forward's own logits, untouched.
    """
    per_member = not isinstance(counts, int)
    most = max(counts) if per_member else counts
    logits = forward(x)
    if most == 1:
        return logits
    logs = torch.stack([logits.log_softmax(-1)] + [forward(view(x, i)).log_softmax(-1) for i in range(1, most)])
    if not per_member:
        return torch.logsumexp(logs, 0) - math.log(most)
    n = torch.tensor(counts, device=x.device).view(-1, 1, 1)
    unused = torch.arange(most, device=x.device).view(-1, 1, 1, 1) >= n  # (V, K, 1, 1): views past a member's count
    averaged = torch.logsumexp(logs.masked_fill(unused, -math.inf), 0) - n.log()
    return torch.where(n == 1, logits, averaged)


class TTAModel(nn.Module):
    """A model as evaluated with test-time augmentation: forward gives log(mean softmax) over its views.

    With tta `none` it is the model itself (its logits). Attacks, evaluation
    and predictions take it as they take the model.
    """

    def __init__(self, model: nn.Module, tta: str):
        super().__init__()
        self.model, self.tta = model, check_mode(tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mean_softmax(self.model, x, VIEW_COUNTS[self.tta])


def as_evaluated(model: nn.Module, tta: str) -> nn.Module:
    """The model as a config's `tta` evaluates it: the model itself for `none`, else its TTAModel."""
    return model if check_mode(tta) == "none" else TTAModel(model, tta)
