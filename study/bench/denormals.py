"""Late-training slowdown from denormal floats: one fused group, denormals flushed and not.

As training goes on, some optimizer states and gradients of the seed CNN
shrink below float32's normal range, and each operation on them takes the
CPU's slow path: epochs get slower the longer a trial trains, which the
bench's few early epochs never see. Every command therefore flushes
denormals (cnnlib.device.flush_denormals). This measures what that buys: the
search's CPU group (K fused trials, `member_configs`) trained for N epochs
twice, each in a child process of its own (the flag is per thread and
inherited when threads are made, so one process cannot hold both), the two
runs one after the other.

`make bench` with `--denormals N` (python -m study bench --denormals 30) adds
the section; the child is `python -m study.bench.denormals`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cnnlib.step import GROUP_SIZE
from cnnlib.splits import DataConfig, prepare_splits

from ..lifetime import PARENT_VARIABLE, follow_parent_from_environment

GROUP = GROUP_SIZE["cpu"]  # the search's fused group on a CPU
EDGE = 3  # epochs averaged at the start and at the end of a run


def epoch_seconds(config: DataConfig, cache: Path, k: int, epochs: int, threads: int) -> dict:
    """Seconds of each epoch of one fused group (dev evaluation included) and its members' last dev accuracies."""
    from cnnlib.training import DeviceData, train_group_epochs  # noqa: PLC0415 - after the caller set the flag

    from .fused import member_configs  # noqa: PLC0415

    torch.set_num_threads(threads)
    data = DeviceData(prepare_splits(config, cache), "cpu")
    seconds, last = [], None
    started = time.perf_counter()
    for results in train_group_epochs(member_configs(k, epochs), data):
        seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        last = results
    return {"epoch_seconds": seconds, "last_dev_macro": [r.history[-1].dev.macro_accuracy for r in last]}


def measure_denormals(config: DataConfig, cache: Path, epochs: int, threads: int, k: int = GROUP,
                      log=print) -> dict:
    """Both child runs and their comparison; a failed child is recorded, never fatal."""
    runs = {}
    for flushed in (True, False):
        name = "flushed" if flushed else "kept"
        log(f"denormals {name}: a fused group of {k} for {epochs} epochs in a child process ...")
        argv = [sys.executable, "-m", "study.bench.denormals", "--config", json.dumps(asdict(config), default=str),
                "--cache", str(cache), "--k", str(k), "--epochs", str(epochs), "--threads", str(threads)]
        if not flushed:
            argv.append("--keep-denormals")
        child = subprocess.run(argv, capture_output=True, text=True,  # it ends with the bench, even a SIGKILLed one
                               env={**os.environ, PARENT_VARIABLE: str(os.getpid())})
        if child.returncode != 0:
            return {"error": f"child ({name}) exited {child.returncode}: {child.stderr.strip()[-500:]}"}
        runs[name] = json.loads(child.stdout.strip().splitlines()[-1])
    report = {"k": k, "epochs": epochs, "threads": threads, "runs": runs}
    for name, run in runs.items():
        seconds = run["epoch_seconds"]
        report[name] = {"first_epochs_s": statistics.fmean(seconds[:EDGE]), "last_epochs_s": statistics.fmean(seconds[-EDGE:]),
                        "total_s": sum(seconds), "mean_last_dev_macro": statistics.fmean(run["last_dev_macro"])}
    report["speedup_total"] = report["kept"]["total_s"] / report["flushed"]["total_s"]
    report["speedup_last_epochs"] = report["kept"]["last_epochs_s"] / report["flushed"]["last_epochs_s"]
    return report


def format_denormals(report: dict) -> str:
    if "error" in report:
        return f"denormals: {report['error']}"
    kept, flushed = report["kept"], report["flushed"]
    return (f"denormals, a fused group of {report['k']} for {report['epochs']} epochs ({report['threads']} threads): "
            f"kept {kept['first_epochs_s']:.2f} s/epoch over the first {EDGE} epochs, "
            f"{kept['last_epochs_s']:.2f} over the last {EDGE}; flushed {flushed['first_epochs_s']:.2f} and "
            f"{flushed['last_epochs_s']:.2f}; whole run {report['speedup_total']:.2f}x faster flushed "
            f"({report['speedup_last_epochs']:.2f}x at the end); mean last dev macro {kept['mean_last_dev_macro']:.3f} "
            f"kept, {flushed['mean_last_dev_macro']:.3f} flushed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="child of `study bench --denormals`: one fused group's epoch times")
    parser.add_argument("--config", required=True, help="the DataConfig as JSON")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--k", type=int, default=GROUP)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-denormals", action="store_true")
    args = parser.parse_args(argv)
    follow_parent_from_environment()
    if not args.keep_denormals:  # before any parallel op: the OpenMP threads inherit it
        from cnnlib.device import flush_denormals  # noqa: PLC0415

        flush_denormals()
    fields = json.loads(args.config)
    corrections = fields.get("corrections")
    config = DataConfig(**{**fields, "corrections": Path(corrections) if corrections else None})
    print(json.dumps(epoch_seconds(config, Path(args.cache), args.k, args.epochs, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
