"""`python -m study <command>`: one entry point, one module per command.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`.
Errors a user can fix (bad files, bad values) print as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

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
    "hpo-bench": ("study.hpo_bench", "default search vs random search vs the user's recipe at an equal budget, on test"),
}


class UserError(Exception):
    """Raised by commands for problems the user can fix; printed as one line."""


def interrupt_on_sigterm(signum=None, frame=None):
    """SIGTERM handler: stop the way Ctrl-C does, so running trials are told FAIL and outputs stay whole.

    `make` passes SIGTERM on to the command it runs (as do kill, systemd and
    docker stop); by default Python would die on the spot and leave its worker
    processes training. The interrupt's text says which signal it was.
    """
    raise KeyboardInterrupt("SIGTERM")


def _load(name: str):
    return importlib.import_module(COMMANDS[name][0])


def main(argv=None) -> int:
    """Imports only the chosen command's module: torch, plotly or cleanlab load only when needed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _load(name)
            command.description = (module.__doc__ or help_text).strip()
            module.add_arguments(command)
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, interrupt_on_sigterm) if in_main_thread else None
    try:
        return int(_load(args.command).run(args) or 0)
    except (CnnlibError, UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        if str(interrupt) == "SIGTERM":
            print("interrupted (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
