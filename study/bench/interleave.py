"""The one timing harness of the benchmarks: runs stepped one epoch each in turn, each with its own RNG.

A run is an iterator that trains one epoch per `next()` (cnnlib.training's
`train_group_epochs`, `lone_trial_epochs` here, the naive loop). The runs take turns
epoch by epoch, the leader alternating each round, so a neighbour's load on a
shared machine falls on all of them alike. Each run keeps its own global torch
RNG state, swapped in around its epochs (OwnRng), so an interleaved run draws
exactly what it would alone. Per epoch the harness records wall seconds and
process CPU seconds; the first epoch of the `probe` run also records the
memory it grew by (PeakMemory).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from cnnlib.config import TrainConfig
from cnnlib.training import LoopOptions, TrainResult, train_group_epochs


def lone_trial_epochs(config: TrainConfig, data, options: LoopOptions = LoopOptions()) -> Iterator[TrainResult]:
    """One config trained alone (a group of one), its result after each epoch; raises DivergedError."""
    for results in train_group_epochs([config], data, options=options):
        if results[0].error is not None:
            raise results[0].error
        yield results[0]


class OwnRng:
    """The global torch RNG state of one run, swapped in around each of its epochs.

    Dropout and weight init draw from the global generator; without this two
    interleaved runs would steal each other's draws and neither would be the
    run a user gets alone for that seed.
    """

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.state = self.cuda_state = None

    def step(self, run: Iterator):
        outside = torch.get_rng_state()
        outside_cuda = torch.cuda.get_rng_state(self.cuda) if self.cuda else None
        if self.state is not None:
            torch.set_rng_state(self.state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state, self.cuda)
        try:
            return next(run)
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outside)
            if self.cuda:
                self.cuda_state = torch.cuda.get_rng_state(self.cuda)
                torch.cuda.set_rng_state(outside_cuda, self.cuda)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of the code run inside: CUDA allocator peak, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif Path("/proc/self/statm").exists():
            self.base = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.base = None
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.base is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int | None:
        return None if self.base is None else self.peak - self.base


@dataclass
class Timed:
    """One interleaved run: its last result and the wall and CPU seconds of each epoch.

    Process CPU time counts only while this process runs, so with one thread it
    is what a neighbour's load cannot inflate (wall time can, by 2x here); with
    more threads it also counts threads spinning while they wait for each other.
    """

    result: Any = None
    wall_seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    memory_growth: int | None = None  # the probe run only: PeakMemory.growth during its first epoch


def interleave(runs: dict[str, Iterator], device: torch.device, probe: str | None = None) -> dict[str, Timed]:
    """Step the runs one epoch each in turn, the leader alternating by round, until all are done."""
    device = torch.device(device)
    rngs = {name: OwnRng(device) for name in runs}
    timed = {name: Timed() for name in runs}
    live, round_ = list(runs), 0
    while live:
        for name in list(live if round_ % 2 == 0 else live[::-1]):
            record = timed[name]
            memory = PeakMemory(device) if name == probe and not record.wall_seconds else None
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                if memory is not None:
                    with memory:
                        result = rngs[name].step(runs[name])
                    record.memory_growth = memory.growth
                else:
                    result = rngs[name].step(runs[name])
            except StopIteration:
                live.remove(name)
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            record.wall_seconds.append(time.perf_counter() - wall)
            record.cpu_seconds.append(time.process_time() - cpu)
            record.result = result
        round_ += 1
    return {name: record for name, record in timed.items() if record.result is not None}
