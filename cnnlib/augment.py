"""Batched, on-device augmentation: one kernel per op for the whole batch.

torchvision's v2 transforms draw one random factor per call; applied to a
batch they would jitter every image alike. These draw per-image factors from
an explicit generator so that a seed fixes the augmentation too.
"""

from __future__ import annotations

import torch

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


def _factors(n: int, strength: float, generator: torch.Generator, device) -> torch.Tensor:
    """Per-image factors uniform in [1 - strength, 1 + strength], shaped to broadcast over NCHW."""
    u = torch.rand(n, 1, 1, 1, generator=generator, device=device)
    return 1.0 + strength * (2.0 * u - 1.0)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation, each scaled by a per-image factor; x in [0, 1]."""
    n, device = x.shape[0], x.device
    luma = torch.tensor(_LUMA, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    x = x * _factors(n, strength, generator, device)
    mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = mean + (x - mean) * _factors(n, strength, generator, device)
    gray = (x * luma).sum(1, keepdim=True)
    x = gray + (x - gray) * _factors(n, strength, generator, device)
    return x.clamp_(0.0, 1.0)


def augment_batch(x: torch.Tensor, flip: bool, jitter: float, generator: torch.Generator) -> torch.Tensor:
    if flip:
        x = random_flip(x, generator)
    if jitter > 0:
        x = color_jitter(x, jitter, generator)
    return x
