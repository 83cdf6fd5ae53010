"""Learning-rate schedules as one factor per optimizer step.

The stacked optimizer indexes one column of the members' tables per step
(torch.optim.lr_scheduler.LambdaLR over the same table is the tests'
reference). Each member's table spans its own epochs, so members of a group
with different epochs follow their own schedules.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_factors(config: TrainConfig, total_steps: int) -> torch.Tensor:
    """Factor of `config.lr` at each of `total_steps` steps (float64).

    Warm-up: linear from 1/w to 1 over the first w = warmup * total steps. Then
    constant: 1; cosine: 1/2 (1 + cos(pi t)); one_cycle: 1 - t (linear to zero,
    the triangle airbench trains with), t going from 0 towards 1 over the rest.
    """
    step = torch.arange(total_steps, dtype=torch.float64)
    warm = min(total_steps - 1, round(config.warmup * total_steps))
    t = (step - warm).clamp(min=0) / max(1, total_steps - warm)
    if config.schedule == "cosine":
        factor = 0.5 * (1 + torch.cos(math.pi * t))
    elif config.schedule == "one_cycle":
        factor = 1 - t
    else:
        factor = torch.ones_like(t)
    if warm > 0:
        factor = torch.where(step < warm, (step + 1) / warm, factor)
    return factor


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return math.ceil(n_train / batch_size)
