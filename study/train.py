"""Train one config (a search-space file whose values are all fixed) and keep everything it produced.

`make train SPACE=search_spaces/seed_final.yaml` reruns the user's final recipe.
Each run gets its own folder `RESULTS/runs/<name>/` with `metrics.json` (dev,
test and train blocks), `history.csv` (one row per epoch) and `model.pt`, so
runs never overwrite each other unless asked to (`--name X --overwrite`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path

from cnnlib.atomic import write_atomic, write_json
from cnnlib.checkpoint import save_checkpoint
from cnnlib.config import MAX_EPOCHS
from cnnlib.config import TrainConfig
from cnnlib.losses import make_criterion
from cnnlib.metrics import majority_baseline
from cnnlib.training import DeviceData, EpochStats, evaluate, train_group
from cnnlib.tta import as_evaluated

from . import lifetime
from .data import load_splits
from .errors import UserError
from .options import MAX_GROUP, add_common_options, add_data_options, whole_number
from .output import check_output_name, fresh_folder, output_name, timestamp
from .search.space_file import load_space
from .threads import use_cpu_threads

RUN_FILES = ("metrics.json", "history.csv", "model.pt")


def add_arguments(parser) -> None:
    parser.add_argument("--space", default=os.environ.get("SPACE") or "search_spaces/seed_final.yaml",
                        help="search-space file whose params are all fixed values (env SPACE)")
    parser.add_argument("--name", type=output_name("--name"), default=None,
                        help="run folder under RESULTS/runs (default: <space name>-<YYYYmmdd-HHMMSS>)")
    parser.add_argument("--overwrite", action="store_true", help="reuse the folder given by --name if it exists")
    parser.add_argument("--epochs", type=whole_number("--epochs", 1, MAX_EPOCHS), default=None,
                        help="override the file's epochs (quick tries)")
    parser.add_argument("--seeds", type=whole_number("SEEDS", 1, MAX_GROUP), default=os.environ.get("SEEDS") or "1",
                        help="train seeds s..s+k-1 (s: the file's seed) as one fused group and report each, "
                             "their mean and spread; the median seed's model is kept (env SEEDS, default 1)")
    add_data_options(parser)
    add_common_options(parser)


# --- files ----------------------------------------------------------------

def history_csv(history: list[EpochStats], classes) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", "train_loss", "dev_loss", "dev_macro_accuracy", *(f"dev_{c}" for c in classes), "seconds"])
    for s in history:
        writer.writerow([s.epoch, f"{s.train_loss:.6g}", f"{s.dev_loss:.6g}", f"{s.dev_macro_accuracy:.6g}",
                         *(f"{a:.6g}" for a in s.dev.per_class.values()), f"{s.seconds:.4f}"])
    return out.getvalue()


def reserve_run_dir(runs: Path, name: str | None, default_stem: str, overwrite: bool) -> tuple[Path, bool]:
    """The run's folder, created now so that two runs never share one; (path, created)."""
    runs.mkdir(parents=True, exist_ok=True)
    if name is not None:
        path = runs / check_output_name("--name", name)
        try:
            path.mkdir()
            return path, True
        except FileExistsError:
            if not overwrite:
                raise UserError(f"{path}: run folder exists; choose another --name or add --overwrite") from None
            for stale in RUN_FILES:  # a failed rerun must not leave the old run's files looking new
                (path / stale).unlink(missing_ok=True)
            return path, False
    return fresh_folder(runs, f"{default_stem}-{timestamp()}"), True


# --- the run --------------------------------------------------------------

def _seed_summary(configs: list[TrainConfig], per_seed: list[dict]) -> dict:
    """Each seed's dev/test macro and per-class accuracy, and mean and sample sd of the macro."""
    rows = [{"seed": c.seed, **{name: {"macro_accuracy": e.macro_accuracy, "per_class": e.per_class}
                                for name, e in evaluations.items()}} for c, evaluations in zip(configs, per_seed)]
    macro = {}
    for name in per_seed[0]:
        values = [e[name].macro_accuracy for e in per_seed]
        macro[name] = {"mean": statistics.mean(values), "sd": statistics.stdev(values)}
    return {"seeds": rows, "macro_accuracy": macro}


def _progress(total_epochs: int, seeds: list[int]):
    width = len(str(total_epochs))

    def on_epoch(member: int, stats: EpochStats) -> None:
        lifetime.check_interrupt()
        per = " ".join(f"{c} {a:5.1%}" for c, a in stats.dev.per_class.items())
        label = f"seed {seeds[member]}  " if len(seeds) > 1 else ""
        print(f"{label}epoch {stats.epoch:>{width}}/{total_epochs}  train loss {stats.train_loss:.4f}  "
              f"dev loss {stats.dev_loss:.4f}  dev macro {stats.dev_macro_accuracy:6.1%}  ({per})  "
              f"{stats.seconds:.2f}s", flush=True)

    return on_epoch


def run(args) -> int:
    space = load_space(args.space)
    config = space.fixed_config()
    if args.epochs is not None:
        try:
            config = TrainConfig.from_dict({**config.to_dict(), "epochs": args.epochs})
        except ValueError as error:
            raise UserError(f"--epochs {args.epochs}: {error}") from None
    run_dir, created = reserve_run_dir(Path(args.results) / "runs", args.name, space.name, args.overwrite)
    try:
        return _train_and_write(args, space, config, load_splits(args), run_dir)
    except BaseException:
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that produced nothing leaves no empty folder behind
        raise


def _train_and_write(args, space, config: TrainConfig, splits, run_dir: Path) -> int:
    data = DeviceData(splits, args.device)
    classes = data.classes
    _announce(space, config, splits, data, run_dir)
    configs = [TrainConfig.from_dict({**config.to_dict(), "seed": config.seed + i}) for i in range(args.seeds)]
    results, per_seed, criterion = _train_seeds(configs, data)
    # The median seed by dev macro accuracy is the run's model (as in `make final`).
    median = sorted(range(len(results)), key=lambda i: per_seed[i]["dev"].macro_accuracy)[(len(results) - 1) // 2]
    result, config, evaluations = results[median], configs[median], dict(per_seed[median])
    evaluations["train"] = evaluate(as_evaluated(result.model, config.tta), data.train, classes, criterion)
    baselines = {name: majority_baseline(splits.train.labels, split.labels, len(classes), classes)
                 for name, split in (("dev", splits.dev), ("test", splits.test)) if split is not None}
    # The median: the first epoch carries one-off warm-up, and other work on a shared machine adds spikes.
    seconds_per_epoch = statistics.median(s.seconds for s in result.history)
    seed_summary = _seed_summary(configs, per_seed) if len(configs) > 1 else None
    if seed_summary:
        _print_seeds(seed_summary, len(configs), config.seed)
    for name, evaluation in evaluations.items():
        print(evaluation.format(f"{name}:"))
    for name, evaluation in baselines.items():
        print(f"majority-class baseline ({name}): macro accuracy {evaluation.macro_accuracy:.1%}")
    print(f"{len(result.history)} epochs in {result.seconds:.1f}s (median {seconds_per_epoch:.2f}s per epoch on {data.device})")

    metrics = {
        "name": run_dir.name,
        "space": str(space.path),
        "config": config.to_dict(),
        "classes": list(classes),
        "data": {**splits.summary(), "cache": str(splits.cache_path) if splits.cache_path else None,
                 "split_seed": args.split_seed},
        "device": str(data.device),
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "seconds": result.seconds,
        "seconds_per_epoch": seconds_per_epoch,
        "dev": evaluations["dev"].to_dict(),
        "test": evaluations["test"].to_dict() if "test" in evaluations else None,
        **({"test_plain": evaluations["test_plain"].to_dict()} if "test_plain" in evaluations else {}),
        "train": evaluations["train"].to_dict(),
        "majority_baseline": {name: evaluation.to_dict() for name, evaluation in baselines.items()},
        "seeds": seed_summary,
        "checkpoint": "model.pt",
    }
    save_checkpoint(run_dir / "model.pt", result.model, config, classes, data.image_size,
                    extra={"run": run_dir.name, "space": str(space.path), "data_source": splits.source,
                           "split_seed": int(args.split_seed),
                           "dev_macro_accuracy": float(evaluations["dev"].macro_accuracy)})
    write_atomic(run_dir / "history.csv", history_csv(result.history, classes))
    write_json(run_dir / "metrics.json", metrics)
    print(f"wrote:  {run_dir / 'metrics.json'}, history.csv, model.pt")
    return 0


def _announce(space, config: TrainConfig, splits, data: DeviceData, run_dir: Path) -> None:
    """What trains: the space file, the config, the split's counts, the device and the run folder."""
    threads = use_cpu_threads(data.device)
    print(f"space:  {space.path}  ({space.description})" if space.description else f"space:  {space.path}")
    print(f"config: {json.dumps(config.to_dict())}")
    counts = splits.summary()["splits"]
    print("data:   " + "; ".join(f"{n} " + "/".join(str(v) for v in c.values()) for n, c in counts.items())
          + f"  ({'/'.join(data.classes)})")
    print(f"device: {data.device}{f' ({threads})' if threads else ''}\nrun:    {run_dir}", flush=True)


def _train_seeds(configs: list[TrainConfig], data: DeviceData) -> tuple[list, list[dict], object]:
    """Every seed trained (as one fused group where they share batches); (results, dev/test per seed, criterion)."""
    results = train_group(configs, data, on_epoch=_progress(configs[0].epochs, [c.seed for c in configs]))
    for result in results:
        if result.error is not None:
            raise result.error
    criterion = make_criterion(configs[0], data.train.y, data.n_classes)
    per_seed = []
    for result in results:
        evaluations = {"dev": result.dev}
        if data.test is not None:
            evaluations["test"] = evaluate(as_evaluated(result.model, configs[0].tta), data.test, data.classes, criterion)
            if configs[0].tta != "none":  # what the views add, on the same weights
                evaluations["test_plain"] = evaluate(result.model, data.test, data.classes, criterion)
        per_seed.append(evaluations)
    return results, per_seed, criterion


def _print_seeds(seed_summary: dict, seeds: int, kept_seed: int) -> None:
    for row in seed_summary["seeds"]:
        print(f"seed {row['seed']}: " + "  ".join(
            f"{name} macro {block['macro_accuracy']:.1%} ("
            + " ".join(f"{c} {a:.1%}" for c, a in block["per_class"].items()) + ")"
            for name, block in row.items() if name != "seed"))
    print("  ".join(f"{name} macro {stats['mean']:.1%} ± {stats['sd']:.1%}" for name, stats
                    in seed_summary["macro_accuracy"].items()) + f" over {seeds} seeds; "
          f"the median seed ({kept_seed}) is kept:")
