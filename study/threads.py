"""How many CPU threads torch uses in this process: THREADS, or as many as the machine's load allows.

Every command that trains calls `use_cpu_threads` (a search asks
`choose_cpu_threads` for each worker process); the choice by load is
cnnlib.device.cpu_threads, which says why it chose what it did.
"""

from __future__ import annotations

import sys

import torch

from cnnlib.device import cpu_threads

from .errors import UserError
from .options import env


def choose_cpu_threads(device, processes: int = 1) -> tuple[int, str]:
    """Torch CPU threads per process: THREADS, or chosen by load (cnnlib.device.cpu_threads); (1, "") off the CPU."""
    if getattr(device, "type", device) != "cpu":
        return 1, ""
    text = env("THREADS")
    if text is not None and not (text.isdigit() and int(text) >= 1):
        raise UserError(f"THREADS {text!r}: expected a whole number >= 1")
    threads, why = cpu_threads(int(text) if text else None, processes)
    if text and threads < int(text):
        print(f"note: {why}", file=sys.stderr)
    return threads, why


def use_cpu_threads(device, processes: int = 1) -> str:
    """Set torch's CPU threads for this process (THREADS, or chosen by load) and say what was chosen.

    Every command that trains calls it: torch's default (one thread per core) on a
    busy 2-core machine made `make final` take 25 s per epoch instead of ~2 (its
    OpenMP threads wait for each other; see cnnlib.device.cpu_threads).
    """
    threads, why = choose_cpu_threads(device, processes)
    if not why:
        return ""
    torch.set_num_threads(threads)
    return f"{threads} thread(s): {why}"
