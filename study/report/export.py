"""Write each study's trials and learning curves as CSV files (`make export`).

For every study in STORAGE (or only STUDY) this writes, under RESULTS/<study>/:

- trials.csv: one row per trial. Optuna's `trials_dataframe` columns (number,
  state, value or values_<objective>, datetime_start, datetime_complete,
  duration in seconds, params_*), then the user attributes flattened into
  scalars: user_attrs_dev_macro_accuracy, user_attrs_dev_acc_<class>,
  user_attrs_train_macro_accuracy, user_attrs_train_acc_<class> (the plain model, no test-time views),
  user_attrs_dev_cm_<true>_as_<predicted> (the dev confusion matrix),
  user_attrs_config_<key> (the full training config, fixed values included),
  user_attrs_train_seconds, user_attrs_device, user_attrs_pruned_reason, ...
- epochs.csv: one row per trial and epoch (trial, state, epoch, train_loss,
  dev_loss, dev_macro_accuracy) plus the trial's params_* and
  user_attrs_config_* columns, so a plot can group curves by learning rate.
- data.csv: images per class in each split (split, class, count, source), from
  the split the study recorded when `make search` created it ("data_summary");
  a study from before that record gives the dev counts of its trials alone.
- data.json: what the study recorded it ran on: that split summary, the split
  cache key and the corrections file's digest (absent for older studies).
- space.yaml: the search-space file the study began with, as recorded on it;
  `make plots` reads its ranges (log scale or not) from there.

`make plots` reads only these files, so they can be copied off the machine
that ran the study and plotted elsewhere.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import optuna
import pandas as pd

from cnnlib.atomic import atomic_path, write_atomic, write_json
from cnnlib.splits import RECORD_KEYS

from ..errors import UserError
from ..options import add_storage_option
from ..output import study_folder  # noqa: F401 - where export writes: RESULTS/<study>
from ..search import hints
from ..search.storage import load_existing_study, open_storage
from ..search.storage_url import redact, storage_file

BASE_COLUMNS = ["number", "state", "value", "datetime_start", "datetime_complete", "duration"]
CURVES = ("train_loss", "dev_loss", "dev_macro_accuracy")
SPACE_FILE = "space.yaml"  # beside the CSVs: the space the study recorded
# Scalar user attributes, in the order a reader wants them; any other scalar attribute follows.
KNOWN_ATTRS = ("dev_macro_accuracy", "train_macro_accuracy", "robust_macro_accuracy", "robust_attack", "epochs_run",
               "train_seconds", "seconds_per_epoch", "device", "pruned_reason", "fail_reason")
SKIPPED_ATTRS = {"traceback", "classes", "config", "dev_per_class", "train_per_class", "dev_confusion_matrix"}


def add_arguments(parser) -> None:
    parser.add_argument("--study", default=os.environ.get("STUDY") or None, help="export only this study (default: all)")
    add_storage_option(parser)
    parser.add_argument("--results", default=os.environ.get("RESULTS") or "results",
                        help="output folder; files go to RESULTS/<study>/ (env RESULTS)")


# --- trials.csv ---------------------------------------------------------------

def _flat_attrs(trial: optuna.trial.FrozenTrial) -> dict:
    attrs = trial.user_attrs
    classes = attrs.get("classes") or list((attrs.get("dev_per_class") or {}).keys())
    row = {}
    for key in KNOWN_ATTRS:
        if key in attrs:
            row[f"user_attrs_{key}"] = attrs[key]
    for split in ("dev", "train"):
        for name, value in (attrs.get(f"{split}_per_class") or {}).items():
            row[f"user_attrs_{split}_acc_{name}"] = value
    matrix = attrs.get("dev_confusion_matrix")
    if matrix and len(matrix) == len(classes):
        for i, true in enumerate(classes):
            for j, predicted in enumerate(classes):
                row[f"user_attrs_dev_cm_{true}_as_{predicted}"] = matrix[i][j]
    for key, value in (attrs.get("config") or {}).items():
        row[f"user_attrs_config_{key}"] = value
    for key in sorted(attrs):
        value = attrs[key]
        if (key not in SKIPPED_ATTRS and not key.startswith("curve_") and f"user_attrs_{key}" not in row
                and (value is None or isinstance(value, (str, int, float, bool)))):
            row[f"user_attrs_{key}"] = value
    return row


def _objective_names(study: optuna.Study) -> list[str]:
    names = study.metric_names or study.user_attrs.get("objectives") or []
    return list(names) if len(names) == len(study.directions) else [str(i) for i in range(len(study.directions))]


def trials_table(study: optuna.Study) -> pd.DataFrame:
    trials = study.get_trials(deepcopy=False)
    base = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                         "duration", "params"))
    value_columns = ["value"] if len(study.directions) == 1 else [f"values_{n}" for n in _objective_names(study)]
    if base.empty:
        return pd.DataFrame(columns=["number", "state", *value_columns, "datetime_start", "datetime_complete",
                                     "duration"])
    if len(study.directions) > 1:  # values_0, values_1 -> values_<objective>, Optuna's naming with metric names
        base = base.rename(columns={f"values_{i}": name for i, name in enumerate(value_columns)})
    elif study.metric_names:  # Optuna writes value_<metric> for a named single objective; readers expect "value"
        base = base.rename(columns={f"value_{study.metric_names[0]}": "value"})
    if "duration" in base:
        base["duration"] = base["duration"].dt.total_seconds()
    params = sorted(c for c in base.columns if c.startswith("params_"))
    base = base[["number", "state", *[c for c in value_columns if c in base], "datetime_start",
                 "datetime_complete", "duration", *params]]
    extra = pd.DataFrame([_flat_attrs(t) for t in trials], index=base.index)
    known = [f"user_attrs_{k}" for k in KNOWN_ATTRS]
    order = sorted(extra.columns, key=lambda c: (c not in known, known.index(c) if c in known else 0,
                                                 not c.startswith("user_attrs_dev_acc_"),
                                                 not c.startswith("user_attrs_train_acc_"),
                                                 not c.startswith("user_attrs_dev_cm_"),
                                                 not c.startswith("user_attrs_config_")))
    return pd.concat([base, extra[order]], axis=1)


# --- epochs.csv ---------------------------------------------------------------

def epochs_table(study: optuna.Study, trials: pd.DataFrame) -> pd.DataFrame:
    context = [c for c in trials.columns if c.startswith(("params_", "user_attrs_config_"))]
    by_number = trials.set_index("number")[context] if len(trials) else None
    rows = []
    for trial in study.get_trials(deepcopy=False):
        curves = {name: trial.user_attrs.get(f"curve_{name}") or [] for name in CURVES}
        for epoch in range(max(len(v) for v in curves.values())):
            row = {"trial": trial.number, "state": trial.state.name, "epoch": epoch + 1}
            for name, values in curves.items():
                row[name] = values[epoch] if epoch < len(values) else math.nan
            row.update(by_number.loc[trial.number].to_dict())
            rows.append(row)
    return pd.DataFrame(rows, columns=["trial", "state", "epoch", *CURVES, *context])


# --- data.csv -------------------------------------------------------------------

def _trial_dev_counts(study: optuna.Study) -> tuple[list[str], list[int]] | None:
    """Dev images per class, from the row sums of the latest trial's dev confusion matrix."""
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number, reverse=True):
        matrix, classes = trial.user_attrs.get("dev_confusion_matrix"), trial.user_attrs.get("classes")
        if matrix and classes and len(matrix) == len(classes):
            return list(classes), [int(sum(row)) for row in matrix]
    return None


def _summary_rows(summary: dict, source: str) -> list[dict]:
    return [{"split": split, "class": name, "count": int(count), "source": source}
            for split, counts in summary["splits"].items() for name, count in counts.items()]


def data_table(study: optuna.Study) -> tuple[pd.DataFrame, str]:
    """Class counts per split, from the split the study recorded, and where they came from."""
    columns = ["split", "class", "count", "source"]
    summary = study.user_attrs.get("data_summary")
    if isinstance(summary, dict) and "splits" in summary:
        return pd.DataFrame(_summary_rows(summary, "study attribute data_summary"), columns=columns), "the study"
    dev = _trial_dev_counts(study)  # a study from before the record: its trials' dev confusion matrices
    if dev is not None:
        rows = [{"split": "dev", "class": c, "count": n, "source": "dev confusion matrix (train/test unknown)"}
                for c, n in zip(*dev)]
        return pd.DataFrame(rows, columns=columns), "the dev confusion matrices only (the study recorded no split)"
    return pd.DataFrame(columns=columns), "nowhere (no trial recorded a confusion matrix)"


def data_record(study: optuna.Study) -> dict | None:
    """data.json: what the study recorded it ran on; None for a study that recorded nothing."""
    record = {name: study.user_attrs[name] for name in RECORD_KEYS if name in study.user_attrs}
    return record or None


# --- the command -------------------------------------------------------------------

def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """Write then rename, so a reader never sees half a file."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def export_study(study: optuna.Study, results: Path) -> dict[str, Path]:
    folder = study_folder(results, study.study_name)
    trials = trials_table(study)
    epochs = epochs_table(study, trials)
    data, data_source = data_table(study)
    paths = {"trials": folder / "trials.csv", "epochs": folder / "epochs.csv", "data": folder / "data.csv"}
    write_frame(trials, paths["trials"])
    write_frame(epochs, paths["epochs"])
    write_frame(data, paths["data"])
    record, space_text = data_record(study), study.user_attrs.get("space_text")
    if record is not None:
        paths["record"] = write_json(folder / "data.json", record)
    if space_text is not None:  # the file as the study began with it, comments and all
        paths["space"] = write_atomic(folder / SPACE_FILE, space_text)
    states = trials["state"].value_counts().to_dict() if len(trials) else {}
    print(f"study {study.study_name!r}: {len(trials)} trials ({', '.join(f'{n} {s}' for s, n in states.items()) or 'none'}), "
          f"{len(epochs)} epoch rows; class counts from {data_source}")
    for path in paths.values():
        print(f"  wrote {path}")
    return paths


def run(args) -> int:
    results = Path(args.results)
    path = storage_file(args.storage)
    if path is not None and not path.is_file():
        raise UserError(f"no storage file at {path}; run `make search` first, or set STORAGE=... to the one it wrote")
    if args.study:
        studies = [load_existing_study(args.study, args.storage)]
    else:
        storage = open_storage(args.storage, heartbeat=False, read_only=True)
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if not names:
            load_existing_study(None, args.storage)  # raises the one-line "holds no study yet"
        studies = [optuna.load_study(study_name=name, storage=storage) for name in names]
    for study in studies:
        export_study(study, results)
    if len(studies) > 1:
        print(f"exported {len(studies)} studies from {redact(args.storage)}")
    for study in studies:
        print(f"plot it: {hints.command('plots', {'STUDY': study.study_name, 'RESULTS': args.results})}")
    return 0
