"""Each member's dropout masks for the stacked activations, drawn from the member's own seed.

A member's own seed sets its dropout masks. On the CPU they are drawn member
by member from a generator that continues the global RNG stream right after
that member's init (cnnlib.stacked_model.init_member), which is what a
SeedCNN trained alone with nn.Dropout draws from: the same bits. On CUDA
nn.Dropout is a fused Philox kernel that cannot be replayed per member, so
all masks come from one draw per layer (a generator seeded with the group's
first seed): statistically the same, not bitwise.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch


class MemberDropout:
    """Each member's dropout masks, as multipliers (mask / keep_prob) for the stacked activations.

    exact (the default on the CPU): member by member from generators holding
    `rng_states` (CPU RNG states), bit for bit the masks nn.Dropout draws.
    Otherwise one draw per layer for all members from a generator seeded
    with `group_seed` (the default on CUDA, where exact is not possible).

    The exact masks are drawn ahead, `ahead` draws per member at a time
    (what Pass asks for: one epoch's), the members' generators in parallel
    threads. The CPU's bernoulli_ is a serial loop over one generator: drawn
    step by step, the 32 calls per step at K=16 run on one core while the
    other waits (1.6 ms of a 24 ms step; 2-core CPU, torch 2.14.1, one run). One call fills a member's stream
    in the order nn.Dropout draws it (each layer's batch x width, layer
    after layer, step after step), so slices of it are the same bits.
    """

    def __init__(self, rates: list[float], rng_states: list[torch.Tensor], group_seed: int, device,
                 exact: bool | None = None, ahead: int = 1 << 16):
        self.rates = list(rates)
        self.device = torch.device(device)
        self.exact = self.device.type == "cpu" if exact is None else exact
        if self.exact:
            self.generators = []
            for state in rng_states:
                generator = torch.Generator()
                generator.set_state(state)
                self.generators.append(generator)
            self.ahead = max(1, ahead)
            self.drawn = torch.empty(len(self.rates), 0, dtype=torch.uint8)  # row k: member k's next draws
            self.scale = self._scale()
        else:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(group_seed)
            self.keep_prob = torch.tensor([1 - p for p in rates], device=device).view(-1, 1, 1)

    @property
    def active(self) -> bool:
        return any(self.rates)

    def masks(self, batch: int, widths: Sequence[int]) -> list[torch.Tensor] | None:
        if not self.active:
            return None
        if not self.exact:
            return [self._batched_mask(batch, width) for width in widths]
        need = batch * sum(widths)
        if self.drawn.shape[1] < need:
            self._draw(max(need, self.ahead))
        masks, start = [], 0
        for width in widths:
            kept = self.drawn[:, start:start + batch * width].view(-1, batch, width)
            masks.append(kept.to(torch.float32).mul_(self.scale).to(self.device))
            start += batch * width
        self.drawn = self.drawn[:, need:]
        return masks

    def _batched_mask(self, batch: int, width: int) -> torch.Tensor:
        u = torch.rand(len(self.rates), batch, width, generator=self.generator, device=self.device)
        return (u < self.keep_prob).float().div_(self.keep_prob)

    def _scale(self) -> torch.Tensor:
        # F.dropout: empty_like(x).bernoulli_(1 - p).div_(1 - p), so a kept unit is
        # multiplied by float32(1) / float32(1 - p); p == 0 draws nothing and keeps every unit.
        return torch.tensor([1.0] * len(self.rates)).div_(torch.tensor([1 - p for p in self.rates])).view(-1, 1, 1)

    def _draw(self, count: int) -> None:
        """Append `count` draws to every member's stream, the members' generators in parallel."""
        fresh = torch.ones(len(self.rates), count, dtype=torch.uint8)

        def draw(row: int) -> None:
            if self.rates[row] > 0:
                fresh[row].bernoulli_(1 - self.rates[row], generator=self.generators[row])

        rows = range(len(self.rates))
        workers = min(torch.get_num_threads(), len(self.rates))
        if workers > 1:  # each generator is drawn by one thread, in order: the same bits whatever the timing
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(draw, rows))
        else:
            for row in rows:
                draw(row)
        self.drawn = torch.cat([self.drawn, fresh], 1) if self.drawn.shape[1] else fresh

    @classmethod
    def concat(cls, parts: list["MemberDropout"]) -> "MemberDropout":
        """The rows of every part, part after part, each member's generator and draws ahead with it (exact only)."""
        if not all(part.exact for part in parts):
            raise ValueError("only exact dropout (the CPU's) can be concatenated")
        out = copy.copy(parts[0])
        out.rates = [rate for part in parts for rate in part.rates]
        out.generators = [generator for part in parts for generator in part.generators]
        out.drawn = torch.cat([part.drawn for part in parts])
        out.scale = out._scale()
        return out

    def select(self, rows: list[int]) -> None:
        self.rates = [self.rates[r] for r in rows]
        if self.exact:
            self.generators = [self.generators[r] for r in rows]
            self.drawn = self.drawn[rows]
            self.scale = self._scale()
        else:
            self.keep_prob = self.keep_prob[rows]

