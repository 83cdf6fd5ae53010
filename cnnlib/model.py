"""The user's CNN (a LeNet-5 variant with dropout) and the audit's stronger fold model.

SeedCNN: conv 3->6 5x5, max-pool 2, conv 6->16 5x5, max-pool 2, fc ->120->84->n_classes.
SmallVGG: 3x3 conv-BN-ReLU stages, max-pool between them, global average pool, linear.
Input normalization lives inside the model so that every caller (training,
evaluation, FGSM) hands it images on the [0, 1] pixel scale; the attack's
epsilon then means the same thing whatever normalization the net uses.
"""

from __future__ import annotations

import torch
from torch import nn

# The user's course code used Normalize(mean=0.5, std=0.5): inputs in [-1, 1].
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
CIFAR_MEAN = (0.491, 0.482, 0.447)
CIFAR_STD = (0.247, 0.243, 0.262)


def flat_features(image_size: int) -> int:
    """Features after the two conv/pool stages: 400 for 32x32 inputs."""
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"image size {image_size} is too small for the seed CNN (needs at least 16)")
    return 16 * side * side


class SeedCNN(nn.Module):
    def __init__(self, n_classes: int = 3, dropout: float = 0.1, image_size: int = 32):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.register_buffer("mean", torch.tensor(INPUT_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(INPUT_STD).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat_features(image_size), 120), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(120, 84), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(84, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) floats in [0, 1]."""
        return self.classifier(self.features((x - self.mean) / self.std))


def model_flops_per_image(image_size: int = 32, n_classes: int = 3) -> int:
    """Multiply-adds x2 of one forward pass; convs and linears only (pool/ReLU are noise)."""
    s1 = image_size - 4
    p1 = s1 // 2
    s2 = p1 - 4
    macs = 6 * s1 * s1 * 3 * 25 + 16 * s2 * s2 * 6 * 25
    macs += flat_features(image_size) * 120 + 120 * 84 + 84 * n_classes
    return 2 * macs


class SmallVGG(nn.Module):
    """3x3 conv-BN-ReLU stages with a max-pool between stages, global average pool, dropout, linear.

    The default widths (16, 16) (32, 32) (64) are the label audit's fold model
    (study/audit/command.py; figures there): about 7.5 M multiply-adds per image against
    the seed CNN's 0.65 M, and 0.80-0.81 out-of-fold macro accuracy on the user's
    train+dev where the seed CNN reaches 0.67-0.71. Global pooling makes it
    work at any image size of at least 2 ** (stages - 1) pixels.
    """

    def __init__(self, n_classes: int = 3, dropout: float = 0.0, image_size: int = 32,
                 widths: tuple[tuple[int, ...], ...] = ((16, 16), (32, 32), (64,))):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if image_size < 2 ** (len(widths) - 1):
            raise ValueError(f"image size {image_size} is too small for {len(widths)} stages of SmallVGG")
        # CIFAR-10's channel statistics: BN after every conv makes the exact values matter little.
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        layers, channels = [], 3
        for stage, stage_widths in enumerate(widths):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for width in stage_widths:
                # No conv bias: the BN right after it has one.
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(channels, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) floats in [0, 1]."""
        return self.classifier(self.features((x - self.mean) / self.std))


# Architectures a TrainConfig can name (`model:`): name -> (n_classes, dropout, image_size) -> nn.Module.
# Each takes images on the [0, 1] scale and normalizes inside. Only the seed CNN has a
# stacked (fused) form; other models train one at a time through the same loop.
MODELS = {"seed_cnn": SeedCNN, "small_vgg": SmallVGG}
