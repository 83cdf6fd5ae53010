"""`make hpo-bench`'s verdict: each method's summary over search seeds, the table, and the figure.
It reads only what the report recorded: the methods that searched (every
method but "recipe", in the order they were set up) and the retrain seeds.
"""

from __future__ import annotations

import statistics

COLOURS = {"default": "#1f77b4", "random": "#ff7f0e", "recipe": "#555555"}


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def searched(report: dict) -> list[str]:
    """The methods that searched, in the order the bench set them up."""
    return [method for method in report["methods"] if method != "recipe"]


def method_summary(searches: list[dict], classes) -> dict:
    """Mean over search seeds of each search's end checkpoint (the sd is over search seeds)."""
    ends = [s["checkpoints"][-1] for s in searches]
    scored = [e for e in ends if e["test_macro_mean"] is not None]
    test_mean, test_sd = mean_sd([e["test_macro_mean"] for e in scored])
    return {"search_seeds": len(searches), "scored_seeds": len(scored),
            "trials_finished_mean": mean_sd([s["trials_finished"] for s in searches])[0],
            "best_dev_mean": mean_sd([s["best_dev"] for s in searches])[0],
            "wall_seconds_mean": mean_sd([s["wall_seconds"] for s in searches])[0],
            "test_macro_mean": test_mean, "test_macro_sd_over_search_seeds": test_sd,
            "test_per_class": {c: mean_sd([e["test_per_class"][c] for e in scored])[0] for c in classes}}


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(report: dict) -> str:
    classes = report["settings"]["classes"]
    head = ["method", "search seeds", "trials (mean)", "search s (mean)", "best dev (mean)",
            "test macro (mean ± sd)", *classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = report["methods"]
    for method in searched(report):
        if "summary" not in methods[method]:
            continue
        s = methods[method]["summary"]
        sd = f" ± {s['test_macro_sd_over_search_seeds']:.3f}" if s["test_macro_sd_over_search_seeds"] is not None else ""
        lines.append("| " + " | ".join([method, str(s["search_seeds"]), _f(s["trials_finished_mean"], 1),
                                         _f(s["wall_seconds_mean"], 0), _f(s["best_dev_mean"]),
                                         _f(s["test_macro_mean"]) + sd,
                                         *(_f(s["test_per_class"][c]) for c in classes)]) + " |")
    recipe = methods.get("recipe")
    if recipe:
        sd = f" ± {recipe['test_macro_sd']:.3f}*" if recipe["test_macro_sd"] is not None else ""
        lines.append("| " + " | ".join(["recipe", "–", "–", "–", "–", _f(recipe["test_macro_mean"]) + sd,
                                         *(_f(recipe["test_per_class"][c]) for c in classes)]) + " |")
    budget = report["settings"]["budget_seconds"]
    lines.append("")
    lines.append(f"Budget {budget} s per search (the trials still training then are stopped and PRUNED: "
                 f"'search s'). Test: held-out test macro accuracy of the best trial's config at the search's end, "
                 f"retrained with seeds {', '.join(map(str, report['settings']['retrain_seeds']))}; mean over search seeds ± sd over "
                 f"search seeds (*recipe: sd over its training seeds). Per-class: test accuracy, mean.")
    return "\n".join(lines)


def figure(report: dict):
    import plotly.graph_objects as go  # noqa: PLC0415 - plotting only here

    fig = go.Figure()
    for method in searched(report):
        searches = report["methods"][method].get("searches", [])
        for s in searches:  # each search seed faint
            points = [c for c in s["checkpoints"] if c["test_macro_mean"] is not None]
            fig.add_trace(go.Scatter(x=[c["elapsed_seconds"] for c in points], y=[c["test_macro_mean"] for c in points],
                                     mode="lines+markers", line=dict(color=COLOURS[method], width=1), opacity=0.3,
                                     name=f"{method} seed {s['search_seed']}", legendgroup=method, showlegend=False))
        if not searches:
            continue
        xs, ys = [], []
        for index in range(len(searches[0]["checkpoints"])):  # the mean over search seeds, checkpoint by checkpoint
            points = [s["checkpoints"][index] for s in searches]
            y = mean_sd([p["test_macro_mean"] for p in points])[0]
            if y is not None:
                xs.append(statistics.fmean(p["elapsed_seconds"] for p in points))
                ys.append(y)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", line=dict(color=COLOURS[method], width=3),
                                 name=f"{method} (mean of {len(searches)} search seeds)", legendgroup=method))
    recipe = report["methods"].get("recipe")
    if recipe and recipe["test_macro_mean"] is not None:
        fig.add_hline(y=recipe["test_macro_mean"], line=dict(color=COLOURS["recipe"], dash="dash"),
                      annotation_text=f"recipe alone ({recipe['test_macro_mean']:.3f})", annotation_position="bottom right")
    budget = report["settings"]["budget_seconds"]
    fig.add_vline(x=budget, line=dict(color="grey", dash="dot"), annotation_text="budget", annotation_position="top left")
    fig.update_layout(title=f"Held-out test macro accuracy of the best config so far against search time<br>"
                            f"<sup>retrained with {len(report['settings']['retrain_seeds'])} seeds; budget {budget} s per search; "
                            "trials still training at the deadline are stopped</sup>",
                      xaxis_title="elapsed search time (s)", yaxis_title="test macro accuracy (fraction, 0-1)",
                      height=500, width=1000, template="plotly_white")
    return fig
