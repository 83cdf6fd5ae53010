"""The figures Optuna draws or rates itself, from a study rebuilt out of trials.csv alone.

Parameter importances (Optuna's fANOVA evaluator) and parallel coordinates
(optuna.visualization) need an optuna.Study: `rebuild_study` makes one in
memory from the CSV's complete trials, each param with the scale the search
sampled it on (figures.recorded_log_scales). The other figures are figures.py.
"""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from .figures import Unavailable, complete, is_log_scale, log_scale, style

# Plasma without its pale yellow end (luminance < 0.6 throughout): worst trials orange, best dark blue-violet.
PARCOORDS_COLOURS = [[i / 4, c] for i, c in enumerate(sample_colorscale("Plasma", [0.75, 0.6, 0.45, 0.25, 0.0]))]


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
    distributions = {c.removeprefix("params_"): _distribution(trials[c], log_scale(c.removeprefix("params_"), trials[c],
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
