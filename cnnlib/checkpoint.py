"""Checkpoints hold weights, the training config and the class names; nothing executable.

A checkpoint holds one model, or a seed ensemble of `members` models of one
config (cnnlib.ensemble): its weights are then the Ensemble's state dict.

They are written as plain tensors and primitives and read with
`weights_only=True`, so a crafted file cannot run code on load.
"""

from __future__ import annotations

import pickle
import re
import reprlib
import warnings
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_path
from .config import TrainConfig
from .ensemble import PREFIX, Ensemble, member_states
from .errors import CheckpointError
from .model import MODELS, flat_features
from .stacked_model import CHANNELS_LAST

FORMAT = "cnnlib-seedcnn-1"
MAX_MEMBERS = 256  # as many as `make final` has seeds


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
        "members": len(model.members) if isinstance(model, Ensemble) else 1,
    }
    with atomic_path(path) as tmp:  # never a half-written checkpoint under the real name
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Path, device="cpu") -> tuple[torch.nn.Module, TrainConfig, tuple[str, ...], dict]:
    """(model in eval mode: a SeedCNN or an Ensemble of them, config, classes, extra); errors name the file and
    what was wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle's protocol: the refusal below says what matters
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # unpickler refusal, truncation, not a zip...
        raise CheckpointError(f"{path}: not a loadable checkpoint: {_why_unloadable(path, error)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    try:
        config = TrainConfig.from_dict(payload["config"])
        classes = _class_names(path, payload["classes"])
        count = _member_count(path, payload.get("members", 1), payload["state_dict"])
        states = member_states(payload["state_dict"], count) if count > 1 else [payload["state_dict"]]
        if config.model == "seed_cnn":  # its first linear layer is sized by the image size
            for state in states:
                _check_image_size(path, payload["image_size"], state, len(classes))
        models = [MODELS[config.model](len(classes), config.dropout, int(payload["image_size"])).to(device)
                  for _ in states]
    except KeyError as error:
        raise CheckpointError(f"{path}: checkpoint lacks its {error.args[0]!r} entry") from None
    except CheckpointError:
        raise
    except (TypeError, ValueError, OverflowError) as error:  # settings this version does not know, or impossible values
        raise CheckpointError(f"{path}: checkpoint settings do not fit this code ({error})") from None
    for model, state in zip(models, states):
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
            raise CheckpointError(f"{path}: weights do not fit the seed CNN for {len(classes)} classes "
                                  f"({detail})") from None
    if CHANNELS_LAST:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    model = Ensemble(models) if len(models) > 1 else models[0]
    return model.eval(), config, classes, payload.get("extra", {})


def _why_unloadable(path: Path, error: Exception) -> str:
    """Why torch.load refused `path`, in words of our own: torch's text for a refused pickle advises loading it
    with weights_only=False, which would run whatever code the file carries."""
    text = str(error)
    with open(path, "rb") as handle:
        head = handle.read(12)
    if not head:
        return "the file is empty"
    code = re.search(r"GLOBAL (\S+)", text)
    if code:
        return (f"it holds a Python object ({code.group(1)}) that could run code when loaded; refused without "
                "loading it (a checkpoint of this project holds only tensors and plain values)")
    if head.startswith(b"PK\x03\x04"):
        if "central directory" in text or not zipfile.is_zipfile(path):
            return "its zip archive is damaged or cut short"
        if isinstance(error, pickle.UnpicklingError):
            return "it holds something other than tensors and plain values"
        return "a zip archive, but not one that torch.save wrote"
    if head[:1] == b"\x80":  # a pickle's protocol opcode
        return ("it is a plain pickle, not the zip archive torch.save writes; refused without unpickling it "
                "(unpickling can run code)")
    return f"it is not the zip archive torch.save writes (it begins {head!r})"


def _member_count(path: Path, members, state) -> int:
    """The member count the checkpoint claims, which its weights must bear out."""
    if isinstance(members, bool) or not isinstance(members, int) or not 1 <= members <= MAX_MEMBERS:
        raise CheckpointError(f"{path}: members {reprlib.repr(members)} is not a whole number from 1 to {MAX_MEMBERS}")
    if isinstance(state, dict):
        held = {key[len(PREFIX):].partition(".")[0] for key in state if isinstance(key, str) and key.startswith(PREFIX)}
        models = len(held) or 1  # weights without the members prefix are one model's
        if models != members:
            raise CheckpointError(f"{path}: its 'members' entry says {members} model(s), but its weights are "
                                  f"those of {models}")
    return members


def _class_names(path: Path, names) -> tuple[str, ...]:
    """Reports, confusion matrices and --classes all take the names as text."""
    if not (isinstance(names, (list, tuple)) and len(names) >= 2 and len(set(map(repr, names))) == len(names)
            and all(isinstance(n, str) and n for n in names)):
        raise CheckpointError(f"{path}: class names {reprlib.repr(names)} are not two or more distinct names")
    return tuple(names)


def _check_image_size(path: Path, image_size, state, n_classes: int) -> None:
    """The claimed image size must be the one the weights were made for, before SeedCNN sizes its first
    linear layer by it: a claim of 10**6 asks for a layer of hundreds of terabytes."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise CheckpointError(f"{path}: image_size {reprlib.repr(image_size)} is not a whole number")
    weight = state.get("classifier.1.weight") if isinstance(state, dict) else None
    if getattr(weight, "ndim", None) != 2:
        raise CheckpointError(f"{path}: weights do not fit the seed CNN for {n_classes} classes "
                              "(no 2-D classifier.1.weight)")
    if weight.shape[1] != flat_features(image_size):  # ValueError below 16 pixels
        raise CheckpointError(f"{path}: weights do not fit the seed CNN for {n_classes} classes (image_size "
                              f"{image_size} needs {flat_features(image_size)} inputs to classifier.1, "
                              f"the weights take {weight.shape[1]})")
