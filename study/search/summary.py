"""The end of a search run: how many trials the study and this run hold, the best trial, and what to run next."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from cnnlib.metrics import Evaluation

from ..records import STOPPED_BY_DEADLINE
from . import hints
from .plan import RUN_ATTR, count_states
from .storage import open_storage
from .storage_errors import storage_failures


def print_summary(args, study_name: str, run_id: str) -> None:
    """The run's last lines, read back from the storage: the workers told their trials there, not to this process."""
    with storage_failures(args.storage):
        study = optuna.load_study(study_name=study_name, storage=open_storage(args.storage, heartbeat=False))
        total, _ = count_states(study)
        added, _ = count_states(study, run_id)
        cut = describe_deadline_stops(study, run_id)
    print(f"\nstudy {study.study_name!r}: {total} finished trials ({added} added by this run{cut})")
    print_best(study)
    print_next_steps(args, study.study_name)


def describe_deadline_stops(study: optuna.Study, run_id: str) -> str:
    """', 3 of them stopped by the deadline': this run's trials that TIMEOUT cut short, cut before the pruner's
    warm-up, or did not let start."""
    stopped = [(t.state, "epochs_run" in t.user_attrs)
               for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.FAIL))
               if t.user_attrs.get(RUN_ATTR) == run_id and t.user_attrs.get("stopped") == STOPPED_BY_DEADLINE]
    cut = sum(state == TrialState.PRUNED for state, _ in stopped)
    early = sum(state == TrialState.FAIL and trained for state, trained in stopped)
    unstarted = sum(state == TrialState.FAIL and not trained for state, trained in stopped)
    text = f", {cut} of them stopped by the deadline (PRUNED)" if cut else ""
    text += f"; {early} stopped by the deadline before the pruner's warm-up (FAIL)" if early else ""
    return text + (f"; {unstarted} asked but not trained before the deadline (FAIL)" if unstarted else "")


def print_best(study: optuna.Study) -> None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        print("no complete trial yet")
        return
    best_trials = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    for best in best_trials:
        values = ", ".join(f"{v:.4f}" for v in best.values)
        print(f"\nbest trial #{best.number}: value {values}")
        for key, value in best.params.items():
            print(f"  {key:<14} {value}")
        attrs = best.user_attrs
        if "dev_confusion_matrix" in attrs:
            evaluation = Evaluation(tuple(attrs["classes"]), __import__("numpy").asarray(attrs["dev_confusion_matrix"]))
            print(evaluation.format("dev (last epoch):"))


def print_next_steps(args, study_name: str) -> None:
    """Commands that work as printed: each carries the storage, results, study and data of this run."""
    place = hints.settings_of(args, "STORAGE", "RESULTS")
    data = hints.settings_of(args, *hints.DATA_SETTINGS, "DEVICE")
    study = {"STUDY": study_name}
    search = hints.settings_of(args, "SPACE", "STUDY", "TRIALS", "TIMEOUT", "WORKERS", FUSE=args.fuse)
    print()
    print(f"continue this study:  {hints.command('search', {**search, **place, **data})}")
    print(f"browse it:            {hints.command('dashboard', place)}")
    print(f"export CSVs:          {hints.command('export', {**study, **place})}")
    print(f"retrain the best:     {hints.command('final', {**study, **place, **data})}")
    if hints.has_password(place):  # a password never lands in a terminal log
        print("(the STORAGE password is left out above: set PGPASSWORD or ~/.pgpass and they work as printed)")
