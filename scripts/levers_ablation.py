"""The levers' ablation (docs/results.md, "Cutout, weight averaging, test-time augmentation").

Trains a recipe and its variants with seeds 0..S-1, every config that shares
batch settings as one fused group (cnnlib.config.group_configs: members
with and without `ema` train together, a cutout changes the batches so its
variants are a group of their own), then evaluates every trained model on dev
and test with each test-time augmentation: TTA is evaluation only, so the
same weights are judged with and without it. Writes one JSON and prints the
table rows (mean test macro over the seeds, per class). With --ensemble N,
seeds 0..N-1, N..2N-1, ... also make disjoint seed ensembles (mean softmax,
cnnlib.ensemble, as `make final` keeps), each judged the same way.

    PYTHONPATH=. .venv/bin/python scripts/levers_ablation.py --space search_spaces/strong.yaml \
        --variant base --variant ema=0.99 --variant cutout=8 --variant cutout=8,ema=0.99 --out ablation.json
DATA and CLASSES are read as `make` reads them (study.options).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cnnlib.checkpoint import save_checkpoint
from cnnlib.config import TrainConfig
from cnnlib.config import group_configs
from cnnlib.ensemble import Ensemble
from cnnlib.training import DeviceData, evaluate, train_group
from cnnlib.tta import TTA_MODES, as_evaluated
from study.data import load_splits
from study.options import add_common_options, add_data_options
from study.threads import use_cpu_threads
from study.search.space_file import load_space


def variant(text: str) -> dict:
    """`base`, or `name=value,name=value` overrides of the space's config."""
    if text == "base":
        return {}
    out = {}
    for item in text.split(","):
        name, value = item.split("=")
        out[name] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="a search-space file whose values are all fixed")
    parser.add_argument("--variant", action="append", type=variant, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ensemble", type=int, default=0,
                        help="also judge disjoint ensembles of this many consecutive seeds (0: none)")
    parser.add_argument("--save", default=None, help="also keep every model here (<variant>-seed<s>.pt)")
    add_data_options(parser)
    add_common_options(parser)
    args = parser.parse_args()
    base = load_space(args.space).fixed_config().to_dict()
    if args.epochs:
        base["epochs"] = args.epochs
    data = DeviceData(load_splits(args), args.device)
    threads = use_cpu_threads(data.device)
    configs = [TrainConfig.from_dict({**base, **overrides, "seed": seed})
               for overrides in args.variant for seed in range(args.seeds)]
    rows, models, started = [None] * len(configs), [None] * len(configs), time.perf_counter()
    for group in group_configs(configs):
        group_started = time.perf_counter()
        results = train_group([configs[i] for i in group], data)
        variants = ", ".join(json.dumps(args.variant[i // args.seeds]) for i in group[::args.seeds])
        print(f"group of {len(group)} ({variants}): {time.perf_counter() - group_started:.0f} s", flush=True)
        for i, result in zip(group, results):
            if result.error is not None:
                raise result.error
            if args.save:
                name = "-".join(f"{k}{v}" for k, v in args.variant[i // args.seeds].items()) or "base"
                save_checkpoint(Path(args.save) / f"{name}-seed{configs[i].seed}.pt", result.model, configs[i],
                                data.classes, data.image_size)
            models[i] = result.model
            rows[i] = {"variant": args.variant[i // args.seeds], "seed": configs[i].seed,
                       **{f"{split}_{mode}": evaluate(as_evaluated(result.model, mode), getattr(data, split),
                                                      data.classes).to_dict()
                          for split in ("dev", "test") for mode in TTA_MODES}}
    report = {"space": args.space, "base": base, "classes": list(data.classes), "seeds": args.seeds,
              "torch": torch.__version__, "machine": f"{platform.node()} {platform.processor()} "
              f"{torch.get_num_threads()} thread(s) ({threads})", "seconds": time.perf_counter() - started,
              "rows": rows, "ensembles": ensemble_rows(args, models, data)}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    for overrides in args.variant:
        print_rows(overrides, [r for r in rows if r["variant"] == overrides], data.classes)
        if report["ensembles"]:
            print_rows(overrides, [r for r in report["ensembles"] if r["variant"] == overrides], data.classes,
                       f"ensembles of {args.ensemble}")


def ensemble_rows(args, models: list, data: DeviceData) -> list[dict]:
    """Each variant's disjoint seed ensembles, judged with each test-time augmentation."""
    size, rows = args.ensemble, []
    if size < 2:
        return rows
    for v, overrides in enumerate(args.variant):
        for first in range(0, args.seeds - size + 1, size):
            ensemble = Ensemble(models[v * args.seeds + first:v * args.seeds + first + size]).eval()
            rows.append({"variant": overrides, "seeds": list(range(first, first + size)),
                         **{f"{split}_{mode}": evaluate(as_evaluated(ensemble, mode), getattr(data, split),
                                                        data.classes).to_dict()
                            for split in ("dev", "test") for mode in TTA_MODES}})
    return rows


def print_rows(overrides: dict, mine: list[dict], classes, what: str = "") -> None:
    """One line per test-time augmentation: dev, test mean ± sd (each model's), per class."""
    label = (json.dumps(overrides) if overrides else "base") + (f" {what}" if what else "")
    for mode in TTA_MODES:
        test = [r[f"test_{mode}"] for r in mine]
        macro = [t["macro_accuracy"] for t in test]
        per = " / ".join(f"{statistics.fmean(t['per_class'][c] for t in test):.3f}" for c in classes)
        dev = statistics.fmean(r[f"dev_{mode}"]["macro_accuracy"] for r in mine)
        spread = statistics.stdev(macro) if len(macro) > 1 else 0
        print(f"{label} tta {mode}: dev {dev:.3f}  test {statistics.fmean(macro):.3f} ± {spread:.3f} "
              f"({', '.join(f'{m:.3f}' for m in macro)})  {per}", flush=True)

if __name__ == "__main__":
    main()
