"""One hyperparameter of a space file: what it is (Param), and how its YAML is read and checked.

Each check names the file and the key, and runs before any training: a
value TrainConfig would reject, a `when:` that can never hold, or an
enqueued point outside its param's range fails when the file loads, not
in the middle of a study.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna

from cnnlib.errors import CnnlibError
from cnnlib.training import TrainConfig

PARAM_TYPES = ("float", "int", "categorical", "fixed")
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "value", "when", "field"}
CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
CONFIG_TYPES = typing.get_type_hints(TrainConfig)  # lr: float, epochs: int, flip: bool, ...


class SpaceError(CnnlibError, ValueError):
    """A search-space file is invalid; the message names the file and the key."""


@dataclass
class Param:
    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None
    value: Any = None
    when: dict = field(default_factory=dict)
    # The TrainConfig setting this param sets; by default its own name. Two params may set
    # one field under exclusive conditions: `weight_decay_adamw: {field: weight_decay, when: ...}`
    # gives decoupled decay its own range beside L2's.
    field: str = ""

    def __post_init__(self):
        self.field = self.field or self.name

    def suggest(self, trial: optuna.Trial):
        if self.type == "fixed":
            return self.value
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def fail(path, key, message) -> SpaceError:
    return SpaceError(f"{path}: {key}: {message}")


def number(path, key, value, integer=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        hint = ""
        if isinstance(value, str) and _looks_numeric(value):
            hint = " (YAML reads 1e-3 as text; write 1.0e-3)"
        raise fail(path, key, f"expected {'an integer' if integer else 'a number'}, got {value!r}{hint}")
    return value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_values(path: Path, params: dict[str, Param]) -> None:
    """Every value a param can take (fixed value, range ends, choices) must be one TrainConfig accepts.

    Otherwise `lr: {low: 0, ...}` or `optimizer: {choices: [sgd, rmsprop]}`
    would load, then fail trial after trial in the middle of a study.
    """
    for name, param in params.items():
        if param.type == "fixed":
            values = [param.value]
        elif param.type == "categorical":
            values = param.choices
        else:
            values = [param.low, param.high]
        for value in values:
            check_usable(path, f"params.{name}", param.field, value)
        for parent, wanted in param.when.items():
            possible = params[parent].choices if params[parent].type == "categorical" else (
                [params[parent].value] if params[parent].type == "fixed" else None)
            for value in (wanted if isinstance(wanted, list) else [wanted]):
                if possible is not None and value not in possible:
                    raise fail(path, f"params.{name}.when",
                                f"{parent} is never {value!r} (its values: {', '.join(map(str, possible))})")


def check_usable(path: Path, key: str, name: str, value) -> None:
    """`value` is of setting `name`'s kind and one TrainConfig accepts for it."""
    _check_kind(path, key, name, value)
    try:
        TrainConfig.from_dict({name: value})
    except (ValueError, TypeError) as error:
        raise fail(path, key, f"value {value!r} is not usable: {error}") from None


def _check_kind(path: Path, key: str, name: str, value) -> None:
    """Numbers must be numbers and switches booleans, before TrainConfig coerces them.

    YAML reads `true`, `yes` and `on` as booleans and int(True) is 1, so
    `batch_size: yes` would train with batch size 1; int(32.5) would quietly be 32.
    """
    kind = CONFIG_TYPES[name]
    if kind is bool and not isinstance(value, bool):
        raise fail(path, key, f"expected true or false, got {value!r}")
    if kind in (int, float):
        number(path, key, value, integer=(kind is int))
        if not math.isfinite(value):
            raise fail(path, key, f"expected a finite number, got {value}")


def parse_param(path: Path, name: str, spec) -> Param:
    key = f"params.{name}"
    field_name = spec.get("field", name) if isinstance(spec, dict) else name
    if field_name not in CONFIG_KEYS:
        raise fail(path, key if field_name == name else f"{key}.field",
                    f"unknown hyperparameter {field_name!r}; known: {', '.join(sorted(CONFIG_KEYS))}")
    if not isinstance(spec, dict):
        return Param(name, "fixed", value=spec)
    unknown = set(spec) - PARAM_KEYS
    if unknown:
        raise fail(path, f"{key}.{sorted(unknown)[0]}", f"unknown key; allowed: {', '.join(sorted(PARAM_KEYS))}")
    return _parse_param_spec(path, name, key, spec, field_name)


def _parse_param_spec(path: Path, name: str, key: str, spec: dict, field_name: str) -> Param:
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise fail(path, f"{key}.type", f"unknown type {kind!r}; expected one of {', '.join(PARAM_TYPES)}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise fail(path, f"{key}.when", f"expected a mapping like {{optimizer: sgd}}, got {when!r}")
    if kind == "fixed":
        if "value" not in spec:
            raise fail(path, f"{key}.value", "a fixed param needs a value")
        return Param(name, kind, value=spec["value"], when=when, field=field_name)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(path, f"{key}.choices", f"expected a non-empty list, got {choices!r}")
        return Param(name, kind, choices=choices, when=when, field=field_name)
    for bound in ("low", "high"):
        if bound not in spec:
            raise fail(path, f"{key}.{bound}", f"a {kind} range needs low and high")
        number(path, f"{key}.{bound}", spec[bound], integer=(kind == "int"))
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for bound in ("low", "high"):
        if not math.isfinite(spec[bound]):
            raise fail(path, f"{key}.{bound}", f"expected a finite number, got {spec[bound]}")
    if not isinstance(log, bool):
        raise fail(path, f"{key}.log", f"expected true or false, got {log!r}")
    if low > high:
        raise fail(path, key, f"low ({low}) > high ({high})")
    if log and low <= 0:
        raise fail(path, f"{key}.low", f"log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if number(path, f"{key}.step", step, integer=(kind == "int")) <= 0:
            raise fail(path, f"{key}.step", f"must be > 0, got {step}")
        if log:
            raise fail(path, f"{key}.step", "step cannot be combined with log")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when, field=field_name)


def parse_enqueue(path: Path, spec, params: dict[str, Param]) -> list[dict]:
    """`enqueue:` a list of points, each {param: value}, evaluated first.

    A searched param's value must be one it can take (inside its range, among
    its choices), so a warm-start point is a point of this space, not a typo
    that Optuna would quietly replace with a sample. A point may also give a
    fixed param another value (the default space fixes flip on, and the
    user's recipe, enqueued so that a search never ends below it, had none);
    SearchSpace.enqueue_into records that on the trial.
    """
    if spec is None:
        return []
    if not isinstance(spec, list):
        raise fail(path, "enqueue", f"expected a list of {{param: value}} points, got {spec!r}")
    points = []
    for index, point in enumerate(spec):
        key = f"enqueue[{index}]"
        if not isinstance(point, dict) or not point:
            raise fail(path, key, f"expected a mapping of searched params to values, got {point!r}")
        for name, value in point.items():
            param = params.get(name)
            if param is None:
                raise fail(path, f"{key}.{name}", f"not a param of this file (its params: {', '.join(params)})")
            if param.type == "fixed":
                check_usable(path, f"{key}.{name}", param.field, value)
            elif param.type == "categorical":
                if value not in param.choices:
                    raise fail(path, f"{key}.{name}", f"{value!r} is not one of its choices {param.choices}")
            else:
                number(path, f"{key}.{name}", value, integer=(param.type == "int"))
                if not param.low <= value <= param.high:
                    raise fail(path, f"{key}.{name}", f"{value!r} is outside its range [{param.low}, {param.high}]")
        points.append(dict(point))
    return points
