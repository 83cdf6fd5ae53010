"""What `make audit` writes for a reviewer: suspects.csv, a corrections draft, contact sheets, class counts."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnnlib.splits import Splits

from ..output import write_csv, write_html, write_json
from .probabilities import Pool

SHEET_SCALE = 4  # 32x32 -> 128x128: big enough to judge, nearest-neighbour keeps the real pixels


def suggested_labels(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The most probable class other than the given one: what a reviewer should compare against."""
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -1.0
    return others.argmax(axis=1)


def write_suspects(path: Path, pool: Pool, labels: np.ndarray, probs: np.ndarray, ranked: np.ndarray,
                   flagged: np.ndarray, classes: Sequence[str]) -> None:
    """Every image, most suspicious first; `flagged`: cleanlab's filter counts it as a label issue."""
    suggested = suggested_labels(labels, probs)
    rows = []
    for rank, i in enumerate(ranked, start=1):
        rows.append([rank, pool.images.ids[i], pool.split[i], classes[labels[i]], classes[suggested[i]],
                     f"{probs[i, labels[i]]:.4f}", f"{probs[i, suggested[i]]:.4f}", "yes" if flagged[i] else "no"])
    write_csv(path, ["rank", "id", "split", "given_label", "suggested_label", "self_confidence",
                      "suggested_probability", "flagged"], rows)


def write_corrections_draft(path: Path, pool: Pool, labels: np.ndarray, probs: np.ndarray, ranked: np.ndarray,
                            classes: Sequence[str]) -> None:
    """suspects as an `id,new_label` file: delete the rows you disagree with, edit, then pass --corrections."""
    suggested = suggested_labels(labels, probs)
    write_csv(path, ["id", "new_label", "given_label"],
               [[pool.images.ids[i], classes[suggested[i]], classes[labels[i]]] for i in ranked])


def _enlarge(image: np.ndarray) -> Image.Image:
    h, w = image.shape[:2]
    return Image.fromarray(image).resize((w * SHEET_SCALE, h * SHEET_SCALE), Image.NEAREST)


def contact_sheet_png(pool: Pool, labels: np.ndarray, probs: np.ndarray, ranked: np.ndarray,
                      classes: Sequence[str], columns: int = 8) -> Image.Image:
    """A grid of the top suspects, each enlarged with rank, given -> suggested label and self-confidence."""
    suggested = suggested_labels(labels, probs)
    font = ImageFont.load_default(size=13)
    side = pool.images.images.shape[1] * SHEET_SCALE
    caption, pad = 34, 6
    cell_w, cell_h = side + 2 * pad, side + caption + 2 * pad
    rows = max(1, -(-len(ranked) // columns))
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, i in enumerate(ranked):
        x, y = (n % columns) * cell_w + pad, (n // columns) * cell_h + pad
        sheet.paste(_enlarge(pool.images.images[i]), (x, y))
        draw.text((x, y + side + 2), f"#{n + 1} {classes[labels[i]]} -> {classes[suggested[i]]}", fill="black", font=font)
        draw.text((x, y + side + 17), f"self-conf {probs[i, labels[i]]:.2f}", fill="dimgray", font=font)
    return sheet


def contact_sheet_html(pool: Pool, labels: np.ndarray, probs: np.ndarray, ranked: np.ndarray,
                       classes: Sequence[str], title: str, warning: str | None = None) -> str:
    """Self-contained page (images inlined as base64 PNG) that opens anywhere, offline; `warning` tops it in red."""
    suggested = suggested_labels(labels, probs)
    cards = []
    for n, i in enumerate(ranked, start=1):
        buffer = io.BytesIO()
        _enlarge(pool.images.images[i]).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        cards.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(str(pool.images.ids[i]))}">'
            f"<figcaption><b>#{n}</b> given <b>{html.escape(classes[labels[i]])}</b> &rarr; "
            f"suggested <b>{html.escape(classes[suggested[i]])}</b><br>self-confidence {probs[i, labels[i]]:.3f}"
            f"<br><code>{html.escape(str(pool.images.ids[i]))}</code> ({html.escape(str(pool.split[i]))})"
            f"</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;margin:6px;width:180px;"
             "vertical-align:top;font-size:12px}img{width:160px;height:160px;image-rendering:pixelated;"
             "border:1px solid #888}code{font-size:11px;word-break:break-all}"
             ".warning{color:#b00;font-size:16px;border:2px solid #b00;padding:.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + (f"<p class='warning'><b>Warning:</b> {html.escape(warning)}</p>" if warning else "") +
            "<p>Most suspicious first. To fix a label, add <code>id,new_label</code> (or <code>drop</code>) "
            "to a corrections file and pass it with CORRECTIONS=... / --corrections.</p>"
            + "".join(cards) + "</body></html>\n")


def class_distribution(splits: Splits) -> dict[str, dict[str, int]]:
    return splits.summary()["splits"]


def write_class_distribution(folder: Path, splits: Splits) -> dict:
    import plotly.graph_objects as go  # noqa: PLC0415 - heavy import, only here

    counts = class_distribution(splits)
    classes = list(splits.classes)
    write_json(folder / "class_distribution.json", counts)
    write_csv(folder / "class_distribution.csv", ["split", *classes, "total"],
               [[name, *(row[c] for c in classes), sum(row.values())] for name, row in counts.items()])
    figure = go.Figure([go.Bar(name=name, x=classes, y=[row[c] for c in classes], text=[row[c] for c in classes])
                        for name, row in counts.items()])
    figure.update_layout(barmode="group", title="Images per class in each split", xaxis_title="class",
                         yaxis_title="images", template="plotly_white")
    # One plotly.min.js beside the page (study/output.py): it opens offline and stays small.
    write_html(figure, folder / "class_distribution.html")
    return counts
