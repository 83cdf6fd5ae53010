"""Evaluate a checkpoint on one split: macro accuracy, per-class accuracy and the confusion matrix.

This is the user's "evaluate a given model" step. It also shows the
majority-class predictor (`--no-baseline` hides it): the ~33% macro accuracy
that an "always car" model scores on the imbalanced dev set while its plain
accuracy looks like 80%.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cnnlib.atomic import write_json
from cnnlib.checkpoint import load_checkpoint
from cnnlib.device import resolve_device
from cnnlib.ensemble import Ensemble, first_member
from cnnlib.errors import CheckpointError
from cnnlib.losses import make_criterion
from cnnlib.metrics import majority_baseline
from cnnlib.model import flat_features
from cnnlib.sources import parse_classes
from cnnlib.training import DeviceSplit, evaluate
from cnnlib.tta import TTA_MODES, VIEW_COUNTS, as_evaluated

from .data import load_splits
from .errors import UserError
from .options import add_common_options, add_data_options, env
from .output import output_place
from .threads import use_cpu_threads

SPLITS = ("train", "dev", "test")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", default=os.environ.get("CHECKPOINT") or None,
                        help="model.pt written by `make train` or `make final` (env CHECKPOINT)")
    parser.add_argument("--split", default=os.environ.get("SPLIT") or "dev", choices=SPLITS,
                        help="which split to evaluate on (env SPLIT)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also show the majority-class baseline (on by default, so `make evaluate` shows it)")
    parser.add_argument("--json", type=output_place("EVAL_JSON / --json", folder=False), default=env("EVAL_JSON"),
                        help="also write the evaluation to this JSON file (env EVAL_JSON)")
    parser.add_argument("--tta", default=os.environ.get("TTA") or None, choices=TTA_MODES,
                        help="test-time augmentation views (env TTA; default: the checkpoint's own `tta`)")
    add_data_options(parser)  # CLASSES, when given, must be the checkpoint's order (run refuses another)
    add_common_options(parser)


def _newest_checkpoint(results: Path) -> Path | None:
    found = sorted((results / "runs").glob("*/model.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _fits(model, image_size: int) -> bool:
    try:
        return flat_features(image_size) == first_member(model).classifier[1].in_features
    except ValueError:
        return False


def model_record(model, config, extra: dict, tta: str) -> dict:
    """What is evaluated: its member networks, their seeds and the views each sees.

    An ensemble's config is its first member's, seed and all; its members' seeds
    are the ones `make final` recorded beside it (None when it recorded none).
    """
    members = len(model.members) if isinstance(model, Ensemble) else 1
    seeds = extra.get("seeds") if members > 1 else [config.seed]
    if not (isinstance(seeds, list) and len(seeds) == members and all(type(s) is int for s in seeds)):
        seeds = None
    return {"members": members, "seeds": seeds, "views": VIEW_COUNTS[tta], "tta": tta}


def model_words(what: dict) -> str:
    """'ensemble of 3 networks (seeds 0, 1, 2), each seeing 10 views (tta flip_translate): 30 forwards an image'."""
    views = f"{what['views']} view{'s' if what['views'] > 1 else ''} (tta {what['tta']})"
    seeds = ", ".join(map(str, what["seeds"])) if what["seeds"] else "not recorded"
    if what["members"] == 1:
        return f"one network (seed {seeds}), seeing {views}"
    return (f"ensemble of {what['members']} networks (seeds {seeds}), each seeing {views}: "
            f"{what['members'] * what['views']} forwards an image")


def run(args) -> int:
    if not args.checkpoint:
        newest = _newest_checkpoint(Path(args.results))
        hint = f" (newest here: CHECKPOINT={newest})" if newest else " (train one with `make train`)"
        raise UserError(f"no checkpoint given: pass --checkpoint PATH or CHECKPOINT=PATH{hint}")
    device = resolve_device(args.device)
    use_cpu_threads(device)
    model, config, classes, extra = load_checkpoint(Path(args.checkpoint), device)
    # The class order comes from the checkpoint: labels must mean what they meant in training.
    if args.classes and tuple(parse_classes(args.classes)) != tuple(classes):
        raise UserError(f"CLASSES={args.classes!r}: {args.checkpoint} was trained for classes {','.join(classes)}; "
                        "leave CLASSES empty to use its order")
    args.classes = ",".join(classes)
    splits = load_splits(args)
    if tuple(splits.classes) != tuple(classes):
        raise CheckpointError(f"{args.checkpoint}: trained for classes {','.join(classes)}, "
                              f"but the data was read as {','.join(splits.classes)} (check --classes)")
    split = getattr(splits, args.split)
    if split is None:
        raise UserError(f"{splits.source}: has no {args.split} split (an array folder needs {args.split}.npz)")
    size = split.images.shape[1]
    if not _fits(model, size):
        raise CheckpointError(f"{args.checkpoint}: model was trained on other image sizes; "
                              f"the {args.split} images are {size}x{size}")
    # The loss uses the training criterion (class-weighted when the run was), so it matches the run's dev loss.
    criterion = make_criterion(config, DeviceSplit(splits.train, device).y, len(classes))
    tta = args.tta or config.tta
    if tta not in TTA_MODES:  # TTA from the environment skips argparse's choices
        raise UserError(f"TTA={tta!r}: expected one of {', '.join(TTA_MODES)}")
    evaluation = evaluate(as_evaluated(model, tta), DeviceSplit(split, device), classes, criterion)

    what = model_record(model, config, extra, tta)
    shown = {k: v for k, v in config.to_dict().items() if k != "seed" or what["members"] == 1}
    print(f"checkpoint: {args.checkpoint}  (config {shown})")
    print(f"model:      {model_words(what)}")
    print(f"tta:        {tta}{'' if tta == config.tta else f' (the checkpoint says {config.tta})'}")
    print(f"data:       {splits.source}, {args.split} split, {len(split)} images")
    print(evaluation.format(f"{args.split}:"))
    report = {"checkpoint": str(args.checkpoint), "split": args.split, "classes": list(classes), "tta": tta,
              "model": what, "config": shown, "checkpoint_extra": extra, "evaluation": evaluation.to_dict()}
    if args.baseline:
        majority = majority_baseline(splits.train.labels, split.labels, len(classes), classes)
        name = classes[int(majority.confusion.sum(axis=0).argmax())] if len(split) else "?"
        print(majority.format(f"majority-class baseline (always '{name}', the most frequent train class):"))
        print(f"  plain accuracy of that baseline: {majority.accuracy:.1%}; "
              f"macro accuracy: {majority.macro_accuracy:.1%}")
        report["majority_baseline"] = majority.to_dict()
    if args.json:
        print(f"wrote: {write_json(Path(args.json), report)}")
    return 0
