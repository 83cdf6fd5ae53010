"""The figures and the report say what they promise: per-class curves shown, readable colours, whole trial
numbers, no PGD claim without PGD, no spread from one seed, and small HTML files sharing one plotly.js."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly
import plotly.graph_objects as go
import pytest
from plotly.colors import hex_to_rgb, unlabel_rgb

from cnnlib.metrics import Evaluation
from study.final import attack as final_attack
from study.final import report as final_report
from study.report import figures, optuna_figures, plots

CLASSES = ["car", "truck", "cat"]
SMALL_HTML = 100_000  # bytes: a figure's own data; plotly.js alone is ~4.6 MB


def sweep_rows(attack: str = "fgsm") -> list[dict]:
    rows = []
    for split in ("dev", "test"):
        for epsilon, truck in ((0.0, 0.8), (0.05, 0.02), (0.1, 0.0)):
            rows.append({"split": split, "attack": attack, "epsilon": epsilon, "macro_accuracy": (0.9 + truck) / 3,
                         "accuracy_car": 0.9, "accuracy_truck": truck, "accuracy_cat": 0.0,
                         "attack_success_rate": 1 - truck})
    return rows


# --- the FGSM figure ---------------------------------------------------------------------

def test_the_fgsm_figure_shows_its_per_class_curves():
    figure = final_attack.accuracy_figure(sweep_rows(), CLASSES, {"dev": 1 / 3, "test": 1 / 3})
    per_class = [t for t in figure.data if t.name.endswith((" car", " truck", " cat"))]
    assert len(per_class) == 2 * len(CLASSES)
    assert all(t.visible in (None, True) for t in per_class), "the subtitle promises dotted per-class lines"
    truck = next(t for t in per_class if t.name == "test fgsm truck")
    assert list(truck.y) == [0.8, 0.02, 0.0]


# --- make plots -----------------------------------------------------------------------------

def trials_frame(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame({"number": range(n), "state": ["COMPLETE"] * n, "value": np.linspace(0.3, 0.8, n),
                         "params_lr": np.geomspace(1e-4, 1e-1, n), "params_batch_size": [(16, 32, 64, 128)[i % 4] for i in range(n)]})


def luminance(colour: str) -> float:
    """Relative luminance (0 black, 1 white) of '#rrggbb' or 'rgb(r, g, b)'."""
    r, g, b = hex_to_rgb(colour) if colour.startswith("#") else unlabel_rgb(colour)
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def test_parallel_coordinates_draw_every_trial_visibly_on_white():
    trials = trials_frame(5).assign(value=[0.30, 0.31, 0.5, 0.7, 0.8])
    figure = optuna_figures.parallel_coordinates(trials, ["value"])
    lines = [t for t in figure.data if t.mode == "lines"]
    assert len(lines) == 5
    shades = {round(float(t.y[0]), 3): luminance(t.line.color) for t in lines}  # first axis: scaled accuracy
    assert max(shades.values()) < 0.75, f"a near-white line vanishes on white: {shades}"
    (colour_bar,) = [t for t in figure.data if t.mode == "markers"]
    assert max(luminance(c) for _, c in colour_bar.marker.colorscale) < 0.75 and not colour_bar.marker.reversescale


def test_the_trial_number_axis_has_whole_number_ticks_only():
    figure = figures.optimization_history(trials_frame(4), ["value"])
    axis = figure.layout.xaxis
    assert axis.tickformat == "d" and axis.dtick is not None and float(axis.dtick).is_integer() and axis.dtick >= 1


def test_a_long_study_keeps_about_ten_trial_number_ticks():
    figure = figures.optimization_history(trials_frame(4).assign(number=[0, 40, 80, 119]), ["value"])
    assert figure.layout.xaxis.dtick == 12


def test_the_plots_report_is_small_and_shares_one_plotly_js_beside_it(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    trials_frame().to_csv(folder / "trials.csv", index=False)
    index, _, _ = plots.make_report(folder / "trials.csv", png=False)
    text = index.read_text()
    assert index.stat().st_size < SMALL_HTML
    assert re.search(r'<script[^>]*src="plotly\.min\.js"', text)
    assert (index.parent / "plotly.min.js").read_text() == plotly.offline.get_plotlyjs()
    assert not re.search(r"<script[^>]*src=[\"']?https?:", text), "nothing from the network"


# --- make final ------------------------------------------------------------------------------

def test_final_figures_are_small_and_share_one_plotly_js(tmp_path):
    figures = {name: go.Figure(go.Scatter(x=[0, 1], y=[1, 0])) for name in final_report.FIGURES}
    final_report.write_figures(figures, tmp_path, png=False)
    for name in final_report.FIGURES:
        html = tmp_path / f"{name}.html"
        assert html.stat().st_size < SMALL_HTML, name
        assert 'src="plotly.min.js"' in html.read_text()
    assert (tmp_path / "plotly.min.js").read_text() == plotly.offline.get_plotlyjs()
    assert "plotly.min.js" in final_report.OUTPUTS, "publish() must move it into place with the figures"


def report_metrics(seeds: int, attacks: list[str]) -> dict:
    evaluation = Evaluation(tuple(CLASSES), np.array([[9, 1, 0], [2, 7, 1], [1, 1, 8]])).to_dict()
    baseline = {"macro_accuracy": 1 / 3}
    seed_runs = [{"seed": s, "seconds": 1.0, "epochs": 3, "dev": evaluation, "test": evaluation} for s in range(seeds)]
    spread = {"mean": 0.8, "std": 0.0 if seeds == 1 else 0.02, "min": 0.78, "max": 0.82, "n": seeds}
    return {"study": "smoke", "classes": CLASSES, "config": {"lr": 0.001, "seed": 0}, "device": "cpu",
            "trial": {"number": 1, "selection": "best", "values": [0.8], "config_source": "user attribute 'config'"},
            "seeds": seed_runs, "median_seed": 0, "model": {"kind": "ensemble", "seeds": list(range(seeds))}
            if seeds > 1 else {"kind": "median seed", "seeds": [0]},
            "summary": {s: {"macro_accuracy": spread} for s in ("dev", "test")},
            "dev": {**evaluation, "majority_baseline": baseline}, "test": {**evaluation, "majority_baseline": baseline},
            "attack": {"attacks": attacks, "epsilons": [0, 0.05, 0.1], "pgd_steps": 10, "seconds": 0.5},
            "figure_split": "test",
            "flip_example": {"true": "car", "before": "car", "after": "truck", "epsilon": 0.05, "attack": attacks[0]}}


def test_the_report_mentions_pgd_only_when_pgd_ran():
    fgsm_only = final_report.format_report(report_metrics(3, ["fgsm"]), sweep_rows(), {"png": [], "png_status": "skipped"})
    both = final_report.format_report(report_metrics(3, ["fgsm", "pgd"]), sweep_rows() + sweep_rows("pgd"),
                               {"png": [], "png_status": "skipped"})
    assert "PGD" not in fgsm_only
    assert "PGD: 10 steps" in both


def test_one_seed_reports_no_spread_and_no_plural():
    text = final_report.format_report(report_metrics(1, ["fgsm"]), sweep_rows(), {"png": [], "png_status": "skipped"})
    assert "1 seeds" not in text and "± 0.0%" not in text
    assert "one seed" in text.lower()
    three = final_report.format_report(report_metrics(3, ["fgsm"]), sweep_rows(), {"png": [], "png_status": "skipped"})
    assert "single seeds, mean ± std (3)" in three and "80.0% ± 2.0%" in three
