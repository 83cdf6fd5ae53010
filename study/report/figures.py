"""The figures of `make plots`, each a function from the exported frames to a plotly figure.

A figure the CSVs cannot support (no complete trial, a parameter the space
never searched) raises Unavailable with the reason, and the report shows the
reason in its place. Accuracy is always dev macro accuracy, a fraction 0-1.
The two figures drawn by Optuna itself, from a study rebuilt out of the CSV,
are optuna_figures.py; the helpers here serve both.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import yaml
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from ..errors import UserError
from ..search import strict_yaml
from .export import SPACE_FILE

ACCURACY = "dev macro accuracy (fraction, 0-1)"


TOP_TRIALS = 10


DISCRETE_MAX = 8  # a parameter with at most this many distinct values is plotted as categories


OPTIMIZER_COLOURS = {"sgd": "#d95f02", "adam": "#1b9e77"}


class Unavailable(Exception):
    """A figure that this CSV cannot support (e.g. no complete trial); the report says why instead."""


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


def log_scale(name: str, values: pd.Series, log_scales: dict[str, bool] | None) -> bool:
    """The recorded scale of a param or config field, else the guess from its values (an export without space.yaml)."""
    if log_scales is not None and name in log_scales:
        return log_scales[name]
    return is_log_scale(values)


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
    elif log_scale(name, x, log_scales):
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
