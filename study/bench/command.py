"""Time the project training loop against a naive DataLoader loop on the user's split (`make bench`).

Both loops train the same SeedCNN from the same initial weights with the same
TrainConfig (the user's recipe: Adam, lr 1e-3, weighted loss; batch sizes
16, 32, 128), 5,000 train images and dev evaluated every epoch; the naive loop
is `study/bench/naive_loop.py` (per-sample torchvision transforms, DataLoader). They
run in one process and take turns epoch by epoch (the leader alternates each
round), so a neighbour's load on a shared machine falls on both alike; each run
keeps its own global RNG stream, so an interleaved run draws exactly what it
would alone. Seconds per epoch are the median over the epochs after warm-up,
in wall time and in process CPU time (the figure to trust with one thread on
a busy machine). Writes RESULTS/bench/bench.json and a timestamped copy.

`--levers` also A/Bs the project loop against each speed lever switched off,
`--recipe-epochs 100` times the user's full recipe (the GPU check:
scripts/gpu_check.sh), `--fused-ks` adds fused trials (study/bench/fused.py).
This module is the command (its options, the run, the report); what it
measures is in training_loop.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cnnlib.config import TrainConfig
from cnnlib.device import cpu_threads
from cnnlib.model import model_flops_per_image
from cnnlib.splits import Splits
from cnnlib.training import DeviceData

from ..data import data_config, load_splits
from ..errors import UserError
from ..options import add_common_options, add_data_options, whole_number
from ..output import fresh_file, timestamp, write_json
from .interleave import lone_trial_epochs
from .machine import device_facts
from .training_loop import (REFERENCE_BATCH, accuracy_check, compare, fused_section, gpu_busy_fraction, measure_levers,
                            recipe_run)

# The user's recipe at three batch sizes, 32 being the user's own (training_loop.REFERENCE_BATCH).
BATCH_SIZES = (16, 32, 128)
ACCURACY_SEEDS = (0, 1, 2)
# Three timed epochs after one warm-up: the median of three survives one epoch
# slowed by a neighbour. All of `make bench` took 1.6 min on the 2-core CPU with
# 1 thread while other jobs kept the load average at 2.5.
EPOCHS, WARMUP = 3, 1
RECIPE_EPOCHS = 100  # the user's final recipe (TrainConfig default)
# A backward pass costs about two forward passes (input and weight gradients).
TRAIN_FLOPS_PER_FORWARD = 3


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"expected at least one integer, got {text!r}")
    return values


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"timed epochs per loop and batch size, after warm-up (default {EPOCHS})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed warm-up epochs (default {WARMUP})")
    parser.add_argument("--batch-sizes", default=None,
                        help=f"comma-separated (default {','.join(map(str, BATCH_SIZES))})")
    parser.add_argument("--seeds", default=None,
                        help=f"seeds of the accuracy check at batch {REFERENCE_BATCH} "
                             f"(default {','.join(map(str, ACCURACY_SEEDS))})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke settings: 1 warm-up + 2 timed epochs, batch 32 only, seeds 0,1")
    parser.add_argument("--threads", type=whole_number("THREADS", 1), default=os.environ.get("THREADS") or None,
                        help="torch CPU threads (default: one per core, or 1 when the machine is already busy)")
    parser.add_argument("--naive-workers", type=int, default=0,
                        help="DataLoader worker processes of the naive loop (tutorials use 0 or 2)")
    parser.add_argument("--recipe-epochs", type=int, default=0,
                        help=f"also train the project loop for this many epochs at batch {REFERENCE_BATCH} and record "
                             f"the time: {RECIPE_EPOCHS} is the user's recipe (the GPU check; ~3 min on 2 CPU cores)")
    parser.add_argument("--levers", action="store_true",
                        help="also A/B the project loop against each lever flipped (channels-last, fused optimizer, "
                             "cudnn.benchmark on CUDA) at batch 32")
    parser.add_argument("--fused-ks", default=os.environ.get("FUSED_KS") or None,
                        help="also time K horizontally fused trials for each K, e.g. 1,4,16,64 (env FUSED_KS)")
    parser.add_argument("--fused-bf16", action="store_true",
                        help="with --fused-ks: also time each fused group under bf16 autocast, beside fp32")
    parser.add_argument("--fused-graphs", action="store_true",
                        help="with --fused-ks on CUDA: also time each fused group with its step replayed as a CUDA "
                             "graph (LoopOptions.cuda_graphs), beside the eager step")
    parser.add_argument("--denormals", type=int, default=0, metavar="EPOCHS",
                        help="also train the search's CPU group (16 fused trials) for this many epochs twice, in "
                             "child processes with denormal floats flushed (what every command does) and kept, "
                             "and compare (30: about 5 min on 2 CPU cores)")
    add_data_options(parser)
    add_common_options(parser)


# --- report --------------------------------------------------------------------

def format_table(report: dict) -> str:
    facts = report["device"]
    peak = facts["peak"]
    lines = [f"device {facts['device']} ({facts['device_name']}), torch {facts['torch']}, {facts['threads']} threads "
             f"({report['settings'].get('threads_reason', '')})",
             f"peak {peak['flops'] / 1e9:.1f} GFLOP/s: {peak['source']}" if peak["flops"] else f"peak: {peak['source']}",
             f"model: {report['flops_per_image']:,} FLOP per image forward, x{TRAIN_FLOPS_PER_FORWARD} for a "
             f"training step; {report['settings']['timed_epochs']} timed epochs after "
             f"{report['settings']['warmup_epochs']} warm-up, median",
             "",
             f"{'batch':>5} {'naive s/ep':>11} {'project s/ep':>13} {'speedup':>8} {'naive img/s':>12} "
             f"{'project img/s':>14} {'GFLOP/s':>8} {'% peak':>7} {'CPU s/ep naive':>15} {'project':>8} {'speedup':>8}"]
    for batch, row in report["batch_sizes"].items():
        naive, project = row["naive"], row["project"]
        share = f"{100 * project['share_of_peak']:.2f}" if project["share_of_peak"] is not None else "-"
        lines.append(f"{batch:>5} {naive['seconds_per_epoch']:>11.3f} {project['seconds_per_epoch']:>13.3f} "
                     f"{row['speedup']:>7.2f}x {naive['images_per_second']:>12.0f} {project['images_per_second']:>14.0f} "
                     f"{project['achieved_flops'] / 1e9:>8.2f} {share:>7} {naive['cpu_seconds_per_epoch']:>15.3f} "
                     f"{project['cpu_seconds_per_epoch']:>8.3f} {row['cpu_speedup']:>7.2f}x")
    acc = report.get("accuracy")
    if acc:
        noise = f"{acc['noise']:.3f}" if acc["noise"] is not None else "n/a (one seed)"
        lines += ["", f"final dev macro accuracy at batch {REFERENCE_BATCH}, seeds {acc['seeds']}:",
                  f"  naive   {' '.join(f'{a:.3f}' for a in acc['naive'])}  mean {acc['mean_naive']:.3f}",
                  f"  project {' '.join(f'{a:.3f}' for a in acc['project'])}  mean {acc['mean_project']:.3f}",
                  f"  difference of means {acc['difference_of_means']:+.3f}; noise (widest spread across seeds) "
                  f"{noise}; within noise: {acc['within_noise']}"]
    if "recipe" in report:
        r = report["recipe"]
        lines += ["", f"recipe ({r['epochs']} epochs, batch {r['batch_size']}, project loop): {r['total_seconds']:.1f} s "
                      f"total, {r['median_epoch_seconds']:.3f} s/epoch median, dev macro {r['final_dev_macro_accuracy']:.3f}"]
    for name, lever in report.get("levers", {}).items():
        lines.append(f"lever {name}: {lever['flipped_seconds_per_epoch']:.3f} s/epoch vs shipped "
                     f"{lever['shipped_seconds_per_epoch']:.3f} (shipped {lever['shipped_speedup']:.2f}x as fast; "
                     f"CPU time {lever['shipped_cpu_speedup']:.2f}x)")
    if "gpu_busy" in report:
        g = report["gpu_busy"]
        lines.append(f"GPU busy {100 * g['busy_fraction']:.0f}% of one epoch at batch {REFERENCE_BATCH} (profiled)")
    return "\n".join(lines)


def write_report(report: dict, folder: Path, copy: Path | None = None) -> tuple[Path, Path]:
    """bench.json (the latest) and a timestamped copy that later runs never overwrite."""
    if copy is None:
        copy = fresh_file(folder, f"bench-{timestamp()}", ".json")
    write_json(copy, report)
    return write_json(folder / "bench.json", report), copy


def settings_from(args) -> dict:
    quick = args.quick
    epochs = args.epochs if args.epochs is not None else (2 if quick else EPOCHS)
    warmup = args.warmup if args.warmup is not None else WARMUP
    batch_sizes = _ints(args.batch_sizes) if args.batch_sizes else ((REFERENCE_BATCH,) if quick else BATCH_SIZES)
    seeds = _ints(args.seeds) if args.seeds else ((0, 1) if quick else ACCURACY_SEEDS)
    if epochs < 1 or warmup < 0:
        raise UserError(f"--epochs must be >= 1 and --warmup >= 0, got {epochs} and {warmup}")
    if any(b < 1 for b in batch_sizes):
        raise UserError(f"--batch-sizes must be positive, got {batch_sizes}")
    return {"timed_epochs": epochs, "warmup_epochs": warmup, "batch_sizes": list(batch_sizes),
            "accuracy_seeds": list(seeds), "naive_workers": args.naive_workers}


def choose_threads(requested: int | None) -> tuple[int, str]:
    """One thread per core on a quiet machine; one thread when others already keep the cores busy."""
    if requested:
        return requested, "--threads"
    threads, why = cpu_threads()
    return threads, why


# --- the command: settings -> loops compared per batch -> accuracy -> extra sections -> report ---

def run(args) -> int:
    settings = settings_from(args)
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    settings["threads_reason"] = why
    splits = load_splits(args)
    data = DeviceData(splits, args.device)
    device = data.device
    report = report_header(settings, splits, data)
    print(f"bench on {device}: {settings['warmup_epochs']} warm-up + {settings['timed_epochs']} timed epochs, "
          f"batch sizes {settings['batch_sizes']}, accuracy seeds {settings['accuracy_seeds']}", flush=True)
    accuracies = compare_batch_sizes(report, splits, data, args.naive_workers)
    report["accuracy"] = accuracy_check(compare_accuracy_seeds(report, accuracies, splits, data, args.naive_workers))
    report["accuracy"]["epochs"] = report["config"]["epochs"]
    if device.type == "cuda":
        profile_gpu(report, data, device)
    if args.levers:
        report["levers"] = measure_levers(splits, data, device, settings["timed_epochs"], settings["warmup_epochs"])
    if args.recipe_epochs > 0:
        report["recipe"] = recipe_run(splits, data, device, args.recipe_epochs)
    folder = Path(args.results) / "bench"
    path, copy = write_report(report, folder)
    print()
    print(format_table(report))
    print(f"\nwrote {path} (and {copy.name})", flush=True)
    if args.fused_ks:
        add_fused_section(report, args, splits, data)
        write_report(report, folder, copy)
        print(f"fused trials: {report['fused'] if isinstance(report['fused'], dict) else 'see above'}; updated {path}")
    if args.denormals > 0:
        add_denormals_section(report, args, device)
        write_report(report, folder, copy)
        print(f"updated {path}")
    return 0


def report_header(settings: dict, splits: Splits, data: DeviceData) -> dict:
    """The report before any timing: device, settings, the shortened recipe and the FLOPs an epoch costs."""
    facts = device_facts(data.device)
    n_train, n_dev = len(splits.train), len(splits.dev)
    flops = model_flops_per_image(data.image_size, data.n_classes)
    base = TrainConfig(epochs=settings["warmup_epochs"] + settings["timed_epochs"])  # the user's recipe, shortened
    return {
        "device": facts, "settings": settings, "config": base.to_dict(),
        "split": {"train": n_train, "dev": n_dev},
        "flops_per_image": flops, "flops_per_epoch": float(n_train * TRAIN_FLOPS_PER_FORWARD * flops + n_dev * flops),
        "flops_note": f"forward FLOPs (2 x multiply-adds of convs and linears) x{TRAIN_FLOPS_PER_FORWARD} per "
                      "train image plus one forward per dev image; share_of_peak = that / seconds_per_epoch / peak",
        "images_per_second_note": "train images per second of epoch wall time, dev evaluation included",
        "batch_sizes": {},
    }


def _compare(report: dict, batch: int, seed: int, splits: Splits, data: DeviceData, naive_workers: int) -> dict:
    """Both loops on the report's recipe at this batch size and seed."""
    config = TrainConfig.from_dict({**report["config"], "batch_size": batch, "seed": seed})
    return compare(config, splits, data, data.device, report["settings"]["warmup_epochs"], report["flops_per_epoch"],
                   report["device"]["peak"]["flops"], naive_workers)


def compare_batch_sizes(report: dict, splits: Splits, data: DeviceData, naive_workers: int) -> dict[int, dict]:
    """Each batch size's row of the report; the reference batch's final accuracies, by seed."""
    settings, accuracies = report["settings"], {}
    seed = settings["accuracy_seeds"][0]
    for batch in settings["batch_sizes"]:
        row = _compare(report, batch, seed, splits, data, naive_workers)
        report["batch_sizes"][str(batch)] = row
        print(f"  batch {batch}: naive {row['naive']['seconds_per_epoch']:.3f} s/epoch, "
              f"project {row['project']['seconds_per_epoch']:.3f} s/epoch, {row['speedup']:.2f}x", flush=True)
        if batch == REFERENCE_BATCH:
            accuracies[seed] = {k: row[k]["final_dev_macro_accuracy"] for k in ("naive", "project")}
    return accuracies


def compare_accuracy_seeds(report: dict, accuracies: dict[int, dict], splits: Splits, data: DeviceData,
                           naive_workers: int) -> dict[int, dict]:
    """Both loops' final dev accuracy at the reference batch for every accuracy seed not measured yet."""
    for seed in report["settings"]["accuracy_seeds"]:
        if seed in accuracies:
            continue
        row = _compare(report, REFERENCE_BATCH, seed, splits, data, naive_workers)
        accuracies[seed] = {k: row[k]["final_dev_macro_accuracy"] for k in ("naive", "project")}
        print(f"  accuracy seed {seed}: naive {accuracies[seed]['naive']:.3f}, "
              f"project {accuracies[seed]['project']:.3f}", flush=True)
    return accuracies


def profile_gpu(report: dict, data: DeviceData, device: torch.device) -> None:
    """How busy the GPU is during one epoch at the reference batch (after a warm-up epoch)."""
    epochs = lone_trial_epochs(TrainConfig(batch_size=REFERENCE_BATCH, epochs=2), data)
    next(epochs)  # warm-up epoch
    try:
        report["gpu_busy"] = gpu_busy_fraction(epochs, device)
    except Exception as error:  # noqa: BLE001 - the profiler (CUPTI) is optional; the timings are not
        report["gpu_busy_error"] = f"{type(error).__name__}: {error}"


def add_fused_section(report: dict, args, splits: Splits, data: DeviceData) -> None:
    settings = report["settings"]
    report["fused"] = fused_section(_ints(args.fused_ks), splits, data, data.device, settings["timed_epochs"],
                                    settings["warmup_epochs"], args.fused_bf16, args.fused_graphs)
    if isinstance(report["fused"], list):
        from .fused import format_summary, format_variants, summary  # noqa: PLC0415

        report["fused_summary"] = summary(report["fused"])
        if args.fused_bf16 or args.fused_graphs:
            print(format_variants(report["fused"]) or "CUDA graphs: not timed on this device (CUDA only)")
        print(format_summary(report["fused_summary"]))


def add_denormals_section(report: dict, args, device: torch.device) -> None:
    if device.type != "cpu":
        report["denormals"] = {"skipped": "denormal floats slow CPUs; this device is not one"}
        return
    from .denormals import format_denormals, measure_denormals  # noqa: PLC0415

    report["denormals"] = measure_denormals(data_config(args), Path(args.results) / "data", args.denormals,
                                            torch.get_num_threads())
    print(format_denormals(report["denormals"]))
