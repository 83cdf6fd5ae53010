"""K SeedCNNs as one network (StackedSeedCNN): one row of a (K, P) tensor per member.

HFTA (Wang et al., MLSys 2021) trains K copies of a model as one wider
model; this is that for `SeedCNN`. The forward splits the (K, P) rows into
per-layer views: conv1 becomes one convolution with K x 6 output channels
(the input batch is shared, so it is read once), conv2 one grouped
convolution (groups=K), the linear layers batched matmuls. `torch.func.vmap`
over `functional_call` was measured too and was 4.4x slower per member
(2-core CPU, K=16, batch 32, 1 thread): grouped convs it is.
- Pooling comes before ReLU here (SeedCNN does ReLU then pool): both are
  monotone so the values are identical, and ReLU and its backward then run
  on a quarter of the elements (~1.2x per step at K=16 on the CPU).
- Each conv's bias is added after its pool, not inside the conv: a bias is
  constant over a pooling window and rounding is monotone, so
  max(a + b, c + b) is max(a, c) + b in floats too, and the values are the
  same bits. The bias gradient then sums the pooled gradient, a quarter of
  conv1's 9.6 MB output gradient at K=16 that oneDNN would read once more.
  (Where a + b and c + b round to one float but a != c, the pool may pass
  the gradient to the other of the two: a rounding-level difference.)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .model import SeedCNN

# channels) stays under this many floats, by device type: K=64 would need 750 MB
# for the 625 dev images at once. On the CPU a chunk whose activations stay
# within a few caches' worth is faster: 2-core CPU, torch 2.14.1, K=16, the 625
# dev images, 2 threads, medians of 9 alternating runs: 246 ms in chunks of 445
# images (1 << 25 floats), 139 ms in chunks of 111 (1 << 23), 145-152 ms for 48-89.
EVAL_ACTIVATION_FLOATS = {"cpu": 1 << 23}
EVAL_ACTIVATION_FLOATS_DEFAULT = 1 << 25  # 128 MiB
CHANNELS_LAST = torch.channels_last
# SeedCNN's parameters in `parameters()` order; the fused forward is written
# against exactly this layout.
LAYOUT = ("features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
          "classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias",
          "classifier.7.weight", "classifier.7.bias")
# Linear weights are stored transposed, (in, out): the batched matmuls then read
# them as they are and their gradients arrive in the stored layout (no copies).
TRANSPOSED = frozenset({"classifier.1.weight", "classifier.4.weight", "classifier.7.weight"})


class StackedSeedCNN:
    """K SeedCNNs as one network; `flat` (K, P) holds member k's parameters in row k.

    `flat` is the only leaf: the forward splits it into per-layer views, whose
    backward is a single concatenation into one (K, P) gradient, the layout
    the optimizer updates in a few whole-block operations. A row holds the
    member's parameters in LAYOUT order, linear weights transposed.
    """

    def __init__(self, flat: torch.Tensor, shapes: list[torch.Size], mean: torch.Tensor, std: torch.Tensor):
        self.flat = flat.detach().requires_grad_(True)
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.mean, self.std = mean, std

    @classmethod
    def from_models(cls, models: Sequence[SeedCNN], device) -> "StackedSeedCNN":
        names = tuple(name for name, _ in models[0].named_parameters())
        if names != LAYOUT:
            raise NotImplementedError(f"fused training is written for SeedCNN's layers {LAYOUT}, "
                                      f"but cnnlib.model.SeedCNN now has {names}")
        shapes = [p.shape[::-1] if name in TRANSPOSED else p.shape for name, p in models[0].named_parameters()]
        flat = torch.stack([torch.cat([(p.t() if name in TRANSPOSED else p).detach().reshape(-1)
                                       for name, p in m.named_parameters()]) for m in models])
        return cls(flat.to(device), shapes, models[0].mean.to(device), models[0].std.to(device))

    @property
    def k(self) -> int:
        return self.flat.shape[0]

    def weights(self) -> list[torch.Tensor]:
        return [piece.view(self.k, *shape) for piece, shape in zip(self.flat.split(self.sizes, 1), self.shapes)]

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1], shared by all members -> logits (K, B, n_classes).

        masks: the two dropout layers' (K, B, width) multipliers, or None (eval / no dropout).
        """
        k, b = self.k, x.shape[0]
        w1, b1, w2, b2, f1, c1, f2, c2, f3, c3 = self.weights()
        h = (x - self.mean) / self.std
        # Channels-last weights make oneDNN run channels-last whatever the batch's layout
        # (index_select hands back NCHW): pooling 10x and the whole step 2.4x faster on the CPU (K=16).
        # Each conv's bias is added after its pool (see the module docstring): the same values.
        h = F.conv2d(h, w1.reshape(-1, *w1.shape[2:]).contiguous(memory_format=CHANNELS_LAST))
        h = F.relu_(F.max_pool2d(h, 2) + b1.reshape(1, -1, 1, 1))
        h = F.conv2d(h, w2.reshape(-1, *w2.shape[2:]).contiguous(memory_format=CHANNELS_LAST), groups=k)
        h = F.relu_(F.max_pool2d(h, 2) + b2.reshape(1, -1, 1, 1))
        # (B, K*16, s, s) -> (K, B, 16*s*s): member k's features in nn.Flatten's (c, y, x) order.
        h = h.reshape(b, k, -1).transpose(0, 1)
        h = F.relu(torch.baddbmm(c1.unsqueeze(1), h, f1))
        if masks is not None:
            h = h * masks[0]
        h = F.relu(torch.baddbmm(c2.unsqueeze(1), h, f2))
        if masks is not None:
            h = h * masks[1]
        return torch.baddbmm(c3.unsqueeze(1), h, f3)

    def __call__(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self.forward(x, masks)

    def select(self, rows: list[int]) -> None:
        """Keep only these members (a stopped member stops costing compute)."""
        index = torch.tensor(rows, device=self.flat.device)
        self.flat = self.flat.detach().index_select(0, index).requires_grad_(True)

    def to_model(self, row: int, model: SeedCNN) -> SeedCNN:
        """Copy member `row`'s weights into `model` (a fresh SeedCNN in the unfused layout) and return it."""
        with torch.no_grad():
            for (name, param), piece, shape in zip(model.named_parameters(), self.flat[row].split(self.sizes),
                                                   self.shapes):
                piece = piece.view(shape)
                param.copy_(piece.t() if name in TRANSPOSED else piece)
        return model

