"""Checkpoints hold weights, the training config and the class names; nothing executable.

They are written as plain tensors and primitives and read with
`weights_only=True`, so a crafted file cannot run code on load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import CheckpointError
from .model import MODELS, SeedCNN
from .training import CHANNELS_LAST, TrainConfig

FORMAT = "cnnlib-seedcnn-1"


def save_checkpoint(path: Path, model: torch.nn.Module, config: TrainConfig, classes, image_size: int = 32,
                    extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
        "classes": list(classes),
        "image_size": int(image_size),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:  # never a half-written checkpoint under the real name
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Path, device="cpu") -> tuple[SeedCNN, TrainConfig, tuple[str, ...], dict]:
    """(model in eval mode, config, classes, extra); errors name the file and what was wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # unpickler refusal, truncation, not a zip...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    try:
        config = TrainConfig.from_dict(payload["config"])
        classes = tuple(payload["classes"])
        model = MODELS[config.model](len(classes), config.dropout, int(payload["image_size"])).to(device)
        state = payload["state_dict"]
    except KeyError as error:
        raise CheckpointError(f"{path}: checkpoint lacks its {error.args[0]!r} entry") from None
    except (TypeError, ValueError) as error:  # settings this version does not know, or impossible values
        raise CheckpointError(f"{path}: checkpoint settings do not fit this code ({error})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise CheckpointError(f"{path}: weights do not fit the seed CNN for {len(classes)} classes ({detail})") from None
    if CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), config, classes, payload.get("extra", {})
