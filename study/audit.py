"""Find probably mislabeled images: a CNN's predicted probabilities ranked by cleanlab.

Every image of the audited splits (train and dev by default) gets predicted
probabilities, by one of two methods:
- training_dynamics (the default): one model trains on all of them, and each
  image's probabilities are its softmax at its own visits during the last
  quarter of the epochs (augmented, before each update). A network learns
  what most images of a class share before it memorizes the exceptions, so an
  image whose label contradicts its content keeps a low probability for that
  label (Swayamdipta et al. 2020, "dataset cartography"; Pleiss et al. 2020,
  "area under the margin"). One run on every image costs a fifth of five
  fold models and ranked flipped labels better here (figures at RECIPES).
- out_of_fold: K-fold cross-validation, each image predicted by the fold
  model that never saw it (confident learning's own recipe).
cleanlab then orders every image by its label quality score (self-confidence:
the probability of the given label), most suspicious first, and its
`find_label_issues` filter says which of them it counts as label issues. A
person reviews the contact sheet and confirms fixes in a corrections file
(see cnnlib/corrections.py), which every command then applies via --corrections.

--flip-count N flips N train labels on purpose before the audit and reports
how many of them the top-N suspects recover (precision/recall at k = N): the
way to check that the audit finds label noise on this data at all.
"""

from __future__ import annotations

import base64
import html
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cnnlib.device import cpu_threads, resolve_device
from cnnlib.metrics import confusion_matrix, macro_accuracy
from cnnlib.config import MAX_EPOCHS, MAX_SEED
from cnnlib.sources import LabeledImages
from cnnlib.splits import Splits
from cnnlib.training import DeviceData, TrainConfig, predict_logits, train

from . import progress
from .errors import UserError
from .output import atomic_path, fresh_folder, output_name, write_atomic, write_csv, write_html, write_json
from .options import add_common_options, add_data_options, fraction, load_splits, whole_number

# How each image gets its predicted probabilities (see the module docstring).
METHODS = ("training_dynamics", "out_of_fold")
DEFAULT_METHOD = "training_dynamics"
# training_dynamics averages each image's at-visit softmax over this share of the last epochs.
# small_vgg, 30 epochs, the user's train+dev with 100 flips (draws 0/1/2, model seed = draw):
# top-100 hits 79/76/85 averaging the last quarter, 76/76/84 the last half, 74/77/83 all epochs,
# 75/79/83 the final model's own predictions.
DYNAMICS_WINDOW = 0.25
DEFAULT_FOLDS = 5  # out_of_fold

# The audit's models only need to rank images, not to win: a fixed recipe per model.
# Unweighted loss on purpose (imbalance "none"): the ranking wants probabilities
# calibrated to the data's own class mix. Class weights inflate truck/cat probabilities,
# so a car labelled "cat" keeps a high self-confidence and hides.
RECIPES = {
    # The default (issue 18). out_of_fold, `make audit FLIP_COUNT=100 SEED=0/1/2 AUDIT_METHOD=out_of_fold`
    # on the user's train+dev (5625 images, 5 folds, 2-core CPU shared with other jobs, torch
    # 2.14.1): precision@100 0.66/0.72/0.79 (mean 0.72), out-of-fold macro accuracy
    # 0.81/0.81/0.80, 8.5 min with one thread. Two more fold draws on flip draw 0: 0.65 and
    # 0.74; averaging those two runs' probabilities 0.69 (their errors correlate 0.86), 10-view
    # test-time augmentation 0.74. One held-out fold, macro accuracy against the true labels:
    # 0.858 at 20 epochs, 0.875 at 40 (1.8x the time), 0.873 at widths 24-48-96 (about 2x),
    # 0.858 at 32-64-128, 0.851 with 4-pixel crops, 0.860 with label smoothing 0.1, 0.844 with
    # SGD-Nesterov, 0.829 at batch 256 (one run each).
    "small_vgg": dict(model="small_vgg", optimizer="adamw", lr=3e-3, weight_decay=5e-2, schedule="one_cycle",
                      warmup=0.2, batch_size=128, imbalance="none", dropout=0.0, crop=2, flip=True, jitter=0.0),
    # The user's CNN, as the audit first trained it (out_of_fold). Measured on the real train+dev
    # (5625 images, 100 train labels flipped, 5 folds, one H200, one seed each): hits in the
    # top 100 suspects were 45/54/57 (seeds 0/1/2) at 12 epochs, 51 and 55 at 20 epochs,
    # 29 with weighted_loss and 34 with weighted_sampler; weight decay, dropout, batch size,
    # lr, jitter and 10 folds moved it less than the seed does. It plateaus near 0.6
    # precision whatever its recipe (issue 18): too weak a model to rank well.
    "seed_cnn": dict(model="seed_cnn", optimizer="adam", lr=1e-3, weight_decay=5e-4, batch_size=64,
                     imbalance="none", dropout=0.1, flip=True, jitter=0.0),
}
DEFAULT_MODEL = "small_vgg"
# Epochs per model and method. training_dynamics trains one model on every image, a fifth
# of five fold models' work, so it affords more epochs in the same time.
EPOCHS = {("small_vgg", "training_dynamics"): 30, ("small_vgg", "out_of_fold"): 20,
          ("seed_cnn", "training_dynamics"): 30, ("seed_cnn", "out_of_fold"): 20}
# Below a quarter of the way from chance (1/K) to perfect, the audit's models barely agree
# with the given labels and the suspects list is mostly noise (0.5 macro for 3 classes).
NEAR_CHANCE_FRACTION = 0.25
FILTER_METHODS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
RANK_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
SHEET_SCALE = 4  # 32x32 -> 128x128: big enough to judge, nearest-neighbour keeps the real pixels


# --- pooling, flipping, folds -------------------------------------------------

@dataclass
class Pool:
    """The audited images of several splits side by side, remembering where each came from."""

    images: LabeledImages
    split: np.ndarray  # (N,) split name per image


def pool_splits(splits: Splits, names: Sequence[str]) -> Pool:
    available = splits.named()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UserError(f"--splits: {', '.join(unknown)} not available (have {', '.join(available)})")
    parts = [available[n] for n in names]
    images = LabeledImages(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                           np.concatenate([p.ids for p in parts]))
    split = np.concatenate([np.full(len(p), n, dtype=object) for n, p in zip(names, parts)]).astype(str)
    return Pool(images, split)


def flip_labels(labels: np.ndarray, candidates: np.ndarray, count: int, n_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Give `count` randomly chosen candidates a uniformly random *other* label: known label noise."""
    if count > len(candidates):
        raise UserError(f"cannot flip {count} labels among {len(candidates)} images")
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    flipped = labels.copy()
    flipped[chosen] = (labels[chosen] + rng.integers(1, n_classes, size=count)) % n_classes
    return flipped, chosen


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per image; every fold keeps the class mix (the rare classes must reach each fold)."""
    from sklearn.model_selection import StratifiedKFold  # noqa: PLC0415 - heavy import, only here

    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    if folds < 2 or smallest < folds:
        raise UserError(f"--folds {folds}: need at least 2 folds and at most the smallest class size ({smallest})")
    fold_of = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[held_out] = k
    return fold_of


def predict_probabilities(model: torch.nn.Module, x: torch.Tensor, mirror: bool = True) -> torch.Tensor:
    """Softmax probabilities; with `mirror`, averaged with the mirrored images' (the model trained on both)."""
    probs = torch.softmax(predict_logits(model, x).double(), dim=1)
    if mirror:
        probs = (probs + torch.softmax(predict_logits(model, x.flip(3)).double(), dim=1)) / 2
    return probs


def out_of_fold_probabilities(images: LabeledImages, classes: Sequence[str], fold_of: np.ndarray,
                              config: TrainConfig, device="auto",
                              log: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, list[dict]]:
    """Softmax probabilities for every image from the fold model that held it out.

    The held-out fold is the training run's "dev" split, so train()'s per-epoch
    evaluation reports how well each fold model agrees with the given labels.
    """
    device = resolve_device(device)
    probs = np.zeros((len(images), len(classes)), dtype=np.float64)
    stats, folds, started = [], int(fold_of.max()) + 1, time.perf_counter()
    for k in range(folds):
        held_out = fold_of == k
        fold = Splits(tuple(classes), images.subset(~held_out), images.subset(held_out))
        data = DeviceData(fold, device)
        label = f"fold {k + 1}/{int(fold_of.max()) + 1}"
        result = train(config, data, device,
                       on_epoch=lambda stats: progress.epoch(label, stats.epoch, config.epochs, stats.dev_macro_accuracy))
        probs[held_out] = predict_probabilities(result.model, data.dev.x, mirror=config.flip).cpu().numpy()
        dev = result.dev
        stats.append({"fold": k, "train_images": int((~held_out).sum()), "held_out_images": int(held_out.sum()),
                      "held_out_macro_accuracy": dev.macro_accuracy, "held_out_per_class": dev.per_class,
                      "seconds": round(result.seconds, 2)})
        elapsed = time.perf_counter() - started
        left = f"; about {_minutes(elapsed / (k + 1) * (folds - k - 1))} left" if k + 1 < folds else ""
        log(f"fold {k + 1}/{folds}: held-out macro accuracy {dev.macro_accuracy:.3f} "
            f"(vs given labels), {result.seconds:.0f}s{left}")
    return probs, stats


class DynamicsRecorder:
    """Each image's softmax at its training visits, summed over the window's epochs (train_members' on_batch).

    It also counts the at-visit predictions of every epoch against the given
    labels: the in-sample agreement that progress shows while the model trains.
    """

    def __init__(self, labels: torch.Tensor, n_classes: int, first_epoch: int):
        self.labels, self.n_classes, self.first_epoch = labels, n_classes, first_epoch
        self.sums = torch.zeros(len(labels), n_classes, dtype=torch.float64, device=labels.device)
        self.visits = torch.zeros(len(labels), dtype=torch.float64, device=labels.device)
        self.counts = torch.zeros(n_classes * n_classes, dtype=torch.long, device=labels.device)

    def __call__(self, epoch: int, index: torch.Tensor, logits: torch.Tensor) -> None:
        y = self.labels.index_select(0, index)
        self.counts += torch.bincount(y * self.n_classes + logits.argmax(1), minlength=self.n_classes ** 2)
        if epoch >= self.first_epoch:
            self.sums.index_add_(0, index, torch.softmax(logits.double(), dim=1))
            self.visits.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def epoch_macro_accuracy(self) -> float:
        """Macro accuracy of this epoch's at-visit predictions against the given labels; starts the next epoch's count."""
        macro = macro_accuracy(self.counts.view(self.n_classes, self.n_classes).cpu().numpy())
        self.counts.zero_()  # after: on the CPU .numpy() shares the tensor's memory
        return macro

    def probabilities(self) -> np.ndarray:
        """Mean softmax per image over its window visits (uniform for an image never visited)."""
        visits = self.visits.clamp(min=1).unsqueeze(1)
        probs = torch.where(self.visits.unsqueeze(1) > 0, self.sums / visits, 1.0 / self.n_classes)
        return probs.cpu().numpy()


def window_start(epochs: int, window: float) -> int:
    """First epoch (1-based) of the last `window` share of `epochs`: at least the last epoch."""
    if not 0 < window <= 1:
        raise UserError(f"--window {window}: the share of last epochs to average must be in (0, 1]")
    return epochs - max(1, round(window * epochs)) + 1


def training_dynamics_probabilities(images: LabeledImages, classes: Sequence[str], config: TrainConfig,
                                    window: float = DYNAMICS_WINDOW, device="auto",
                                    log: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, list[dict]]:
    """Each image's mean softmax at its visits during the last `window` of one training run on all of them."""
    device = resolve_device(device)
    nothing = images.subset(np.zeros(len(images), dtype=bool))  # no held-out split: every image trains
    data = DeviceData(Splits(tuple(classes), images, nothing), device)
    first = window_start(config.epochs, window)
    recorder = DynamicsRecorder(data.train.y, len(classes), first)

    def on_epoch(stats) -> None:
        progress.epoch("model", stats.epoch, config.epochs, recorder.epoch_macro_accuracy(), metric="in-sample macro")

    result = train(config, data, device, on_epoch=on_epoch, on_batch=recorder)
    probs = recorder.probabilities()
    log(f"trained on {len(images)} images in {result.seconds:.0f}s; probabilities averaged over epochs "
        f"{first}-{config.epochs}")
    return probs, [{"train_images": len(images), "window_epochs": [first, config.epochs],
                    "seconds": round(result.seconds, 2)}]


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min"


def agreement_macro_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro accuracy of the predicted probabilities' argmax against the given labels."""
    return macro_accuracy(confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1]))


def near_chance(macro: float, n_classes: int) -> bool:
    """True when macro accuracy is within NEAR_CHANCE_FRACTION of the way from chance (1/K) to 1."""
    chance = 1.0 / n_classes
    return not macro >= chance + NEAR_CHANCE_FRACTION * (1.0 - chance)  # NaN counts as near chance


def chance_warning(macro: float, n_classes: int) -> str | None:
    """The one warning for audit models near chance (see near_chance), else None.

    Confident learning then ranks images by the models' bias (every cat "-> car"), not by their labels.
    """
    if not near_chance(macro, n_classes):
        return None
    return (f"audit models near chance: macro accuracy {macro:.3f} against the given labels, a constant guess "
            f"scores {1 / n_classes:.3f} with {n_classes} classes; the suspects reflect the models' bias, not label "
            "errors (check the data and labels, or train longer with --epochs)")


# --- ranking --------------------------------------------------------------------

def rank_label_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str = "prune_by_noise_rate",
                      rank_by: str = "self_confidence") -> tuple[np.ndarray, np.ndarray]:
    """Every image's index, most suspicious first by cleanlab's label quality score, and cleanlab's flag per image.

    The whole ranking, not only the flagged images: on the user's data the
    images the filter leaves out still hold flips, and the filter counts too
    few issues when in-sample probabilities are confident (training
    dynamics: 60-78 of 100 flips' worth). Out of fold, ranking every image by
    self-confidence also found a few more flips in the top 100 than ranking
    the filter's issues (0.69/0.73/0.79 against 0.66/0.72/0.79).
    """
    from cleanlab.filter import find_label_issues  # noqa: PLC0415 - heavy imports, only here
    from cleanlab.rank import get_label_quality_scores  # noqa: PLC0415

    scores = get_label_quality_scores(labels, probs, method=rank_by)
    ranked = np.lexsort((np.arange(len(labels)), scores)).astype(np.int64)  # ties: lower index first
    # n_jobs=1: the pool is small and multiprocessing on a shared 2-core box only adds start-up time.
    flagged = np.asarray(find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1), dtype=bool)
    return ranked, flagged


def suggested_labels(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The most probable class other than the given one: what a reviewer should compare against."""
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -1.0
    return others.argmax(axis=1)


def precision_recall_at_k(ranked: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """How many of the top-k suspects are in `truth` (the images flipped on purpose).

    With fewer than k suspects, precision is over the suspects listed and
    recall still counts every flipped image, so a short list is not rewarded.
    """
    top = ranked[:k]
    hits = int(np.isin(top, truth).sum())
    return {"k": int(k), "suspects_considered": int(len(top)), "hits": hits,
            "precision": hits / len(top) if len(top) else float("nan"),
            "recall": hits / len(truth) if len(truth) else float("nan")}


# --- outputs --------------------------------------------------------------------

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


def new_run_folder(root: Path, name: str | None) -> Path:
    """results/audit/<name>, never reusing an existing folder; `latest` points at the newest run."""
    return fresh_folder(root, name or None)


def point_latest(root: Path, folder: Path) -> None:
    link, tmp = root / "latest", root / f".latest-{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(folder.name, tmp)
        os.replace(tmp, link)
    except OSError:
        write_atomic(root / "LATEST", folder.name + "\n")  # file systems without symlinks


# --- command --------------------------------------------------------------------

def add_arguments(parser) -> None:
    add_data_options(parser)
    add_common_options(parser)
    group = parser.add_argument_group("audit")
    group.add_argument("--splits", default="train,dev", help="comma-separated splits to audit together")
    group.add_argument("--method", choices=METHODS, default=os.environ.get("AUDIT_METHOD") or DEFAULT_METHOD,
                       help="how each image gets its probabilities: training_dynamics (one model on every image, "
                            "its predictions averaged over the last epochs) or out_of_fold (cross-validation); "
                            "env AUDIT_METHOD")
    group.add_argument("--window", type=float, default=None,
                       help=f"training_dynamics: share of the last epochs whose predictions are averaged "
                            f"(default {DYNAMICS_WINDOW})")
    group.add_argument("--folds", type=int, default=None,
                       help=f"out_of_fold: cross-validation folds, each image predicted by a model that never saw "
                            f"it (default {DEFAULT_FOLDS})")
    group.add_argument("--model", choices=tuple(RECIPES), default=DEFAULT_MODEL,
                       help="architecture and training recipe of the audit's models (small_vgg: the default; "
                            "seed_cnn: the user's CNN)")
    group.add_argument("--epochs", type=whole_number("--epochs", 1, MAX_EPOCHS), default=None,
                       help="epochs per model (default: EPOCHS for the model and method)")
    group.add_argument("--seed", type=whole_number("SEED", 0, MAX_SEED), default=os.environ.get("SEED") or "0",
                       help="seed of the folds, the models and the flips (env SEED: `make audit FLIP_COUNT=100 SEED=1` "
                            "is another flip draw)")
    group.add_argument("--filter-by", choices=FILTER_METHODS, default="prune_by_noise_rate",
                       help="cleanlab's rule for which images it counts as label issues (the flagged column)")
    group.add_argument("--rank-by", choices=RANK_METHODS, default="self_confidence",
                       help="cleanlab's label quality score that orders the images")
    # Default: one thread per core on a quiet machine, one thread when other work keeps the cores
    # busy (cnnlib.device.cpu_threads): there 2 threads spin-wait. small_vgg at load ~4-5 on the
    # 2-core box: 100 s per fold with 1 thread, 180-430 s with 2.
    group.add_argument("--threads", type=whole_number("THREADS", 1), default=os.environ.get("THREADS") or None,
                       help="CPU threads for training (env THREADS; default: one per core, or 1 when the "
                            "machine is already busy)")
    group.add_argument("--top", type=whole_number("--top"), default=48, help="suspects shown on the contact sheet")
    group.add_argument("--run", type=output_name("--run"), default=None,
                       help="run folder name under RESULTS/audit (default: a timestamp)")
    flips = group.add_mutually_exclusive_group()
    flips.add_argument("--flip-count", type=whole_number("FLIP_COUNT"), default=os.environ.get("FLIP_COUNT") or 0,
                       help="evaluation only: flip this many train labels on purpose and report precision/recall "
                            "at k (env FLIP_COUNT, so `make audit FLIP_COUNT=100` works)")
    flips.add_argument("--flip-fraction", type=fraction("--flip-fraction"), default=0.0, help="evaluation only: like --flip-count, as a fraction of train")


def run(args) -> int:
    if args.method not in METHODS:  # argparse checks choices on the command line, not the env default
        raise UserError(f"AUDIT_METHOD / --method {args.method!r}: choose {' or '.join(METHODS)}")
    # Each method's own option means nothing to the other: refuse it rather than ignore it.
    if args.method == "training_dynamics" and args.folds is not None:
        raise UserError("--folds is an option of --method out_of_fold; training_dynamics trains one model on every image")
    if args.method == "out_of_fold" and args.window is not None:
        raise UserError("--window is an option of --method training_dynamics; out_of_fold predicts each image once")
    args.folds = DEFAULT_FOLDS if args.folds is None else args.folds
    args.window = DYNAMICS_WINDOW if args.window is None else args.window
    threads, threads_reason = cpu_threads(args.threads)
    torch.set_num_threads(threads)
    names = [n.strip() for n in args.splits.split(",") if n.strip()]
    if not names:
        raise UserError("--splits names no split (e.g. train,dev)")
    splits = load_splits(args)
    classes = tuple(splits.classes)
    pool = pool_splits(splits, names)
    given = labels = pool.images.labels
    in_train = np.flatnonzero(pool.split == "train")
    flip_count = args.flip_count or int(round(args.flip_fraction * len(in_train)))
    flipped = np.zeros(0, dtype=np.int64)
    if flip_count:
        if "train" not in names:
            raise UserError("--flip-count/--flip-fraction flip train labels; add train to --splits")
        labels, flipped = flip_labels(given, in_train, flip_count, len(classes), np.random.default_rng(args.seed))
        pool = Pool(LabeledImages(pool.images.images, labels, pool.images.ids), pool.split)

    recipe = RECIPES[args.model]
    epochs = args.epochs or EPOCHS[args.model, args.method]
    config = TrainConfig.from_dict({**recipe, "epochs": epochs, "seed": args.seed})
    started = time.perf_counter()
    fold_of = None
    if args.method == "training_dynamics":
        print(f"auditing {len(labels)} images ({', '.join(names)}) by training dynamics: one {args.model} model, "
              f"{epochs} epochs, predictions averaged over epochs {window_start(epochs, args.window)}-{epochs}, "
              f"{threads} thread(s) ({threads_reason})")
        probs, model_stats = training_dynamics_probabilities(pool.images, classes, config, args.window, args.device,
                                                             log=print)
    else:
        print(f"auditing {len(labels)} images ({', '.join(names)}) with {args.folds}-fold cross-validation: "
              f"{args.folds} {args.model} models, {epochs} epochs each, {threads} thread(s) ({threads_reason})")
        fold_of = stratified_folds(labels, args.folds, args.seed)
        probs, model_stats = out_of_fold_probabilities(pool.images, classes, fold_of, config, args.device, log=print)
    ranked, flagged = rank_label_issues(labels, probs, args.filter_by, args.rank_by)
    seconds = time.perf_counter() - started
    per_split = {n: int((pool.split[flagged] == n).sum()) for n in names}
    print(f"{int(flagged.sum())} suspected label issues in {_minutes(seconds)} "
          f"({', '.join(f'{n}: {c}' for n, c in per_split.items())}); every image ranked in suspects.csv")
    macro = agreement_macro_accuracy(labels, probs)
    warning = chance_warning(macro, len(classes))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    root = Path(args.results) / "audit"
    folder = new_run_folder(root, args.run)
    write_suspects(folder / "suspects.csv", pool, labels, probs, ranked, flagged, classes)
    write_corrections_draft(folder / "corrections_draft.csv", pool, labels, probs, ranked[flagged[ranked]], classes)
    fold_column = ["fold"] if fold_of is not None else []
    write_csv(folder / "pred_probs.csv", ["id", "split", "given_label", *fold_column, *(f"p_{c}" for c in classes)],
               [[pool.images.ids[i], pool.split[i], classes[labels[i]], *([int(fold_of[i])] if fold_column else []),
                 *(f"{p:.5f}" for p in probs[i])] for i in range(len(labels))])
    top = ranked[:args.top]
    title = (f"Audit {folder.name}: the {len(top)} most suspicious of {len(ranked)} images "
             f"({int(flagged.sum())} flagged as label issues)")
    if warning:  # the same warning on every output a reviewer opens
        title += " (WARNING: audit models at chance level; these are not label errors)"
        write_atomic(folder / "WARNING.txt", f"{warning}\n")
    write_atomic(folder / "contact_sheet.html", contact_sheet_html(pool, labels, probs, top, classes, title, warning))
    with atomic_path(folder / "contact_sheet.png") as tmp:
        contact_sheet_png(pool, labels, probs, top, classes).save(tmp, format="PNG")
    counts = write_class_distribution(folder, splits)  # as loaded: corrections applied, no flips

    summary = {"run": folder.name, "source": splits.source, "corrections": args.corrections, "splits": names,
               "images": int(len(labels)), "classes": list(classes), "method": args.method,
               "window": args.window if args.method == "training_dynamics" else None,
               "folds": args.folds if args.method == "out_of_fold" else None,
               "model": args.model, "recipe": config.to_dict(), "threads": threads,
               "macro_accuracy_vs_given_labels": macro,
               "macro_accuracy_kind": "in-sample, at each image's training visits in the window"
                                      if args.method == "training_dynamics" else "out-of-fold",
               "warning": warning, "device": str(resolve_device(args.device)), "filter_by": args.filter_by,
               "rank_by": args.rank_by, "suspects": int(flagged.sum()), "suspects_per_split": per_split,
               "seconds": round(seconds, 1), "model_stats": model_stats, "class_distribution": counts,
               "models_at_chance": warning is not None}
    if flip_count:
        rank_of = {int(i): r for r, i in enumerate(ranked, start=1)}
        write_csv(folder / "flipped.csv", ["id", "split", "original_label", "flipped_label", "suspect_rank"],
                   [[pool.images.ids[i], pool.split[i], classes[given[i]], classes[labels[i]], rank_of.get(int(i), "")]
                    for i in flipped])
        at_k = precision_recall_at_k(ranked, flipped, flip_count)
        recovered = float(flagged[flipped].mean())
        summary["flip_evaluation"] = {"flipped": flip_count, **at_k, "recall_flagged": recovered}
        print(f"flipped {flip_count} train labels on purpose: the top {flip_count} suspects hold {at_k['hits']} of them "
              f"(precision {at_k['precision']:.3f}, recall {at_k['recall']:.3f}); "
              f"the {int(flagged.sum())} flagged images hold {recovered:.1%}")
    write_json(folder / "summary.json", summary)
    point_latest(root, folder)
    print(f"wrote {folder}: suspects.csv, contact_sheet.html/.png, class_distribution.*, summary.json")
    return 0
