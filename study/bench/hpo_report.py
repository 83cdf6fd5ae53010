"""`make hpo-bench`'s verdict: each method's summary over search seeds, the paired comparisons, the tables and the figure.

It reads only what the report recorded: per data set, the methods that
searched (in the order they ran), their searches, and the recipe when it ran.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..output import write_atomic, write_pngs
from ..records import split_text

COLOURS = {"tpe": "#1f77b4", "random": "#ff7f0e", "default": "#2ca02c", "tpe_hyperband": "#9467bd"}
RECIPE = "recipe"
# (method, against, what the line calls the comparison): TPE's model first, the question the bench asks.
COMPARISONS = (
    ("tpe", "random", "TPE (cold) vs random (cold)"),
    ("default", "tpe", "warm start: default (TPE + enqueued points) vs TPE (cold)"),
    ("tpe_hyperband", "tpe", "multi-fidelity: TPE + Hyperband pruner vs TPE (cold)"),
)


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def number_text(value, digits: int = 3) -> str:
    """A number with `digits` decimals, "–" for none."""
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(mean, sd, digits: int = 3, sign: str = "") -> str:
    if mean is None:
        return "–"
    return f"{mean:{sign}.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def method_summary(searches: list[dict], classes) -> dict:
    """One method on one data set: means over its search seeds (sd over search seeds) of what each search recorded."""
    scored = [s["test"] for s in searches if s["test"]["test_macro_mean"] is not None]
    test_mean, test_sd = mean_sd([t["test_macro_mean"] for t in scored])
    dev_mean, dev_sd = mean_sd([s["best_dev"] for s in searches])
    asks = [s["model_driven_asks_judged"] for s in searches]
    return {"search_seeds": len(searches), "scored_seeds": len(scored),
            "test_macro_mean": test_mean, "test_macro_sd_over_search_seeds": test_sd,
            "test_per_class": {c: mean_sd([t["test_per_class"][c] for t in scored])[0] for c in classes},
            "best_dev_mean": dev_mean, "best_dev_sd_over_search_seeds": dev_sd,
            "trials_finished_mean": mean_sd([s["trials_finished"] for s in searches])[0],
            "model_driven_asks_min": min(asks, default=None), "model_driven_asks_max": max(asks, default=None),
            "search_seconds_mean": mean_sd([s["search_seconds"] for s in searches])[0],
            "search_seconds_max": max((s["search_seconds"] for s in searches), default=None),
            "searches_over_budget": sum(not s["kept_budget"] for s in searches)}


def paired_difference(part: dict, method: str, against: str) -> dict | None:
    """Test macro of `method` minus `against`, search seed by search seed (they share their random draws)."""
    methods = part["methods"]
    if method not in methods or against not in methods:
        return None
    theirs = {s["search_seed"]: s["test"]["test_macro_mean"] for s in methods[against]["searches"]}
    diffs = [s["test"]["test_macro_mean"] - theirs[s["search_seed"]] for s in methods[method]["searches"]
             if s["test"]["test_macro_mean"] is not None and theirs.get(s["search_seed"]) is not None]
    if not diffs:
        return None
    mean, sd = mean_sd(diffs)
    return {"method": method, "against": against, "mean": mean, "sd": sd, "seeds": len(diffs),
            "ahead": sum(d > 0 for d in diffs)}


def verdict_line(label: str, diff: dict) -> str:
    """'TPE (cold) vs random (cold): +0.012 test macro (sd 0.020 over 3 paired search seeds; tpe ahead on 2 of 3)'."""
    n = diff["seeds"]
    spread = f"sd {diff['sd']:.3f} over {n} paired search seeds" if diff["sd"] is not None else "1 search seed"
    line = (f"{label}: {diff['mean']:+.3f} test macro ({spread}; {diff['method']} ahead on {diff['ahead']} of {n})")
    if diff["mean"] <= 0:
        line += f"; {diff['method']} did not beat {diff['against']} here"
    elif diff["sd"] is not None and diff["mean"] <= 2 * diff["sd"] / math.sqrt(n):
        line += f"; within the seeds' noise (2 standard errors: {2 * diff['sd'] / math.sqrt(n):.3f})"
    return line


def verdicts(part: dict) -> list[str]:
    """The plain-words lines of one data set, each computed from its searches; a comparison that did not run has none."""
    lines = []
    for method, against, label in COMPARISONS:
        diff = paired_difference(part, method, against)
        if diff is not None:
            lines.append(verdict_line(label, diff))
    return lines


def format_table(name: str, part: dict, budget: int) -> str:
    """One data set: a row per method, then its verdict lines."""
    classes = part["classes"]
    head = ["method", "search seeds", "test macro (mean ± sd)", "vs random (paired)", *classes, "best dev (mean ± sd)",
            "trials (mean)", "model-driven asks (min–max)", f"search s (max of {budget})"]
    lines = [f"### {name} ({', '.join(classes)}: {split_text(part['split'])})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, entry in part["methods"].items():
        if method == RECIPE or "summary" not in entry:
            continue
        s = entry["summary"]
        diff = paired_difference(part, method, "random") if method != "random" else None
        over = f" ({s['searches_over_budget']} over)" if s["searches_over_budget"] else ""
        lines.append("| " + " | ".join([
            method, str(s["search_seeds"]), _pm(s["test_macro_mean"], s["test_macro_sd_over_search_seeds"]),
            "–" if diff is None else _pm(diff["mean"], diff["sd"], sign="+"),
            *(number_text(s["test_per_class"][c]) for c in classes),
            _pm(s["best_dev_mean"], s["best_dev_sd_over_search_seeds"]), number_text(s["trials_finished_mean"], 1),
            f"{s['model_driven_asks_min']}–{s['model_driven_asks_max']}",
            number_text(s["search_seconds_max"], 0) + over]) + " |")
    recipe = part["methods"].get(RECIPE)
    if recipe:
        sd = f" ± {recipe['test_macro_sd']:.3f}*" if recipe["test_macro_sd"] is not None else ""
        lines.append("| " + " | ".join(["recipe (no search)", "–", number_text(recipe["test_macro_mean"]) + sd, "–",
                                         *(number_text(recipe["test_per_class"][c]) for c in classes), "–", "–", "–", "–"])
                     + " |")
    lines.append("")
    lines.extend(f"- {line}" for line in part.get("verdicts") or [])
    return "\n".join(lines)


def format_tables(report: dict) -> str:
    """table.md: a table and verdict per data set, what the columns mean, and the run's warnings."""
    settings = report["settings"]
    budget = settings["budget_seconds"]
    parts = [format_table(name, part, budget) for name, part in report["datasets"].items()]
    seeds = ", ".join(map(str, settings["retrain_seeds"]))
    parts.append(
        f"Budget {budget} s per search ({settings['space']}, {settings['fuse']} trials per ask, "
        f"{settings['startup_trials']} start-up trials). Test: held-out test macro accuracy of each search's best "
        f"trial by dev, retrained with seeds {seeds}; mean over search seeds ± sd over search seeds "
        f"(*recipe: sd over its training seeds); per class: test accuracy, mean. vs random: test macro minus "
        f"random search's of the same search seed, mean ± sd over seeds. Model-driven asks: asks after the "
        f"start-up trials of which a trial completed or was pruned on its merits, not cut by the deadline (for "
        f"random search, the asks TPE's model would have driven). "
        f"Search s: from the first ask to the search's end (set-up apart); searches ending after "
        f"{settings['budget_slack']} x the budget are counted as over.")
    if report.get("warnings"):
        parts.append("Warnings:\n" + "\n".join(f"- {w}" for w in report["warnings"]))
    return "\n\n".join(parts)


def best_so_far(search: dict, times: list[float]) -> list[float | None]:
    """The search's best dev macro accuracy by each time (None before its first complete trial)."""
    points = sorted((t["elapsed_seconds"], t["dev_macro_accuracy"]) for t in search["complete_trials"])
    out, best, i = [], None, 0
    for time in times:
        while i < len(points) and points[i][0] <= time:
            best = points[i][1] if best is None else max(best, points[i][1])
            i += 1
        out.append(best)
    return out


def figure(report: dict):
    """Best dev macro accuracy so far against search time, per data set: each search faint, the mean over seeds bold.

    Free to draw (the trials' own completion times and values); test is in the table.
    """
    import plotly.graph_objects as go  # noqa: PLC0415 - plotting only here
    from plotly.subplots import make_subplots  # noqa: PLC0415

    names = list(report["datasets"])
    budget = report["settings"]["budget_seconds"]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    for column, name in enumerate(names, 1):
        for method, entry in report["datasets"][name]["methods"].items():
            searches = entry.get("searches") or []
            if method == RECIPE or not searches:
                continue
            end = max([budget, *(t["elapsed_seconds"] for s in searches for t in s["complete_trials"])])
            times = [end * k / 100 for k in range(101)]
            colour = COLOURS.get(method, "#555555")
            curves = [best_so_far(s, times) for s in searches]
            for s, curve in zip(searches, curves):
                fig.add_trace(go.Scatter(x=times, y=curve, mode="lines", line=dict(color=colour, width=1, shape="hv"),
                                         opacity=0.3, name=f"{method} seed {s['search_seed']}", legendgroup=method,
                                         showlegend=False), row=1, col=column)
            mean = [statistics.fmean(ys) if all(y is not None for y in ys) else None for ys in zip(*curves)]
            fig.add_trace(go.Scatter(x=times, y=mean, mode="lines", line=dict(color=colour, width=3, shape="hv"),
                                     name=f"{method}, mean over {len(searches)} search seed(s)", legendgroup=method,
                                     showlegend=column == 1), row=1, col=column)
        fig.add_vline(x=budget, line=dict(color="grey", dash="dot"), row=1, col=column)
    fig.update_xaxes(title_text="elapsed search time (s)")
    fig.update_yaxes(title_text="best dev macro accuracy so far (fraction, 0-1)", row=1, col=1)
    fig.update_layout(title=f"Best dev macro accuracy so far against search time<br><sup>budget {budget} s per "
                            "search (dotted); the mean over search seeds starts once every seed has a complete "
                            "trial; held-out test scores are in table.md</sup>",
                      height=500, width=550 * len(names) + 150, template="plotly_white")
    return fig


def write_figure(fig, run_dir: Path, png: bool) -> str:
    """dev_vs_time.html (plotly.js inside: opens offline) and, when kaleido can start Chromium, the PNG."""
    write_atomic(run_dir / "dev_vs_time.html", fig.to_html(include_plotlyjs=True, full_html=True))
    if not png:
        return "PNG skipped (--no-png)"
    failed = write_pngs({run_dir / "dev_vs_time.png": fig}, width=1100)
    if failed:
        return f"PNG export unavailable ({failed}); the HTML report does not need it"
    return f"wrote 1 PNGs to {run_dir}/"
