"""What `make final` writes besides the model: the attack figures, report.md, and the move into place.

Figures are self-contained HTML beside one plotly.min.js (PNG too when
kaleido can start Chromium); report.md says what was chosen, how it scored
over the seeds and under attack. Everything is made in a staging folder and
`publish` moves it into place one rename each, report.md last.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from cnnlib.atomic import check_replaceable, write_atomic
from cnnlib.attacks import perturb
from cnnlib.metrics import Evaluation
from cnnlib.training import predict_logits

from .errors import UserError
from .output import BUNDLE, write_html, write_pngs

FIGURES = ("accuracy_vs_epsilon", "examples_grid", "flip_example")


GRID_IMAGES = 5


# --- figures --------------------------------------------------------------

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """NCHW floats in [0, 1] -> NHWC uint8 for plotly's Image trace."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _label(true: str, predicted: str) -> str:
    colour = "#1a7f37" if true == predicted else "#cf222e"
    return f"{true} → <span style='color:{colour}'><b>{predicted}</b></span>"


def accuracy_figure(rows: list[dict], classes, baseline: dict[str, float]):
    import plotly.graph_objects as go  # noqa: PLC0415 - plotting only here
    from plotly.subplots import make_subplots  # noqa: PLC0415

    fig = make_subplots(rows=1, cols=2, subplot_titles=("macro accuracy (dotted: per class)", "attack success rate"))
    dash = {"fgsm": "solid", "pgd": "dash"}
    palette = {"dev": "#1f77b4", "test": "#d62728"}
    for split in sorted({r["split"] for r in rows}):
        for attack in sorted({r["attack"] for r in rows}):
            part = [r for r in rows if r["split"] == split and r["attack"] == attack]
            if not part:
                continue
            x = [r["epsilon"] for r in part]
            name = f"{split} {attack}"
            line = dict(color=palette.get(split), dash=dash.get(attack))
            fig.add_trace(go.Scatter(x=x, y=[r["macro_accuracy"] for r in part], name=name, mode="lines+markers",
                                     line=line, legendgroup=name), 1, 1)
            fig.add_trace(go.Scatter(x=x, y=[r["attack_success_rate"] for r in part], name=name, mode="lines+markers",
                                     line=line, legendgroup=name, showlegend=False), 1, 2)
            for c in classes:
                fig.add_trace(go.Scatter(x=x, y=[r[f"accuracy_{c}"] for r in part], name=f"{name} {c}",
                                         mode="lines", line=dict(color=palette.get(split), dash="dot", width=1),
                                         legendgroup=name), 1, 1)
    for value in sorted(set(round(v, 6) for v in baseline.values())):  # macro of a constant guess is 1/K on every split
        fig.add_hline(y=value, line=dict(color="grey", dash="dot"), row=1, col=1,
                      annotation_text="majority-class baseline", annotation_position="bottom right")
    fig.update_xaxes(title_text="epsilon ([0, 1] pixel scale)")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(title="Accuracy under attack", height=480, width=1100, template="plotly_white")
    return fig


def grid_indices(y: torch.Tensor, correct: torch.Tensor, n_classes: int, count: int = GRID_IMAGES) -> list[int]:
    """`count` correctly classified images, classes taken in turn, earliest first: the same images every rerun."""
    pools = [torch.nonzero((y == c) & correct).flatten().tolist() for c in range(n_classes)]
    if not any(pools):
        pools = [torch.nonzero(y == c).flatten().tolist() for c in range(n_classes)]
    chosen = []
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop(0))
    return chosen


def grid_figure(model, split, split_name: str, classes, epsilons, attack: str, options: dict):
    import plotly.graph_objects as go  # noqa: PLC0415
    from plotly.subplots import make_subplots  # noqa: PLC0415

    clean = predict_logits(model, split.x).argmax(1)
    index = grid_indices(split.y, clean == split.y, len(classes))
    x, y = split.x[index], split.y[index]
    cells, titles = [], []
    for epsilon in epsilons:
        x_adv = perturb(model, x, y, attack, epsilon, **options)
        predicted = predict_logits(model, x_adv).argmax(1).tolist()
        cells.append(to_uint8(x_adv))
        titles += [f"ε={epsilon:g}: {_label(classes[t], classes[p])}" for t, p in zip(y.tolist(), predicted)]
    fig = make_subplots(rows=len(epsilons), cols=len(index), subplot_titles=titles,
                        horizontal_spacing=0.02, vertical_spacing=0.3 / len(epsilons))
    for row, images in enumerate(cells, start=1):
        for col, image in enumerate(images, start=1):
            fig.add_trace(go.Image(z=image, hoverinfo="skip"), row, col)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_annotations(font_size=11)
    fig.update_layout(title=f"{attack.upper()} on {split_name} images: true → predicted, per epsilon",
                      height=150 * len(epsilons) + 80, width=170 * len(index) + 40,
                      margin=dict(l=10, r=10, t=80, b=10), template="plotly_white")
    return fig


def find_flip(model, split, classes, epsilons, attack: str, options: dict):
    """(index, epsilon, x_adv) of the smallest-epsilon flip, preferring car -> truck; None when nothing flips."""
    prefer = (classes.index("car"), classes.index("truck")) if {"car", "truck"} <= set(classes) else None
    clean = predict_logits(model, split.x).argmax(1)
    correct = clean == split.y
    fallback = None
    for epsilon in [e for e in epsilons if e > 0]:
        x_adv = perturb(model, split.x, split.y, attack, epsilon, **options)
        predicted = predict_logits(model, x_adv).argmax(1)
        flipped = correct & (predicted != split.y)
        if prefer is not None:
            wanted = torch.nonzero(flipped & (split.y == prefer[0]) & (predicted == prefer[1])).flatten()
            if wanted.numel():
                i = int(wanted[0])
                return i, epsilon, x_adv[i:i + 1]
        if fallback is None and flipped.any():
            i = int(torch.nonzero(flipped).flatten()[0])
            fallback = (i, epsilon, x_adv[i:i + 1])
    return fallback


def flip_figure(model, split, split_name: str, classes, epsilons, attack: str, options: dict):
    import plotly.graph_objects as go  # noqa: PLC0415
    from plotly.subplots import make_subplots  # noqa: PLC0415

    found = find_flip(model, split, classes, epsilons, attack, options)
    if found is None:  # a model that predicts one class whatever the input: nothing to flip
        index, epsilon = 0, max(epsilons)
        x_adv = perturb(model, split.x[:1], split.y[:1], attack, epsilon, **options)
        note = f"no correctly classified {split_name} image flips at any epsilon; showing {split_name} image 0"
    else:
        index, epsilon, x_adv = found
        note = f"the smallest ε that flips a correctly classified {split_name} image (car → truck preferred)"
    x = split.x[index:index + 1]
    probs = torch.softmax(predict_logits(model, torch.cat([x, x_adv])), 1).cpu()
    before, after = probs.argmax(1).tolist()
    scale = max(epsilon, 1e-12)
    noise = ((x_adv - x) / (2 * scale) + 0.5).clamp(0, 1)  # -eps..+eps stretched to black..white
    true = classes[int(split.y[index])]
    titles = (f"original: pred {classes[before]} ({probs[0, before]:.0%})",
              f"noise ×{0.5 / scale:.0f} (ε={epsilon:g})",
              f"perturbed: pred {classes[after]} ({probs[1, after]:.0%})")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.03)
    for col, image in enumerate((x, noise, x_adv), start=1):
        fig.add_trace(go.Image(z=to_uint8(image)[0], hoverinfo="skip"), 1, col)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=dict(text=f"{attack.upper()} at ε={epsilon:g} on a true {true}<br><sup>{note}</sup>"),
                      height=420, width=1000, template="plotly_white")
    return fig, {"index": index, "id": None, "true": true, "before": classes[before], "after": classes[after],
                 "epsilon": epsilon, "attack": attack, "flipped": found is not None}


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
    splits = [s for s in ("dev", "test") if s in metrics]
    kept = model_words(metrics["model"])
    out = [f"# Final model: study `{metrics['study']}`, trial {trial['number']}", "",
           f"Chosen: {trial['selection']}. Search value(s): {', '.join(f'{v:.4f}' for v in trial['values'] or [])}.",
           f"Config from {trial['config_source']}; retrained on train with seeds "
           f"{', '.join(str(r['seed']) for r in metrics['seeds'])} on {metrics['device']}. "
           + _model_sentence(metrics["model"]), "",
           _table(["setting", "value"], [[k, f"`{v}`"] for k, v in config.items() if k != "seed"]), "",
           "## Accuracy", ""]
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
    out += _candidates_section(metrics, classes)
    attack = metrics["attack"]
    pgd = f" (PGD: {attack['pgd_steps']} steps)" if "pgd" in attack["attacks"] else ""
    out += ["## Adversarial robustness", "",
            f"Attacks: {', '.join(a.upper() for a in attack['attacks'])}{pgd}. "
            "Epsilon is on the [0, 1] pixel scale; on the user's [-1, 1] inputs the same perturbation is 2 × epsilon "
            "(their eps 0.1 = 0.05 here). Success rate = share of correctly classified images the attack flips. "
            f"Sweep time: {attack['seconds']:.1f} s on {metrics['device']}.", "",
            "Full rows (per-class accuracy, counts): [fgsm.csv](fgsm.csv); everything above as data: "
            "[metrics.json](metrics.json).", ""]
    tta = config.get("tta", "none")
    if tta != "none":
        out += [f"The model as evaluated: test-time augmentation `{tta}`, the attacks differentiate through its "
                "views. The plain model (no views) below it, for comparison.", ""]
    out.append(_attack_table([r for r in rows if r.get("tta", "none") == tta], classes))
    if tta != "none":
        out += ["", "### The plain model (tta none)", "",
                _attack_table([r for r in rows if r.get("tta", "none") == "none"], classes)]
    flip = metrics["flip_example"]
    out += ["", "## Figures", ""]
    descriptions = {"accuracy_vs_epsilon": "Accuracy and attack success rate against epsilon",
                    "examples_grid": f"{GRID_IMAGES} {metrics['figure_split']} images per epsilon, true → predicted",
                    "flip_example": f"A true {flip['true']} predicted {flip['before']}, turned into {flip['after']} "
                                    f"at ε={flip['epsilon']:g} ({flip['attack'].upper()}): original, noise, perturbed"}
    for name in FIGURES:
        png = f" · [PNG]({name}.png)" if name in figures["png"] else ""
        out.append(f"- {descriptions[name]}: [{name}.html]({name}.html){png}")
    out += ["", f"PNG export: {figures['png_status']}.", ""]
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return write_atomic(path, buffer.getvalue())


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
