"""The study a search run adds to: created or continued, and checked against the run's space and data.

A study keeps the space file and the data it began with, so a later run (or
`make export`, `make final`) can tell when it is given other ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna

from ..errors import UserError
from ..records import check_recorded_data
from .artifacts import record_artifact_dir
from .locks import file_lock, lock_path
from .space import SearchSpace
from .storage import open_storage
from .storage_errors import storage_failures


def prepare_study(args, space: SearchSpace, splits) -> optuna.Study:
    """The run's study, created if new, with its data and artifact folder recorded, before any worker starts.

    Runs started together on this machine: one creates the study and queues its
    warm-start points, the other then finds them queued (enqueue_trial's
    skip_if_exists) instead of queueing them twice.
    """
    storage = open_storage(args.storage)
    with file_lock(lock_path(args.storage, args.study or space.name, Path(args.results))):
        study = create_study(args, space, storage)
    record_data(study, args, splits)
    record_artifact_dir(study, Path(args.results))  # trial reports go to RESULTS/artifacts, wherever the storage is
    return study


def create_study(args, space: SearchSpace, storage) -> optuna.Study:
    name = args.study or space.name
    with storage_failures(args.storage):  # e.g. a read-only file: the first write is here
        study = optuna.create_study(study_name=name, storage=storage, sampler=space.make_sampler(),
                                    pruner=space.make_pruner(), directions=space.directions, load_if_exists=True)
    if len(study.directions) != len(space.directions):
        raise UserError(f"study {name!r} has {len(study.directions)} objective(s) but {space.path} defines "
                        f"{len(space.directions)}; use another STUDY name")
    text = space.path.read_text()
    previous = study.user_attrs.get("space_text")
    if previous != text:
        check_space_fits_study(study, space)
    if previous is None:
        study.set_user_attr("space_file", str(space.path))
        study.set_user_attr("space_text", text)
        study.set_user_attr("objectives", space.objectives)
        space.enqueue_into(study)  # warm start: the known points are the first trials of a new study
    elif previous != text:
        print(f"note: {space.path} differs from the space file study {name!r} began with "
              f"({study.user_attrs.get('space_file')}); new trials use its ranges", file=sys.stderr)
    if study.metric_names is None:  # the dashboard then labels its axes "dev_macro_accuracy", not "Objective 0"
        study.set_metric_names(list(space.objectives))
    return study


def check_space_fits_study(study: optuna.Study, space: SearchSpace) -> None:
    """Refuse a space whose params Optuna would reject trial after trial in this study.

    A param keeps its kind and, if categorical, its choices for the life of a
    study ("CategoricalDistribution does not support dynamic value space"):
    another space file, or an edited one, must not change them.
    """
    wanted = space.distributions()
    began = f" (begun with {study.user_attrs['space_file']})" if study.user_attrs.get("space_file") else ""
    for trial in study.get_trials(deepcopy=False):
        for name, before in trial.distributions.items():
            if name not in wanted:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(before, wanted[name])
            except ValueError:
                raise UserError(f"{space.path}: params.{name} is {wanted[name]}, but study {study.study_name!r}{began} "
                                f"asked it as {before} in trial {trial.number}; choose another STUDY=... for this space"
                                ) from None


def record_data(study: optuna.Study, args, splits) -> None:
    """The class order and split a study was searched on, stated once and kept on the study.

    Later commands read them back: `make export` writes them beside the CSVs,
    `make final` refuses another split. A run on another class order or
    another split (other counts, CORRECTIONS, images) is refused as
    `make final` refuses it: its trials' dev scores would be ranked beside
    scores on another dev set.
    """
    recorded = study.user_attrs.get("classes")
    if recorded is not None and list(recorded) != list(splits.classes):
        raise UserError(f"study {study.study_name!r} was searched with classes {','.join(recorded)}; this run reads "
                        f"{','.join(splits.classes)} (check DATA and CLASSES, or use another STUDY name)")
    check_recorded_data(study, splits, args.corrections,
                        fix="pass the same data options as before, or use a new STUDY name for this split")
    if recorded is None:
        study.set_user_attr("classes", list(splits.classes))
    if study.user_attrs.get("split_cache_key") is None:  # a new study, or one from before the split was recorded
        for name, value in splits.record().items():  # cnnlib.splits.RECORD_KEYS
            study.set_user_attr(name, value)
