"""`python -m study <command>`: one entry point, one module per command.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`.
Errors a user can fix (bad files, bad values) print as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cnnlib.errors import CnnlibError

COMMANDS = {
    "data": ("study.data_cmd", "build the user's split and print its class counts"),
    "train": ("study.train_cmd", "train one config (a search-space file whose values are all fixed)"),
    "evaluate": ("study.evaluate_cmd", "evaluate a checkpoint on a split (macro, per-class, confusion)"),
    "search": ("study.search", "run or continue an Optuna study"),
    "export": ("study.export", "write trials.csv and epochs.csv for a study"),
    "plots": ("study.plots", "HTML report (and PNGs) from exported CSVs"),
    "dashboard": ("study.dashboard", "serve the study storage with optuna-dashboard"),
    "final": ("study.final", "retrain the best trial with several seeds, evaluate, FGSM sweep"),
    "bench": ("study.bench", "time the project training loop against a naive DataLoader loop"),
    "audit": ("study.audit", "find probably mislabeled images with cross-validated confident learning"),
}


class UserError(Exception):
    """Raised by commands for problems the user can fix; printed as one line."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # command not built yet
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip()))
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except (CnnlibError, UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
