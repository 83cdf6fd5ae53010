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

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cnnlib.config import MAX_EPOCHS, MAX_SEED
from cnnlib.config import TrainConfig
from cnnlib.device import cpu_threads, resolve_device
from cnnlib.sources import LabeledImages

from ..data import load_splits
from ..errors import UserError
from ..options import add_common_options, add_data_options, fraction, whole_number
from ..output import atomic_path, fresh_folder, output_name, write_atomic, write_csv, write_json
from ..progress import minutes
from .outputs import (contact_sheet_html, contact_sheet_png, write_class_distribution, write_corrections_draft,
                      write_suspects)
from .probabilities import (DYNAMICS_WINDOW, Pool, agreement_macro_accuracy, chance_warning, flip_labels,
                            out_of_fold_probabilities, pool_splits, stratified_folds, training_dynamics_probabilities,
                            window_start)

# How each image gets its predicted probabilities (see the module docstring).
METHODS = ("training_dynamics", "out_of_fold")
DEFAULT_METHOD = "training_dynamics"
DEFAULT_FOLDS = 5  # out_of_fold

# The audit's models only need to rank images, not to win: a fixed recipe per model.
# Unweighted loss on purpose (imbalance "none"): the ranking wants probabilities
# calibrated to the data's own class mix. Class weights inflate truck/cat probabilities,
# so a car labelled "cat" keeps a high self-confidence and hides.
RECIPES = {
    # The default. out_of_fold, `make audit FLIP_COUNT=100 SEED=0/1/2 AUDIT_METHOD=out_of_fold`
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
    # The user's CNN, trained out_of_fold. Measured on the real train+dev
    # (5625 images, 100 train labels flipped, 5 folds, one H200, one seed each): hits in the
    # top 100 suspects were 45/54/57 (seeds 0/1/2) at 12 epochs, 51 and 55 at 20 epochs,
    # 29 with weighted_loss and 34 with weighted_sampler; weight decay, dropout, batch size,
    # lr, jitter and 10 folds moved it less than the seed does. It plateaus near 0.6
    # precision whatever its recipe: too weak a model to rank well.
    "seed_cnn": dict(model="seed_cnn", optimizer="adam", lr=1e-3, weight_decay=5e-4, batch_size=64,
                     imbalance="none", dropout=0.1, flip=True, jitter=0.0),
}
DEFAULT_MODEL = "small_vgg"
# Epochs per model and method. training_dynamics trains one model on every image, a fifth
# of five fold models' work, so it affords more epochs in the same time.
EPOCHS = {("small_vgg", "training_dynamics"): 30, ("small_vgg", "out_of_fold"): 20,
          ("seed_cnn", "training_dynamics"): 30, ("seed_cnn", "out_of_fold"): 20}
FILTER_METHODS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
RANK_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


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


# --- the run folder ---------------------------------------------------------------


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


# --- the command: options -> images (flipped on purpose?) -> probabilities -> ranking -> files ---

def run(args) -> int:
    threads, threads_reason, names = check_options(args)
    splits = load_splits(args)
    classes = tuple(splits.classes)
    pool, given, flipped = pool_with_flips(splits, names, len(classes), args)
    labels = pool.images.labels
    config = TrainConfig.from_dict({**RECIPES[args.model], "epochs": args.epochs or EPOCHS[args.model, args.method],
                                    "seed": args.seed})
    started = time.perf_counter()
    probs, model_stats, fold_of = audit_probabilities(pool, classes, config, names, args, threads, threads_reason)
    ranked, flagged = rank_label_issues(labels, probs, args.filter_by, args.rank_by)
    seconds = time.perf_counter() - started
    per_split = {n: int((pool.split[flagged] == n).sum()) for n in names}
    print(f"{int(flagged.sum())} suspected label issues in {minutes(seconds)} "
          f"({', '.join(f'{n}: {c}' for n, c in per_split.items())}); every image ranked in suspects.csv")
    macro = agreement_macro_accuracy(labels, probs)
    warning = chance_warning(macro, len(classes))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    root = Path(args.results) / "audit"
    folder = new_run_folder(root, args.run)
    write_review_files(folder, pool, probs, ranked, flagged, classes, fold_of, args.top, warning)
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
    if len(flipped):
        summary["flip_evaluation"] = evaluate_flips(folder, pool, given, flipped, ranked, flagged, classes)
    write_json(folder / "summary.json", summary)
    point_latest(root, folder)
    print(f"wrote {folder}: suspects.csv, contact_sheet.html/.png, class_distribution.*, summary.json")
    return 0


def check_options(args) -> tuple[int, str, list[str]]:
    """Refuse options that contradict each other, fill each method's default; (threads, why, split names)."""
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
    return threads, threads_reason, names


def pool_with_flips(splits, names: list[str], n_classes: int, args) -> tuple[Pool, np.ndarray, np.ndarray]:
    """The audited images side by side, with FLIP_COUNT train labels flipped on purpose; (pool, given labels, flipped)."""
    pool = pool_splits(splits, names)
    given = pool.images.labels
    in_train = np.flatnonzero(pool.split == "train")
    flip_count = args.flip_count or int(round(args.flip_fraction * len(in_train)))
    if not flip_count:
        return pool, given, np.zeros(0, dtype=np.int64)
    if "train" not in names:
        raise UserError("--flip-count/--flip-fraction flip train labels; add train to --splits")
    labels, flipped = flip_labels(given, in_train, flip_count, n_classes, np.random.default_rng(args.seed))
    return Pool(LabeledImages(pool.images.images, labels, pool.images.ids), pool.split), given, flipped


def audit_probabilities(pool: Pool, classes, config: TrainConfig, names: list[str], args, threads: int,
                        threads_reason: str) -> tuple[np.ndarray, list[dict], np.ndarray | None]:
    """(probabilities per image, per-model stats, fold per image or None) by the method asked for."""
    images, epochs = pool.images, config.epochs
    if args.method == "training_dynamics":
        print(f"auditing {len(images)} images ({', '.join(names)}) by training dynamics: one {args.model} model, "
              f"{epochs} epochs, predictions averaged over epochs {window_start(epochs, args.window)}-{epochs}, "
              f"{threads} thread(s) ({threads_reason})")
        probs, model_stats = training_dynamics_probabilities(images, classes, config, args.window, args.device,
                                                             log=print)
        return probs, model_stats, None
    print(f"auditing {len(images)} images ({', '.join(names)}) with {args.folds}-fold cross-validation: "
          f"{args.folds} {args.model} models, {epochs} epochs each, {threads} thread(s) ({threads_reason})")
    fold_of = stratified_folds(images.labels, args.folds, args.seed)
    probs, model_stats = out_of_fold_probabilities(images, classes, fold_of, config, args.device, log=print)
    return probs, model_stats, fold_of


def write_review_files(folder: Path, pool: Pool, probs: np.ndarray, ranked: np.ndarray, flagged: np.ndarray,
                       classes, fold_of: np.ndarray | None, top: int, warning: str | None) -> None:
    """suspects.csv, corrections_draft.csv, pred_probs.csv and the contact sheet of the `top` suspects."""
    labels = pool.images.labels
    write_suspects(folder / "suspects.csv", pool, labels, probs, ranked, flagged, classes)
    write_corrections_draft(folder / "corrections_draft.csv", pool, labels, probs, ranked[flagged[ranked]], classes)
    fold_column = ["fold"] if fold_of is not None else []
    write_csv(folder / "pred_probs.csv", ["id", "split", "given_label", *fold_column, *(f"p_{c}" for c in classes)],
              [[pool.images.ids[i], pool.split[i], classes[labels[i]], *([int(fold_of[i])] if fold_column else []),
                *(f"{p:.5f}" for p in probs[i])] for i in range(len(labels))])
    shown = ranked[:top]
    title = (f"Audit {folder.name}: the {len(shown)} most suspicious of {len(ranked)} images "
             f"({int(flagged.sum())} flagged as label issues)")
    if warning:  # the same warning on every output a reviewer opens
        title += " (WARNING: audit models at chance level; these are not label errors)"
        write_atomic(folder / "WARNING.txt", f"{warning}\n")
    write_atomic(folder / "contact_sheet.html", contact_sheet_html(pool, labels, probs, shown, classes, title, warning))
    with atomic_path(folder / "contact_sheet.png") as tmp:
        contact_sheet_png(pool, labels, probs, shown, classes).save(tmp, format="PNG")


def evaluate_flips(folder: Path, pool: Pool, given: np.ndarray, flipped: np.ndarray, ranked: np.ndarray,
                   flagged: np.ndarray, classes) -> dict:
    """How many of the labels flipped on purpose the top suspects hold; flipped.csv lists each with its rank."""
    labels, flip_count = pool.images.labels, len(flipped)
    rank_of = {int(i): r for r, i in enumerate(ranked, start=1)}
    write_csv(folder / "flipped.csv", ["id", "split", "original_label", "flipped_label", "suspect_rank"],
              [[pool.images.ids[i], pool.split[i], classes[given[i]], classes[labels[i]], rank_of.get(int(i), "")]
               for i in flipped])
    at_k = precision_recall_at_k(ranked, flipped, flip_count)
    recovered = float(flagged[flipped].mean())
    print(f"flipped {flip_count} train labels on purpose: the top {flip_count} suspects hold {at_k['hits']} of them "
          f"(precision {at_k['precision']:.3f}, recall {at_k['recall']:.3f}); "
          f"the {int(flagged.sum())} flagged images hold {recovered:.1%}")
    return {"flipped": flip_count, **at_k, "recall_flagged": recovered}
