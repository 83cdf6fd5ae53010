"""Find probably mislabeled images: K-fold out-of-fold CNN probabilities ranked by confident learning.

Every image of the audited splits (train and dev by default) gets predicted
probabilities from a fold model that never saw it; cleanlab's
`find_label_issues` (confident learning) then flags the images whose given
label the models confidently disagree with, worst first. A person reviews the
contact sheet and confirms fixes in a corrections file (see
cnnlib/corrections.py), which every command then applies via --corrections.

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
from cnnlib.sources import LabeledImages
from cnnlib.splits import Splits
from cnnlib.training import DeviceData, TrainConfig, predict_logits, train

from . import progress
from .errors import UserError
from .output import atomic_path, fresh_folder, write_atomic, write_csv, write_html, write_json
from .options import add_common_options, add_data_options, load_splits, whole_number

# The fold models only need to rank images, not to win: a fixed recipe per fold model.
# Unweighted loss on purpose (imbalance "none"): confident learning wants probabilities
# calibrated to the data's own class mix. Class weights inflate truck/cat probabilities,
# so a car labelled "cat" keeps a high self-confidence and hides.
FOLD_RECIPES = {
    # The default (issue 18). `make audit FLIP_COUNT=100 SEED=0/1/2` on the user's train+dev
    # (5625 images, 5 folds, 2-core CPU shared with other jobs, torch 2.14.1): precision@100
    # 0.66/0.72/0.79 (mean 0.72), out-of-fold macro accuracy 0.81/0.81/0.80, 8.5 min with one
    # thread (27 min with two: the neighbours' load made them spin-wait). Two more fold draws
    # on flip draw 0: 0.65 and 0.74. Averaging those two runs' probabilities gave 0.69 (their
    # errors correlate 0.86), 10-view test-time augmentation 0.74 (unchanged). One held-out
    # fold, macro accuracy against the true labels: 0.858 at 20 epochs, 0.875 at 40 (1.8x the
    # time), 0.873 at widths 24-48-96 (about 2x), 0.858 at 32-64-128, 0.851 with 4-pixel crops,
    # 0.860 with label smoothing 0.1, 0.844 with SGD-Nesterov, 0.829 at batch 256 (one run
    # each). The two gains (+0.017, +0.015) cost about 2x, past 10 minutes on the busy CPU, and
    # are small beside the spread between fold draws, so the 20-epoch net is the default.
    "small_vgg": dict(model="small_vgg", optimizer="adamw", lr=3e-3, weight_decay=5e-2, schedule="one_cycle",
                      warmup=0.2, batch_size=128, epochs=20, imbalance="none", dropout=0.0, crop=2, flip=True,
                      jitter=0.0),
    # The user's CNN, as the audit first trained it. Measured on the real train+dev
    # (5625 images, 100 train labels flipped, 5 folds, one H200, one seed each): hits in the
    # top 100 suspects were 45/54/57 (seeds 0/1/2) at 12 epochs, 51 and 55 at 20 epochs,
    # 29 with weighted_loss and 34 with weighted_sampler; weight decay, dropout, batch size,
    # lr, jitter and 10 folds moved it less than the seed does. 20 epochs helps small sets
    # (600 images: mean 13.1 vs 10.1 hits of 30 over 8 draws). It plateaus near 0.6
    # precision whatever its recipe (issue 18): too weak a model to rank well.
    "seed_cnn": dict(model="seed_cnn", optimizer="adam", lr=1e-3, weight_decay=5e-4, batch_size=64, epochs=20,
                     imbalance="none", dropout=0.1, flip=True, jitter=0.0),
}
DEFAULT_FOLD_MODEL = "small_vgg"
# Below a quarter of the way from chance (1/K) to perfect, the fold models barely agree
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


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min"


def out_of_fold_macro_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro accuracy of the out-of-fold predictions against the given labels."""
    return macro_accuracy(confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1]))


def near_chance(macro: float, n_classes: int) -> bool:
    """True when macro accuracy is within NEAR_CHANCE_FRACTION of the way from chance (1/K) to 1."""
    chance = 1.0 / n_classes
    return not macro >= chance + NEAR_CHANCE_FRACTION * (1.0 - chance)  # NaN counts as near chance


def chance_warning(macro: float, n_classes: int) -> str | None:
    """The one warning for fold models near chance (see near_chance), else None.

    Confident learning then ranks images by the models' bias (every cat "-> car"), not by their labels.
    """
    if not near_chance(macro, n_classes):
        return None
    return (f"fold models near chance: out-of-fold macro accuracy {macro:.3f}, a constant guess scores "
            f"{1 / n_classes:.3f} with {n_classes} classes; the suspects reflect the models' bias, not label "
            "errors (check the data and labels, or train the fold models longer with --epochs)")


# --- ranking --------------------------------------------------------------------

def rank_label_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str = "prune_by_noise_rate",
                      rank_by: str = "self_confidence") -> np.ndarray:
    """Indices of the images cleanlab flags as label issues, most suspicious first."""
    from cleanlab.filter import find_label_issues  # noqa: PLC0415 - heavy import, only here

    # n_jobs=1: the pool is small and multiprocessing on a shared 2-core box only adds start-up time.
    return np.asarray(find_label_issues(labels, probs, filter_by=filter_by, return_indices_ranked_by=rank_by,
                                        n_jobs=1), dtype=np.int64)


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
                   classes: Sequence[str]) -> None:
    suggested = suggested_labels(labels, probs)
    rows = []
    for rank, i in enumerate(ranked, start=1):
        rows.append([rank, pool.images.ids[i], pool.split[i], classes[labels[i]], classes[suggested[i]],
                     f"{probs[i, labels[i]]:.4f}", f"{probs[i, suggested[i]]:.4f}"])
    write_csv(path, ["rank", "id", "split", "given_label", "suggested_label", "self_confidence",
                      "suggested_probability"], rows)


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
    group.add_argument("--folds", type=int, default=5, help="cross-validation folds (each image predicted by a model that never saw it)")
    group.add_argument("--fold-model", choices=tuple(FOLD_RECIPES), default=DEFAULT_FOLD_MODEL,
                       help="architecture and training recipe of the fold models (small_vgg: the default; seed_cnn: the user's CNN)")
    group.add_argument("--epochs", type=int, default=None, help="epochs per fold model (default: the fold model's recipe)")
    group.add_argument("--seed", type=int, default=int(os.environ.get("SEED") or 0),
                       help="seed of the folds, the fold models and the flips (env SEED: `make audit FLIP_COUNT=100 SEED=1` "
                            "is another flip draw)")
    group.add_argument("--filter-by", choices=FILTER_METHODS, default="prune_by_noise_rate",
                       help="cleanlab's rule for which images are label issues")
    group.add_argument("--rank-by", choices=RANK_METHODS, default="self_confidence",
                       help="cleanlab's score that orders the issues")
    # Default: one thread per core on a quiet machine, one thread when other work keeps the cores
    # busy (cnnlib.device.cpu_threads): there 2 threads spin-wait. small_vgg at load ~4-5 on the
    # 2-core box: 100 s per fold with 1 thread, 180-430 s with 2.
    group.add_argument("--threads", type=whole_number("THREADS", 1), default=os.environ.get("THREADS") or None,
                       help="CPU threads for training (env THREADS; default: one per core, or 1 when the "
                            "machine is already busy)")
    group.add_argument("--top", type=int, default=48, help="suspects shown on the contact sheet")
    group.add_argument("--run", default=None, help="run folder name under RESULTS/audit (default: a timestamp)")
    flips = group.add_mutually_exclusive_group()
    flips.add_argument("--flip-count", type=int, default=os.environ.get("FLIP_COUNT") or 0,
                       help="evaluation only: flip this many train labels on purpose and report precision/recall "
                            "at k (env FLIP_COUNT, so `make audit FLIP_COUNT=100` works)")
    flips.add_argument("--flip-fraction", type=float, default=0.0, help="evaluation only: like --flip-count, as a fraction of train")


def run(args) -> int:
    if args.top < 0 or (args.epochs is not None and args.epochs < 1) or args.flip_count < 0 or not 0 <= args.flip_fraction < 1:
        raise UserError("need --top >= 0, --epochs >= 1, --flip-count >= 0 and 0 <= --flip-fraction < 1")
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

    recipe = FOLD_RECIPES[args.fold_model]
    config = TrainConfig.from_dict({**recipe, "epochs": args.epochs or recipe["epochs"], "seed": args.seed})
    print(f"auditing {len(labels)} images ({', '.join(names)}) with {args.folds}-fold cross-validation: "
          f"{args.folds} {args.fold_model} models, {config.epochs} epochs each, {threads} thread(s) ({threads_reason})")
    started = time.perf_counter()
    fold_of = stratified_folds(labels, args.folds, args.seed)
    probs, fold_stats = out_of_fold_probabilities(pool.images, classes, fold_of, config, args.device, log=print)
    ranked = rank_label_issues(labels, probs, args.filter_by, args.rank_by)
    seconds = time.perf_counter() - started
    per_split = {n: int((pool.split[ranked] == n).sum()) for n in names}
    print(f"{len(ranked)} suspected label issues in {_minutes(seconds)} "
          f"({', '.join(f'{n}: {c}' for n, c in per_split.items())})")
    macro = out_of_fold_macro_accuracy(labels, probs)
    warning = chance_warning(macro, len(classes))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    root = Path(args.results) / "audit"
    folder = new_run_folder(root, args.run)
    write_suspects(folder / "suspects.csv", pool, labels, probs, ranked, classes)
    write_corrections_draft(folder / "corrections_draft.csv", pool, labels, probs, ranked, classes)
    write_csv(folder / "pred_probs.csv", ["id", "split", "given_label", "fold", *(f"p_{c}" for c in classes)],
               [[pool.images.ids[i], pool.split[i], classes[labels[i]], int(fold_of[i]),
                 *(f"{p:.5f}" for p in probs[i])] for i in range(len(labels))])
    top = ranked[:args.top]
    title = f"Audit {folder.name}: top {len(top)} of {len(ranked)} suspected label issues"
    if warning:  # the same warning on every output a reviewer opens
        title += " (WARNING: fold models at chance level; these are not label errors)"
        write_atomic(folder / "WARNING.txt", f"{warning}\n")
    write_atomic(folder / "contact_sheet.html", contact_sheet_html(pool, labels, probs, top, classes, title, warning))
    with atomic_path(folder / "contact_sheet.png") as tmp:
        contact_sheet_png(pool, labels, probs, top, classes).save(tmp, format="PNG")
    counts = write_class_distribution(folder, splits)  # as loaded: corrections applied, no flips

    summary = {"run": folder.name, "source": splits.source, "corrections": args.corrections, "splits": names,
               "images": int(len(labels)), "classes": list(classes), "folds": args.folds,
               "fold_model": args.fold_model, "recipe": config.to_dict(), "threads": threads,
               "out_of_fold_macro_accuracy": macro, "warning": warning,
               "device": str(resolve_device(args.device)), "filter_by": args.filter_by, "rank_by": args.rank_by,
               "suspects": int(len(ranked)), "suspects_per_split": per_split, "seconds": round(seconds, 1),
               "fold_stats": fold_stats, "class_distribution": counts,
               "fold_models_at_chance": warning is not None}
    if flip_count:
        rank_of = {int(i): r for r, i in enumerate(ranked, start=1)}
        write_csv(folder / "flipped.csv", ["id", "split", "original_label", "flipped_label", "suspect_rank"],
                   [[pool.images.ids[i], pool.split[i], classes[given[i]], classes[labels[i]], rank_of.get(int(i), "")]
                    for i in flipped])
        at_k = precision_recall_at_k(ranked, flipped, flip_count)
        recovered = float(np.isin(flipped, ranked).mean())
        summary["flip_evaluation"] = {"flipped": flip_count, **at_k, "recall_all_suspects": recovered}
        print(f"flipped {flip_count} train labels on purpose: the top {flip_count} suspects hold {at_k['hits']} of them "
              f"(precision {at_k['precision']:.3f}, recall {at_k['recall']:.3f}); "
              f"all {len(ranked)} suspects hold {recovered:.1%}")
    write_json(folder / "summary.json", summary)
    point_latest(root, folder)
    print(f"wrote {folder}: suspects.csv, contact_sheet.html/.png, class_distribution.*, summary.json")
    return 0
