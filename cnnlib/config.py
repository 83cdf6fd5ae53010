"""The settings of one training run, and which of them a fused group must share.

`TrainConfig` defaults are the user's final recipe (report table 4), so a
config that names nothing trains what they trained. The levers they did not
have (crop, cutout, schedule, AdamW, Nesterov, logit adjustment, label
smoothing, weight averaging, test-time augmentation) default to off.

Every field is declared either SHARED or PER_MEMBER (`FIELD_ROLES`). Members
of a fused group see the same batch of images each step, so whatever decides
those images must be equal across the group (SHARED); everything else is
carried by each member on its own rows (PER_MEMBER). `check_roles` refuses a
TrainConfig with an undeclared field, so a new lever cannot be silently
dropped by the fused path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

from .model import MODELS
from .tta import TTA_MODES

OPTIMIZERS = ("sgd", "adam", "adamw")
IMBALANCE_METHODS = ("weighted_loss", "weighted_sampler", "logit_adjusted", "none")
SCHEDULES = ("constant", "cosine", "one_cycle")
# Upper bounds that keep a typo from allocating what no machine has: an epoch count of 1e11 passed
# every check, then each trial failed allocating ~800 GB for its per-epoch records. The user's recipe
# is 100 epochs at batch 32; the search spaces stay within 4-60 epochs and batches of 16-256.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_SEED = 2 ** 32 - 1  # numpy's legacy seeding, which some code paths reach, takes no more


@dataclass
class TrainConfig:
    """Every knob of one training run; defaults are the user's final recipe (report table 4)."""

    model: str = "seed_cnn"  # a name in cnnlib.model.MODELS
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 1e-2  # L2 added to the gradient for sgd/adam; decoupled (p *= 1 - lr*wd) for adamw
    schedule: str = "constant"  # lr factor per batch: constant, cosine or one_cycle (linear up, linear down)
    warmup: float = 0.0  # fraction of all steps with a linear warm-up from 0, before the schedule's shape
    batch_size: int = 32
    epochs: int = 100
    imbalance: str = "weighted_loss"  # beat the weighted sampler in the user's report
    tau: float = 1.0  # logit_adjusted only: logits + tau * log(prior) in the loss (1 = balanced softmax)
    label_smoothing: float = 0.0
    dropout: float = 0.1
    ema: float = 0.0  # decay of an exponential moving average of the weights, which evaluation uses; 0 = off
    crop: int = 0  # random translation by up to this many pixels (reflect-padded); the user had none
    flip: bool = False  # the user tried no augmentation in the final model
    jitter: float = 0.0
    cutout: int = 0  # a random square of this many pixels a side set to the image's mean colour; 0 = off
    # Evaluation only: a prediction is the mean softmax over the image's views (cnnlib.tta): none,
    # flip (the image and its mirror) or flip_translate (and both shifted 2 px each way).
    tta: str = "none"
    seed: int = 0

    def __post_init__(self):
        for name in ("optimizer", "schedule", "imbalance", "model", "tta"):
            setattr(self, name, str(getattr(self, name)).lower())
        for name, allowed in (("optimizer", OPTIMIZERS), ("imbalance", IMBALANCE_METHODS),
                              ("schedule", SCHEDULES), ("model", tuple(MODELS)), ("tta", TTA_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("nesterov", "flip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        for name in ("batch_size", "epochs", "seed", "crop", "cutout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError(f"{name}={value!r} must be a whole number")
            setattr(self, name, int(value))
        for name in ("lr", "momentum", "weight_decay", "warmup", "tau", "label_smoothing", "dropout", "jitter", "ema"):
            setattr(self, name, float(getattr(self, name)))
        checks = [("lr", self.lr > 0, "> 0"),
                  ("batch_size", 1 <= self.batch_size <= MAX_BATCH_SIZE, f"1 to {MAX_BATCH_SIZE}"),
                  ("epochs", 1 <= self.epochs <= MAX_EPOCHS, f"1 to {MAX_EPOCHS}"),
                  ("seed", 0 <= self.seed <= MAX_SEED, f"0 to {MAX_SEED}"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"), ("momentum", 0 <= self.momentum < 1, "0 to < 1"),
                  ("warmup", 0 <= self.warmup < 1, "0 to < 1"), ("tau", self.tau >= 0, ">= 0"),
                  ("label_smoothing", 0 <= self.label_smoothing < 1, "0 to < 1"), ("crop", 0 <= self.crop <= 8, "0 to 8"),
                  ("cutout", 0 <= self.cutout <= 16, "0 to 16"),
                  ("jitter", 0 <= self.jitter < 1, "0 to < 1"), ("dropout", 0 <= self.dropout < 1, "0 to < 1"),
                  ("ema", 0 <= self.ema < 1, "0 to < 1")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range (allowed: {allowed})")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if self.ema and self.model != "seed_cnn":
            raise ValueError(f"ema averages weights only; model {self.model!r} has batch-norm statistics that "
                             "would not match them (the seed CNN has none)")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def augments(self) -> bool:
        """Whether training batches are augmented: the one list of the augmentation settings."""
        return bool(self.crop or self.flip or self.jitter or self.cutout)


# What decides the images of a step is SHARED: the batch size and the augmentation
# draws. `imbalance` is per member (each member has its own loss) except that a
# weighted sampler draws another batch order, so `group_key` also keys on it.
# `model`: only the seed CNN has a stacked form; the group key keeps architectures apart.
# `ema` is per member: each member's average is its own row, with its own decay (cnnlib.weight_average).
# `tta` is per member: each member's evaluation takes its own views of the shared images.
SHARED = ("batch_size", "crop", "flip", "jitter", "cutout", "model")
PER_MEMBER = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup", "epochs",
              "imbalance", "tau", "label_smoothing", "dropout", "ema", "tta", "seed")
FIELD_ROLES = {**{name: "shared" for name in SHARED}, **{name: "per member" for name in PER_MEMBER}}


def check_roles(config_type=TrainConfig) -> None:
    """Refuse a config type with a field that is neither shared nor per member."""
    names = [f.name for f in fields(config_type)]
    missing = [name for name in names if name not in FIELD_ROLES]
    if missing:
        raise TypeError(f"TrainConfig field(s) {', '.join(missing)} are declared neither shared nor per member "
                        "(cnnlib.config.SHARED / PER_MEMBER): a fused group would ignore them")


def group_key(config: TrainConfig) -> tuple:
    """Configs with equal keys see the same batches, so they can be trained as one fused group."""
    check_roles(type(config))
    return tuple(getattr(config, name) for name in SHARED) + (config.imbalance == "weighted_sampler",)


# --- fused groups: configs that can share a batch --------------------------------------

def group_configs(configs: Sequence[TrainConfig], max_size: int | None = None) -> list[list[int]]:
    """Indices into `configs`, split into fusable groups (equal `group_key`) of at most `max_size`.

    Groups come in order of their first member; members keep their input order.
    """
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    groups: dict[tuple, list[list[int]]] = {}
    for index, config in enumerate(configs):
        chunks = groups.setdefault(group_key(config), [[]])
        if max_size is not None and len(chunks[-1]) >= max_size:
            chunks.append([])
        chunks[-1].append(index)
    return [chunk for chunks in groups.values() for chunk in chunks]


def check_group(configs: Sequence[TrainConfig]) -> None:
    """Members must agree on every SHARED setting (and on using a weighted sampler)."""
    if not configs:
        raise ValueError("training needs at least one config")
    check_roles(type(configs[0]))
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        for name in SHARED:
            if getattr(config, name) != getattr(first, name):
                raise ValueError(
                    f"config {index} has {name}={getattr(config, name)!r} but config 0 has "
                    f"{getattr(first, name)!r}; members of a group must share {', '.join(SHARED)} "
                    "(split them with group_configs)")
        if (config.imbalance == "weighted_sampler") != (first.imbalance == "weighted_sampler"):
            raise ValueError(f"config {index} has imbalance={config.imbalance!r} but config 0 has "
                             f"{first.imbalance!r}; a weighted sampler draws other batches, so all members "
                             "or none must use it")
