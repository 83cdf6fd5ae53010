"""`cnn-hpo <command>` (or `python -m study <command>`): one entry point, one module per command.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`.
Errors a user can fix (bad files, bad values, a typo in a variable) print as
one line and exit 2, not a traceback and not argparse's usage block.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import signal
import sys
import threading

from cnnlib.allocator import keep_freed_memory
from cnnlib.errors import CnnlibError, OutputError

from . import lifetime
from .errors import UserError
from .lifetime import follow_parent_from_environment, program_name

# name -> (where it lives, one line for the command list, what --help says about it). One rule finds the module
# (_load): study.<where>, entered through its command.py when <where> is a package (search, final, audit, bench).
# The texts are for users: what the command does and writes, never where the code lives (docstrings are for that).
COMMANDS = {
    "data": ("data", "build the user's split and print its class counts",
             "Build (or reuse from the cache) the train/dev/test split and write RESULTS/data/summary.json."),
    "train": ("train", "train one config (a search-space file whose values are all fixed)",
              "Train one fixed config and write RESULTS/runs/<name>/ (metrics.json, history.csv, model.pt)."),
    "evaluate": ("evaluate", "evaluate a checkpoint on a split (macro, per-class, confusion)",
                 "Evaluate a model.pt on one split: macro and per-class accuracy, confusion matrix, and the "
                 "majority-class baseline beside them."),
    "search": ("search", "run or continue an Optuna study",
               "Run or continue an Optuna study of the seed CNN. Running it again continues the same study; "
               "TRIALS counts the trials this run adds; Ctrl-C stops it and the next run continues."),
    "export": ("report.export", "write trials.csv and epochs.csv for a study",
               "Write RESULTS/<study>/trials.csv (one row per trial), epochs.csv (one row per epoch) and data.csv "
               "(class counts) for each study in STORAGE, or only STUDY."),
    "plots": ("report.plots", "HTML report (and PNGs) from exported CSVs",
              "Write an offline HTML report (and PNGs when Chromium is there) from the CSVs of `export`."),
    "dashboard": ("search.dashboard", "serve the study storage with optuna-dashboard",
                  "Serve STORAGE with optuna-dashboard, with each trial's report (note and artifacts)."),
    "final": ("final", "retrain the best trial with several seeds, evaluate, FGSM sweep",
              "Retrain the study's best trial (or TRIAL) with SEEDS seeds, report dev and held-out test accuracy, "
              "and attack the model kept, the seeds' ensemble (ENSEMBLE=0: the median seed); writes "
              "RESULTS/final/<study>/. Epsilons are on the [0, 1] pixel scale (the user's [-1, 1]-scale eps 0.1 is "
              "0.05 here)."),
    "bench": ("bench", "time the project training loop against a naive DataLoader loop",
              "Time the project's training loop against a tutorial DataLoader loop; writes RESULTS/bench/."),
    "audit": ("audit", "find probably mislabeled images with cross-validated confident learning",
              "Rank probably mislabeled images (K-fold out-of-fold predictions + confident learning) and write "
              "RESULTS/audit/<run>/: suspects.csv, a contact sheet and a corrections draft."),
    "hpo-bench": ("bench.hpo", "is TPE worth it? TPE vs random search (and warm start, Hyperband) at an "
                                     "equal budget, on test",
                  "Compare TPE, random search, the warm-started default and TPE with a Hyperband pruner at an equal "
                  "time budget on two data sets, each search's best config retrained with several seeds and judged "
                  "on the held-out test split."),
}

EPILOG = ("Each option can also be set by the Makefile variable (environment variable) named in its help, "
          "e.g. `make search TRIALS=20` is `--trials 20`.")


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        if text.endswith(")") and "(env " in text:  # "... (env WORKERS; default: 1)"
            return f"{text[:-1]}; default: {shown})"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <what>` and exit 2, like every other user error here."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_env_choices(parser: argparse.ArgumentParser | None, args: argparse.Namespace) -> None:
    """An option with choices whose value came from its environment variable: argparse checks only the command line."""
    for action in parser._actions if parser is not None else ():
        value = getattr(args, action.dest, None)
        if not action.choices or value is None or value in action.choices:
            continue
        variable = re.search(r"\benv ([A-Z][A-Z_]*)", action.help or "")
        named = f"{variable.group(1)} / {action.option_strings[0]}" if variable else action.option_strings[0]
        choices = [str(c) for c in action.choices]
        raise UserError(f"{named} {value!r}: choose {', '.join(choices[:-1])} or {choices[-1]}")


# Commands that may run on a RESULTS they cannot write: they read it (plots writes where --out says, evaluate
# only a split cache it lacks); any write they do make there that fails is told by output_failure.
READS_RESULTS = {"plots", "dashboard", "evaluate"}


def check_places(args: argparse.Namespace) -> None:
    """Where a command writes and computes, checked before it starts: RESULTS a folder it can write (before a
    search or a retraining spends minutes), DEVICE one this machine has."""
    if getattr(args, "results", None):
        from .options import check_results_folder  # noqa: PLC0415 - torch loads only once a command runs

        check_results_folder(args.results, writes=args.command not in READS_RESULTS)
    if getattr(args, "device", None):
        from cnnlib.device import resolve_device  # noqa: PLC0415

        resolve_device(args.device)


def storage_failure(args: argparse.Namespace, error: Exception) -> str | None:
    """One line for a storage that fails under any command (damaged, gone, read-only); None for other errors."""
    if not getattr(args, "storage", None) or "optuna" not in sys.modules:
        return None
    from .search.storage_errors import storage_failure_message  # noqa: PLC0415 - loaded already when optuna is

    return storage_failure_message(args.storage, error)


# What a write fails with where it may not write: read-only, no permission, full, or something in the way.
WRITE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EISDIR,
                errno.ENOTDIR, errno.EEXIST}
# The options that name where outputs go, most specific first: (attribute, how the line names it).
OUTPUT_PLACES = (("json", "EVAL_JSON / --json"), ("out", "PLOTS_OUT / --out"), ("results", "RESULTS"))


def _within(path: str, place: str) -> bool:
    """`path` is `place`, inside it, or the temporary file an atomic write makes beside it."""
    path, place = os.path.abspath(path), os.path.abspath(place)
    return (path == place or path.startswith(place.rstrip(os.sep) + os.sep)
            or (os.path.dirname(path) == os.path.dirname(place)
                and os.path.basename(path).startswith(f".{os.path.basename(place)}.")))


def output_failure(args: argparse.Namespace, error: Exception) -> str | None:
    """One line for a write that fails in an output place (RESULTS, --json, --out), naming that place.

    The one place that turns a failed write into a user error: RESULTS on a
    read-only mount, a --json path that is a folder, a full disk. None for
    other errors, and for a failing path that is no output place (a read).
    """
    if isinstance(error, OutputError):
        path, reason = error.path, str(error)
    elif isinstance(error, OSError) and error.errno in WRITE_ERRNOS and (error.filename2 or error.filename):
        path = os.fsdecode(error.filename2 or error.filename)  # a rename's target, else the path
        reason = f"cannot write {path} ({error.strerror})"
    else:
        return None
    for attr, named in OUTPUT_PLACES:
        place = getattr(args, attr, None)
        if place and _within(os.fspath(path), os.fspath(place)):
            return f"{named}={str(place)!r}: {reason}" if named == "RESULTS" else f"{named} {str(place)!r}: {reason}"
    return reason if isinstance(error, OutputError) else None


def _load(name: str):
    """The command's module: study.<where>, or that package's command.py."""
    module = importlib.import_module(f"study.{COMMANDS[name][0]}")
    return importlib.import_module(f"{module.__name__}.command") if hasattr(module, "__path__") else module


def main(argv=None) -> int:
    """Imports only the chosen command's module: torch, plotly or cleanlab load only when needed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog=program_name(), description="Hyperparameter search for a small imbalanced-image CNN.",
                    epilog="Run `%(prog)s <command> --help` for a command's options and their defaults.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=Parser)
    chosen, chosen_parser = next((a for a in argv if not a.startswith("-")), None), None
    for name, (_, help_text, description) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=description, epilog=EPILOG,
                                 formatter_class=HelpFormatter)
        if name == chosen:
            _load(name).add_arguments(command)
            chosen_parser = command
    args = parser.parse_args(argv)
    keep_freed_memory()  # every command that trains: each step then reuses resident pages (cnnlib.allocator)
    from cnnlib.device import flush_denormals  # noqa: PLC0415 - torch loads only once a command runs

    flush_denormals()  # before the first parallel op: the OpenMP threads inherit it (cnnlib.device)
    if hasattr(args, "storage") and not args.storage:  # STORAGE follows RESULTS, as in the Makefile
        from .options import default_storage  # noqa: PLC0415 - only commands with a storage need it

        args.storage = default_storage(getattr(args, "results", None) or "results")
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        if in_main_thread:
            lifetime.install_sigterm()  # SIGTERM stops the command as Ctrl-C does
            follow_parent_from_environment()  # under make: end with make, even when make is SIGKILLed
        check_env_choices(chosen_parser, args)
        check_places(args)
        return int(_load(args.command).run(args) or 0)
    except (CnnlibError, UserError) as error:
        print(f"error: {output_failure(args, error) or error}", file=sys.stderr)
        return 2
    except Exception as error:
        message = output_failure(args, error) or storage_failure(args, error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        lifetime.stop_begun()
        if str(stop) == "SIGTERM":
            print("interrupted (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if in_main_thread:
            lifetime.restore_sigterm(previous)
