"""A search space as the record a space file becomes: its params, sampler, pruner and objectives.

`SearchSpace` is what space_file.load_space builds from a YAML file (see
search_spaces/default.yaml), and what a study asks of it: a trial's config
(`suggest`), the known points queued first (`enqueue_into`), the sampler and
the pruner. A space whose params are all fixed values is simply a training
config (`make train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from cnnlib.config import SHARED, TrainConfig
from cnnlib.errors import CnnlibError

from ..records import WARM_START_ATTR

CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
# The user attribute that carries an enqueued point's values for fixed params (SearchSpace.enqueue_into).
ENQUEUED_FIXED_ATTR = "enqueued_fixed_params"
SHARED_SEED_SAMPLERS = {"GridSampler", "QMCSampler", "BruteForceSampler"}  # see SearchSpace.make_sampler


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
