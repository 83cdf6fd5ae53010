"""What the levers cost per trial-epoch (docs/results.md): the strong recipe with and without ema, cutout and tta.

Each variant trains a group of K members (seeds 0..K-1) on the user's data;
the variants take turns epoch by epoch (study.bench.interleave: a
neighbour's load falls on all alike) and each epoch's process CPU seconds
are kept (one thread: what other work on the machine cannot inflate). An
epoch includes its dev evaluation, so a tta variant's extra is its views.
Prints, per K and variant, the median CPU seconds per trial-epoch and the
ratio to the recipe without the levers.

    PYTHONPATH=. .venv/bin/python scripts/levers_cost.py --ks 1,16 --epochs 4

With --search E: whole trials instead, as a search trains them: K members of
E-K+1..E epochs (a fused group's mixed lengths), tta none, tta flip_translate
evaluated every epoch, and flip_translate evaluated only in the objective's
last 5 epochs (the search's way: the plain model before, both in them);
total CPU seconds over all epochs per member-epoch, and the ratios.

    PYTHONPATH=. .venv/bin/python scripts/levers_cost.py --ks 1,4 --search 30
"""

from __future__ import annotations

import argparse
import statistics

import torch

from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData, train_group_epochs
from study.bench.interleave import interleave
from study.data import load_splits
from study.options import add_common_options, add_data_options
from study.search.space_file import load_space

VARIANTS = {"recipe": {}, "ema 0.999": {"ema": 0.999}, "cutout 8": {"cutout": 8},
            "ema + cutout": {"ema": 0.999, "cutout": 8}, "tta flip_translate": {"tta": "flip_translate"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/strong.yaml")
    parser.add_argument("--ks", default="1,16")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs (one more, untimed, first)")
    parser.add_argument("--search", type=int, default=None, help="whole trials of at most this many epochs")
    add_data_options(parser)
    add_common_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_space(args.space).fixed_config().to_dict()
    data = DeviceData(load_splits(args), args.device)
    if args.search:
        return search_cost(base, data, [int(k) for k in args.ks.split(",")], args.search)
    for k in map(int, args.ks.split(",")):
        runs = {name: train_group_epochs([TrainConfig.from_dict({**base, **overrides, "seed": seed,
                                                                 "epochs": args.epochs + 1}) for seed in range(k)],
                                         data)
                for name, overrides in VARIANTS.items()}
        timed = interleave(runs, data.device)
        per_epoch = {name: statistics.median(t.cpu_seconds[1:]) / k for name, t in timed.items()}
        for name, seconds in per_epoch.items():
            print(f"K={k:>2} {name:<20} {seconds:.3f} CPU s per trial-epoch  {seconds / per_epoch['recipe']:.3f}x",
                  flush=True)


OBJECTIVE_EPOCHS = 5  # default.yaml's objective_epochs


def search_cost(base: dict, data: DeviceData, ks: list[int], epochs: int) -> None:
    variants = {"tta none": ({"tta": "none"}, None), "tta flip_translate, every epoch": ({}, None),
                "tta flip_translate, last 5 epochs": ({}, OBJECTIVE_EPOCHS)}
    base = {**base, "tta": "flip_translate"}
    for k in ks:
        lengths = [epochs - k + 1 + i for i in range(k)]
        runs = {name: train_group_epochs([TrainConfig.from_dict({**base, **overrides, "seed": seed, "epochs": e})
                                          for seed, e in enumerate(lengths)], data, tta_epochs=window)
                for name, (overrides, window) in variants.items()}
        timed = interleave(runs, data.device)
        per = {name: sum(t.cpu_seconds) / sum(lengths) for name, t in timed.items()}
        for name, seconds in per.items():
            print(f"K={k:>2} epochs {lengths[0]}-{lengths[-1]} {name:<34} {seconds:.3f} CPU s per trial-epoch  "
                  f"{seconds / per['tta none']:.3f}x", flush=True)


if __name__ == "__main__":
    main()
