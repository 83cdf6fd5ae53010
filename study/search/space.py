"""Search-space files: hyperparameter ranges, sampler, pruner and objective as data.

A space is a YAML file someone who never saw the code can read (see
search_spaces/default.yaml). Every mistake in it is reported before any
training starts, with the file and the key. A space whose params are all
fixed values is simply a training config (`make train`).
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

from cnnlib.errors import CnnlibError
from cnnlib.config import SHARED
from cnnlib.training import TrainConfig

from . import strict_yaml

PARAM_TYPES = ("float", "int", "categorical", "fixed")
OBJECTIVES = ("dev_macro_accuracy", "robust_macro_accuracy")
TOP_KEYS = {"description", "objective", "objective_epochs", "robust", "sampler", "pruner", "budget", "params",
            "enqueue"}
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "value", "when", "field"}
CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
CONFIG_TYPES = typing.get_type_hints(TrainConfig)  # lr: float, epochs: int, flip: bool, ...
# The user attribute that carries an enqueued point's values for fixed params (SearchSpace.enqueue_into).
ENQUEUED_FIXED_ATTR = "enqueued_fixed_params"
# The user attribute that marks a trial of a space file's known point: its index in `enqueue:`.
# make final always retrains these beside the search's top trials (study.final.warm_start_trials).
WARM_START_ATTR = "warm_start_point"
SHARED_SEED_SAMPLERS = {"GridSampler", "QMCSampler", "BruteForceSampler"}  # see SearchSpace.make_sampler
# Where the shipped spaces are: inside the package when installed from a wheel (pyproject.toml maps
# search_spaces/ to study/search_spaces), at the checkout's top level when run from source.
_PACKAGE = Path(__file__).resolve().parents[1]  # study/
SHIPPED_SPACE_DIRS = (_PACKAGE / "search_spaces", _PACKAGE.parent / "search_spaces")


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


class SeededPerTrial(optuna.samplers.BaseSampler):
    """A sampler built anew for each trial, seeded from the file's seed and the trial's number.

    Optuna's samplers read the study's history from the storage for every
    trial; what they keep between trials is their random state (and caches),
    so a fresh one per trial draws as a long-lived one would, from a stream no
    other trial shares.
    """

    KEPT = 64  # trials asked but not yet told whose sampler is kept (a fused group, plus slack)

    def __init__(self, build, seed: int):
        self._build, self._seed = build, seed
        self._by_number: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, trial) -> optuna.samplers.BaseSampler:
        sampler = self._by_number.get(trial.number)
        if sampler is None:
            if len(self._by_number) >= self.KEPT:  # trials never told (their worker was stopped)
                self._by_number.pop(next(iter(self._by_number)))
            seed = int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0])
            sampler = self._by_number[trial.number] = self._build(seed)
        return sampler

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._for(trial).after_trial(study, trial, state, values)
        self._by_number.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Nothing to reseed: each trial's seed is fixed by its number."""


@dataclass
class SearchSpace:
    path: Path
    params: dict[str, Param]
    objectives: list[str]
    sampler: dict
    pruner: dict | None
    robust: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    description: str = ""
    enqueue: list[dict] = field(default_factory=list)  # known points evaluated first (warm start)
    # dev macro accuracy averaged over this many last epochs (1: the last epoch alone); see README
    # "An honest objective": averaging the last 5 ranked configs closer to their test scores.
    objective_epochs: int = 1

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def directions(self) -> list[str]:
        return ["maximize"] * len(self.objectives)

    @property
    def is_fixed(self) -> bool:
        return all(p.type == "fixed" for p in self.params.values())

    @property
    def searched(self) -> list[str]:
        return [n for n, p in self.params.items() if p.type != "fixed"]

    def active(self, name: str, values: dict) -> bool:
        """A conditional param is active only when the params it depends on have the given values."""
        return all(values.get(k) in (v if isinstance(v, list) else [v]) for k, v in self.params[name].when.items())

    def suggest(self, trial: optuna.Trial) -> TrainConfig:
        """Ask the trial for every active param; fixed ones are constants, inactive ones keep defaults.

        An enqueued point's own value for a fixed param (enqueue_into) wins over the file's.
        """
        values: dict = {}
        overrides = trial.user_attrs.get(ENQUEUED_FIXED_ATTR) or {}
        for name, param in self.params.items():  # file order: a condition's parent comes first
            if self.active(name, values):
                values[name] = overrides[name] if name in overrides else param.suggest(trial)
        return self._config(values)

    def enqueue_into(self, study: optuna.Study) -> None:
        """Queue the file's known points (Optuna's enqueue_trial) as the study's next trials.

        Optuna fixes only the params a trial suggests; a point's values for
        this file's fixed params travel as a user attribute that `suggest` reads.
        """
        for index, point in enumerate(self.enqueue):
            searched = {k: v for k, v in point.items() if self.params[k].type != "fixed"}
            fixed = {k: v for k, v in point.items() if self.params[k].type == "fixed" and v != self.params[k].value}
            attrs = {WARM_START_ATTR: index, **({ENQUEUED_FIXED_ATTR: fixed} if fixed else {})}
            study.enqueue_trial(searched, user_attrs=attrs, skip_if_exists=True)

    def _config(self, values: dict) -> TrainConfig:
        """TrainConfig from {param name: value}, each param setting its field."""
        settings: dict = {}
        for name, value in values.items():
            field_name = self.params[name].field if name in self.params else name
            if field_name in settings:
                raise SpaceError(f"{self.path}: params {name!r} and another both set {field_name!r}; "
                                 "make their `when:` conditions exclusive")
            settings[field_name] = value
        return TrainConfig.from_dict(settings)

    def config_from_params(self, params: dict) -> TrainConfig:
        """A trial's sampled params plus this space's fixed values."""
        values = {n: p.value for n, p in self.params.items() if p.type == "fixed"}
        values.update({k: v for k, v in params.items() if k in self.params or k in CONFIG_KEYS})
        return self._config(values)

    def fixed_config(self) -> TrainConfig:
        if not self.is_fixed:
            raise SpaceError(f"{self.path}: params {', '.join(self.searched)} are ranges; "
                             "a training run needs a file whose values are all fixed (e.g. search_spaces/seed_final.yaml)")
        return self.config_from_params({})

    def shared_params(self, params: dict) -> dict:
        """The params of a trial that decide its batches (cnnlib.config.SHARED, and a weighted sampler).

        Trials asked together that agree on these train as one fused group.
        """
        shared = {name: value for name, value in params.items()
                  if name in self.params and self.params[name].field in SHARED}
        if params.get("imbalance") == "weighted_sampler":
            shared["imbalance"] = "weighted_sampler"
        return shared

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        """The file's sampler; with a seed, each trial's draw is seeded from that seed and the trial's number.

        Every process that opens the study builds its own sampler, and samplers
        with equal seeds propose equal params (TPE's random start-up trials,
        for one): two workers, a resumed run, runs started together or machines
        sharing one storage would repeat one another's trials. A trial's number
        is unique in its study (the storage assigns it), so seeding per trial
        keeps every draw distinct, and a single run reproducible.
        Grid and QMC samplers are the exception: their seed fixes one shuffled
        order that a trial's number indexes, which every process must share.
        """
        spec = dict(self.sampler)
        name = spec.pop("name")
        cls = getattr(optuna.samplers, name)
        if name == "GridSampler":
            spec["search_space"] = {n: p.choices for n, p in self.params.items() if p.type == "categorical"}

        def build(**override):
            try:
                return cls(**{**spec, **override})
            except TypeError as error:
                raise SpaceError(f"{self.path}: sampler: {error}") from None

        sampler = build()
        if spec.get("seed") is None or name in SHARED_SEED_SAMPLERS:
            return sampler  # unseeded: each process draws its own seed from the OS
        return SeededPerTrial(lambda seed: build(seed=seed), int(spec["seed"]))

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if not self.pruner or len(self.objectives) > 1:  # Optuna cannot prune multi-objective trials
            return optuna.pruners.NopPruner()
        spec = dict(self.pruner)
        name = spec.pop("name")
        try:
            return getattr(optuna.pruners, name)(**spec)
        except TypeError as error:
            raise SpaceError(f"{self.path}: pruner: {error}") from None

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """What `suggest` asks Optuna for, per searched param."""
        made = {}
        for name, p in self.params.items():
            if p.type == "categorical":
                made[name] = optuna.distributions.CategoricalDistribution(p.choices)
            elif p.type == "int":
                made[name] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
            elif p.type == "float":
                made[name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        return made

    def grid_size(self) -> int | None:
        if self.sampler.get("name") != "GridSampler":
            return None
        return math.prod(len(p.choices) for p in self.params.values() if p.type == "categorical")


def _fail(path, key, message) -> SpaceError:
    return SpaceError(f"{path}: {key}: {message}")


def _number(path, key, value, integer=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        hint = ""
        if isinstance(value, str) and _looks_numeric(value):
            hint = " (YAML reads 1e-3 as text; write 1.0e-3)"
        raise _fail(path, key, f"expected {'an integer' if integer else 'a number'}, got {value!r}{hint}")
    return value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_values(path: Path, params: dict[str, Param]) -> None:
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
            _check_usable(path, f"params.{name}", param.field, value)
        for parent, wanted in param.when.items():
            possible = params[parent].choices if params[parent].type == "categorical" else (
                [params[parent].value] if params[parent].type == "fixed" else None)
            for value in (wanted if isinstance(wanted, list) else [wanted]):
                if possible is not None and value not in possible:
                    raise _fail(path, f"params.{name}.when",
                                f"{parent} is never {value!r} (its values: {', '.join(map(str, possible))})")


def _check_usable(path: Path, key: str, name: str, value) -> None:
    """`value` is of setting `name`'s kind and one TrainConfig accepts for it."""
    _check_kind(path, key, name, value)
    try:
        TrainConfig.from_dict({name: value})
    except (ValueError, TypeError) as error:
        raise _fail(path, key, f"value {value!r} is not usable: {error}") from None


def _check_kind(path: Path, key: str, name: str, value) -> None:
    """Numbers must be numbers and switches booleans, before TrainConfig coerces them.

    YAML reads `true`, `yes` and `on` as booleans and int(True) is 1, so
    `batch_size: yes` would train with batch size 1; int(32.5) would quietly be 32.
    """
    kind = CONFIG_TYPES[name]
    if kind is bool and not isinstance(value, bool):
        raise _fail(path, key, f"expected true or false, got {value!r}")
    if kind in (int, float):
        _number(path, key, value, integer=(kind is int))
        if not math.isfinite(value):
            raise _fail(path, key, f"expected a finite number, got {value}")


def _parse_param(path: Path, name: str, spec) -> Param:
    key = f"params.{name}"
    field_name = spec.get("field", name) if isinstance(spec, dict) else name
    if field_name not in CONFIG_KEYS:
        raise _fail(path, key if field_name == name else f"{key}.field",
                    f"unknown hyperparameter {field_name!r}; known: {', '.join(sorted(CONFIG_KEYS))}")
    if not isinstance(spec, dict):
        return Param(name, "fixed", value=spec)
    unknown = set(spec) - PARAM_KEYS
    if unknown:
        raise _fail(path, f"{key}.{sorted(unknown)[0]}", f"unknown key; allowed: {', '.join(sorted(PARAM_KEYS))}")
    return _parse_param_spec(path, name, key, spec, field_name)


def _parse_param_spec(path: Path, name: str, key: str, spec: dict, field_name: str) -> Param:
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise _fail(path, f"{key}.type", f"unknown type {kind!r}; expected one of {', '.join(PARAM_TYPES)}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise _fail(path, f"{key}.when", f"expected a mapping like {{optimizer: sgd}}, got {when!r}")
    if kind == "fixed":
        if "value" not in spec:
            raise _fail(path, f"{key}.value", "a fixed param needs a value")
        return Param(name, kind, value=spec["value"], when=when, field=field_name)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(path, f"{key}.choices", f"expected a non-empty list, got {choices!r}")
        return Param(name, kind, choices=choices, when=when, field=field_name)
    for bound in ("low", "high"):
        if bound not in spec:
            raise _fail(path, f"{key}.{bound}", f"a {kind} range needs low and high")
        _number(path, f"{key}.{bound}", spec[bound], integer=(kind == "int"))
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    for bound in ("low", "high"):
        if not math.isfinite(spec[bound]):
            raise _fail(path, f"{key}.{bound}", f"expected a finite number, got {spec[bound]}")
    if not isinstance(log, bool):
        raise _fail(path, f"{key}.log", f"expected true or false, got {log!r}")
    if low > high:
        raise _fail(path, key, f"low ({low}) > high ({high})")
    if log and low <= 0:
        raise _fail(path, f"{key}.low", f"log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if _number(path, f"{key}.step", step, integer=(kind == "int")) <= 0:
            raise _fail(path, f"{key}.step", f"must be > 0, got {step}")
        if log:
            raise _fail(path, f"{key}.step", "step cannot be combined with log")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when, field=field_name)


def _parse_enqueue(path: Path, spec, params: dict[str, Param]) -> list[dict]:
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
        raise _fail(path, "enqueue", f"expected a list of {{param: value}} points, got {spec!r}")
    points = []
    for index, point in enumerate(spec):
        key = f"enqueue[{index}]"
        if not isinstance(point, dict) or not point:
            raise _fail(path, key, f"expected a mapping of searched params to values, got {point!r}")
        for name, value in point.items():
            param = params.get(name)
            if param is None:
                raise _fail(path, f"{key}.{name}", f"not a param of this file (its params: {', '.join(params)})")
            if param.type == "fixed":
                _check_usable(path, f"{key}.{name}", param.field, value)
            elif param.type == "categorical":
                if value not in param.choices:
                    raise _fail(path, f"{key}.{name}", f"{value!r} is not one of its choices {param.choices}")
            else:
                _number(path, f"{key}.{name}", value, integer=(param.type == "int"))
                if not param.low <= value <= param.high:
                    raise _fail(path, f"{key}.{name}", f"{value!r} is outside its range [{param.low}, {param.high}]")
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
        raise _fail(path, key, f"expected {{name: ..., <args>}}, got {spec!r}")
    usable = sorted(n for n, c in vars(module).items() if not n.startswith("_") and isinstance(c, type)
                    and issubclass(c, base) and not inspect.isabstract(c))
    if spec["name"] not in usable:
        raise _fail(path, f"{key}.name", f"{spec['name']!r} is not a public {key} class of {module.__name__}; "
                                         f"expected one of {', '.join(usable)}")
    arguments = inspect.signature(getattr(module, spec["name"])).parameters
    for name, value in spec.items():  # YAML's yes/on are booleans: `seed: yes` would quietly be seed 1
        annotation = str(arguments[name].annotation) if name in arguments else ""
        if isinstance(value, bool) and re.search(r"\b(int|float)\b", annotation) and "bool" not in annotation:
            raise _fail(path, f"{key}.{name}", f"expected a number, got {value!r}")
    return dict(spec)


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
        raise _fail(space.path, "sampler", f"cannot propose a trial ({type(error).__name__}: {detail})") from None
    finally:
        optuna.logging.set_verbosity(verbosity)


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
        raise _fail(path, sorted(unknown)[0], f"unknown key; allowed: {', '.join(sorted(TOP_KEYS))}")
    if not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise _fail(path, "params", "missing or empty; list the hyperparameters")
    params = {name: _parse_param(path, name, spec) for name, spec in raw["params"].items()}
    names = list(params)
    for name, param in params.items():
        for parent in param.when:
            if parent not in params:
                raise _fail(path, f"params.{name}.when", f"depends on {parent!r}, which is not a param of this file")
            if names.index(parent) > names.index(name):
                raise _fail(path, f"params.{name}.when", f"depends on {parent!r}, which must be a param listed before it")
    objectives = raw.get("objective", "dev_macro_accuracy")
    objectives = objectives if isinstance(objectives, list) else [objectives]
    for objective in objectives:
        if objective not in OBJECTIVES:
            raise _fail(path, "objective", f"unknown objective {objective!r}; expected {', '.join(OBJECTIVES)}")
    robust = raw.get("robust") or {}
    epsilon = robust.get("epsilon")
    if "robust_macro_accuracy" in objectives and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))):
        raise _fail(path, "robust.epsilon", "the robust objective needs robust: {attack: fgsm, epsilon: 0.03}")
    objective_epochs = raw.get("objective_epochs", 1)
    if _number(path, "objective_epochs", objective_epochs, integer=True) < 1:
        raise _fail(path, "objective_epochs", f"must be at least 1, got {objective_epochs}")
    budget = raw.get("budget") or {}
    for key, value in budget.items():
        if key not in ("trials", "timeout"):
            raise _fail(path, f"budget.{key}", "unknown key; allowed: trials, timeout")
        if value is not None and _number(path, f"budget.{key}", value, integer=True) < 1:  # 0 is not "no limit"
            raise _fail(path, f"budget.{key}", f"must be at least 1, got {value}")
    sampler = _parse_component(path, "sampler", raw.get("sampler"), optuna.samplers, optuna.samplers.BaseSampler,
                               {"name": "TPESampler"})
    pruner = _parse_component(path, "pruner", raw.get("pruner"), optuna.pruners, optuna.pruners.BasePruner, None)
    enqueue = _parse_enqueue(path, raw.get("enqueue"), params)
    space = SearchSpace(path, params, objectives, sampler, pruner, robust, budget, str(raw.get("description", "")),
                        enqueue, objective_epochs)
    if sampler["name"] == "GridSampler":
        bad = [n for n, p in params.items() if p.type not in ("categorical", "fixed")]
        if bad:
            raise _fail(path, f"params.{bad[0]}", "a GridSampler space lists values as categorical choices")
    _check_values(path, params)  # a value TrainConfig rejects fails now, not mid-study
    for key, make in (("sampler", space.make_sampler), ("pruner", space.make_pruner)):
        try:
            make()
        except SpaceError:
            raise
        except ValueError as error:
            raise _fail(path, key, str(error)) from None
    _check_sampler_proposes(space)
    return space
