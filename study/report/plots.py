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
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import plotly
import plotly.graph_objects as go

from cnnlib.atomic import write_atomic

from .. import output
from ..errors import UserError
from ..output import BUNDLE, output_place, study_folder, write_bundle
from .figures import (TOP_TRIALS, Unavailable, accuracy_against, best_trial_confusion, class_distribution,
                      learning_curves, optimization_history, optimizer_comparison, recorded_log_scales, top_trials)
from .optuna_figures import parallel_coordinates, param_importances


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
    parser.add_argument("--out", type=output_place("PLOTS_OUT / --out", folder=True),
                        default=os.environ.get("PLOTS_OUT") or None,
                        help="output folder (env PLOTS_OUT; default: plots/ beside the CSV)")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG copies (they need kaleido and Chromium)")


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
