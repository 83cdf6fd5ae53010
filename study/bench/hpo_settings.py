"""`make hpo-bench`'s settings: the methods it compares, the data sets it runs them on, and each search's space file.

Every method that searches runs `make search` on a file derived from one
space (SPACE, default search_spaces/bench.yaml), so that the methods differ
only where their names say:
- tpe: the space's TPESampler seeded with the search seed, its pruner, no
  enqueued points (TPE cold);
- random: RandomSampler with the same seed, the same pruner, no enqueued
  points (random cold);
- default: the space as it is: its sampler seeded, its pruner, its enqueued
  warm-start points;
- tpe_hyperband: tpe with Optuna's HyperbandPruner instead of the space's
  pruner (multi-fidelity: a fused group's pruned members stop costing compute,
  so more trials start in the same budget).
A fifth, `recipe`, searches nothing: the user's recipe retrained as a
reference row. It is 100 epochs at batch 32, dearer than a whole search here,
so it runs only when METHODS names it.

A bad value of any option is one line that names the option and the value.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from cnnlib.config import TrainConfig
from cnnlib.device import resolve_device
from cnnlib.sources import class_folder_problem, is_image_tree, parse_classes

from ..errors import UserError
from ..options import MAX_GROUP, PROJECT_ROOT, env
from ..search.space import SearchSpace
from ..search.space_file import load_space

SEARCH_METHODS = {
    "tpe": "the space's TPESampler, seeded, no enqueued points",
    "random": "RandomSampler with the same seed and pruner, no enqueued points",
    "default": "the space as it is: TPE with its enqueued warm-start points",
    "tpe_hyperband": "tpe with Optuna's HyperbandPruner instead of the space's pruner",
}
RECIPE = "recipe"
METHOD_NAMES = (*SEARCH_METHODS, RECIPE)
DEFAULT_METHODS = tuple(SEARCH_METHODS)
# Seconds per search. With bench.yaml and FUSE 8 on the shared 2-core CPU (1 torch thread, 2.3-3.0 s per
# epoch of a fused group of 8), an ask takes 30-45 s: 160 s is the start-up ask and three model-driven
# asks after it, two or three judged before the deadline (one smoke search each of default and
# tpe_hyperband). 2 data sets x 4 methods x 3 seeds of it, with set-up and retrains, take about
# 75 minutes (hpo.estimate_minutes).
DEFAULT_BUDGET = 160
DEFAULT_SEARCH_SEEDS = 3
SPACE = "search_spaces/bench.yaml"
RECIPE_SPACE = "search_spaces/seed_final.yaml"
# The second data set of a default run: other CIFAR-10 classes at the user's counts, so a verdict
# does not rest on one split's 51 dev trucks.
SECOND_DATASET = (Path("shared") / "data" / "cifar10-deer-dog-horse", "deer,dog,horse")
HYPERBAND_REDUCTION_FACTOR = 3  # Optuna's default: a third of a rung's trials go on to the next
TPE_STARTUP_DEFAULT = inspect.signature(optuna.samplers.TPESampler).parameters["n_startup_trials"].default
NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class Dataset:
    """One data set the bench runs every method on: a DATA folder and its class order (None: the folder's own)."""

    name: str
    path: str
    classes: str | None
    counts: str | None = None  # COUNTS for this data set (None: the bench's own)

    def options(self, args):
        """The bench's data options with this data set's DATA and CLASSES (the split counts stay the bench's)."""
        return type(args)(**{**vars(args), "data": self.path, "classes": self.classes,
                             "counts": getattr(args, "counts", None) or self.counts})


# --- the options ------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--space", default=env("SPACE", SPACE),
                        help="the space every search derives its file from (env SPACE)")
    parser.add_argument("--methods", default=env("METHODS", ",".join(DEFAULT_METHODS)),
                        help=f"comma list of methods, some of {', '.join(METHOD_NAMES)} (env METHODS; "
                             f"default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--datasets", default=env("DATASETS"),
                        help="data sets, separated by spaces or ';', each PATH or PATH:CLASSES (env DATASETS; "
                             "default: DATA with CLASSES, and ../shared/data/cifar10-deer-dog-horse with "
                             "deer,dog,horse; TRAIN_COUNTS, DEV_COUNTS and TEST_COUNTS apply to each)")
    parser.add_argument("--recipe", default=RECIPE_SPACE,
                        help="the hand-tuned recipe of the `recipe` method: a space file whose values are all fixed")
    parser.add_argument("--budget", default=env("BUDGET"),
                        help=f"seconds per search: TIMEOUT of each `make search` (env BUDGET; default {DEFAULT_BUDGET})")
    parser.add_argument("--search-seeds", default=env("SEARCH_SEEDS", str(DEFAULT_SEARCH_SEEDS)),
                        help="search seeds 0..k-1 per method and data set (env SEARCH_SEEDS)")
    parser.add_argument("--fuse", default=env("FUSE"),
                        help="trials per ask of each search (env FUSE; default: the space's TPE n_startup_trials, "
                             "so the start-up is one ask and every later ask is TPE's model's)")


def _whole(name: str, text, minimum: int = 1, maximum: int | None = None) -> int:
    bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UserError(f"{name} {text!r}: expected a whole number {bounds}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise UserError(f"{name} {text!r}: expected a whole number {bounds}")
    return value


def parse_methods(text: str) -> tuple[str, ...]:
    """'tpe,random' -> ('tpe', 'random'), in the order given; an unknown or repeated name is one line."""
    names = [name.strip() for name in str(text).split(",")]
    where = f"METHODS (--methods) {text!r}"
    if any(not name for name in names):
        raise UserError(f"{where}: expected a comma list of {', '.join(METHOD_NAMES)}")
    for name in names:
        if name not in METHOD_NAMES:
            raise UserError(f"{where}: unknown method {name!r}; expected some of {', '.join(METHOD_NAMES)}")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: a method is named twice")
    if not any(name in SEARCH_METHODS for name in names):
        raise UserError(f"{where}: name at least one method that searches ({', '.join(SEARCH_METHODS)})")
    return tuple(names)


def shared_second_dataset() -> Path:
    """The deer/dog/horse images beside the checkout (from any working directory), else ../shared."""
    for candidate in (PROJECT_ROOT.parent / SECOND_DATASET[0], Path("..") / SECOND_DATASET[0]):
        if candidate.is_dir():
            return candidate
    return Path("..") / SECOND_DATASET[0]


def parse_datasets(text: str | None, data: str, classes: str | None) -> list[Dataset]:
    """DATASETS as data sets; empty: DATA (with CLASSES) and the shared deer/dog/horse set.

    Each entry is PATH or PATH:CLASSES; its name, which labels its table and
    folders, is the folder's name. Entries are separated by spaces or ';'.
    """
    if not text or not str(text).strip():
        entries = [(data, classes), (str(shared_second_dataset()), SECOND_DATASET[1])]
        if Path(entries[0][0]).resolve() == Path(entries[1][0]).resolve():
            entries = entries[:1]
        where = "DATASETS unset (DATA" + ("" if len(entries) == 1 else f", and {entries[1][0]} as {entries[1][1]}") + ")"
    else:
        entries = [tuple(entry.rsplit(":", 1)) if ":" in entry else (entry, None)
                   for entry in re.split(r"[;\s]+", str(text).strip())]
        where = f"DATASETS (--datasets) {text!r}"
    datasets = []
    for path, names in entries:
        if not path:
            raise UserError(f"{where}: an entry has no folder; expected PATH or PATH:CLASSES")
        if not Path(path).is_dir():
            raise UserError(f"{where}: {path!r} is not a folder (expected an image tree or a folder of .npz files)")
        if names is not None:
            try:
                order = parse_classes(names)
            except ValueError as error:
                raise UserError(f"{where}: {error}") from None
            problem = next(filter(None, (class_folder_problem(Path(path) / split, order) for split in ("train", "val", "test")
                                         if is_image_tree(Path(path)) and (Path(path) / split).is_dir())), None)
            if problem:  # the data options would blame CLASSES, which did not set this order
                raise UserError(f"{where}: {problem}; the classes after {path}: must name its class folders")
        name = Path(path).resolve().name
        if not NAME.fullmatch(name):
            raise UserError(f"{where}: the folder name {name!r} cannot name a data set; rename or link the folder")
        if name in (d.name for d in datasets):
            raise UserError(f"{where}: two data sets are named {name!r} (a data set is named by its folder)")
        # The shared deer/dog/horse folder stands in for the user's problem at their counts, as the first does.
        second = Path(path).resolve() == shared_second_dataset().resolve()
        datasets.append(Dataset(name, str(path), names or None, "user" if second else None))
    return datasets


def settings_from(args) -> dict:
    """The bench's settings from the options; a bad value is one line naming the option, before any data or training."""
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as error:
        raise UserError(f"DEVICE {args.device!r}: {error}") from None
    methods = parse_methods(args.methods)
    budget = _whole("BUDGET (--budget)", args.budget) if args.budget is not None else DEFAULT_BUDGET
    seeds = _whole("SEARCH_SEEDS (--search-seeds)", args.search_seeds, maximum=MAX_GROUP)
    fuse = _whole("FUSE (--fuse)", args.fuse, maximum=MAX_GROUP) if args.fuse is not None else None
    space = load_space(args.space)
    if space.objectives != ["dev_macro_accuracy"]:
        raise UserError(f"{space.path}: hpo-bench ranks trials by dev macro accuracy alone; "
                        f"this space's objectives are {', '.join(space.objectives)}")
    tpe_methods = [m for m in methods if m in SEARCH_METHODS and m != "random"]
    if tpe_methods and space.sampler["name"] != "TPESampler":
        raise UserError(f"{space.path}: METHODS {', '.join(tpe_methods)} compare TPE with random search, "
                        f"but this space's sampler is {space.sampler['name']}; give a TPESampler space")
    startup = startup_trials(space)
    recipe = load_space(args.recipe) if RECIPE in methods else None
    datasets = parse_datasets(args.datasets, args.data, args.classes)
    return {"methods": methods, "searches": [m for m in methods if m in SEARCH_METHODS],
            "budget_seconds": budget, "search_seeds": list(range(seeds)), "device": device,
            "fuse": fuse if fuse is not None else min(startup, MAX_GROUP),
            "fuse_from": "FUSE" if fuse is not None else "the space's n_startup_trials",
            "startup_trials": startup, "space": space, "datasets": datasets,
            "recipe": recipe, "recipe_config": recipe.fixed_config() if recipe else None}


# --- each method's space file -------------------------------------------------------------------

def startup_trials(space: SearchSpace) -> int:
    """Trials TPE draws at random before its model acts: the space's n_startup_trials, else Optuna's default."""
    return int(space.sampler.get("n_startup_trials", TPE_STARTUP_DEFAULT))


def max_epochs(space: SearchSpace) -> int:
    """The most epochs a trial of this space trains (its epochs param's high end, or fixed value)."""
    for param in space.params.values():
        if param.field == "epochs":
            if param.type == "fixed":
                return int(param.value)
            return int(max(param.choices) if param.type == "categorical" else param.high)
    return TrainConfig().epochs


def hyperband_pruner(space: SearchSpace) -> dict:
    """Optuna's HyperbandPruner over the trials' epochs: no trial judged before the space's own warm-up.

    Its first rung is the space's n_warmup_steps (a decaying schedule looks worse
    early than it ends), its last the space's most epochs; Optuna splits trials
    over brackets that start pruning at successive rungs.
    """
    top = max_epochs(space)
    first = int((space.pruner or {}).get("n_warmup_steps") or 1)
    return {"name": "HyperbandPruner", "min_resource": first if first < top else 1, "max_resource": top,
            "reduction_factor": HYPERBAND_REDUCTION_FACTOR}


def derived_space_text(space: SearchSpace, method: str, seed: int) -> str:
    """The space file one search runs: the space's own, its sampler seeded or replaced, enqueue and pruner as the method says."""
    raw = yaml.safe_load(Path(space.path).read_text())
    sampler = dict(space.sampler)
    if method == "random":
        raw["sampler"] = {"name": "RandomSampler", "seed": seed}
    else:
        raw["sampler"] = {**sampler, "seed": seed}
    if method != "default":
        raw.pop("enqueue", None)
    if method == "tpe_hyperband":
        raw["pruner"] = hyperband_pruner(space)
    header = (f"# make hpo-bench, method {method} ({SEARCH_METHODS[method]}), search seed {seed}: "
              f"derived from {space.path}.\n")
    # File order kept (a condition's parent comes first); one line per param, as in search_spaces/.
    return header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=1000)
