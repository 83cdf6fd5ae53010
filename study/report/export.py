"""Write each study's trials and learning curves as CSV files (`make export`).

For every study in STORAGE (or only STUDY) this writes, under RESULTS/<study>/:

- trials.csv: one row per trial. Optuna's `trials_dataframe` columns (number,
  state, value or values_<objective>, datetime_start, datetime_complete,
  duration in seconds, params_*), then the user attributes flattened into
  scalars: user_attrs_dev_macro_accuracy, user_attrs_dev_acc_<class>,
  user_attrs_train_macro_accuracy, user_attrs_train_acc_<class>,
  user_attrs_dev_cm_<true>_as_<predicted> (the dev confusion matrix),
  user_attrs_config_<key> (the full training config, fixed values included),
  user_attrs_train_seconds, user_attrs_device, user_attrs_pruned_reason, ...
- epochs.csv: one row per trial and epoch (trial, state, epoch, train_loss,
  dev_loss, dev_macro_accuracy) plus the trial's params_* and
  user_attrs_config_* columns, so a plot can group curves by learning rate.
- data.csv: images per class in each split (split, class, count, source), when
  the study's split can be identified: the study's "data_summary" attribute,
  RESULTS/data/summary.json, or a split cache in RESULTS/data whose dev counts
  match the trials' confusion matrices; else the dev counts alone.

`make plots` reads only these files, so they can be copied off the machine
that ran the study and plotted elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from cnnlib.atomic import atomic_path

from .. import hints
from ..errors import UserError
from ..options import add_storage_option
from ..search.storage import load_existing_study, open_storage, redact, storage_file

BASE_COLUMNS = ["number", "state", "value", "datetime_start", "datetime_complete", "duration"]
CURVES = ("train_loss", "dev_loss", "dev_macro_accuracy")
# Scalar user attributes, in the order a reader wants them; any other scalar attribute follows.
KNOWN_ATTRS = ("dev_macro_accuracy", "train_macro_accuracy", "robust_macro_accuracy", "robust_attack", "epochs_run",
               "train_seconds", "seconds_per_epoch", "device", "pruned_reason", "fail_reason")
SKIPPED_ATTRS = {"traceback", "classes", "config", "dev_per_class", "train_per_class", "dev_confusion_matrix"}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESULTS_FOLDERS = {"data", "runs", "final", "bench", "audit", "artifacts"}  # what other commands write in RESULTS


def add_arguments(parser) -> None:
    parser.add_argument("--study", default=os.environ.get("STUDY") or None, help="export only this study (default: all)")
    add_storage_option(parser)
    parser.add_argument("--results", default=os.environ.get("RESULTS") or "results",
                        help="output folder; files go to RESULTS/<study>/ (env RESULTS)")


def study_folder(results: Path, study_name: str) -> Path:
    """RESULTS/<study>: the name itself when it is a plain folder name, else a safe form of it plus a hash.

    Replacing unsafe characters alone maps `a/b` and `a_b` to one folder, where
    one study's files replace the other's. The hash keeps names apart; the `+`
    before it is never in a plain name, so no plain name can take that folder.
    """
    if PLAIN_NAME.fullmatch(study_name) and study_name not in RESULTS_FOLDERS:
        return Path(results) / study_name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", study_name).strip("._")[:80] or "study"
    return Path(results) / f"{safe}+{hashlib.sha256(study_name.encode()).hexdigest()[:10]}"


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


def _cache_summary(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as arrays:
        classes = arrays["classes"].tolist()
        splits = {}
        for split in ("train", "dev", "test"):
            if f"{split}_labels" in arrays.files:
                counts = np.bincount(arrays[f"{split}_labels"], minlength=len(classes))
                splits[split] = {c: int(n) for c, n in zip(classes, counts)}
    return {"classes": classes, "splits": splits}


def _matches(summary: dict, dev: tuple[list[str], list[int]] | None) -> bool:
    if dev is None:
        return True
    classes, counts = dev
    return summary.get("splits", {}).get("dev") == dict(zip(classes, counts))


def data_table(study: optuna.Study, results: Path) -> tuple[pd.DataFrame, str]:
    """Class counts per split and where they came from."""
    columns = ["split", "class", "count", "source"]
    dev = _trial_dev_counts(study)
    summary = study.user_attrs.get("data_summary")
    if isinstance(summary, dict) and "splits" in summary:
        return pd.DataFrame(_summary_rows(summary, "study attribute data_summary"), columns=columns), "the study"
    candidates = []
    summary_json = Path(results) / "data" / "summary.json"
    if summary_json.is_file():
        candidates.append((summary_json, lambda p: json.loads(p.read_text())))
    caches = sorted((Path(results) / "data").glob("split-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates += [(path, _cache_summary) for path in caches]
    for path, read in candidates:
        try:
            summary = read(path)
        except (OSError, ValueError, KeyError):
            continue
        if _matches(summary, dev):
            return pd.DataFrame(_summary_rows(summary, str(path)), columns=columns), str(path)
    if dev is not None:
        rows = [{"split": "dev", "class": c, "count": n, "source": "dev confusion matrix (train/test unknown)"}
                for c, n in zip(*dev)]
        return pd.DataFrame(rows, columns=columns), "the dev confusion matrices only (no matching split in RESULTS/data)"
    return pd.DataFrame(columns=columns), "nowhere (no trial recorded a confusion matrix)"


# --- the command -------------------------------------------------------------------

def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write then rename, so a reader never sees half a file."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def export_study(study: optuna.Study, results: Path) -> dict[str, Path]:
    folder = study_folder(results, study.study_name)
    trials = trials_table(study)
    epochs = epochs_table(study, trials)
    data, data_source = data_table(study, results)
    paths = {"trials": folder / "trials.csv", "epochs": folder / "epochs.csv", "data": folder / "data.csv"}
    write_csv(trials, paths["trials"])
    write_csv(epochs, paths["epochs"])
    write_csv(data, paths["data"])
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
        storage = open_storage(args.storage, heartbeat=False)
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
