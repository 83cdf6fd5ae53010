"""A seed ensemble: the prediction is the mean softmax over models trained alike with different seeds.

`make final` already trains the chosen config with several seeds to show
their spread; averaging their probabilities costs no training, only
inference (one forward per member). On the user's data the three seeds of
the AdamW recipe scored 0.886-0.904 test macro alone and 0.909 together
(docs/results.md).

The output is the log of the mean softmax, as `cnnlib.tta.TTAModel` gives:
the argmax is the averaged prediction, cross-entropy on it differentiates
through every member (attacks attack the ensemble), and wrapping it in a
TTAModel averages over views and members alike.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

PREFIX = "members."


class Ensemble(nn.Module):
    """Members of one architecture; forward gives log(mean over members of softmax(member(x)))."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs two or more members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logs = torch.stack([member(x).log_softmax(-1) for member in self.members])
        return torch.logsumexp(logs, 0) - math.log(len(self.members))


def member_states(state: dict, count: int) -> list[dict]:
    """An Ensemble's state dict cut into its members' own state dicts (keys without `members.<i>.`)."""
    if not isinstance(state, dict):
        raise ValueError(f"the weights are a {type(state).__name__}, not a state dict")
    states = [{} for _ in range(count)]
    for key, value in state.items():
        index, _, rest = key[len(PREFIX):].partition(".") if key.startswith(PREFIX) else ("", "", "")
        if not (index.isdigit() and int(index) < count and rest):
            raise ValueError(f"weight {key!r} belongs to no member of an ensemble of {count}")
        states[int(index)][rest] = value
    return states


def first_member(model: nn.Module) -> nn.Module:
    """The model itself, or an ensemble's first member: what a check of the architecture reads."""
    return model.members[0] if isinstance(model, Ensemble) else model
