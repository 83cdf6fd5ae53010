"""A search-space file read and checked: every mistake is named with the file and the key, before any training.

A space is a YAML file someone who never saw the code can read (see
search_spaces/default.yaml). `load_space` finds it (a path, or a shipped
space by name), reads every param, point, objective, sampler and pruner, and
returns the SearchSpace record (space.py). Each check runs when the file
loads, not in the middle of a study: a value TrainConfig would reject, a
`when:` that can never hold, an enqueued point outside its param's range, a
sampler that cannot propose a trial.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from pathlib import Path

import optuna
import yaml

from cnnlib.config import TrainConfig

from . import strict_yaml
from .space import CONFIG_KEYS, Param, SearchSpace, SpaceError

OBJECTIVES = ("dev_macro_accuracy", "robust_macro_accuracy")
TOP_KEYS = {"description", "objective", "objective_epochs", "robust", "sampler", "pruner", "budget", "params",
            "enqueue"}
PARAM_TYPES = ("float", "int", "categorical", "fixed")
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "value", "when", "field"}
CONFIG_TYPES = typing.get_type_hints(TrainConfig)  # lr: float, epochs: int, flip: bool, ...
# Where the shipped spaces are: inside the package when installed from a wheel (pyproject.toml maps
# search_spaces/ to study/search_spaces), at the checkout's top level when run from source.
_PACKAGE = Path(__file__).resolve().parents[1]  # study/
SHIPPED_SPACE_DIRS = (_PACKAGE / "search_spaces", _PACKAGE.parent / "search_spaces")


# --- finding and reading the file ------------------------------------------------

def shipped_spaces() -> list[str]:
    folder = next((d for d in SHIPPED_SPACE_DIRS if d.is_dir()), None)
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")) if folder else []


def find_space(name: str | Path) -> Path:
    """The space file as given, else the shipped one of that name.

    So `SPACE=smoke`, `smoke.yaml` and `search_spaces/smoke.yaml` all work from
    any working directory, and from an installed package that has no checkout.
    """
    path = Path(name)
    if path.is_file():
        return path
    relative = Path(*path.parts[1:]) if path.parts[:1] == ("search_spaces",) else path
    if not relative.suffix:
        relative = relative.with_suffix(".yaml")
    if not relative.is_absolute():
        for folder in SHIPPED_SPACE_DIRS:
            if (folder / relative).is_file():
                return folder / relative
    return path


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; raises SpaceError naming the file and key."""
    path = find_space(path)
    raw = _read_yaml(path)
    params = _parse_params(path, raw)
    objectives, robust, objective_epochs = _parse_objectives(path, raw)
    budget = _parse_budget(path, raw.get("budget") or {})
    sampler = _parse_component(path, "sampler", raw.get("sampler"), optuna.samplers, optuna.samplers.BaseSampler,
                               {"name": "TPESampler"})
    pruner = _parse_component(path, "pruner", raw.get("pruner"), optuna.pruners, optuna.pruners.BasePruner, None)
    enqueue = parse_enqueue(path, raw.get("enqueue"), params)
    space = SearchSpace(path, params, objectives, sampler, pruner, robust, budget, str(raw.get("description", "")),
                        enqueue, objective_epochs)
    _check_space(space)
    return space


def _read_yaml(path: Path) -> dict:
    """The file's top-level mapping; a missing file, bad YAML or an unknown top key is one SpaceError."""
    if path.is_dir():
        raise SpaceError(f"{path}: is a folder; expected a search-space YAML file (see search_spaces/)")
    if not path.is_file():
        raise SpaceError(f"{path}: search-space file not found (shipped spaces: {', '.join(shipped_spaces())})")
    try:
        raw = strict_yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        what = problem if isinstance(error, strict_yaml.RefusedYAML) else f"not valid YAML ({problem})"
        raise SpaceError(f"{path}: {where}{what}") from None
    except RecursionError:
        raise SpaceError(f"{path}: YAML nested too deeply to be a search space") from None
    except UnicodeDecodeError as error:
        raise SpaceError(f"{path}: not a UTF-8 text file (byte {error.start}); expected a YAML search space") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level with a 'params' key")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise fail(path, sorted(unknown)[0], f"unknown key; allowed: {', '.join(sorted(TOP_KEYS))}")
    return raw


def _parse_params(path: Path, raw: dict) -> dict[str, Param]:
    """Each param, in file order; a `when:` may only depend on a param listed before it."""
    if not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise fail(path, "params", "missing or empty; list the hyperparameters")
    params = {name: parse_param(path, name, spec) for name, spec in raw["params"].items()}
    names = list(params)
    for name, param in params.items():
        for parent in param.when:
            if parent not in params:
                raise fail(path, f"params.{name}.when", f"depends on {parent!r}, which is not a param of this file")
            if names.index(parent) > names.index(name):
                raise fail(path, f"params.{name}.when", f"depends on {parent!r}, which must be a param listed before it")
    return params


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


def _parse_objectives(path: Path, raw: dict) -> tuple[list[str], dict, int]:
    """(objectives, the robust objective's attack settings, epochs a trial's value averages over)."""
    objectives = raw.get("objective", "dev_macro_accuracy")
    objectives = objectives if isinstance(objectives, list) else [objectives]
    for objective in objectives:
        if objective not in OBJECTIVES:
            raise fail(path, "objective", f"unknown objective {objective!r}; expected {', '.join(OBJECTIVES)}")
    robust = raw.get("robust") or {}
    epsilon = robust.get("epsilon")
    if "robust_macro_accuracy" in objectives and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))):
        raise fail(path, "robust.epsilon", "the robust objective needs robust: {attack: fgsm, epsilon: 0.03}")
    objective_epochs = raw.get("objective_epochs", 1)
    if number(path, "objective_epochs", objective_epochs, integer=True) < 1:
        raise fail(path, "objective_epochs", f"must be at least 1, got {objective_epochs}")
    return objectives, robust, objective_epochs


def _parse_budget(path: Path, budget: dict) -> dict:
    for key, value in budget.items():
        if key not in ("trials", "timeout"):
            raise fail(path, f"budget.{key}", "unknown key; allowed: trials, timeout")
        if value is not None and number(path, f"budget.{key}", value, integer=True) < 1:  # 0 is not "no limit"
            raise fail(path, f"budget.{key}", f"must be at least 1, got {value}")
    return budget


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


def _parse_component(path, key, spec, module, base, default):
    """A sampler or pruner spec; its name must be a public class of `module` that subclasses `base`.

    Any other attribute (a helper function such as optuna.pruners._filter_study)
    would be called with the file's arguments.
    """
    if spec is None:
        return default
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise fail(path, key, f"expected {{name: ..., <args>}}, got {spec!r}")
    usable = sorted(n for n, c in vars(module).items() if not n.startswith("_") and isinstance(c, type)
                    and issubclass(c, base) and not inspect.isabstract(c))
    if spec["name"] not in usable:
        raise fail(path, f"{key}.name", f"{spec['name']!r} is not a public {key} class of {module.__name__}; "
                                         f"expected one of {', '.join(usable)}")
    arguments = inspect.signature(getattr(module, spec["name"])).parameters
    for name, value in spec.items():  # YAML's yes/on are booleans: `seed: yes` would quietly be seed 1
        annotation = str(arguments[name].annotation) if name in arguments else ""
        if isinstance(value, bool) and re.search(r"\b(int|float)\b", annotation) and "bool" not in annotation:
            raise fail(path, f"{key}.{name}", f"expected a number, got {value!r}")
    return dict(spec)


# --- checking values ----------------------------------------------------------------

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


# --- checking the whole space ----------------------------------------------------

def _check_space(space: SearchSpace) -> None:
    """What only the whole space shows: grid params, usable values, a sampler and pruner that build and propose."""
    path, params = space.path, space.params
    if space.sampler["name"] == "GridSampler":
        bad = [n for n, p in params.items() if p.type not in ("categorical", "fixed")]
        if bad:
            raise fail(path, f"params.{bad[0]}", "a GridSampler space lists values as categorical choices")
    check_values(path, params)  # a value TrainConfig rejects fails now, not mid-study
    for key, make in (("sampler", space.make_sampler), ("pruner", space.make_pruner)):
        try:
            make()
        except SpaceError:
            raise
        except ValueError as error:
            raise fail(path, key, str(error)) from None
    _check_sampler_proposes(space)


def _check_sampler_proposes(space: SearchSpace) -> None:
    """Ask one trial of a throwaway in-memory study.

    A sampler can be built and still fail inside `study.ask()` (PartialFixedSampler
    given the text `base_sampler: TPESampler`), and by then the real storage holds
    the new trial, RUNNING, with no worker to ever finish it.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
    try:
        space.suggest(optuna.create_study(sampler=space.make_sampler(), directions=space.directions).ask())
    except SpaceError:
        raise
    except Exception as error:  # noqa: BLE001 - a sampler can raise anything
        detail = (str(error).strip().splitlines() or [""])[0]
        raise fail(space.path, "sampler", f"cannot propose a trial ({type(error).__name__}: {detail})") from None
    finally:
        optuna.logging.set_verbosity(verbosity)
