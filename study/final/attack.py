"""make final's robustness probe: every attack at every epsilon on dev and test, and the figures of it.

The rows and pictures describe the model as evaluated (its test-time views
and all: the attacks differentiate through them). Epsilons are on the [0, 1]
pixel scale (cnnlib/attacks.py): the user's [-1, 1]-scale eps 0.1 is 0.05 here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cnnlib.attacks import attack_sweep, perturb
from cnnlib.training import DeviceData, predict_logits
from cnnlib.tta import as_evaluated

from ..output import write_csv
from .runs import eval_splits


# --- the sweep: fgsm.csv -----------------------------------------------------------

def sweep_rows(model, data: DeviceData, epsilons, attacks, pgd_steps: int, tta: str = "none") -> list[dict]:
    """fgsm.csv's rows: for each attack, each evaluated split, each epsilon, of `model` as evaluated with `tta`.

    The attacks differentiate through the test-time views (cnnlib.tta.TTAModel):
    the rows describe the model as deployed, views and all.
    """
    rows = []
    evaluated = as_evaluated(model, tta)
    for attack in attacks:
        options = {"steps": pgd_steps} if attack == "pgd" else {}
        for name, split in eval_splits(data).items():
            rows += [{"tta": tta, **r.row()}
                     for r in attack_sweep(evaluated, split, data.classes, epsilons, attack, name, **options)]
    return rows


def run_attack_sweep(model, tta: str, data: DeviceData, args, stage: Path) -> tuple[list[dict], list[dict], float]:
    """Every attack at every epsilon on dev and test, written as stage/fgsm.csv; (rows, plain rows, seconds).

    The rows attack the model as evaluated (with its test-time views); with views,
    the plain model's rows come beside them so the two can be compared.
    """
    started = time.perf_counter()
    rows = sweep_rows(model, data, args.epsilons, args.attack, args.pgd_steps, tta)
    seconds = time.perf_counter() - started
    plain_rows = sweep_rows(model, data, args.epsilons, args.attack, args.pgd_steps) if tta != "none" else []
    print(f"attack sweep: {len(rows)} rows in {seconds:.1f} s (tta {tta})"
          + (f", and the plain model's {len(plain_rows)}" if plain_rows else ""), flush=True)
    write_csv(stage / "fgsm.csv", list(rows[0]), [[row[key] for key in rows[0]] for row in rows + plain_rows])
    return rows, plain_rows, seconds


def draw_figures(model, data: DeviceData, splits, args, rows: list[dict], baseline: dict) -> tuple[dict, dict, str]:
    """(figures by name, the flip example, the split they show).

    The pictures show the held-out test images (dev when the data has no test
    split) under the first attack asked for.
    """
    figure_name = "test" if data.test is not None else "dev"
    figure_split, attack = eval_splits(data)[figure_name], args.attack[0]
    attack_options = {"steps": args.pgd_steps} if attack == "pgd" else {}
    figures = {"accuracy_vs_epsilon": accuracy_figure(rows, data.classes, {k: v.macro_accuracy for k, v in baseline.items()}),
               "examples_grid": grid_figure(model, figure_split, figure_name, data.classes, args.epsilons, attack,
                                            attack_options)}
    figures["flip_example"], flip = flip_figure(model, figure_split, figure_name, data.classes, args.epsilons, attack,
                                                attack_options)
    flip["id"] = str(getattr(splits, figure_name).ids[flip["index"]])
    return figures, flip, figure_name


def attack_record(args, seconds: float) -> dict:
    return {"attacks": list(args.attack), "epsilons": list(args.epsilons), "pgd_steps": args.pgd_steps,
            "epsilon_scale": "[0, 1] pixels; on [-1, 1] inputs the same perturbation is 2 x epsilon",
            "seconds": seconds}


# --- figures: the attack on a few images --------------------------------------

GRID_IMAGES = 5


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
