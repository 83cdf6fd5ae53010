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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import yaml

from cnnlib.config import SHARED
from cnnlib.training import TrainConfig

from ..records import WARM_START_ATTR
from . import strict_yaml
from .space_params import CONFIG_KEYS, Param, SpaceError, check_values, fail, number, parse_enqueue, parse_param

OBJECTIVES = ("dev_macro_accuracy", "robust_macro_accuracy")
TOP_KEYS = {"description", "objective", "objective_epochs", "robust", "sampler", "pruner", "budget", "params",
            "enqueue"}
# The user attribute that carries an enqueued point's values for fixed params (SearchSpace.enqueue_into).
ENQUEUED_FIXED_ATTR = "enqueued_fixed_params"
SHARED_SEED_SAMPLERS = {"GridSampler", "QMCSampler", "BruteForceSampler"}  # see SearchSpace.make_sampler
# Where the shipped spaces are: inside the package when installed from a wheel (pyproject.toml maps
# search_spaces/ to study/search_spaces), at the checkout's top level when run from source.
_PACKAGE = Path(__file__).resolve().parents[1]  # study/
SHIPPED_SPACE_DIRS = (_PACKAGE / "search_spaces", _PACKAGE.parent / "search_spaces")


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
