"""Run or continue an Optuna study over the seed CNN (`make search`).

Running it again continues the same study. TRIALS counts the trials this run
adds; WORKERS processes share the storage and together finish exactly that many
(COMPLETE or PRUNED): a file lock around "count, then ask" makes the quota exact
for workers on this machine, and heartbeats plus Optuna's retry callback
re-run the trial of a worker that died (journal storage has no heartbeat and is
for one machine: there a dead worker is recognised by its pid, study/search/storage.py).
Ctrl-C or SIGTERM marks the running trials FAIL with the reason and stops every
worker; a storage that fails mid-run ends it with one line; the next run
continues either way.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import warnings

import optuna
import torch
from optuna.trial import TrialState

from cnnlib.allocator import keep_freed_memory
from cnnlib.device import flush_denormals
from cnnlib.device import resolve_device
from cnnlib.errors import CnnlibError
from cnnlib.metrics import Evaluation
from cnnlib.fused import GROUP_SIZE
from cnnlib.training import DeviceData

from .. import hints, progress
from .artifacts import note_outcome, record_artifact_dir
from ..cli import interrupt_on_sigterm
from ..errors import UserError
from .objective import run_trials
from ..options import (MAX_GROUP, add_common_options, add_data_options, add_study_options, check_recorded_data,
                       choose_cpu_threads, describe_classes, env, load_splits, whole_number)
from .space import SearchSpace, load_space
from .storage import (
    claim_trial, fail_dead_local_trials, fail_unclaimed_trials, lock_path, open_storage, redact, storage_failures,
)

# We drive heartbeats ourselves around ask/tell (objective.Heartbeat) and print our own trial lines.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT_TIMEOUT = 780  # seconds: with the trial in flight, a default run ends within ~15 min on 2 cores
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 2.0
MAX_RESPAWNS_PER_WORKER = 3
STOP_SECONDS = 30  # after an interrupt, how long a worker may take to tell its trial FAIL before it is killed


def add_arguments(parser) -> None:
    parser.add_argument("--space", default=env("SPACE", "search_spaces/default.yaml"),
                        help="search-space file, or the name of a shipped one such as smoke (env SPACE)")
    add_study_options(parser)
    parser.add_argument("--trials", type=whole_number("TRIALS"), default=env("TRIALS"),
                        help="finished trials to add in this run (env TRIALS; default: the space's budget, else "
                             "no limit)")
    parser.add_argument("--timeout", type=whole_number("TIMEOUT"), default=env("TIMEOUT"),
                        help=f"seconds after which no new trial starts (env TIMEOUT; default: the space's budget, "
                             f"else {DEFAULT_TIMEOUT} when TRIALS is not set either)")
    parser.add_argument("--workers", type=whole_number("WORKERS", 1), default=env("WORKERS", "1"),
                        help="worker processes sharing the study (env WORKERS)")
    parser.add_argument("--fuse", type=whole_number("FUSE", 1, MAX_GROUP), default=env("FUSE"),
                        help="train up to K trials at once as one fused model (env FUSE; default: as wide as pays "
                             "on the device: " + ", ".join(f"{k} {v}" for k, v in GROUP_SIZE.items()) +
                             "; 1: one at a time)")
    add_data_options(parser)
    add_common_options(parser)


# --- the run's plan -------------------------------------------------------

@dataclass(frozen=True)
class RunPlan:
    """What this run set out to do, fixed before the first trial and handed to every worker process."""

    target: float  # finished trials the study holds when the run is done (inf: no trial limit)
    deadline: float  # time.time() after which no new trial starts (inf: none)
    started: float  # time.time() at the start of the run
    finished_at_start: int  # finished trials before this run: what it adds is counted from here
    trials_at_start: int  # all trials before this run: with the worker's number, its sampler's seed stream
    max_failures: int  # trials failing in a row after which a worker stops
    fuse: int  # trials asked and trained together as one fused group
    threads: int  # torch CPU threads per worker process


# --- quota and locking ----------------------------------------------------

@contextmanager
def file_lock(path: Path):
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def count_states(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials of the study."""
    states = [t.state for t in study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))]
    running = sum(s == TrialState.RUNNING for s in states)
    return len(states) - running, running


def create_study(args, space: SearchSpace, storage, stream: tuple[int, ...] = ()) -> optuna.Study:
    name = args.study or space.name
    with storage_failures(args.storage):  # e.g. a read-only file: the first write is here
        study = optuna.create_study(study_name=name, storage=storage, sampler=space.make_sampler(stream),
                                    pruner=space.make_pruner(), directions=space.directions, load_if_exists=True)
    if len(study.directions) != len(space.directions):
        raise UserError(f"study {name!r} has {len(study.directions)} objective(s) but {space.path} defines "
                        f"{len(space.directions)}; use another STUDY name")
    text = space.path.read_text()
    previous = study.user_attrs.get("space_text")
    if previous != text:
        check_space_fits_study(study, space)
    if previous is None:
        study.set_user_attr("space_file", str(space.path))
        study.set_user_attr("space_text", text)
        study.set_user_attr("objectives", space.objectives)
        space.enqueue_into(study)  # warm start: the known points are the first trials of a new study
    elif previous != text:
        print(f"note: {space.path} differs from the space file study {name!r} began with "
              f"({study.user_attrs.get('space_file')}); new trials use its ranges", file=sys.stderr)
    if study.metric_names is None:  # the dashboard then labels its axes "dev_macro_accuracy", not "Objective 0"
        study.set_metric_names(list(space.objectives))
    return study


def check_space_fits_study(study: optuna.Study, space: SearchSpace) -> None:
    """Refuse a space whose params Optuna would reject trial after trial in this study.

    A param keeps its kind and, if categorical, its choices for the life of a
    study ("CategoricalDistribution does not support dynamic value space"):
    another space file, or an edited one, must not change them.
    """
    wanted = space.distributions()
    began = f" (begun with {study.user_attrs['space_file']})" if study.user_attrs.get("space_file") else ""
    for trial in study.get_trials(deepcopy=False):
        for name, before in trial.distributions.items():
            if name not in wanted:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(before, wanted[name])
            except ValueError:
                raise UserError(f"{space.path}: params.{name} is {wanted[name]}, but study {study.study_name!r}{began} "
                                f"asked it as {before} in trial {trial.number}; choose another STUDY=... for this space"
                                ) from None


def record_data(study: optuna.Study, args, splits) -> None:
    """The class order and split a study was searched on, stated once and kept on the study.

    Later commands read them back: `make export` writes them beside the CSVs,
    `make final` refuses another split. A run on another class order or
    another split (other counts, CORRECTIONS, images) is refused as
    `make final` refuses it: its trials' dev scores would be ranked beside
    scores on another dev set.
    """
    recorded = study.user_attrs.get("classes")
    if recorded is not None and list(recorded) != list(splits.classes):
        raise UserError(f"study {study.study_name!r} was searched with classes {','.join(recorded)}; this run reads "
                        f"{','.join(splits.classes)} (check DATA and CLASSES, or use another STUDY name)")
    check_recorded_data(study, splits, args.corrections,
                        fix="pass the same data options as before, or use a new STUDY name for this split")
    if recorded is None:
        study.set_user_attr("classes", list(splits.classes))
    if study.user_attrs.get("split_cache_key") is None:  # a new study, or one from before the split was recorded
        for name, value in splits.record().items():  # cnnlib.splits.RECORD_KEYS
            study.set_user_attr(name, value)


# --- progress ---------------------------------------------------------------

def _bar(done: int, total: int | None, width: int = 24) -> str:
    if not total:
        return f"{done} finished"
    filled = min(width, round(width * done / total))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def budget_text(started: float, deadline: float, now: float | None = None) -> str:
    """'4.5 min elapsed, 8.5 min of 13.0 left': how much of the run's time budget remains."""
    now = time.time() if now is None else now
    text = f"{(now - started) / 60:.1f} min elapsed"
    if deadline == float("inf"):
        return text
    left = deadline - now
    if left <= 0:
        return f"{text}, time budget used up: no new trial starts"
    return f"{text}, {left / 60:.1f} min of {(deadline - started) / 60:.1f} left for new trials"


def format_trial_line(frozen, run_done: int, run_total: int | None, started: float, worker: str,
                      deadline: float = float("inf")) -> str:
    params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in frozen.params.items())
    value = "" if frozen.values is None else " value=" + ",".join(f"{v:.4f}" for v in frozen.values)
    per = frozen.user_attrs.get("dev_per_class")
    per_text = f" ({' '.join(f'{c} {a:.2f}' for c, a in per.items())})" if per else ""
    reason = frozen.user_attrs.get("pruned_reason") or frozen.user_attrs.get("fail_reason") or ""
    seconds = frozen.user_attrs.get("train_seconds")
    return (f"{worker}trial {frozen.number:>4} {frozen.state.name:<8}{value}{per_text}"
            f"{f' {seconds:.1f}s' if seconds else ''}  {params}{f'  [{reason}]' if reason else ''}\n"
            f"      {_bar(run_done, run_total)} this run, {budget_text(started, deadline)}")


# --- the worker loop ------------------------------------------------------

def ask_trials(study: optuna.Study, space: SearchSpace, count: int) -> list[optuna.Trial]:
    """Ask `count` trials that can train as one fused group.

    The first trial (a waiting warm-start point, or the sampler's pick) leads;
    the others are asked with the leader's batch settings fixed
    (SearchSpace.shared_params, through Optuna's PartialFixedSampler), so
    they share its batches and fill its group instead of scattering over
    batch size x augmentation. A waiting enqueued point is always taken as
    it is, whatever the leader's settings.
    """
    leader = study.ask()
    trials = [leader]
    if count > 1:
        try:
            space.suggest(leader)  # define-by-run: the leader's params exist once suggested (run_trials reads them back)
        except Exception:  # noqa: BLE001 - an impossible config; run_trials records why
            return trials + [study.ask() for _ in range(count - 1)]
        fixed, sampler = space.shared_params(leader.params), study.sampler
        if fixed:
            study.sampler = optuna.samplers.PartialFixedSampler(fixed, sampler)
        try:
            for _ in range(count - 1):
                trials.append(study.ask())
                try:  # now, while the fixing sampler is in place: a param is drawn when first suggested
                    space.suggest(trials[-1])
                except Exception:  # noqa: BLE001 - an impossible config; run_trials records why
                    pass
        finally:
            study.sampler = sampler
    return trials


def worker_loop(args, space: SearchSpace, plan: RunPlan, worker: str = "", number: int = 0) -> int:
    """Ask, train and tell trials until the study holds `plan.target` finished trials or time is up.

    `number` (0, 1, ... for each worker process this run starts) and the study's
    trial count at the start of the run pick the sampler's seed stream, so
    neither parallel workers nor a resumed run re-propose existing trials.
    """
    storage = open_storage(args.storage)
    study = create_study(args, space, storage, stream=(plan.trials_at_start, number))
    target, deadline = plan.target, plan.deadline
    data = DeviceData(load_splits(args), resolve_device(args.device))
    lock = lock_path(args.storage, study.study_name, Path(args.results))
    failures = 0
    run_total = None if target == float("inf") else int(target - plan.finished_at_start)
    while True:
        with file_lock(lock):
            # Under the lock: two local workers never both fail, and both re-queue, one dead worker's trial.
            optuna.storages.fail_stale_trials(study)
            fail_dead_local_trials(study)  # journal storage: no heartbeat, so check this machine's pids
            fail_unclaimed_trials(study)  # RUNNING without an owner: study.ask() failed after storing it
            finished, running = count_states(study)
            room = target - finished - running
            count = int(min(plan.fuse, room)) if room >= 1 and time.time() < deadline else 0
            trials = ask_trials(study, space, count) if count else []
            for trial in trials:
                claim_trial(study, trial)
        if not trials:
            if finished >= target or time.time() >= deadline:
                return 0
            time.sleep(POLL_SECONDS)  # others' trials are in flight; one may still die and need a retry
            continue
        def report(group: list) -> None:
            """One line per trial as soon as its fused group is told (not when the whole ask is)."""
            nonlocal failures
            progress.clear()
            # A fused group is told all at once: count its members one by one, so each line shows its own step.
            done = count_states(study)[0] - plan.finished_at_start - sum(f.state in FINISHED for f in group)
            for frozen in group:
                failures = failures + 1 if frozen.state == TrialState.FAIL else 0
                done += frozen.state in FINISHED
                note_outcome(study, frozen)  # a pruned or failed trial's dashboard note says so, and why
                print(format_trial_line(frozen, done, run_total, plan.started, worker, deadline), flush=True)

        results = run_trials(study, trials, space, data, on_told=report)
        frozen = results[-1]
        if failures >= plan.max_failures:
            print(f"{worker}stopping: {failures} trials failed in a row; last reason: {frozen.user_attrs.get('fail_reason')}",
                  file=sys.stderr, flush=True)
            return 3


def _worker_process(args, index: int, number: int, plan: RunPlan) -> None:
    """Entry point of one worker process; threads split the cores so workers do not oversubscribe them."""
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)  # run_workers passes SIGTERM on: stop as on Ctrl-C
    keep_freed_memory()  # a spawned process starts with the C library's defaults
    flush_denormals()  # and with the CPU's: before its first parallel op
    torch.set_num_threads(plan.threads)
    progress.configure(bar=False, prefix=f"[w{index}] ")  # workers share the terminal: lines, each tagged
    space = load_space(args.space)
    try:
        with storage_failures(args.storage):
            sys.exit(worker_loop(args, space, plan, worker=f"[w{index}] ", number=number))
    except KeyboardInterrupt:
        sys.exit(130)
    except (UserError, CnnlibError) as error:
        print(f"[w{index}] error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_workers(args, space: SearchSpace, plan: RunPlan) -> int:
    """N processes on the shared storage; a worker that dies is replaced while the quota is unmet.

    Returns the first error exit code of a worker (3: too many failed trials,
    1: it crashed, 128+signal: killed too often), so a run whose workers broke
    does not report success.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = {}
    respawns, started, code = 0, 0, 0
    for i in range(args.workers):
        procs[i] = ctx.Process(target=_worker_process, args=(args, i, started, plan), daemon=False)
        procs[i].start()
        started += 1
    storage = open_storage(args.storage, heartbeat=False)
    name = args.study or space.name
    try:
        while procs:
            time.sleep(POLL_SECONDS)
            for i, proc in list(procs.items()):
                if proc.is_alive():
                    continue
                del procs[i]
                if proc.exitcode and proc.exitcode < 0:  # killed by a signal
                    finished, _ = count_states(optuna.load_study(study_name=name, storage=storage))
                    if finished >= plan.target or time.time() >= plan.deadline:
                        continue  # its work is done anyway
                    if respawns < MAX_RESPAWNS_PER_WORKER * args.workers:
                        print(f"worker {i} died (signal {-proc.exitcode}); starting a replacement", file=sys.stderr)
                        respawns += 1
                        procs[i] = ctx.Process(target=_worker_process, args=(args, i, started, plan))
                        procs[i].start()
                        started += 1
                        continue
                    print(f"worker {i} died (signal {-proc.exitcode}); {respawns} replacements already, giving up on it",
                          file=sys.stderr)
                    code = code or 128 - proc.exitcode
                elif proc.exitcode and not code:  # 3: it gave up on failing trials; 1: it crashed
                    code = proc.exitcode
    except KeyboardInterrupt as interrupt:
        stop_workers(list(procs.values()), workers_interrupted=str(interrupt) != "SIGTERM")
        raise
    return code


def stop_workers(procs: list, workers_interrupted: bool) -> None:
    """Stop the workers after an interrupt; none outlives this process.

    Ctrl-C in a terminal reaches the whole process group, workers included
    (`workers_interrupted`): they get a moment to tell their trials FAIL. SIGTERM (make
    passes it on to its recipe only) and a SIGINT sent to this process alone
    do not reach them, so they get SIGTERM. One that does not stop in time is
    killed; its trial is then failed and retried like any dead worker's.
    """
    handlers = {number: signal.signal(number, signal.SIG_IGN)  # a second interrupt must not cut this short
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        if workers_interrupted:
            _join(procs, 5)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        _join(procs, STOP_SECONDS)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        _join(procs, 5)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def _join(procs: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))


# --- the command ------------------------------------------------------------

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


def run(args) -> int:
    space = load_space(args.space)  # fails here, before any training, on a bad file
    device = resolve_device(args.device)  # and here on a device this machine does not have
    fuse = args.fuse if args.fuse is not None else GROUP_SIZE.get(device.type, 1)
    splits = load_splits(args)  # build the cached split once, before workers race for it
    storage = open_storage(args.storage)
    study = create_study(args, space, storage)
    record_data(study, args, splits)
    record_artifact_dir(study, Path(args.results))  # trial reports go to RESULTS/artifacts, wherever the storage is
    finished, running = count_states(study)
    trials = args.trials if args.trials is not None else space.budget.get("trials")
    grid = space.grid_size()
    if grid is not None:
        remaining = max(0, grid - finished)
        trials = remaining if trials is None else min(trials, remaining)
        if remaining == 0:
            print(f"grid study {study.study_name!r} is complete ({finished} trials)")
            print_best(study)
            return 0
    timeout = args.timeout if args.timeout is not None else space.budget.get("timeout")
    if timeout is None:
        timeout = None if trials is not None else DEFAULT_TIMEOUT
    started = time.time()
    threads, why = choose_cpu_threads(device, args.workers)  # workers share the cores out
    plan = RunPlan(target=finished + trials if trials is not None else float("inf"),
                   deadline=started + timeout if timeout else float("inf"), started=started,
                   finished_at_start=finished, trials_at_start=len(study.get_trials(deepcopy=False)),
                   max_failures=max(3, 2 * (trials or 5)), fuse=fuse, threads=threads)
    if args.workers == 1:
        torch.set_num_threads(threads)
    budget = " and ".join(filter(None, [f"{trials} trials" if trials is not None else "",
                                        f"{timeout / 60:.1f} min ({timeout} s)" if timeout else ""]))
    print(f"study {study.study_name!r} in {redact(args.storage)}: {finished} finished trials so far; "
          f"this run adds up to {budget} with {args.workers} worker(s) on {device}"
          + (f", {threads} thread(s) each ({why})" if why else ""), flush=True)
    print(f"space: {space.path}\n{describe_classes(args, splits.classes)}", flush=True)
    with storage_failures(args.storage):
        if args.workers == 1:
            code = worker_loop(args, space, plan)
        else:
            code = run_workers(args, space, plan)
        study = optuna.load_study(study_name=study.study_name, storage=open_storage(args.storage, heartbeat=False))
        total, _ = count_states(study)
    print(f"\nstudy {study.study_name!r}: {total} finished trials ({total - finished} added by this run)")
    print_best(study)
    print_next_steps(args, study.study_name)
    return code


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
