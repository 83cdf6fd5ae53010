"""What `make final` writes besides the model: the figure files, report.md, and the move into place.

Figures (drawn in attack.py) are self-contained HTML beside one plotly.min.js
(PNG too when kaleido can start Chromium); report.md says what was chosen,
how it scored over the seeds and under attack. Everything is made in a staging folder and
`publish` moves it into place one rename each, report.md last.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from cnnlib.atomic import check_replaceable
from cnnlib.metrics import Evaluation

from ..errors import UserError
from ..output import BUNDLE, write_html, write_pngs
from .attack import GRID_IMAGES

FIGURES = ("accuracy_vs_epsilon", "examples_grid", "flip_example")


# --- figures --------------------------------------------------------------


def write_figures(figures: dict, out: Path, png: bool) -> tuple[list[str], str]:
    """HTML always (one plotly.min.js beside them, no CDN: they open offline); PNG when kaleido can start Chromium."""
    for name, fig in figures.items():
        write_html(fig, out / f"{name}.html")
    if not png:
        return [], "skipped (--no-png)"
    failed = write_pngs({out / f"{name}.png": fig for name, fig in figures.items()}, scale=2)
    if failed:
        return [], f"unavailable ({failed})"
    written = [name for name in figures if (out / f"{name}.png").is_file()]
    return written, "written" if written else "kaleido wrote nothing"


# --- report.md --------------------------------------------------------------

def _pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _attack_table(rows: list[dict], classes) -> str:
    return _table(["split", "attack", "epsilon", "macro accuracy", *classes, "success rate"],
                  [[r["split"], r["attack"], f"{r['epsilon']:g}", _pct(r["macro_accuracy"]),
                    *[_pct(r[f"accuracy_{c}"]) for c in classes], _pct(r["attack_success_rate"])] for r in rows])


def model_words(kept: dict) -> str:
    """How report lines name the model kept: 'ensemble of seeds 0, 1, 2' or 'median seed 1'."""
    if kept["kind"] == "ensemble":
        return "ensemble of seeds " + ", ".join(map(str, kept["seeds"]))
    return f"median seed {kept['seeds'][0]}"


def _candidates_section(metrics: dict, classes) -> list[str]:
    """The candidates side by side: what chose among them, ± its standard error, and their test scores."""
    rows, selection = metrics.get("candidates") or [], metrics.get("selection") or {}
    if len(rows) < 2:
        return []
    out = ["## Candidates", "", f"Chosen by {selection.get('signal', 'the mean dev over seeds')}; the held-out test "
           "split never chose anything.", ""]
    if "folds" in selection:
        out += [f"Cross-validation: train and dev pooled, {selection['folds']} stratified folds (the same for every "
                "candidate), each held out once from a model trained on the rest with the config (fold f: seed f). "
                "CV macro is the folds' mean ± its standard error; a search trial is kept over the best warm-start "
                "point only when it leads it by more than the standard error of their paired difference. "
                "Fold test: the same fold models on the test split, mean ± sd, shown only to check the signal.", ""]
        body = [[f"**{r['trial']}**" if r["chosen"] else r["trial"], "warm start" if r["warm_start"] else "search",
                 f"{r['search_value']:.3f}", f"{r['cv_macro_accuracy']:.3f} ± {r['cv_standard_error']:.3f}",
                 *[_pct(r["cv_per_class"][c]) for c in classes],
                 _mean_sd(r["fold_test_macro_accuracy"], r["fold_test_sd"])] for r in rows]
        out += [_table(["trial", "from", "search dev", "CV macro ± SE", *[f"CV {c}" for c in classes], "fold test"],
                       body), ""]
        rho = selection.get("rank_correlation_with_fold_test") or {}
        if rho.get("search_value") is not None and rho.get("cross_validation") is not None:
            out += [f"Rank correlation with fold test over {rho['candidates']} candidates (Spearman): search dev "
                    f"{rho['search_value']:.2f}, cross-validation {rho['cross_validation']:.2f}.", ""]
        return out
    body = [[r["trial"], f"{r['search_value']:.3f}", f"{r['mean_dev_macro_accuracy']:.3f}",
             _pct(r["mean_test_macro_accuracy"]) if r.get("mean_test_macro_accuracy") is not None else "–"] for r in rows]
    return out + [_table(["trial", "search dev", "mean dev over seeds", "mean test over seeds"], body), ""]


def _model_sentence(kept: dict) -> str:
    if kept["kind"] == "ensemble":
        return (f"The checkpoint [model.pt](model.pt) is the {model_words(kept)}: the mean of their softmax, each "
                "with the config's test-time views (ENSEMBLE=0 keeps the median seed instead).")
    return f"The checkpoint [model.pt](model.pt) is seed {kept['seeds'][0]}, the median by dev macro accuracy."


def _mean_sd(mean, sd) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def format_report(metrics: dict, rows: list[dict], figures: dict) -> str:
    classes = metrics["classes"]
    trial = metrics["trial"]
    config = metrics["config"]
    out = [f"# Final model: study `{metrics['study']}`, trial {trial['number']}", "",
           f"Chosen: {trial['selection']}. Search value(s): {', '.join(f'{v:.4f}' for v in trial['values'] or [])}.",
           f"Config from {trial['config_source']}; retrained on train with seeds "
           f"{', '.join(str(r['seed']) for r in metrics['seeds'])} on {metrics['device']}. "
           + _model_sentence(metrics["model"]), "",
           _table(["setting", "value"], [[k, f"`{v}`"] for k, v in config.items() if k != "seed"]), ""]
    out += _accuracy_section(metrics, classes)
    out += _candidates_section(metrics, classes)
    out += _robustness_section(metrics, rows, classes, config.get("tta", "none"))
    out += _figures_section(metrics, figures)
    return "\n".join(out)


def _accuracy_section(metrics: dict, classes) -> list[str]:
    """The model kept on each split beside the seeds' spread and the majority baseline; each seed; confusions."""
    splits = [s for s in ("dev", "test") if s in metrics]
    kept = model_words(metrics["model"])
    out = ["## Accuracy", ""]
    seeds = len(metrics["seeds"])
    if seeds > 1:
        out += [f"Macro and per class: the model kept ({kept}); mean ± std (sample std): "
                "the seeds alone; the majority-class baseline predicts the most frequent training class for "
                "everything.", ""]
    else:  # a spread needs two seeds; "± 0.0%" would claim a stability nobody measured
        out += ["One seed, so no spread over seeds (SEEDS=3 or more measures how much of the score is luck); the "
                "majority-class baseline predicts the most frequent training class for everything.", ""]
    spread_column = [f"single seeds, mean ± std ({seeds})"] if seeds > 1 else []
    header = ["split", "macro accuracy", *spread_column, *classes, "majority baseline"]
    body = []
    for s in splits:
        m, agg = metrics[s], metrics["summary"][s]["macro_accuracy"]
        body.append([s, _pct(m["macro_accuracy"]), *([f"{agg['mean']:.1%} ± {agg['std']:.1%}"] if seeds > 1 else []),
                     *[_pct(m["per_class"][c]) for c in classes], _pct(m["majority_baseline"]["macro_accuracy"])])
    out += [_table(header, body), "", "Per seed:", "",
            _table(["seed", *[f"{s} macro" for s in splits], "epochs", "seconds"],
                   [[r["seed"], *[_pct(r[s]["macro_accuracy"]) for s in splits], r["epochs"], f"{r['seconds']:.1f}"]
                    for r in metrics["seeds"]]), ""]
    for s in splits:
        out += ["```", Evaluation.from_dict(classes, metrics[s]).format(f"{s} ({kept})"), "```", ""]
    return out


def _robustness_section(metrics: dict, rows: list[dict], classes, tta: str) -> list[str]:
    """The attacks, their epsilon scale and the sweep's rows (with test-time views: the plain model's too)."""
    attack = metrics["attack"]
    pgd = f" (PGD: {attack['pgd_steps']} steps)" if "pgd" in attack["attacks"] else ""
    out = ["## Adversarial robustness", "",
           f"Attacks: {', '.join(a.upper() for a in attack['attacks'])}{pgd}. "
           "Epsilon is on the [0, 1] pixel scale; on the user's [-1, 1] inputs the same perturbation is 2 × epsilon "
           "(their eps 0.1 = 0.05 here). Success rate = share of correctly classified images the attack flips. "
           f"Sweep time: {attack['seconds']:.1f} s on {metrics['device']}.", "",
           "Full rows (per-class accuracy, counts): [fgsm.csv](fgsm.csv); everything above as data: "
           "[metrics.json](metrics.json).", ""]
    if tta != "none":
        out += [f"The model as evaluated: test-time augmentation `{tta}`, the attacks differentiate through its "
                "views. The plain model (no views) below it, for comparison.", ""]
    out.append(_attack_table([r for r in rows if r.get("tta", "none") == tta], classes))
    if tta != "none":
        out += ["", "### The plain model (tta none)", "",
                _attack_table([r for r in rows if r.get("tta", "none") == "none"], classes)]
    return out


def _figures_section(metrics: dict, figures: dict) -> list[str]:
    flip = metrics["flip_example"]
    out = ["", "## Figures", ""]
    descriptions = {"accuracy_vs_epsilon": "Accuracy and attack success rate against epsilon",
                    "examples_grid": f"{GRID_IMAGES} {metrics['figure_split']} images per epsilon, true → predicted",
                    "flip_example": f"A true {flip['true']} predicted {flip['before']}, turned into {flip['after']} "
                                    f"at ε={flip['epsilon']:g} ({flip['attack'].upper()}): original, noise, perturbed"}
    for name in FIGURES:
        png = f" · [PNG]({name}.png)" if name in figures["png"] else ""
        out.append(f"- {descriptions[name]}: [{name}.html]({name}.html){png}")
    out += ["", f"PNG export: {figures['png_status']}.", ""]
    return out


# --- putting a finished run in place -----------------------------------------

OUTPUTS = {"model.pt", "metrics.json", "fgsm.csv", "report.md", BUNDLE,
           *(f"{n}.{e}" for n in FIGURES for e in ("html", "png"))}
REQUIRED_OUTPUTS = {name for name in OUTPUTS if not name.endswith(".png")}  # PNGs need a Chromium; the rest every run makes


def publish(stage: Path, out: Path) -> None:
    """Move a finished run's files into place one rename each, report.md last.

    A stage that lacks an output every run makes is refused before anything
    moves, so the last run's files stay whole. An output of the last run that
    this one did not make (a PNG it could not redraw) is removed only once this
    run's model.pt has replaced the last one: it describes the replaced model.
    """
    made = {p.name for p in stage.iterdir()} if stage.is_dir() else set()
    lacking = REQUIRED_OUTPUTS - made
    if lacking:
        raise UserError(f"{stage}: this run's outputs are incomplete (no {', '.join(sorted(lacking))}); nothing in "
                        f"{out} was replaced")
    for name in made | (OUTPUTS - made):  # a device or a pipe planted there stays, and nothing moves
        check_replaceable(out / name)
    for name in sorted(made - {"report.md"}, key=lambda n: n != "model.pt"):
        os.replace(stage / name, out / name)
    for name in OUTPUTS - made:
        (out / name).unlink(missing_ok=True)
    os.replace(stage / "report.md", out / "report.md")
    stage.rmdir()
