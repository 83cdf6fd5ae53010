"""An offline HTML report (and PNGs) of a study, from the CSVs of `make export` only (`make plots`).

Reading only trials.csv, epochs.csv and data.csv (never the storage) means a
study exported on a GPU machine can be plotted on a laptop. The report is one
self-contained file, <csv folder>/plots/index.html, with plotly.js embedded
once: it opens without a network connection and needs no server.

Parameter importances come from Optuna's own fANOVA evaluator, run on an
in-memory study rebuilt from the CSV. Which ranges were sampled on a log scale
comes from the space.yaml that `make export` writes beside the CSVs (the space
the study recorded); for an export without one, a positive float parameter
spanning a factor of 10 or more is taken as log-scaled. Accuracy is always dev macro accuracy (mean
of per-class accuracies, a fraction from 0 to 1), higher is better.
"""

from __future__ import annotations

import html
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly
import plotly.graph_objects as go
import yaml
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from cnnlib.atomic import write_atomic

from ..errors import UserError
from .. import output
from ..output import BUNDLE, study_folder, write_bundle
from ..search import strict_yaml
from .export import SPACE_FILE

ACCURACY = "dev macro accuracy (fraction, 0-1)"
TOP_TRIALS = 10
DISCRETE_MAX = 8  # a parameter with at most this many distinct values is plotted as categories
OPTIMIZER_COLOURS = {"sgd": "#d95f02", "adam": "#1b9e77"}
# Plasma without its pale yellow end (luminance < 0.6 throughout): worst trials orange, best dark blue-violet.
PARCOORDS_COLOURS = [[i / 4, c] for i, c in enumerate(sample_colorscale("Plasma", [0.75, 0.6, 0.45, 0.25, 0.0]))]

ID_COLUMNS = ("number", "trial", "epoch")  # whole numbers, never empty
NUMERIC_COLUMNS = (*ID_COLUMNS, "value", "duration", "train_loss", "dev_loss", "dev_macro_accuracy", "count")
TRIAL_STATES = tuple(state.name for state in optuna.trial.TrialState)
REQUIRED_COLUMNS = {
    "trials.csv": ("number", "state"),
    "epochs.csv": ("trial", "state", "epoch", "train_loss", "dev_loss", "dev_macro_accuracy"),
    "data.csv": ("split", "class", "count"),
}


def add_arguments(parser) -> None:
    parser.add_argument("--csv", default=os.environ.get("CSV") or None,
                        help="trials.csv written by `make export` (epochs.csv and data.csv are read from beside it); "
                             "default: RESULTS/<STUDY>/trials.csv, or the only one under RESULTS (env CSV)")
    parser.add_argument("--study", default=os.environ.get("STUDY") or None, help="study whose export to plot (env STUDY)")
    parser.add_argument("--results", default=os.environ.get("RESULTS") or "results", help="where `make export` wrote (env RESULTS)")
    parser.add_argument("--out", default=None, help="output folder (default: plots/ beside the CSV)")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG copies (they need kaleido and Chromium)")


class Unavailable(Exception):
    """A figure that this CSV cannot support (e.g. no complete trial); the report says why instead."""


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    figure: go.Figure | None = None
    missing: str = ""


# --- reading -------------------------------------------------------------------

def read_csv(path: Path, required: tuple[str, ...] | None = None) -> pd.DataFrame:
    """A CSV with the columns the report needs; anything else is a one-line error naming the file."""
    required = REQUIRED_COLUMNS[path.name] if required is None and path.name in REQUIRED_COLUMNS else required or ()
    if not path.is_file():
        raise UserError(f"{path}: file not found (write it with `make export`)")
    try:
        with warnings.catch_warnings():
            # index_col=False: a row with extra fields is an error, not silently shifted into an index.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, index_col=False)
    except pd.errors.ParserWarning:
        raise UserError(f"{path}: not a readable CSV (a row has more fields than the header)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path}: not a readable CSV ({str(error).strip().splitlines()[0]})") from None
    for column in required:
        if column not in frame.columns:
            raise UserError(f"{path}: missing column {column!r} (columns found: {', '.join(map(str, frame.columns[:8]))}"
                            f"{', ...' if len(frame.columns) > 8 else ''}); expected a file written by `make export`")
    check_cells(frame, path)
    return frame


def check_cells(frame: pd.DataFrame, path: Path) -> None:
    """Numbers where numbers belong, known trial states: a hand-edited CSV fails here, naming the cell."""
    def fail(column: str, row, what: str):
        raise UserError(f"{path}: row {row + 2}, column {column!r}: {what}")  # +2: the header is line 1
    for column in frame.columns:
        cells = frame[column]
        if column in NUMERIC_COLUMNS or str(column).startswith("values_"):
            numbers = pd.to_numeric(cells, errors="coerce")
            bad = cells.notna() & numbers.isna()
            if bad.any():
                row = bad.idxmax()
                fail(column, row, f"{cells[row]!r} is not a number")
            if column in ID_COLUMNS and cells.isna().any():
                fail(column, cells.isna().idxmax(), "empty; expected a whole number")
            if column in ID_COLUMNS and (numbers % 1 != 0).any():
                row = (numbers % 1 != 0).idxmax()
                fail(column, row, f"{cells[row]!r} is not a whole number")
        elif column == "state":
            bad = ~cells.isin(TRIAL_STATES)
            if bad.any():
                row = bad.idxmax()
                fail(column, row, f"{cells[row]!r} is not a trial state ({', '.join(TRIAL_STATES)})")


def value_columns(trials: pd.DataFrame, path: Path) -> list[str]:
    columns = ["value"] if "value" in trials.columns else [c for c in trials.columns if c.startswith("values_")]
    if not columns:
        raise UserError(f"{path}: missing column 'value' (or values_<objective> for a multi-objective study)")
    return columns


def find_csv(args) -> Path:
    if args.csv:
        return Path(args.csv)
    results = Path(args.results)
    if args.study:
        return study_folder(results, args.study) / "trials.csv"
    found = sorted(results.glob("*/trials.csv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"no trials.csv under {results}/: run `make export` first, or give CSV=path/to/trials.csv")
    raise UserError(f"several exports under {results}/ ({', '.join(p.parent.name for p in found)}); "
                    "choose one with STUDY=<name> or CSV=path/to/trials.csv")


# --- helpers ---------------------------------------------------------------------

def parameter(trials: pd.DataFrame, name: str) -> pd.Series | None:
    """A sampled parameter, or the same field of the full config when the space fixed it."""
    for column in (f"params_{name}", f"user_attrs_config_{name}"):
        if column in trials.columns and trials[column].notna().any():
            return trials[column]
    return None


def dev_accuracy(trials: pd.DataFrame, values: list[str]) -> pd.Series:
    if "user_attrs_dev_macro_accuracy" in trials.columns:
        return trials["user_attrs_dev_macro_accuracy"]
    return trials[values[0]]


def complete(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["state"] == "COMPLETE"]


def is_log_scale(values: pd.Series) -> bool:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(values)) and values.min() > 0 and values.max() / values.min() >= 10


def is_discrete(values: pd.Series) -> bool:
    """Plot as categories: text, or few values that repeat or are whole numbers (a grid, batch sizes)."""
    values = values.dropna()
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return True
    few = values.nunique() <= DISCRETE_MAX
    return few and (values.nunique() < len(values) or bool(np.all(np.mod(values, 1) == 0)))


def short(value) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if value != 0 else "0"
    return str(value)


def style(fig: go.Figure, title: str, height: int = 460) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.01}, template="plotly_white", height=height,
                      margin={"l": 70, "r": 30, "t": 70, "b": 60}, font={"size": 13})
    return fig


# --- figures ---------------------------------------------------------------------

def class_distribution(data: pd.DataFrame | None) -> go.Figure:
    if data is None or data.empty:
        raise Unavailable("data.csv is missing or empty: the study recorded no class counts")
    fig = go.Figure()
    classes = list(dict.fromkeys(data["class"]))
    splits = list(dict.fromkeys(data["split"]))
    for k, name in enumerate(classes):
        rows = data[data["class"] == name].set_index("split").reindex(splits)
        fig.add_bar(x=splits, y=rows["count"], name=name, text=rows["count"], textposition="outside",
                    marker_color=qualitative.Set2[k % len(qualitative.Set2)])
    fig.update_layout(barmode="group", xaxis_title="split", yaxis_title="images (count)", legend_title="class")
    return style(fig, "Class distribution per split (Figure 1)")


def optimization_history(trials: pd.DataFrame, values: list[str]) -> go.Figure:
    done = complete(trials).sort_values("number")
    if done.empty:
        raise Unavailable("no COMPLETE trial in trials.csv")
    fig = go.Figure()
    for column in values:
        label = "dev macro accuracy" if column == "value" else column.removeprefix("values_").replace("_", " ")
        fig.add_scatter(x=done["number"], y=done[column], mode="markers", name=f"{label} (complete trial)",
                        marker={"size": 8})
        best = done[column].cummax()
        last = int(trials["number"].max())  # carry the best to the last trial, pruned or not
        fig.add_scatter(x=[*done["number"], last], y=[*best, best.iloc[-1]], mode="lines", line_shape="hv",
                        name=f"running best {label}")
    pruned = trials[trials["state"] == "PRUNED"]
    if len(pruned) and "user_attrs_dev_macro_accuracy" in trials.columns:
        fig.add_scatter(x=pruned["number"], y=pruned["user_attrs_dev_macro_accuracy"], mode="markers",
                        name="pruned trial (accuracy when stopped)",
                        marker={"symbol": "x", "color": "#999", "size": 7})
    fig.update_layout(xaxis_title="trial number", yaxis_title=ACCURACY if values == ["value"] else "objective value")
    fig.update_xaxes(tickformat="d", dtick=trial_ticks(trials["number"]))
    return style(fig, "Optimization history with the running best")


def trial_ticks(numbers: pd.Series) -> int:
    """A whole-number tick step giving about ten ticks: plotly's own choice shows 0.5 steps for a few trials."""
    return max(1, math.ceil((int(numbers.max()) + 1) / 10))


def recorded_log_scales(folder: Path) -> dict[str, bool] | None:
    """{param name and config field: sampled on a log scale}, from the space.yaml beside the CSVs; None without one.

    A field that two params set (weight_decay_l2 and weight_decay_decoupled set
    weight_decay) is log-scaled when either of them is.
    """
    path = Path(folder) / SPACE_FILE
    if not path.is_file():
        return None
    try:
        raw = strict_yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{path}: not the space file `make export` writes ({type(error).__name__})") from None
    params = raw.get("params") if isinstance(raw, dict) else None
    scales: dict[str, bool] = {}
    for name, spec in (params or {}).items():
        if isinstance(spec, dict) and spec.get("type") in ("float", "int"):
            log = spec.get("log") is True
            scales[str(name)] = log
            field = str(spec.get("field") or name)
            scales[field] = scales.get(field, False) or log
    return scales


def _log_scale(name: str, values: pd.Series, log_scales: dict[str, bool] | None) -> bool:
    """The recorded scale of a param or config field, else the guess from its values (an export without space.yaml)."""
    if log_scales is not None and name in log_scales:
        return log_scales[name]
    return is_log_scale(values)


def _distribution(series: pd.Series, log: bool | None = None) -> optuna.distributions.BaseDistribution:
    values = series.dropna()
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return optuna.distributions.CategoricalDistribution(sorted(values.unique().tolist(), key=str))
    if np.all(np.equal(np.mod(values, 1), 0)):
        return optuna.distributions.IntDistribution(int(values.min()), int(values.max()))
    return optuna.distributions.FloatDistribution(float(values.min()), float(values.max()),
                                                  log=is_log_scale(values) if log is None else log)


def _python(value):
    return value.item() if isinstance(value, np.generic) else value


def rebuild_study(trials: pd.DataFrame, values: list[str], log_scales: dict[str, bool] | None = None) -> optuna.Study:
    """An in-memory study holding the CSV's complete trials, for Optuna's evaluators and plots.

    `log_scales` (recorded_log_scales): which params were sampled on a log scale; else guessed from the values.
    """
    params = [c for c in trials.columns if c.startswith("params_")]
    done = complete(trials).dropna(subset=values)
    distributions = {c.removeprefix("params_"): _distribution(trials[c], _log_scale(c.removeprefix("params_"), trials[c],
                                                                                     log_scales))
                     for c in params if trials[c].notna().any()}
    study = optuna.create_study(directions=["maximize"] * len(values))
    if len(values) > 1:
        study.set_metric_names([v.removeprefix("values_") for v in values])
    rebuilt = []
    for _, row in done.iterrows():
        present = {name: d for name, d in distributions.items() if pd.notna(row[f"params_{name}"])}
        trial_params = {}
        for name, dist in present.items():
            raw = _python(row[f"params_{name}"])
            trial_params[name] = int(raw) if isinstance(dist, optuna.distributions.IntDistribution) else (
                float(raw) if isinstance(dist, optuna.distributions.FloatDistribution) else raw)
        rebuilt.append(optuna.trial.create_trial(params=trial_params, distributions=present,
                                                 values=[float(row[v]) for v in values]))
    study.add_trials(rebuilt)
    return study


def param_importances(trials: pd.DataFrame, values: list[str], log_scales: dict[str, bool] | None = None) -> go.Figure:
    study = rebuild_study(trials, values, log_scales)
    if len(study.trials) < 2:
        raise Unavailable(f"needs at least 2 COMPLETE trials, trials.csv has {len(study.trials)}")
    distributions = {name: d for t in study.trials for name, d in t.distributions.items()}
    varied = [name for name, d in distributions.items() if not d.single()]
    common = [p for p in varied if all(p in t.params for t in study.trials)]
    if not common:
        raise Unavailable("no parameter was sampled in every complete trial with more than one value")
    try:
        importances = optuna.importance.get_param_importances(
            study, params=common, target=(lambda t: t.values[0]) if len(values) > 1 else None,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as error:
        raise Unavailable(f"Optuna's fANOVA evaluator could not run on these trials ({error})") from None
    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h",
                           text=[f"{importances[n]:.2f}" for n in names], textposition="outside",
                           marker_color="#1f54a0"))
    conditional = sorted(set(varied) - set(common))
    note = f" (not rated: {', '.join(conditional)}, sampled only in some trials)" if conditional else ""
    fig.update_layout(xaxis_title="importance (fANOVA share of dev macro accuracy variance, sums to 1)",
                      yaxis_title="parameter", xaxis_range=[0, 1.1])
    return style(fig, f"Parameter importances over {len(study.trials)} complete trials{note}", 120 + 45 * len(names))


def parallel_coordinates(trials: pd.DataFrame, values: list[str], log_scales: dict[str, bool] | None = None) -> go.Figure:
    study = rebuild_study(trials, values, log_scales)
    if not study.trials:
        raise Unavailable("no COMPLETE trial in trials.csv")
    if not any(t.params for t in study.trials):
        raise Unavailable("trials.csv has no params_* values: nothing was sampled")
    target = (lambda t: t.values[0]) if len(values) > 1 else None
    fig = optuna.visualization.plot_parallel_coordinate(study, target=target, target_name="dev macro accuracy")
    recolour_lines(fig)
    fig.update_layout(title=None)
    return style(fig, f"Parallel coordinates: every sampled parameter, coloured by dev macro accuracy "
                      f"({len(study.trials)} complete trials)")


def recolour_lines(fig: go.Figure) -> None:
    """Optuna's white-to-blue scale draws the worst trials white on white: recolour with PARCOORDS_COLOURS.

    Optuna draws each trial as a line whose first point is its dev macro
    accuracy on the first axis, already scaled to 0..1 over the trials (the
    same range as the colour), so that point gives the colour; the colour bar
    is its one markers trace.
    """
    for trace in fig.data:
        if trace.mode == "lines" and trace.y:
            trace.line.color = sample_colorscale(PARCOORDS_COLOURS, [min(1.0, max(0.0, float(trace.y[0])))])[0]
        elif trace.mode == "markers" and trace.marker.showscale:
            trace.marker.colorscale, trace.marker.reversescale = PARCOORDS_COLOURS, False


def accuracy_against(trials: pd.DataFrame, values: list[str], name: str, label: str, title: str,
                     log_scales: dict[str, bool] | None = None) -> go.Figure:
    done = complete(trials)
    x = parameter(done, name)
    if done.empty or x is None:
        raise Unavailable(f"no COMPLETE trial with a {name} value")
    y = dev_accuracy(done, values)
    optimizer = parameter(done, "optimizer")
    groups = sorted(optimizer.dropna().unique()) if optimizer is not None else [None]
    discrete = is_discrete(x)
    fig = go.Figure()
    order = sorted(x.dropna().unique(), key=lambda v: (isinstance(v, str), v))
    for k, group in enumerate(groups):
        mask = (optimizer == group) if group is not None else pd.Series(True, index=done.index)
        colour = OPTIMIZER_COLOURS.get(str(group), qualitative.Plotly[k % len(qualitative.Plotly)])
        hover = [f"trial {n}" for n in done.loc[mask, "number"]]
        if discrete:
            fig.add_box(x=[short(v) for v in x[mask]], y=y[mask], name=str(group or "all"), boxpoints="all",
                        jitter=0.4, pointpos=0, marker_color=colour, text=hover)
        else:
            fig.add_scatter(x=x[mask], y=y[mask], mode="markers", name=str(group or "all"), text=hover,
                            marker={"size": 9, "color": colour})
    if discrete:
        fig.update_layout(boxmode="group", xaxis={"type": "category", "categoryorder": "array",
                                                  "categoryarray": [short(v) for v in order]})
    elif _log_scale(name, x, log_scales):
        decades = math.log10(x.max() / x.min())
        fig.update_xaxes(type="log", dtick=1 if decades >= 2 else "D2", exponentformat="power")
    fig.update_layout(xaxis_title=label, yaxis_title=ACCURACY, legend_title="optimizer", showlegend=True)
    return style(fig, f"{title} ({len(done)} complete trials)")


def optimizer_comparison(trials: pd.DataFrame, values: list[str]) -> go.Figure:
    optimizer = parameter(trials, "optimizer")
    if optimizer is None:
        raise Unavailable("trials.csv has no optimizer column")
    done = complete(trials)
    y = dev_accuracy(done, values)
    names = sorted(optimizer.dropna().unique())
    fig = make_subplots(rows=1, cols=2, column_widths=[0.38, 0.62], specs=[[{"type": "xy"}, {"type": "table"}]],
                        subplot_titles=("dev macro accuracy of complete trials", "Table 2: summary per optimizer"))
    rows = []
    for k, name in enumerate(names):
        mask = optimizer.loc[done.index] == name
        scores = y[mask].dropna()
        states = trials.loc[optimizer == name, "state"].value_counts()
        colour = OPTIMIZER_COLOURS.get(str(name), qualitative.Plotly[k % len(qualitative.Plotly)])
        fig.add_box(y=scores, name=str(name), boxpoints="all", jitter=0.4, pointpos=0, marker_color=colour,
                    showlegend=False, row=1, col=1)
        rows.append([name, int(states.get("COMPLETE", 0)), int(states.get("PRUNED", 0)), int(states.get("FAIL", 0)),
                     short(scores.max()) if len(scores) else "n/a",
                     f"{scores.mean():.3f} ± {scores.std():.3f}" if len(scores) > 1 else short(scores.mean()) if len(scores) else "n/a",
                     short(scores.median()) if len(scores) else "n/a"])
    header = ["optimizer", "complete", "pruned", "failed", "best", "mean ± sd", "median"]
    fig.add_trace(go.Table(columnwidth=[1.1, 1, 1, 0.9, 0.9, 1.6, 0.9],
                           header={"values": header, "fill_color": "#dde6f3", "align": "left"},
                           cells={"values": list(map(list, zip(*rows))) if rows else [[] for _ in header], "align": "left"}),
                  row=1, col=2)
    fig.update_yaxes(title_text=ACCURACY, row=1, col=1)
    fig.update_xaxes(title_text="optimizer", row=1, col=1)
    return style(fig, "SGD vs Adam (Table 2)")


def _lr_groups(lr: pd.Series, per_trial: pd.Series) -> tuple[pd.Series, list[str]]:
    """Each trial's learning-rate group: the exact value for a grid, else one of a few log-spaced bins."""
    distinct = sorted(lr.dropna().unique())
    if len(distinct) <= 6 and is_discrete(per_trial):
        labels = {v: f"lr {short(v)}" for v in distinct}
        return lr.map(labels), [labels[v] for v in distinct]
    bins = min(4, len(distinct))
    logs = np.log10(lr.astype(float))
    edges = np.linspace(logs.min(), logs.max(), bins + 1)
    index = np.clip(np.searchsorted(edges, logs, side="right") - 1, 0, bins - 1)
    names = [f"lr {10 ** edges[i]:.2g} to {10 ** edges[i + 1]:.2g}" for i in range(bins)]
    groups = pd.Series([names[i] for i in index], index=lr.index)
    return groups, [n for n in names if (groups == n).any()]


def learning_curves(epochs: pd.DataFrame | None) -> go.Figure:
    if epochs is None or epochs.empty:
        raise Unavailable("epochs.csv is missing or has no rows")
    lr = parameter(epochs, "lr")
    if lr is None:
        raise Unavailable("epochs.csv has no params_lr or user_attrs_config_lr column to group by")
    groups, order = _lr_groups(lr, lr.groupby(epochs["trial"]).first())
    colours = dict(zip(order, sample_colorscale("Viridis", [i / max(1, len(order) - 1) * 0.9 for i in range(len(order))])))
    optimizer = parameter(epochs, "optimizer")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("train loss", "dev macro accuracy"), horizontal_spacing=0.1)
    shown = set()
    # Complete trials first, so each legend entry shows a solid line.
    by_trial = sorted(epochs.groupby("trial"), key=lambda item: (item[1]["state"].iloc[0] != "COMPLETE", item[0]))
    for number, rows in by_trial:
        group = groups.loc[rows.index[0]]
        state = rows["state"].iloc[0]
        hover = f"trial {number}, {state.lower()}, lr {short(lr.loc[rows.index[0]])}"
        if optimizer is not None:
            hover += f", {optimizer.loc[rows.index[0]]}"
        for col, column in ((1, "train_loss"), (2, "dev_macro_accuracy")):
            fig.add_scatter(x=rows["epoch"], y=rows[column], mode="lines+markers", name=group, legendgroup=group,
                            showlegend=col == 1 and group not in shown, legendrank=order.index(group),
                            hovertext=hover, hoverinfo="text+x+y",
                            line={"color": colours[group], "dash": "solid" if state == "COMPLETE" else "dot"},
                            marker={"size": 4}, row=1, col=col)
        shown.add(group)
    fig.update_xaxes(title_text="epoch", dtick=1 if epochs["epoch"].max() <= 12 else None)
    fig.update_yaxes(title_text="train loss (weighted cross-entropy, nats)", row=1, col=1)
    fig.update_yaxes(title_text=ACCURACY, row=1, col=2)
    fig.update_layout(legend_title="learning rate", legend={"traceorder": "normal"})
    n = epochs["trial"].nunique()
    return style(fig, f"Learning curves grouped by learning rate (Figure 4; {n} trials, dotted: pruned or failed)", 480)


def best_trial_confusion(trials: pd.DataFrame, values: list[str]) -> go.Figure:
    done = complete(trials)
    if done.empty:
        raise Unavailable("no COMPLETE trial in trials.csv")
    cells = [c for c in trials.columns if c.startswith("user_attrs_dev_cm_")]
    if not cells:
        raise Unavailable("trials.csv has no user_attrs_dev_cm_* columns")
    best = done.loc[dev_accuracy(done, values).idxmax()]
    classes = list(dict.fromkeys(c.removeprefix("user_attrs_dev_cm_").split("_as_")[0] for c in cells))
    matrix = np.array([[best[f"user_attrs_dev_cm_{t}_as_{p}"] for p in classes] for t in classes], dtype=float)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    text = [[f"{int(matrix[i, j])}<br>{100 * share[i, j]:.0f}%" for j in range(len(classes))] for i in range(len(classes))]
    fig = go.Figure(go.Heatmap(z=share, x=classes, y=classes, text=text, texttemplate="%{text}", colorscale="Blues",
                               zmin=0, zmax=1, colorbar={"title": "share of true class"}))
    fig.update_layout(xaxis_title="predicted class", yaxis_title="true class", yaxis_autorange="reversed")
    fig.update_xaxes(side="bottom")
    return style(fig, f"Best trial #{int(best['number'])}: dev confusion matrix "
                      f"(dev macro accuracy {dev_accuracy(done, values)[best.name]:.3f})", 440)


def top_trials(trials: pd.DataFrame, values: list[str]) -> go.Figure:
    done = complete(trials)
    if done.empty:
        raise Unavailable("no COMPLETE trial in trials.csv")
    done = done.assign(_score=dev_accuracy(done, values)).sort_values("_score", ascending=False).head(TOP_TRIALS)
    columns = ["number", *values]
    columns += [c for c in trials.columns if c.startswith("user_attrs_dev_acc_")]
    columns += [c for c in trials.columns if c.startswith("params_")]
    columns += [c for c in ("user_attrs_train_macro_accuracy", "user_attrs_epochs_run", "user_attrs_train_seconds")
                if c in trials.columns]
    names = {"number": "trial", "value": "dev macro acc", "user_attrs_train_macro_accuracy": "train macro acc",
             "user_attrs_epochs_run": "epochs run", "user_attrs_train_seconds": "train s"}
    header = [names.get(c) or c.removeprefix("params_").removeprefix("user_attrs_").replace("dev_acc_", "dev ")
              .replace("values_", "").replace("_", " ") for c in columns]
    cells = [[short(v) if not isinstance(v, (int, np.integer)) else str(v) for v in done[c]] for c in columns]
    fig = go.Figure(go.Table(header={"values": header, "fill_color": "#dde6f3", "align": "left"},
                             cells={"values": cells, "align": "left"}))
    fig = style(fig, f"Top {len(done)} trials by dev macro accuracy (per-class dev accuracy, params, seconds)",
                200 + 32 * len(done))
    fig.update_layout(margin={"b": 10})
    return fig


# --- the report ---------------------------------------------------------------------

def build_figures(trials: pd.DataFrame, values: list[str], epochs: pd.DataFrame | None,
                  data: pd.DataFrame | None, log_scales: dict[str, bool] | None = None) -> list[Figure]:
    data_note = ""
    if data is not None and "source" in data.columns and len(data):
        data_note = f" Counts from {data['source'].iloc[0]}."
    specs = [
        ("class-distribution", "Class distribution per split",
         "Images per class in train, dev and test: the imbalance that macro accuracy corrects for." + data_note,
         lambda: class_distribution(data)),
        ("optimization-history", "Optimization history",
         "Dev macro accuracy of each complete trial and the best so far; pruned trials shown at the accuracy they had when stopped.",
         lambda: optimization_history(trials, values)),
        ("param-importances", "Parameter importances",
         "Optuna's fANOVA evaluator on the complete trials (a study rebuilt from trials.csv).",
         lambda: param_importances(trials, values, log_scales)),
        ("parallel-coordinates", "Parallel coordinates",
         "Each line is a complete trial; log-scaled parameters are shown on log axes.",
         lambda: parallel_coordinates(trials, values, log_scales)),
        ("accuracy-vs-batch-size", "Dev macro accuracy vs batch size (Figure 2, left)",
         "Complete trials only: a pruned trial stopped early, so its accuracy is not comparable.",
         lambda: accuracy_against(trials, values, "batch_size", "batch size (images per step)",
                                  "Dev macro accuracy vs batch size (Figure 2, left)", log_scales)),
        ("accuracy-vs-epochs", "Dev macro accuracy vs epochs (Figure 2, right)",
         "Complete trials only; accuracy after the last epoch, the study's objective.",
         lambda: accuracy_against(trials, values, "epochs", "epochs (passes over the train split)",
                                  "Dev macro accuracy vs epochs (Figure 2, right)", log_scales)),
        ("accuracy-vs-weight-decay", "Dev macro accuracy vs weight decay (Figure 3)",
         "Complete trials only.",
         lambda: accuracy_against(trials, values, "weight_decay", "weight decay (L2 coefficient)",
                                  "Dev macro accuracy vs weight decay (Figure 3)", log_scales)),
        ("sgd-vs-adam", "SGD vs Adam (Table 2)",
         "Distribution of dev macro accuracy per optimizer, and counts of complete, pruned and failed trials.",
         lambda: optimizer_comparison(trials, values)),
        ("learning-curves", "Learning curves by learning rate (Figure 4)",
         "Train loss and dev macro accuracy per epoch, from epochs.csv; one line per trial, coloured by learning rate.",
         lambda: learning_curves(epochs)),
        ("best-trial-confusion", "Best trial: dev confusion matrix",
         "Rows are true classes; each cell shows the count and the share of its true class.",
         lambda: best_trial_confusion(trials, values)),
        ("top-trials", "Top trials", f"The {TOP_TRIALS} best complete trials by dev macro accuracy.",
         lambda: top_trials(trials, values)),
    ]
    figures = []
    for key, title, caption, build in specs:
        item = Figure(key, title, caption)
        try:
            item.figure = build()
        except Unavailable as reason:
            item.missing = str(reason)
        figures.append(item)
    return figures


PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; margin: 0 auto;
       max-width: 1150px; padding: 0 18px 40px; color: #222; }
h1 { font-size: 1.5em; margin: 22px 0 4px; }
h2 { font-size: 1.15em; margin: 28px 0 2px; border-top: 1px solid #ddd; padding-top: 14px; }
p.meta, p.caption { color: #555; margin: 4px 0 8px; }
nav ol { columns: 2; color: #1f54a0; }
nav a { color: #1f54a0; text-decoration: none; }
.missing { background: #fff6e0; border: 1px solid #f0d48a; padding: 10px 14px; border-radius: 4px; }
"""


def render_html(figures: list[Figure], trials: pd.DataFrame, csv_path: Path, study: str) -> str:
    states = trials["state"].value_counts().to_dict()
    counts = ", ".join(f"{n} {s.lower()}" for s, n in states.items()) or "no trials"
    generated = time.strftime("%Y-%m-%d %H:%M")
    toc = "\n".join(f'<li><a href="#{f.key}">{html.escape(f.title)}</a>{" (not available)" if f.figure is None else ""}</li>'
                    for f in figures)
    sections = []
    config = {"displaylogo": False, "responsive": True}
    for f in figures:
        body = (f.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{f.key}", config=config)
                if f.figure is not None else f'<p class="missing">Not available: {html.escape(f.missing)}.</p>')
        sections.append(f'<section id="{f.key}" data-figure="{f.key}">\n<h2>{html.escape(f.title)}</h2>\n'
                        f'<p class="caption">{html.escape(f.caption)}</p>\n{body}\n</section>')
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Study {html.escape(study)}: hyperparameter search report</title>\n"
            f"<style>{PAGE_STYLE}</style>\n"
            f"<script src=\"{BUNDLE}\"></script><!-- plotly.js {plotly.__version__}, beside this file: works offline -->\n"
            f"</head>\n<body>\n"
            f"<h1>Study {html.escape(study)}: hyperparameter search report</h1>\n"
            f"<p class=\"meta\">From {html.escape(str(csv_path))} ({len(trials)} trials: {counts}); generated {generated}. "
            f"Accuracy is dev macro accuracy, the mean of per-class accuracies.</p>\n"
            f"<nav><ol>\n{toc}\n</ol></nav>\n" + "\n".join(sections) + "\n</body>\n</html>\n")


def write_pngs(figures: list[Figure], folder: Path) -> str:
    """PNG copies via kaleido (headless Chromium); any failure is reported, never raised."""
    ready = [f for f in figures if f.figure is not None]
    if not ready:
        return "no figures to export"
    failed = output.write_pngs({folder / f"{f.key}.png": f.figure for f in ready}, width=1100)
    if failed:
        return f"PNG export unavailable ({failed}); the HTML report does not need it"
    return f"wrote {len(ready)} PNGs to {folder}/"


def make_report(csv_path: Path, out: Path | None = None, png: bool = True) -> tuple[Path, list[Figure], str]:
    csv_path = Path(csv_path)
    trials = read_csv(csv_path, REQUIRED_COLUMNS["trials.csv"])
    values = value_columns(trials, csv_path)
    folder = csv_path.parent
    epochs = read_csv(folder / "epochs.csv") if (folder / "epochs.csv").is_file() else None
    data = read_csv(folder / "data.csv") if (folder / "data.csv").is_file() else None
    if trials.empty:
        raise UserError(f"{csv_path}: no trials yet (header only); run `make search` then `make export`")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    figures = build_figures(trials, values, epochs, data, recorded_log_scales(folder))
    out = Path(out) if out else folder / "plots"
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    write_bundle(out)
    write_atomic(index, render_html(figures, trials, csv_path, folder.name))
    png_note = write_pngs(figures, out) if png else "PNG export skipped (--no-png)"
    return index, figures, png_note


def run(args) -> int:
    csv_path = find_csv(args)
    index, figures, png_note = make_report(csv_path, Path(args.out) if args.out else None, png=not args.no_png)
    made = [f for f in figures if f.figure is not None]
    print(f"{len(made)} of {len(figures)} figures from {csv_path}")
    for f in figures:
        if f.figure is None:
            print(f"  not available: {f.title}: {f.missing}")
    print(png_note)
    print(f"wrote {index}  (open it in a browser; it works offline, with the {BUNDLE} beside it)")
    return 0
