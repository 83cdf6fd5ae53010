"""One place that turns a user's device choice into a torch.device."""

from __future__ import annotations

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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"DEVICE={name!r}: CUDA is not available on this machine; use DEVICE=cpu or DEVICE=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"DEVICE={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return device
