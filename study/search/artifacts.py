"""Per-trial report files as Optuna artifacts, plus a trial note, for optuna-dashboard's trial view.

Optuna's own pages show values and params; a user of this study also wants,
for each trial, the dev confusion matrix, per-class accuracy and the learning
curve (the data is imbalanced, so macro accuracy alone hides which class
failed). Each trial therefore gets:

- `trial-<n>-report.svg`: confusion matrix, per-class bars, learning curves
  (SVG, so the dashboard previews it as an image; written without any plotting
  library so it costs milliseconds per trial);
- `trial-<n>-metrics.json`: every number behind the figure;
- a Markdown note (optuna_dashboard.save_note) with the same tables.

Optuna only accepts a trial's artifacts while the trial is running (its
system attributes freeze at `tell`), so the objective attaches them after the
results are recorded and before it tells the outcome. The store is a
FileSystemArtifactStore in RESULTS/artifacts: `make search` records that
absolute path on the study before its first trial (record_artifact_dir), so
reports land there wherever the database lives, and `make dashboard` finds
them. A study without the record (made elsewhere) needs the results folder
passed in.

Notes live on the study, not the trial, so they can still change after
`tell`: the search loop rewrites a pruned or failed trial's note to open with
what happened and why (note_outcome).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from html import escape
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from .storage_url import storage_file

ARTIFACT_DIR_ATTR = "cnn_hpo:artifact_dir"  # study system attribute: where this study's artifacts were written


# --- where the store lives ------------------------------------------------

def default_results_dir(url: str) -> Path:
    """Where a study made elsewhere keeps its results: the folder of its SQLite/journal file, else $RESULTS."""
    path = storage_file(url)
    if path is not None:
        return path.parent
    return Path(os.environ.get("RESULTS") or "results")


def artifact_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "artifacts"


def record_artifact_dir(study: optuna.Study, results_dir: str | Path) -> Path:
    """Fix where this study's trial reports go: RESULTS/artifacts, wherever the storage lives.

    The first folder recorded stays: a study continued with another RESULTS
    keeps one store, which `make dashboard` serves whole.
    """
    storage = study._storage
    recorded = storage.get_study_system_attrs(study._study_id).get(ARTIFACT_DIR_ATTR)
    if recorded:
        return Path(recorded)
    folder = artifact_dir(results_dir).resolve()
    storage.set_study_system_attr(study._study_id, ARTIFACT_DIR_ATTR, str(folder))
    return folder


def recorded_artifact_dirs(storage) -> set[str]:
    """Artifact folders recorded by the studies of a storage (normally one)."""
    found = set()
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        path = storage.get_study_system_attrs(summary._study_id).get(ARTIFACT_DIR_ATTR)
        if path:
            found.add(path)
    return found


# --- the report -------------------------------------------------------------

def trial_report_data(study: optuna.Study, trial) -> dict:
    """The JSON artifact: everything the SVG and the note show, from the trial's user attributes."""
    attrs = trial.user_attrs
    return {
        "study": study.study_name,
        "trial": trial.number,
        "classes": attrs.get("classes", []),
        "config": attrs.get("config", {}),
        "params": trial.params,
        "epochs_run": attrs.get("epochs_run"),
        "dev": {"macro_accuracy": attrs.get("dev_macro_accuracy"), "per_class": attrs.get("dev_per_class", {}),
                "confusion_matrix": attrs.get("dev_confusion_matrix")},
        "train": {"macro_accuracy": attrs.get("train_macro_accuracy"), "per_class": attrs.get("train_per_class", {})},
        "curves": {name: attrs.get(f"curve_{name}", []) for name in ("train_loss", "dev_loss", "dev_macro_accuracy")},
        "train_seconds": attrs.get("train_seconds"),
        "device": attrs.get("device"),
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _text(x, y, text, size=12, anchor="middle", weight="normal", fill="#222", rotate=None) -> str:
    transform = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'fill="{fill}"{transform}>{escape(str(text))}</text>')


def _blue(fraction: float) -> str:
    """White (0) to dark blue (1), for confusion-matrix cells."""
    f = 0.0 if fraction is None or math.isnan(fraction) else max(0.0, min(1.0, fraction))
    r, g, b = (round(255 + (c - 255) * f) for c in (31, 84, 160))
    return f"rgb({r},{g},{b})"


def _confusion_panel(x0: float, classes: list[str], matrix) -> list[str]:
    n = len(classes)
    size = min(70, 210 // max(1, n))
    left, top = x0 + 80, 60
    parts = [_text(left + n * size / 2, 24, "Dev confusion matrix", 14, weight="bold")]
    if not matrix:
        return parts + [_text(x0 + 150, 160, "no confusion matrix recorded")]
    for i, row in enumerate(matrix):
        total = sum(row)
        for j, count in enumerate(row):
            fraction = count / total if total else float("nan")
            x, y = left + j * size, top + i * size
            parts.append(f'<rect x="{x}" y="{y}" width="{size}" height="{size}" fill="{_blue(fraction)}" stroke="#fff"/>')
            ink = "#fff" if total and fraction > 0.55 else "#222"
            parts.append(_text(x + size / 2, y + size / 2 - 2, count, 13, weight="bold", fill=ink))
            parts.append(_text(x + size / 2, y + size / 2 + 14, f"{100 * fraction:.0f}%" if total else "", 10, fill=ink))
        parts.append(_text(left - 6, top + i * size + size / 2 + 4, classes[i], 12, anchor="end"))
    for j, name in enumerate(classes):
        parts.append(_text(left + j * size + size / 2, top + n * size + 16, name, 12))
    parts.append(_text(left + n * size / 2, top + n * size + 34, "predicted class (row % of true class)", 12))
    parts.append(_text(x0 + 16, top + n * size / 2, "true class", 12, rotate=-90))
    return parts


def _per_class_panel(x0: float, classes: list[str], dev: dict, train: dict, dev_macro) -> list[str]:
    parts = [_text(x0 + 150, 24, "Per-class accuracy (fraction correct)", 14, weight="bold")]
    left, top, width, height = x0 + 45, 50, 240, 200
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + height * (1 - tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(_text(left - 5, y + 4, f"{tick:.2f}", 10, anchor="end"))
    slot = width / max(1, len(classes))
    bar = slot * 0.35
    for i, name in enumerate(classes):
        for k, (series, colour) in enumerate(((dev, "#1f54a0"), (train, "#9bb7de"))):
            value = series.get(name)
            if value is None or math.isnan(value):
                continue
            x = left + i * slot + slot * 0.12 + k * bar
            parts.append(f'<rect x="{x:.1f}" y="{top + height * (1 - value):.1f}" width="{bar:.1f}" '
                         f'height="{height * value:.1f}" fill="{colour}"/>')
            parts.append(_text(x + bar / 2, top + height * (1 - value) - 3, f"{value:.2f}", 9))
        parts.append(_text(left + i * slot + slot / 2, top + height + 16, name, 12))
    if dev_macro is not None and not math.isnan(dev_macro):
        y = top + height * (1 - dev_macro)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" stroke="#c0392b" '
                     'stroke-dasharray="5,3"/>')
    legend_y = top + height + 36
    parts.append(f'<rect x="{left}" y="{legend_y - 9}" width="10" height="10" fill="#1f54a0"/>')
    parts.append(_text(left + 14, legend_y, "dev", 11, anchor="start"))
    parts.append(f'<rect x="{left + 50}" y="{legend_y - 9}" width="10" height="10" fill="#9bb7de"/>')
    parts.append(_text(left + 64, legend_y, "train", 11, anchor="start"))
    parts.append(f'<line x1="{left + 110}" y1="{legend_y - 4}" x2="{left + 130}" y2="{legend_y - 4}" '
                 'stroke="#c0392b" stroke-dasharray="5,3"/>')
    parts.append(_text(left + 134, legend_y, f"dev macro {_fmt(dev_macro)}", 11, anchor="start"))
    return parts


def _polyline(values, x_of, y_of, colour, dash="") -> str:
    points = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(values) if v is not None and math.isfinite(v))
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>'


def _curve_panel(x0: float, curves: dict) -> list[str]:
    parts = [_text(x0 + 160, 24, "Learning curves", 14, weight="bold")]
    left, top, width, height = x0 + 50, 50, 230, 200
    train, dev, acc = curves.get("train_loss", []), curves.get("dev_loss", []), curves.get("dev_macro_accuracy", [])
    n = max(len(train), len(dev), len(acc))
    if n == 0:
        return parts + [_text(x0 + 160, 160, "no epochs recorded")]
    losses = [v for v in train + dev if v is not None and math.isfinite(v)]
    top_loss = max(losses) * 1.1 if losses else 1.0
    x_of = (lambda i: left + width / 2) if n == 1 else (lambda i: left + width * i / (n - 1))
    loss_y = lambda v: top + height * (1 - v / top_loss)  # noqa: E731
    acc_y = lambda v: top + height * (1 - v)  # noqa: E731
    parts.append(f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#bbb"/>')
    for k in range(5):
        y = top + height * k / 4
        parts.append(_text(left - 5, y + 4, f"{top_loss * (1 - k / 4):.2f}", 10, anchor="end"))
        parts.append(_text(left + width + 5, y + 4, f"{1 - k / 4:.2f}", 10, anchor="start"))
    for i in sorted({0, n - 1, (n - 1) // 2}):
        parts.append(_text(x_of(i), top + height + 16, i + 1, 11))
    parts.append(_text(left + width / 2, top + height + 32, "epoch", 12))
    parts.append(_text(x0 + 12, top + height / 2, "loss (cross-entropy)", 11, rotate=-90))
    parts.append(_text(left + width + 36, top + height / 2, "dev macro accuracy", 11, rotate=90))
    for values, colour, dash, y_of in ((train, "#e67e22", "", loss_y), (dev, "#8e44ad", "5,3", loss_y),
                                       (acc, "#1f54a0", "", acc_y)):
        if values:
            parts.append(_polyline(values, x_of, y_of, colour, dash))
            for i, v in enumerate(values):
                if v is not None and math.isfinite(v):
                    parts.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="2.5" fill="{colour}"/>')
    legend_y = top + height + 50
    for k, (label, colour, dash) in enumerate((("train loss", "#e67e22", ""), ("dev loss", "#8e44ad", "5,3"),
                                               ("dev macro acc.", "#1f54a0", ""))):
        x = left - 20 + k * 95
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{x}" y1="{legend_y - 4}" x2="{x + 18}" y2="{legend_y - 4}" stroke="{colour}" '
                     f'stroke-width="2"{dash_attr}/>')
        parts.append(_text(x + 22, legend_y, label, 11, anchor="start"))
    return parts


def report_svg(report: dict) -> str:
    """Three panels side by side: confusion matrix, per-class accuracy, learning curves."""
    classes = list(report["classes"])
    epochs = report.get("epochs_run")
    planned = report.get("config", {}).get("epochs")
    title = (f"Study {report['study']}, trial {report['trial']}: dev macro accuracy {_fmt(report['dev']['macro_accuracy'])}"
             f" after {epochs if epochs is not None else '?'}{f' of {planned}' if planned else ''} epochs")
    body = [_text(490, 16, title, 13, weight="bold", fill="#444")]
    body += ['<g transform="translate(0,14)">']
    body += _confusion_panel(0, classes, report["dev"]["confusion_matrix"])
    body += _per_class_panel(320, classes, report["dev"]["per_class"] or {}, report["train"]["per_class"] or {},
                             report["dev"]["macro_accuracy"])
    body += _curve_panel(630, report["curves"])
    body += ["</g>"]
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="980" height="340" viewBox="0 0 980 340" '
            'font-family="DejaVu Sans, Arial, sans-serif">\n<rect width="980" height="340" fill="#fff"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def report_markdown(report: dict, svg_url: str | None, headline: str | None = None, preface: str = "") -> str:
    """The trial note: tables a reader can scan without opening the artifacts."""
    classes = list(report["classes"])
    dev, train = report["dev"]["per_class"] or {}, report["train"]["per_class"] or {}
    matrix = report["dev"]["confusion_matrix"] or []
    title = headline or f"Trial {report['trial']}"
    lines = [f"### {title}: dev macro accuracy {_fmt(report['dev']['macro_accuracy'])}", *([preface, ""] if preface else []),
             f"{report.get('epochs_run')} epoch(s) run, {_fmt(report.get('train_seconds'), 1)} s on "
             f"{report.get('device')}; train macro accuracy {_fmt(report['train']['macro_accuracy'])}.", "",
             "| class | dev accuracy | train accuracy | dev images |", "|---|---|---|---|"]
    for i, name in enumerate(classes):
        support = sum(matrix[i]) if i < len(matrix) else "n/a"
        lines.append(f"| {name} | {_fmt(dev.get(name))} | {_fmt(train.get(name))} | {support} |")
    if matrix:
        lines += ["", "Dev confusion matrix (rows: true class, columns: predicted class):", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        lines += [f"| {classes[i]} | " + " | ".join(str(c) for c in row) + " |" for i, row in enumerate(matrix)]
    if svg_url:
        lines += ["", f"![confusion matrix, per-class accuracy and learning curves]({svg_url})"]
    lines += ["", "Artifacts: the figure (SVG) and every number behind it (JSON) are in this trial's Artifacts panel."]
    return "\n".join(lines) + "\n"


# --- attaching -------------------------------------------------------------

def attach_trial_artifacts(study: optuna.Study, trial: optuna.Trial, results_dir: str | Path | None = None) -> list[str]:
    """Upload the report of a *running* trial whose results are recorded; returns the artifact ids.

    Never raises: a report is a convenience, and a full disk or a storage
    hiccup must not turn a trained trial into a failed one. Problems warn.
    """
    try:
        return _attach(study, trial, results_dir)
    except Exception as error:  # noqa: BLE001 - see docstring
        warnings.warn(f"trial {trial.number}: could not attach its report to the dashboard ({type(error).__name__}: "
                      f"{error}); the trial itself is unaffected", RuntimeWarning, stacklevel=2)
        return []


def _attach(study: optuna.Study, trial: optuna.Trial, results_dir) -> list[str]:
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact  # noqa: PLC0415

    storage = study._storage
    recorded = storage.get_study_system_attrs(study._study_id).get(ARTIFACT_DIR_ATTR)
    if results_dir is not None:
        folder = artifact_dir(results_dir).resolve()
    elif recorded:
        folder = Path(recorded)  # `make search` recorded RESULTS/artifacts before the first trial
    else:
        raise ValueError("the study records no artifact folder (record_artifact_dir) and no results folder was given")
    folder.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(folder)
    if storage.get_study_system_attrs(study._study_id).get(ARTIFACT_DIR_ATTR) != str(folder):
        storage.set_study_system_attr(study._study_id, ARTIFACT_DIR_ATTR, str(folder))
    report = trial_report_data(study, trial)
    ids = []
    with tempfile.TemporaryDirectory(prefix="trial-report-") as tmp:
        svg_path = Path(tmp) / f"trial-{trial.number}-report.svg"
        svg_path.write_text(report_svg(report))
        json_path = Path(tmp) / f"trial-{trial.number}-metrics.json"
        json_path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
        for path in (svg_path, json_path):
            ids.append(upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial))
    _save_note(trial, report_markdown(report, f"/artifacts/{study._study_id}/{trial._trial_id}/{ids[0]}"))
    return ids


# --- what happened to a trial ---------------------------------------------

def pruning_explanation(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> str:
    """Why a trial was pruned, in words: for a median or percentile pruner, the numbers it compared.

    Optuna's PercentilePruner (MedianPruner is its 50th percentile) stops a
    trial whose best intermediate value so far is below the percentile of the
    complete trials' values at the same step; recomputed here right after the
    decision, on the same trials.
    """
    reason = frozen.user_attrs.get("pruned_reason") or f"pruned by {type(study.pruner).__name__}"
    step, pruner = frozen.last_step, study.pruner
    if not reason.startswith("pruned by") or step is None or not isinstance(pruner, optuna.pruners.PercentilePruner):
        return reason[:1].upper() + reason[1:] + "."
    at_step = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if step in t.intermediate_values]
    values = [v for v in frozen.intermediate_values.values() if v is not None and math.isfinite(v)]
    if not at_step or not values:
        return reason[:1].upper() + reason[1:] + "."
    percentile = pruner._percentile  # noqa: SLF001 - the pruner's own setting, not stored elsewhere
    name = "median" if percentile == 50 else f"{100 - percentile:g}th percentile"
    threshold = float(np.nanpercentile(np.asarray(at_step, dtype=float), 100 - percentile))
    return (f"Pruned by {type(pruner).__name__} at epoch {step}: its best dev macro accuracy so far, "
            f"{max(values):.3f}, was below the {name}, {threshold:.3f}, of the {len(at_step)} complete trials "
            f"at epoch {step}.")


class _TrialNoteTarget:
    """What optuna_dashboard.save_note needs of a trial (its storage, study and id), for a finished one.

    A finished trial takes no new attributes, but notes live on the study, so
    they can still be written; optuna.Trial(study, id) would wake the sampler.
    """

    def __init__(self, study: optuna.Study, trial_id: int):
        self.study, self.storage, self._trial_id = study, study._storage, trial_id


def note_outcome(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
    """Rewrite a pruned or failed trial's note so that its first lines say so, and why. Only warns."""
    if frozen.state not in (TrialState.PRUNED, TrialState.FAIL):
        return
    try:
        report = trial_report_data(study, frozen)
        planned = report["config"].get("epochs")
        if frozen.state == TrialState.PRUNED:
            epoch = report.get("epochs_run") or frozen.last_step
            headline = f"Trial {frozen.number}: PRUNED" + (f" after epoch {epoch}" if epoch else "") + \
                (f" of {planned}" if epoch and planned else "")
            why = pruning_explanation(study, frozen) + " The numbers below are from that epoch, not a finished run."
        else:
            headline = f"Trial {frozen.number}: FAILED"
            why = f"Failed: {frozen.user_attrs.get('fail_reason') or 'no reason recorded'}."
        if report["dev"]["confusion_matrix"]:
            metas = optuna.artifacts.get_all_artifact_meta(frozen, storage=study._storage)
            svg = next((m for m in metas if m.filename.endswith("-report.svg")), None)
            url = f"/artifacts/{study._study_id}/{frozen._trial_id}/{svg.artifact_id}" if svg else None
            body = report_markdown(report, url, headline=headline, preface=why)
        else:
            body = f"### {headline}\n\n{why}\n"
        _save_note(_TrialNoteTarget(study, frozen._trial_id), body)
    except Exception as error:  # noqa: BLE001 - a note is a convenience, as in attach_trial_artifacts
        warnings.warn(f"trial {frozen.number}: could not write its note ({type(error).__name__}: {error})",
                      RuntimeWarning, stacklevel=2)


def _save_note(trial: optuna.Trial, body: str) -> None:
    try:
        from optuna_dashboard import save_note  # noqa: PLC0415
    except ImportError:
        return  # notes are a dashboard feature; the artifacts alone still carry the report
    save_note(trial, body)
