"""Trial-epochs per second: K horizontally fused trials against one trial at a time.

For each K the same K configs (both optimizers, spread learning rates and
weight decays, dropout 0.1, seeds 0..K-1: what a search asks for) are trained
as one fused group (`cnnlib.training.train_group_epochs`) next to one of them
trained alone, a group of one (`interleave.lone_trial_epochs`) and, optionally, in
the naive DataLoader loop (`study.bench.naive_loop`). The runs take turns epoch by
epoch (the leader alternating each round) so that a neighbour's load falls on
all of them alike. Per epoch, dev evaluation included, the bench records wall
seconds and process CPU seconds; figures are medians over the epochs after
warm-up. trial-epochs per second = K / fused seconds per epoch (1 / seconds
for a lone trial). On a shared, oversubscribed CPU the wall clock mostly
measures the neighbours (one unfused epoch took 2 to 12 s here within
minutes); CPU seconds measure the work, and with one thread they are what a
dedicated core would take.

Memory per member: parameters, gradients and optimizer state (exact); and
the peak during the fused run's first epoch, divided by K: on CUDA
max_memory_allocated above what was allocated before (the resident data); on
the CPU the growth of the process's RSS (a lower bound: the allocator reuses
memory that earlier runs freed).

Standalone: `python -m study.bench.fused --ks 1,4,16 --naive` (writes
RESULTS/bench/fused-<time>.json); `make bench` calls `measure_fused`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from cnnlib.config import TrainConfig
from cnnlib.model import SeedCNN
from cnnlib.splits import Splits
from cnnlib.training import DeviceData, LoopOptions, train_group_epochs

from ..output import fresh_file, timestamp, write_json
from .interleave import interleave, lone_trial_epochs

FUSED_KS = (1, 4, 16, 64)
# One warm-up epoch (oneDNN/cuDNN pick their kernels in the first steps), then two timed.
EPOCHS, WARMUP = 2, 1
BATCH_SIZE = 32  # the user's


def member_configs(k: int, epochs: int, batch_size: int = BATCH_SIZE) -> list[TrainConfig]:
    """K configs as a search would draw them: Adam and SGD alternating, lr and weight decay spread."""
    configs = []
    for i in range(k):
        spread = 2.0 ** ((i % 5 - 2) / 2)  # 0.5x .. 2x
        adam = i % 2 == 0
        configs.append(TrainConfig(optimizer="adam" if adam else "sgd", lr=(1e-3 if adam else 1e-2) * spread,
                                   momentum=0.9, weight_decay=1e-2 * spread if i % 3 else 0.0, dropout=0.1,
                                   batch_size=batch_size, epochs=epochs, seed=i))
    return configs


# --- memory ------------------------------------------------------------------------------

def state_bytes_per_member(configs: list[TrainConfig], n_params: int) -> float:
    """Parameters + gradients + optimizer state (SGD: momentum; Adam: two moments), float32."""
    per = [n_params * 4 * (2 + (1 if c.optimizer == "sgd" else 2)) for c in configs]
    return sum(per) / len(per)


# --- timing ----------------------------------------------------------------------------------

def _summary(times: dict[str, list[float]], warmup: int, trials: int) -> dict:
    out = {}
    for clock, seconds in times.items():
        timed = seconds[warmup:] or seconds
        median = statistics.median(timed)
        out[clock] = {"seconds_per_epoch": median, "trial_epochs_per_second": trials / median, "epoch_seconds": seconds}
    return out


def measure_fused(data: DeviceData, device=None, ks=FUSED_KS, epochs: int = EPOCHS, warmup: int = WARMUP,
                  batch_size: int = BATCH_SIZE, splits: Splits | None = None, naive: bool | None = None,
                  progress: Callable[[str], None] | None = print, bf16: bool = False,
                  graphs: bool = False) -> list[dict]:
    """One row per K: fused vs one trial at a time in the unfused project loop (and the naive loop:
    by default when `splits` is given), stepped epoch by epoch in turn. bf16 / graphs: also the same
    group under bf16 autocast (LoopOptions.precision) / with its step replayed as a CUDA graph
    (LoopOptions.cuda_graphs; CUDA only), its rate beside the shipped step's and its last dev accuracy."""
    naive = splits is not None if naive is None else naive
    if naive and splits is None:
        raise ValueError("timing the naive loop needs the splits")
    if device is not None and torch.device(device) != data.device:
        if splits is None:
            raise ValueError(f"data lives on {data.device}, not on {device}; pass splits to move it")
        data = DeviceData(splits, device)
    device = data.device
    variants = {name: options for name, options, wanted in
                (("bf16", LoopOptions(precision="bf16"), bf16),
                 ("graphs", LoopOptions(cuda_graphs=True), graphs and device.type == "cuda")) if wanted}
    rows = []
    if progress is not None:
        progress(HEADER)
    for k in ks:
        configs = member_configs(k, warmup + epochs, batch_size)
        runs = {"fused": train_group_epochs(configs, data), "unfused": lone_trial_epochs(configs[0], data)}
        for name, options in variants.items():
            runs[f"fused {name}"] = train_group_epochs(configs, data, options=options)
        if naive:
            from .naive_loop import naive_train_epochs

            runs["naive"] = naive_train_epochs(configs[0], splits, device)
        timed = interleave(runs, device, probe="fused")
        row = {"k": k, "device": str(device), "threads": torch.get_num_threads(), "batch_size": batch_size,
               "warmup_epochs": warmup, "timed_epochs": epochs, "train_images": len(data.train)}
        _add_rates(row, timed, k, warmup, variants)
        row["memory_per_member"] = _memory_per_member(configs, data, timed["fused"].memory_growth)
        rows.append(row)
        if progress is not None:
            progress(format_row(row))
    return rows


def _add_rates(row: dict, timed: dict, k: int, warmup: int, variants: dict) -> None:
    """Each run's seconds and trial-epochs per second, and the fused group's speedups over the others."""
    for name, run in timed.items():
        row[name] = _summary({"wall": run.wall_seconds, "cpu": run.cpu_seconds}, warmup,
                             k if name.startswith("fused") else 1)
    for name in variants:
        for clock in ("wall", "cpu"):
            row[f"{name}_speedup_{clock}"] = (row[f"fused {name}"][clock]["trial_epochs_per_second"]
                                              / row["fused"][clock]["trial_epochs_per_second"])
    row["mean_last_dev_macro"] = {name: _mean_last_dev(run) for name, run in timed.items() if name.startswith("fused")}
    for clock in ("wall", "cpu"):
        fused_rate = row["fused"][clock]["trial_epochs_per_second"]
        row[f"speedup_vs_unfused_{clock}"] = fused_rate / row["unfused"][clock]["trial_epochs_per_second"]
        if "naive" in timed:
            row[f"speedup_vs_naive_{clock}"] = fused_rate / row["naive"][clock]["trial_epochs_per_second"]


def _memory_per_member(configs, data: DeviceData, growth: float | None) -> dict:
    n_params = sum(math.prod(p.shape) for p in SeedCNN(data.n_classes, 0.0, data.image_size).parameters())
    return {
        "state_bytes": state_bytes_per_member(configs, n_params),
        "peak_growth_bytes": None if growth is None else growth / len(configs),
        "peak_growth_kind": "cuda max_memory_allocated above what was allocated before (the resident data)"
                            if data.device.type == "cuda" else
                            "peak RSS growth in the first fused epoch, sampled every 5 ms (a lower bound: "
                            "the allocator reuses what earlier runs freed)",
    }


def _mean_last_dev(run) -> float | None:
    """The members' mean dev macro accuracy after the run's last epoch (a sanity check, not an accuracy study)."""
    scores = [r.history[-1].dev.macro_accuracy for r in run.result or () if r.history]
    return statistics.fmean(scores) if scores else None


# --- report ------------------------------------------------------------------------------------

def _mib(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.2f}"


HEADER = (f"{'K':>4} {'fused s/ep':>10} {'fused tr-ep/s':>13} {'unfused':>8} {'naive':>8} "
          f"{'vs unfused':>10} {'vs naive':>9} {'(cpu time)':>16} {'state':>6} {'peak':>6}")


def format_row(row: dict) -> str:
    def rate(name):
        return f"{row[name]['wall']['trial_epochs_per_second']:.3f}" if name in row else "-"

    def speedup(key):
        return f"{row[key]:.2f}x" if key in row else "-"

    memory = row["memory_per_member"]
    return (f"{row['k']:>4} {row['fused']['wall']['seconds_per_epoch']:>10.2f} {rate('fused'):>13} "
            f"{rate('unfused'):>8} {rate('naive'):>8} {speedup('speedup_vs_unfused_wall'):>10} "
            f"{speedup('speedup_vs_naive_wall'):>9} {speedup('speedup_vs_unfused_cpu'):>8} "
            f"{speedup('speedup_vs_naive_cpu'):>8} {_mib(memory['state_bytes']):>6} "
            f"{_mib(memory['peak_growth_bytes']):>6}")


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "no fused measurements"
    first = rows[0]
    lines = [f"fused trials on {first['device']}, {first['threads']} threads, batch {first['batch_size']}, "
             f"{first['train_images']} train images; median of {first['timed_epochs']} epochs after "
             f"{first['warmup_epochs']} warm-up, runs stepped epoch by epoch in turn",
             "tr-ep/s = trial-epochs per second (wall clock); speedups = fused trial-epochs/s over one trial's, "
             "by wall clock, then by process CPU time; memory in MiB per member (parameters + gradients + "
             "optimizer state; peak growth)", HEADER]
    lines += [format_row(row) for row in rows]
    variants = format_variants(rows)
    return "\n".join(lines + ([variants] if variants else []) + [format_summary(summary(rows))])


# The user's hand tuning, one sweep at a time: about 100 trials of 100 epochs.
USER_TRIALS, USER_EPOCHS = 100, 100


def summary(rows: list[dict]) -> dict | None:
    """The K that trains the most trial-epochs per second (wall clock), and the user's tuning at that rate."""
    if not rows:
        return None
    best = max(rows, key=lambda row: row["fused"]["wall"]["trial_epochs_per_second"])
    rate = best["fused"]["wall"]["trial_epochs_per_second"]
    return {"device": best["device"], "k": best["k"], "trial_epochs_per_second": rate,
            "speedup_vs_naive_wall": best.get("speedup_vs_naive_wall"),
            "speedup_vs_naive_cpu": best.get("speedup_vs_naive_cpu"),
            "mean_last_dev_macro": best.get("mean_last_dev_macro", {}).get("fused"),
            "trials": USER_TRIALS, "epochs": USER_EPOCHS,
            "seconds_for_user_tuning": USER_TRIALS * USER_EPOCHS / rate}


def format_summary(best: dict | None) -> str:
    if best is None:
        return "no fused measurements"
    naive = (f", {best['speedup_vs_naive_wall']:.2f}x the naive loop (CPU time "
             f"{best['speedup_vs_naive_cpu']:.2f}x)") if best.get("speedup_vs_naive_wall") else ""
    seconds = best["seconds_for_user_tuning"]
    return (f"fastest on {best['device']}: K={best['k']}, {best['trial_epochs_per_second']:.2f} trial-epochs/s{naive}; "
            f"{best['trials']} trials x {best['epochs']} epochs would take {seconds:,.0f} s ({seconds / 60:.1f} min)")


VARIANT_TITLES = {"bf16": "bf16 autocast", "graphs": "CUDA graphs"}


def format_variants(rows: list[dict]) -> str:
    """A line per variant: its trial-epochs/s over the shipped step's for the same groups, and the last dev accuracies."""
    lines = []
    for name, title in VARIANT_TITLES.items():
        timed = [row for row in rows if f"{name}_speedup_wall" in row]
        if timed:
            lines.append(f"{title}, same groups: " + "; ".join(
                f"K={row['k']} {row[f'{name}_speedup_wall']:.2f}x wall, {row[f'{name}_speedup_cpu']:.2f}x cpu"
                + "".join(f", {run} dev {score:.3f}" for run, score in row["mean_last_dev_macro"].items()
                          if score is not None and run in ("fused", f"fused {name}"))
                for row in timed))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..data import load_splits
    from ..options import add_common_options, add_data_options

    parser = argparse.ArgumentParser(prog="python -m study.bench.fused", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default=",".join(map(str, FUSED_KS)), help="comma-separated group sizes K")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="timed epochs per run")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed warm-up epochs per run")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--naive", action="store_true", help="also time the naive DataLoader loop (study.bench.naive_loop)")
    parser.add_argument("--bf16", action="store_true", help="also time each group under bf16 autocast")
    parser.add_argument("--graphs", action="store_true", help="CUDA: also time each group with its step replayed as a CUDA graph")
    add_data_options(parser)
    add_common_options(parser)
    args = parser.parse_args(argv)
    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        parser.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if any(k < 1 for k in ks) or args.epochs < 1 or args.warmup < 0:
        parser.error(f"need K >= 1, --epochs >= 1, --warmup >= 0; got {ks}, {args.epochs}, {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_splits(args)
    data = DeviceData(splits, args.device)
    print(HEADER, flush=True)
    rows = measure_fused(data, ks=ks, epochs=args.epochs, warmup=args.warmup, batch_size=args.batch_size,
                         splits=splits, naive=args.naive, progress=lambda line: print(line, flush=True), bf16=args.bf16,
                         graphs=args.graphs)
    path = fresh_file(Path(args.results) / "bench", f"fused-{timestamp()}", ".json")  # never overwrite an earlier run
    write_json(path, {"torch": torch.__version__, "rows": rows})
    print()
    print(format_table(rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
