"""What `make bench` measures: the project loop against a naive one, its speed levers, fused trials.

Two loops run interleaved (interleave.py), epoch by epoch in one process,
so that a neighbour's load on a shared machine falls on both alike; each
measurement here returns plain numbers, and command.py puts them in the report.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterator

import torch

from cnnlib.config import TrainConfig
from cnnlib.splits import Splits
from cnnlib.training import DeviceData, LoopOptions, TrainResult

from .interleave import Timed, interleave, lone_trial_epochs
from .naive_loop import naive_train_epochs

REFERENCE_BATCH = 32  # the user's own batch size: the accuracy check, the recipe, the levers and fused trials run at it


# --- interleaved runs (study/bench/interleave.py) ---------------------------

def _median_after(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:] or values)


def loop_summary(run: Timed, warmup: int, n_train: int, flops_per_epoch: float, peak: float | None) -> dict:
    result = run.result
    seconds = [h.seconds for h in result.history]
    median = _median_after(seconds, warmup)
    achieved = flops_per_epoch / median
    return {
        "seconds_per_epoch": median,
        "epoch_seconds": seconds,
        "timed_epochs": len(seconds[warmup:] or seconds),
        "cpu_seconds_per_epoch": _median_after(run.cpu_seconds, warmup),
        "epoch_cpu_seconds": run.cpu_seconds,
        "images_per_second": n_train / median,
        "achieved_flops": achieved,
        "share_of_peak": achieved / peak if peak else None,
        "final_dev_macro_accuracy": result.history[-1].dev_macro_accuracy,
        "final_train_loss": result.history[-1].train_loss,
    }


def compare(config: TrainConfig, splits: Splits, data: DeviceData, device, warmup: int,
            flops_per_epoch: float, peak: float | None, workers: int) -> dict:
    results = interleave({"naive": naive_train_epochs(config, splits, device, workers),
                          "project": lone_trial_epochs(config, data)}, device)
    n_train = len(splits.train)
    out = {name: loop_summary(results[name], warmup, n_train, flops_per_epoch, peak) for name in ("naive", "project")}
    out["speedup"] = out["naive"]["seconds_per_epoch"] / out["project"]["seconds_per_epoch"]
    out["cpu_speedup"] = out["naive"]["cpu_seconds_per_epoch"] / out["project"]["cpu_seconds_per_epoch"]
    return out


def accuracy_check(per_seed: dict[int, dict]) -> dict:
    """Same seed, same final dev macro accuracy within noise; noise = the widest spread across seeds of either loop."""
    naive = [per_seed[s]["naive"] for s in sorted(per_seed)]
    project = [per_seed[s]["project"] for s in sorted(per_seed)]
    noise = max(max(naive) - min(naive), max(project) - min(project)) if len(per_seed) > 1 else None
    difference = statistics.mean(project) - statistics.mean(naive)
    return {
        "seeds": sorted(per_seed), "naive": naive, "project": project,
        "mean_naive": statistics.mean(naive), "mean_project": statistics.mean(project),
        "difference_of_means": difference,
        "noise": noise,
        "noise_definition": "widest max-min spread of final dev macro accuracy across seeds, either loop",
        "within_noise": None if noise is None else abs(difference) <= noise,
    }


def gpu_busy_fraction(run: Iterator[TrainResult], device: torch.device) -> dict:
    """Share of one epoch's wall time with a CUDA kernel running (profiler overhead makes it a lower bound)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        next(run)
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    kernel_us = 0.0
    for event in prof.key_averages():
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            kernel_us += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return {"wall_seconds": wall, "kernel_seconds": kernel_us / 1e6, "busy_fraction": kernel_us / 1e6 / wall}


def recipe_run(splits: Splits, data: DeviceData, device, epochs: int) -> dict:
    config = TrainConfig(batch_size=REFERENCE_BATCH, epochs=epochs)
    result = None
    for result in lone_trial_epochs(config, data):
        pass
    seconds = [h.seconds for h in result.history]
    return {"epochs": epochs, "batch_size": REFERENCE_BATCH, "total_seconds": result.seconds,
            "median_epoch_seconds": statistics.median(seconds[1:] or seconds),
            "first_epoch_seconds": seconds[0], "final_dev_macro_accuracy": result.history[-1].dev_macro_accuracy}


# --- levers of the project loop (A/B, interleaved like the main comparison) ------

def _lever_options(device: torch.device) -> dict[str, LoopOptions]:
    """Each lever flipped, as the loop options of the flipped run; the shipped run takes the defaults."""
    shipped = LoopOptions()
    flip = {"channels_last off": LoopOptions(channels_last=not shipped.channels_last),
            # each optimizer formula as one op over the parameter rows, not torch's fused kernel per member
            "block optimizer (not fused kernels)": LoopOptions(optimizer_kernels="block")}
    if device.type == "cuda":
        flip["cudnn.benchmark on"] = LoopOptions(cudnn_benchmark=True)
    return flip


def measure_levers(splits: Splits, data: DeviceData, device: torch.device, epochs: int, warmup: int) -> dict:
    """Seconds per epoch of the shipped loop against each lever flipped, at batch 32, two runs at a time."""
    config = TrainConfig(batch_size=REFERENCE_BATCH, epochs=warmup + epochs)
    out = {}
    for name, options in _lever_options(device).items():
        # the resident copy's layout follows the channels-last lever too
        flipped_data = data if options.channels_last == LoopOptions().channels_last else \
            DeviceData(splits, device, options.channels_last)
        results = interleave({"shipped": lone_trial_epochs(config, data),
                              "flipped": lone_trial_epochs(config, flipped_data, options)}, device)
        wall = {k: _median_after([h.seconds for h in results[k].result.history], warmup) for k in results}
        cpu = {k: _median_after(results[k].cpu_seconds, warmup) for k in results}
        out[name] = {"shipped_seconds_per_epoch": wall["shipped"], "flipped_seconds_per_epoch": wall["flipped"],
                     "shipped_speedup": wall["flipped"] / wall["shipped"],
                     "shipped_cpu_seconds_per_epoch": cpu["shipped"], "flipped_cpu_seconds_per_epoch": cpu["flipped"],
                     "shipped_cpu_speedup": cpu["flipped"] / cpu["shipped"]}
        shipped, flipped = wall["shipped"], wall["flipped"]
        print(f"  lever {name}: shipped {shipped:.3f} s/epoch, flipped {flipped:.3f} ({flipped / shipped:.2f}x); "
              f"CPU {cpu['shipped']:.3f} vs {cpu['flipped']:.3f} ({out[name]['shipped_cpu_speedup']:.2f}x)", flush=True)
    return out


# --- horizontally fused trials (cnnlib/step.py, study/bench/fused.py) ---

def fused_section(ks: tuple[int, ...], splits: Splits, data: DeviceData, device, epochs: int, warmup: int,
                  bf16: bool = False, graphs: bool = False) -> dict:
    """Whatever study.bench.fused measures for K fused trials; a failure there is recorded, never fatal."""
    try:
        from .fused import measure_fused
    except ImportError as error:
        return {"skipped": f"study.bench.fused is not importable ({error})"}
    try:
        return measure_fused(splits=splits, data=data, device=device, ks=ks, epochs=epochs, warmup=warmup,
                             batch_size=REFERENCE_BATCH, bf16=bf16, graphs=graphs)
    except Exception as error:  # noqa: BLE001 - a failing fused bench must not cost this report
        return {"error": f"{type(error).__name__}: {error}"}
