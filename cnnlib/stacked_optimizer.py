"""Each member's optimizer (SGD with or without Nesterov, Adam, AdamW) on the rows of one (K, P) tensor."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .schedules import lr_factors

# torch.optim.Adam's defaults.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

# How the stacked optimizer steps its rows, by device type: "rows" runs torch's own fused
# optimizer kernel once per member; "block" runs each formula once over all rows (a
# handful of launches per step whatever K: what a launch-bound GPU wants; measured on the
# H200 at K=64 with torch 2.11, 46 trial-epochs/s). 2-core CPU, torch 2.14.1, K=16, batch
# 32, 2 threads, one process, alternating: the optimizer alone 5.2 ms a step (block) against
# 0.55-0.85 ms (rows); a whole fused epoch, dev evaluation included, 4.24 against 3.77 s
# (1.13x, median of 7 epochs each).
OPTIMIZER_KERNELS = {"cpu": "rows"}


class StackedOptimizer:
    """SGD (Nesterov or not), Adam and AdamW with per-row settings on (K, P) rows; SGD rows come first.

    kernels "rows" (the CPU's): each row is stepped by torch's fused optimizer
    kernel (`_fused_sgd_`, `_fused_adam_`, `_fused_adamw_`: what torch.optim
    runs with fused=True) on views of the stacked rows, with that member's
    lr, momentum, Nesterov flag and weight decay: one pass over its row
    instead of one per formula. kernels "block" (other
    devices): the same math written out on the whole block, per-row settings
    as columns, operation by operation as torch.optim's foreach Adam and SGD.
    Differences between the two and torch.optim are rounding-level
    (tests/test_fused.py states the tolerance). `lr64[k, s]` is member
    k's lr at step s (its lr times its schedule's factor), so the lr costs one
    column gather per step.

    The step count lives on the device (`step_index`, and the float copy
    the Adam kernels read), and so does everything computed from it (the lr column, Adam's
    bias corrections): a step reads no Python number that changes between
    steps, so a CUDA graph captured once replays every later step as it is
    (Pass.capture).
    """

    def __init__(self, configs: Sequence[TrainConfig], n_params: int, device, steps_per_epoch: int = 1,
                 kernels: str | None = None):
        device = torch.device(device)
        self.kernels = kernels or OPTIMIZER_KERNELS.get(device.type, "block")
        if self.kernels not in ("rows", "block"):
            raise ValueError(f"kernels must be 'rows' or 'block', got {self.kernels!r}")

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)

        total = [c.epochs * steps_per_epoch for c in configs]
        width = max(total)
        table = torch.stack([F.pad(lr_factors(c, n) * c.lr, (0, width - n), value=0.0) for c, n in zip(configs, total)])
        self.lr64 = table.to(device)  # the kernels and Adam's step size take the lr in double, as torch.optim does
        self.configs = list(configs)
        # L2 (added to the gradient) for SGD and Adam; decoupled (p *= 1 - lr * wd) for AdamW.
        self.coupled_decay = column([0.0 if c.optimizer == "adamw" else c.weight_decay for c in configs])
        self.decoupled_decay = column([c.weight_decay if c.optimizer == "adamw" else 0.0 for c in configs],
                                      torch.float64)
        self.momentum = column([c.momentum for c in configs])
        self.nesterov = column([c.optimizer == "sgd" and c.nesterov for c in configs], torch.bool)
        n_sgd = sum(c.optimizer == "sgd" for c in configs)
        # Zero momentum buffers: the first step's buf = momentum * 0 + grad is torch.optim's buf = grad.
        # Row i of a buffer belongs to the i-th member of its kind (SGD, or Adam and AdamW).
        self.momentum_buffer = torch.zeros(n_sgd, n_params, device=device)
        self.exp_avg = torch.zeros(len(configs) - n_sgd, n_params, device=device)
        self.exp_avg_sq = torch.zeros(len(configs) - n_sgd, n_params, device=device)
        # Adam's step count for the kernels (float, as torch.optim keeps it): members step together, so one.
        self.adam_step = torch.zeros((), device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # steps taken so far
        self._derive()

    def _derive(self) -> None:
        """What follows from the rows: the SGD block's size, which formulas any row needs, the float32 lrs."""
        kinds = [c.optimizer for c in self.configs]
        if kinds != sorted(kinds, key=lambda kind: kind != "sgd"):
            raise ValueError(f"SGD members must come first, got {kinds}")
        self.n_sgd = kinds.count("sgd")
        self.any_coupled = any(c.weight_decay and c.optimizer != "adamw" for c in self.configs)
        self.any_decoupled = any(c.weight_decay and c.optimizer == "adamw" for c in self.configs)
        self.any_nesterov = any(c.optimizer == "sgd" and c.nesterov for c in self.configs)
        self.lr32 = self.lr64.float()

    @torch.no_grad()
    def step(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        if self.kernels == "rows":
            self._step_rows(params, grads)
        else:
            self._step_block(params, grads)

    def _step_rows(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        lrs = self.lr64.index_select(1, self.step_index).view(-1).unbind(0)
        self.step_index += 1
        self.adam_step += 1  # torch.optim advances the count before the kernel reads it
        s = self.n_sgd
        # Rows as views, one unbind per tensor: K selects each cost more than the small kernels they feed.
        rows = zip(self.configs, params.unbind(0), grads.unbind(0), lrs)
        momenta, exp_avgs, exp_avg_sqs = self.momentum_buffer.unbind(0), self.exp_avg.unbind(0), self.exp_avg_sq.unbind(0)
        for row, (c, param, grad, lr) in enumerate(rows):
            if row < s:
                buffers = [momenta[row]] if c.momentum else []  # the kernel wants none without momentum
                torch._fused_sgd_([param], [grad], buffers, weight_decay=c.weight_decay, momentum=c.momentum, lr=lr,
                                  dampening=0.0, nesterov=c.nesterov, maximize=False, is_first_step=False)
            else:
                kernel = torch._fused_adamw_ if c.optimizer == "adamw" else torch._fused_adam_
                kernel([param], [grad], [exp_avgs[row - s]], [exp_avg_sqs[row - s]], [], [self.adam_step], lr=lr,
                       beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], weight_decay=c.weight_decay, eps=ADAM_EPS,
                       amsgrad=False, maximize=False)

    def _step_block(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        lr32, lr64 = self.lr32.index_select(1, self.step_index), self.lr64.index_select(1, self.step_index)
        self.step_index += 1
        s = self.n_sgd
        if self.any_coupled:
            grads = torch.addcmul(grads, params, self.coupled_decay)  # L2: grad + wd * p
        if s:
            # torch.optim.SGD: buf = momentum * buf + grad (buf starts as grad: 0 * m + g == g);
            # Nesterov steps along grad + momentum * buf, plain SGD along buf.
            g = grads[:s]
            self.momentum_buffer.mul_(self.momentum[:s]).add_(g)
            direction = self.momentum_buffer
            if self.any_nesterov:
                direction = torch.where(self.nesterov[:s], torch.addcmul(g, self.momentum_buffer, self.momentum[:s]),
                                        self.momentum_buffer)
            params[:s].addcmul_(direction, lr32[:s], value=-1)
        if s < params.shape[0]:
            beta1, beta2 = ADAM_BETAS
            g = grads[s:]
            if self.any_decoupled:  # torch.optim.AdamW: p *= 1 - lr * wd, before the moments
                params[s:].mul_((1 - lr64[s:] * self.decoupled_decay[s:]).float())
            self.exp_avg.lerp_(g, 1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            steps = self.step_index.double()  # float64, as torch.optim's Python-float bias corrections
            bias_correction1 = 1 - beta1 ** steps
            bias_correction2_sqrt = (1 - beta2 ** steps).sqrt_()
            step_size = (lr64[s:] / bias_correction1).neg_().float()
            denom = self.exp_avg_sq.sqrt().div_(bias_correction2_sqrt.float()).add_(ADAM_EPS)
            params[s:].add_(self.exp_avg.mul(step_size).div_(denom))  # addcdiv's (value * m) / denom

    def select(self, rows: list[int]) -> None:
        """Keep these rows, in this order (SGD rows first), with their state."""
        index = torch.tensor(rows, device=self.lr64.device)
        sgd = [c.optimizer == "sgd" for c in self.configs]
        # A row's state sits in its kind's buffers at its place among the rows of that kind.
        place = {r: i for kind in (True, False) for i, r in enumerate(r for r in range(len(sgd)) if sgd[r] == kind)}
        self.momentum_buffer = self.momentum_buffer[[place[r] for r in rows if sgd[r]]]
        adam = [place[r] for r in rows if not sgd[r]]
        self.exp_avg, self.exp_avg_sq = self.exp_avg[adam], self.exp_avg_sq[adam]
        for name in ("lr64", "coupled_decay", "decoupled_decay", "momentum", "nesterov"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.configs = [self.configs[r] for r in rows]
        self._derive()

    @classmethod
    def concat(cls, parts: list["StackedOptimizer"]) -> "StackedOptimizer":
        """The rows of every part, part after part, with their state (`select` then orders them SGD first)."""
        out = copy.copy(parts[0])
        width = max(part.lr64.shape[1] for part in parts)  # each part's table spans its own longest member
        out.lr64 = torch.cat([F.pad(part.lr64, (0, width - part.lr64.shape[1])) for part in parts])
        for name in ("coupled_decay", "decoupled_decay", "momentum", "nesterov", "momentum_buffer", "exp_avg",
                     "exp_avg_sq"):
            setattr(out, name, torch.cat([getattr(part, name) for part in parts]))
        out.configs = [c for part in parts for c in part.configs]
        out.n_sgd = None  # rows of both kinds in part order: not stepped before `select` orders them
        return out


