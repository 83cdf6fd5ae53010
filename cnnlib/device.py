"""One place that turns a user's device choice into a torch.device."""

from __future__ import annotations

import os
import time

import torch

from .errors import CnnlibError


class DeviceError(CnnlibError, ValueError):
    """The requested device is not a device name, or is not present on this machine."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' means cuda when present, else cpu; anything else is passed to torch."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"DEVICE={name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    for kind, backend in (("mps", getattr(torch.backends, "mps", None)), ("xpu", getattr(torch, "xpu", None))):
        if device.type == kind and not (backend is not None and backend.is_available()):
            raise DeviceError(f"DEVICE={name!r}: this machine has no {kind} device; use DEVICE=cpu or DEVICE=auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"DEVICE={name!r}: CUDA is not available on this machine; use DEVICE=cpu or DEVICE=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"DEVICE={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return device


def flush_denormals() -> bool:
    """Treat denormal floats as zero on this CPU (x86 FTZ/DAZ); False where the CPU cannot.

    As training goes on, some optimizer states and gradients shrink below
    float32's normal range (~1.2e-38), and every operation on such a number
    takes a slow microcode path: a fused group of 16 seed-CNN trials took
    3.3 s for its first epoch and 7.8 s by its 12th on the 2-core CPU (torch
    2.14.1, 2 threads), against 3.4-4.4 s throughout with denormals flushed,
    and the same dev accuracies to three decimals. Values that small carry
    nothing a float32 network can use; GPUs flush them in their fast paths too.

    Per thread, and threads inherit it when they are created: call it before
    the first parallel op (the command line does, and each search worker).
    """
    return bool(torch.set_flush_denormal(True))


def cpu_threads(requested: int | None = None, processes: int = 1) -> tuple[int, str]:
    """Torch CPU threads per process: the cores shared out, or 1 when others already keep them busy.

    Measured on the 2-core CPU with five neighbours running (load ~7): the
    project loop took 20.5 s/epoch at batch 32 with 2 threads and 3.9 s with 1,
    because an op's OpenMP threads wait for each other and one of them is
    usually descheduled. On a quiet machine 2 threads gave 1.0 s vs 1.6 s.
    (A 3-member fused group at batch 64 here: ~22 s/epoch at 2 threads under
    load ~5, 2.5 s at 1 thread.)
    """
    cores = os.cpu_count() or 1
    if requested and requested > cores:  # more threads than cores only wait for each other
        return cores, f"THREADS={requested} capped at the {cores} cores of this machine"
    if requested:
        return requested, "requested"
    if cores > 1:
        busy = busy_cores()
        if busy is not None and busy >= cores - 0.5:
            return 1, f"{busy:.1f} of {cores} cores busy with other work"
        load = os.getloadavg()[0] if busy is None and hasattr(os, "getloadavg") else 0.0  # no /proc/stat
        if load >= cores - 0.5:
            return 1, f"load average {load:.1f} on {cores} cores: other processes keep the cores busy"
    return max(1, cores // processes), f"{cores} cores shared by {processes} process(es)"


def busy_cores(interval: float = 0.3) -> float | None:
    """Cores that other work keeps busy now: the non-idle share of /proc/stat over `interval` (Linux; else None).

    The 1-minute load average lags: `make final` started right after `make
    search` saw the search's load (about 2 on 2 cores) and trained at 1
    thread on a machine gone quiet. This process sleeps while it samples, so
    what it counts is other work.
    """
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]  # user .. steal
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
