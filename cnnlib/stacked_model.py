"""The networks the training step trains: K members as one network, with their weights as the rows of one (K, P) tensor.

- StackedSeedCNN: K SeedCNNs as one network, K >= 1 (a lone trial is a stack
  of one). HFTA (Wang et al., MLSys 2021) trains K copies of a model as one
  wider model; this is that for `SeedCNN`. The forward splits the rows into
  per-layer views: conv1 becomes one convolution with K x 6 output channels
  (the input batch is shared, so it is read once), conv2 one grouped
  convolution (groups=K), the linear layers batched matmuls.
  `torch.func.vmap` over `functional_call` was measured too and was 4.4x
  slower per member (2-core CPU, K=16, batch 32, 1 thread): grouped convs it is.
- StackOfOne: any other model (cnnlib.model.MODELS) as a stack of one
  member, through `torch.func.functional_call`; only the seed CNN stacks wider.

Both hand a member back as its own nn.Module (`to_model`), so checkpoints,
evaluation and attacks see the user's model. A member's initial weights are
the ones `torch.manual_seed(config.seed)` and its model's own init give
(`init_member`), whatever else trains beside it.

In StackedSeedCNN:
- Pooling comes before ReLU (SeedCNN does ReLU then pool): both are
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

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .model import MODELS, SeedCNN

# Channels-last weights (oneDNN NHWC convolutions): 1.46x per training step at batch 32
# (2.63 ms against 3.84 ms) on the quiet 2-core CPU, torch 2.14.1, 1 thread, one run.
# Channels-last conv weights make oneDNN run channels-last whatever the batch's layout
# (index_select hands back NCHW): pooling 10x and the whole step 2.4x faster (K=16, same CPU).
CHANNELS_LAST = True
# Dev evaluation runs in chunks so that the widest activation (conv1's K x 6
# channels) stays under this many floats, by device type: K=64 would need 750 MB
# for the 625 dev images at once. On the CPU a chunk whose activations stay
# within a few caches' worth is faster: 2-core CPU, torch 2.14.1, K=16, the 625
# dev images, 2 threads, medians of 9 alternating runs: 246 ms in chunks of 445
# images (1 << 25 floats), 139 ms in chunks of 111 (1 << 23), 145-152 ms for 48-89.
EVAL_ACTIVATION_FLOATS = {"cpu": 1 << 23}
EVAL_ACTIVATION_FLOATS_DEFAULT = 1 << 25  # 128 MiB
EVAL_BATCH = 4096  # images per forward when evaluating a model that does not stack
# SeedCNN's parameters in `parameters()` order; the stacked forward is written
# against exactly this layout.
LAYOUT = ("features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
          "classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias",
          "classifier.7.weight", "classifier.7.bias")
# Linear weights are stored transposed, (in, out): the batched matmuls then read
# them as they are and their gradients arrive in the stored layout (no copies).
TRANSPOSED = frozenset({"classifier.1.weight", "classifier.4.weight", "classifier.7.weight"})


def make_model(n_classes: int, config: TrainConfig, image_size: int, device,
               channels_last: bool = CHANNELS_LAST) -> nn.Module:
    """The user's model for this config, on `device` (its init draws from the global RNG)."""
    model = MODELS[config.model](n_classes, config.dropout, image_size).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def init_member(config: TrainConfig, n_classes: int, image_size: int) -> tuple[nn.Module, torch.Tensor]:
    """The member's initial model, as `torch.manual_seed(config.seed)` and the model's init give it, and the
    CPU RNG state right after that init (what a lone run's dropout draws from next).

    The caller's RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(config.seed)  # what torch.manual_seed does on the CPU
        model = MODELS[config.model](n_classes, config.dropout, image_size)
        return model, torch.get_rng_state()


def stack_members(configs: Sequence[TrainConfig], n_classes: int, image_size: int, device,
                  channels_last: bool = CHANNELS_LAST) -> tuple[StackedSeedCNN | StackOfOne, list[torch.Tensor]]:
    """The members' initial models as one network, and each member's RNG state right after its init.

    Seed CNNs stack (StackedSeedCNN); any other model trains as a stack of one
    (StackOfOne), whose own dropout layers draw from the global RNG: it is set
    to continue right after the member's init, as a lone run's always has.
    """
    models, states = zip(*(init_member(c, n_classes, image_size) for c in configs))
    if len(models) == 1 and not isinstance(models[0], SeedCNN):
        torch.set_rng_state(states[0])
        return StackOfOne(models[0], device, channels_last), list(states)
    return StackedSeedCNN.from_models(models, device, channels_last), list(states)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


class StackedSeedCNN:
    """K SeedCNNs as one network; `flat` (K, P) holds member k's parameters in row k.

    `flat` is the only leaf: the forward splits it into per-layer views, whose
    backward is a single concatenation into one (K, P) gradient, the layout
    the optimizer updates in a few whole-block operations. A row holds the
    member's parameters in LAYOUT order, linear weights transposed.
    """

    def __init__(self, flat: torch.Tensor, shapes: list[torch.Size], mean: torch.Tensor, std: torch.Tensor,
                 channels_last: bool = CHANNELS_LAST):
        self.flat = flat.detach().requires_grad_(True)
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.mean, self.std = mean, std
        self.memory_format = _memory_format(channels_last)
        # The widths of the two dropout layers, whose masks the step hands to `forward`.
        self.dropout_widths = [shapes[LAYOUT.index(name)][1] for name in ("classifier.1.weight", "classifier.4.weight")]

    @classmethod
    def from_models(cls, models: Sequence[SeedCNN], device, channels_last: bool = CHANNELS_LAST) -> "StackedSeedCNN":
        names = tuple(name for name, _ in models[0].named_parameters())
        if names != LAYOUT:
            raise NotImplementedError(f"the stacked network is written for SeedCNN's layers {LAYOUT}, "
                                      f"but cnnlib.model.SeedCNN now has {names}")
        shapes = [p.shape[::-1] if name in TRANSPOSED else p.shape for name, p in models[0].named_parameters()]
        flat = torch.stack([torch.cat([(p.t() if name in TRANSPOSED else p).detach().reshape(-1)
                                       for name, p in m.named_parameters()]) for m in models])
        return cls(flat.to(device), shapes, models[0].mean.to(device), models[0].std.to(device), channels_last)

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
        # Each conv's bias is added after its pool (see the module docstring): the same values.
        h = F.conv2d(h, w1.reshape(-1, *w1.shape[2:]).contiguous(memory_format=self.memory_format))
        h = F.relu_(F.max_pool2d(h, 2) + b1.reshape(1, -1, 1, 1))
        h = F.conv2d(h, w2.reshape(-1, *w2.shape[2:]).contiguous(memory_format=self.memory_format), groups=k)
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

    def train(self, mode: bool = True) -> None:
        """Nothing to switch: dropout is the masks the step hands in, and there is no batch norm."""

    def eval_chunk(self, x: torch.Tensor) -> int:
        """Images per evaluation forward: conv1's K x 6 output channels stay under EVAL_ACTIVATION_FLOATS."""
        per_image = self.shapes[0][0] * (x.shape[2] - self.shapes[0][2] + 1) * (x.shape[3] - self.shapes[0][3] + 1)
        floats = EVAL_ACTIVATION_FLOATS.get(x.device.type, EVAL_ACTIVATION_FLOATS_DEFAULT)
        return max(1, floats // (self.k * per_image))

    def select(self, rows: list[int]) -> None:
        """Keep only these members (a stopped member stops costing compute)."""
        index = torch.tensor(rows, device=self.flat.device)
        self.flat = self.flat.detach().index_select(0, index).requires_grad_(True)

    @classmethod
    def concat(cls, parts: list["StackedSeedCNN"]) -> "StackedSeedCNN":
        """The members of every part, part after part, as one network."""
        out = copy.copy(parts[0])
        out.flat = torch.cat([part.flat.detach() for part in parts]).requires_grad_(True)
        return out

    def to_model(self, row: int, model: SeedCNN) -> SeedCNN:
        """Copy member `row`'s weights into `model` (a fresh SeedCNN) and return it."""
        with torch.no_grad():
            for (name, param), piece, shape in zip(model.named_parameters(), self.flat[row].split(self.sizes),
                                                   self.shapes):
                piece = piece.view(shape)
                param.copy_(piece.t() if name in TRANSPOSED else piece)
        return model



class StackOfOne:
    """One model of any architecture as a stack of one member: `flat` (1, P) holds its parameters.

    The forward runs the module itself with its parameters as views of `flat`
    (torch.func.functional_call), so the step and the stacked optimizer treat
    it as they treat a stacked seed CNN. The module keeps what is its own: its
    buffers (batch-norm statistics, updated in place) and its dropout layers,
    which draw from the global RNG as a lone run's always have (the step
    hands it no masks: `dropout_widths` is empty).
    """

    def __init__(self, module: nn.Module, device, channels_last: bool = CHANNELS_LAST):
        self.module = module.to(device)
        named = list(self.module.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.flat = torch.cat([p.detach().reshape(-1) for _, p in named]).unsqueeze(0).requires_grad_(True)
        self.memory_format = _memory_format(channels_last)
        self.dropout_widths: list[int] = []
        for p in self.module.parameters():
            p.requires_grad_(False)  # `flat` is the leaf that trains

    @property
    def k(self) -> int:
        return self.flat.shape[0]

    def __call__(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (1, B, n_classes)."""
        params = {}
        for name, piece, shape in zip(self.names, self.flat[0].split(self.sizes), self.shapes):
            piece = piece.view(shape)
            params[name] = piece.contiguous(memory_format=self.memory_format) if piece.dim() == 4 else piece
        return torch.func.functional_call(self.module, params, (x,)).unsqueeze(0)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval_chunk(self, x: torch.Tensor) -> int:
        return EVAL_BATCH

    def select(self, rows: list[int]) -> None:
        if rows != [0]:
            raise ValueError(f"a stack of one keeps row 0 or stops; asked for rows {rows}")

    def to_model(self, row: int, model: nn.Module) -> nn.Module:
        """Copy the member's weights and buffers into `model` (a fresh one of its architecture) and return it."""
        with torch.no_grad():
            for param, piece, shape in zip(model.parameters(), self.flat[row].split(self.sizes), self.shapes):
                param.copy_(piece.view(shape))
            for buffer, own in zip(model.buffers(), self.module.buffers()):
                buffer.copy_(own)
        return model
