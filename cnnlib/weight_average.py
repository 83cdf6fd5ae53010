"""Weight averaging: per member, an exponential moving average of its weights, one (K, P) tensor for a pass.

A member's `ema` is its decay d (0: off). After every optimizer step the
average moves towards the new weights by (1 - d) / (1 - d ** t) at step t:
the bias-corrected average of the steps so far (Adam's correction, applied
to the average itself), so step 1 replaces the initial weights and early
epochs' dev values are an average of trained weights, not of the random
init (the pruner judges them). With d = 0 the factor is 1: the row is a copy
of the weights, so a member without averaging evaluates its own weights.
Evaluation and the checkpoint take the averaged rows (`Pass.evaluated_net`);
the seed CNN has no batch norm, so there are no statistics to recompute.
"""

from __future__ import annotations

from typing import Sequence

import torch


class WeightAverage:
    """A pass's averaged rows: `update` after each optimizer step; `select` and `concat` as its rows go."""

    def __init__(self, decays: Sequence[float], flat: torch.Tensor):
        self.decay = torch.tensor(list(decays), dtype=flat.dtype, device=flat.device).view(-1, 1)
        self.average = flat.detach().clone()
        self.steps = torch.zeros((), dtype=flat.dtype, device=flat.device)  # members step together: one count

    def update(self, flat: torch.Tensor) -> None:
        self.steps += 1
        self.average.lerp_(flat.detach(), (1 - self.decay) / (1 - self.decay.pow(self.steps)))

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.average.device)
        self.decay = self.decay.index_select(0, index)
        self.average = self.average.index_select(0, index)

    def copy(self) -> "WeightAverage":
        """Its own rows and step count: the average is updated in place."""
        other = WeightAverage.__new__(WeightAverage)
        other.decay, other.average, other.steps = self.decay, self.average.clone(), self.steps.clone()
        return other

    @staticmethod
    def concat(parts: Sequence["WeightAverage"]) -> "WeightAverage":
        """The rows of several passes' averages in order (passes of one group have stepped alike)."""
        out = parts[0].copy()
        out.decay = torch.cat([p.decay for p in parts])
        out.average = torch.cat([p.average for p in parts])
        return out
