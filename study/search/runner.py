"""Run or continue an Optuna study over the seed CNN (`make search`).

Running it again continues the same study. TRIALS counts the trials this run
adds; WORKERS processes (capped at what can run: cap_workers) share the storage
and together finish exactly that many (COMPLETE or PRUNED). Each run draws a
random id that marks its trials, so the quota and "added by this run" count
this run's own trials whatever other runs add to the study meanwhile; a file
lock around "count, then ask" makes the quota exact for the run's workers, and
heartbeats plus Optuna's retry callback
re-run the trial of a worker that died (journal storage has no heartbeat and is
for one machine: there a dead worker is recognised by its pid, study/search/storage.py).
TIMEOUT is the time the run's trials may train: every worker stops its
trials at the one deadline of the run (study/search/deadline.py), so a run
ends within its TIMEOUT plus the set-up and the last trials' reports.
Ctrl-C or SIGTERM marks the running trials FAIL with the reason and stops every
worker; a storage that fails mid-run ends it with one line; the next run
continues either way. No process of a run outlives it (study/lifetime.py), and
docs/parallel.md says what holds under kills and concurrent starts.
"""

from __future__ import annotations

import fcntl
import math
import multiprocessing
import multiprocessing.connection
import os
import secrets
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
from cnnlib.step import GROUP_SIZE
from cnnlib.training import DeviceData

from .. import hints, progress
from .artifacts import note_outcome, record_artifact_dir
from ..cli import interrupt_on_sigterm
from ..errors import UserError
from ..lifetime import follow_parent
from .deadline import Deadline
from .objective import STOPPED_BY_DEADLINE, run_trials
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

DEFAULT_TIMEOUT = 780  # seconds: with the set-up, a default run takes about 14 min
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 2.0
MAX_RESPAWNS_PER_WORKER = 3
STOP_SECONDS = 30  # after an interrupt, how long a worker may take to tell its trial FAIL before it is killed
RUN_ATTR = "search_run"  # trial user attribute: the id of the run whose worker trained the trial
# Memory one worker needs, with a margin: a search process peaked at 1.3 GB resident training a fused
# group of 4 smoke trials on the shared data (2-core CPU, torch 2.14.1+cu130, /usr/bin/time -v, n=1).
WORKER_MEMORY = 1.5 * 2 ** 30


def add_arguments(parser) -> None:
    parser.add_argument("--space", default=env("SPACE", "search_spaces/default.yaml"),
                        help="search-space file, or the name of a shipped one such as smoke (env SPACE)")
    add_study_options(parser)
    parser.add_argument("--trials", type=whole_number("TRIALS", 1), default=env("TRIALS"),
                        help="finished trials to add in this run (env TRIALS; default: the space's budget, else "
                             "no trial limit)")
    parser.add_argument("--timeout", type=whole_number("TIMEOUT", 1), default=env("TIMEOUT"),
                        help=f"seconds the run's trials may train: trials still training then stop and are recorded "
                             f"PRUNED (env TIMEOUT; default: the space's budget, else {DEFAULT_TIMEOUT} when TRIALS is "
                             f"not set either, else no time limit)")
    parser.add_argument("--workers", type=whole_number("WORKERS", 1), default=env("WORKERS", "1"),
                        help="worker processes sharing the study, at most what can run: trials left, CPU cores, "
                             "memory (env WORKERS)")
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

    run_id: str  # marks this run's trials (RUN_ATTR): its quota counts them alone
    trials: float  # finished trials this run adds (inf: no trial limit)
    deadline: float  # time.time() by which every worker has stopped training (inf: none)
    started: float  # time.time() at the start of the run
    workers: int  # worker processes: WORKERS, capped at what can run
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


def count_states(study: optuna.Study, run_id: str | None = None) -> tuple[int, int]:
    """(finished, running) trials of the study, or of one run (`run_id`) alone.

    A run counts its own trials, never the difference of two totals: runs started
    together on one storage (two `make search`, several machines) add trials meanwhile.
    """
    states = [t.state for t in study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
              if run_id is None or t.user_attrs.get(RUN_ATTR) == run_id]
    running = sum(s == TrialState.RUNNING for s in states)
    return len(states) - running, running


def create_study(args, space: SearchSpace, storage) -> optuna.Study:
    name = args.study or space.name
    with storage_failures(args.storage):  # e.g. a read-only file: the first write is here
        study = optuna.create_study(study_name=name, storage=storage, sampler=space.make_sampler(),
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
        return f"{text}, time budget used up"
    return f"{text}, {left / 60:.1f} min of {(deadline - started) / 60:.1f} left"


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


def worker_loop(args, space: SearchSpace, plan: RunPlan, worker: str = "") -> int:
    """Ask, train and tell trials until this run has added `plan.trials` finished trials or time is up.

    Each process builds its own sampler; it seeds every trial from the trial's
    number (SearchSpace.make_sampler), so no two workers, runs or machines draw
    the same stream.
    """
    storage = open_storage(args.storage)
    study = create_study(args, space, storage)
    target, deadline = plan.trials, Deadline.for_space(plan.deadline, space)
    data = DeviceData(load_splits(args), resolve_device(args.device))
    lock = lock_path(args.storage, study.study_name, Path(args.results))
    failures = 0
    run_total = None if target == float("inf") else int(target)
    while True:
        with file_lock(lock):
            # Under the lock: two local workers never both fail, and both re-queue, one dead worker's trial.
            optuna.storages.fail_stale_trials(study)
            fail_dead_local_trials(study)  # journal storage: no heartbeat, so check this machine's pids
            fail_unclaimed_trials(study)  # RUNNING without an owner: study.ask() failed after storing it
            finished, running = count_states(study, plan.run_id)
            room = target - finished - running
            count = deadline.group_that_fits(int(min(plan.fuse, room))) if room >= 1 else 0
            trials = ask_trials(study, space, count) if count else []
            for trial in trials:
                claim_trial(study, trial)
                trial.set_user_attr(RUN_ATTR, plan.run_id)  # a retried trial carried its first run's id
        if not trials:
            if finished >= target or not deadline.group_that_fits(1):
                return 0
            time.sleep(POLL_SECONDS)  # others' trials are in flight; one may still die and need a retry
            continue
        def report(group: list) -> None:
            """One line per trial as soon as its fused group is told (not when the whole ask is)."""
            nonlocal failures
            progress.clear()
            # A fused group is told all at once: count its members one by one, so each line shows its own step.
            done = count_states(study, plan.run_id)[0] - sum(f.state in FINISHED for f in group)
            for frozen in group:
                if frozen.user_attrs.get("stopped") != STOPPED_BY_DEADLINE:  # untrained, not failing
                    failures = failures + 1 if frozen.state == TrialState.FAIL else 0
                done += frozen.state in FINISHED
                note_outcome(study, frozen)  # a pruned or failed trial's dashboard note says so, and why
                print(format_trial_line(frozen, done, run_total, plan.started, worker, plan.deadline), flush=True)

        results = run_trials(study, trials, space, data, on_told=report, deadline=deadline)
        frozen = results[-1]
        if failures >= plan.max_failures:
            print(f"{worker}stopping: {failures} trials failed in a row; last reason: {frozen.user_attrs.get('fail_reason')}",
                  file=sys.stderr, flush=True)
            return 3


def _worker_process(args, index: int, plan: RunPlan) -> None:
    """Entry point of one worker process; threads split the cores so workers do not oversubscribe them."""
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)  # run_workers passes SIGTERM on: stop as on Ctrl-C
    follow_parent(multiprocessing.parent_process().pid)  # a search killed with SIGKILL takes its workers along
    keep_freed_memory()  # a spawned process starts with the C library's defaults
    flush_denormals()  # and with the CPU's: before its first parallel op
    torch.set_num_threads(plan.threads)
    progress.configure(bar=False, prefix=f"[w{index}] ")  # workers share the terminal: lines, each tagged
    space = load_space(args.space)
    try:
        with storage_failures(args.storage):
            sys.exit(worker_loop(args, space, plan, worker=f"[w{index}] "))
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
    respawns, code = 0, 0
    for i in range(plan.workers):
        procs[i] = ctx.Process(target=_worker_process, args=(args, i, plan), daemon=False)
        procs[i].start()
    storage = open_storage(args.storage, heartbeat=False)
    name = args.study or space.name
    try:
        while procs:
            # Woken as soon as a worker ends: the run ends with its last worker, not up to a poll later.
            multiprocessing.connection.wait([proc.sentinel for proc in procs.values()], timeout=POLL_SECONDS)
            for i, proc in list(procs.items()):
                if proc.is_alive():
                    continue
                del procs[i]
                if proc.exitcode and proc.exitcode < 0:  # killed by a signal
                    finished, _ = count_states(optuna.load_study(study_name=name, storage=storage), plan.run_id)
                    if finished >= plan.trials or time.time() >= plan.deadline:
                        continue  # its work is done anyway
                    if respawns < MAX_RESPAWNS_PER_WORKER * plan.workers:
                        print(f"worker {i} died (signal {-proc.exitcode}); starting a replacement", file=sys.stderr)
                        respawns += 1
                        procs[i] = ctx.Process(target=_worker_process, args=(args, i, plan))
                        procs[i].start()
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
    # Runs started together on this machine: one creates the study and queues its warm-start points, the
    # other then finds them queued (enqueue_trial's skip_if_exists) instead of queueing them twice.
    with file_lock(lock_path(args.storage, args.study or space.name, Path(args.results))):
        study = create_study(args, space, storage)
    record_data(study, args, splits)
    record_artifact_dir(study, Path(args.results))  # trial reports go to RESULTS/artifacts, wherever the storage is
    finished, running = count_states(study)
    trials, trials_from = (args.trials, "TRIALS") if args.trials is not None else (space.budget.get("trials"),
                                                                                   "the space's budget")
    grid = space.grid_size()
    if grid is not None:
        remaining = max(0, grid - finished)
        if remaining == 0:
            print(f"grid study {study.study_name!r} is complete ({finished} trials)")
            print_best(study)
            return 0
        if trials is None or remaining < trials:
            trials, trials_from = remaining, "the grid points left"
    timeout, timeout_from = ((args.timeout, "TIMEOUT") if args.timeout is not None
                             else (space.budget.get("timeout"), "the space's budget"))
    if timeout is None and trials is None:
        timeout, timeout_from = DEFAULT_TIMEOUT, "the default when neither TRIALS nor TIMEOUT is set"
    workers, capped = cap_workers(args.workers, trials, fuse)
    if capped:
        print(capped, file=sys.stderr, flush=True)
    started = time.time()
    threads, why = choose_cpu_threads(device, workers)  # workers share the cores out
    plan = RunPlan(run_id=secrets.token_hex(8), trials=trials if trials is not None else float("inf"),
                   deadline=started + timeout if timeout is not None else float("inf"), started=started,
                   workers=workers, max_failures=max(3, 2 * (trials or 5)), fuse=fuse, threads=threads)
    if workers == 1:
        torch.set_num_threads(threads)
    print(f"study {study.study_name!r} in {redact(args.storage)}: {finished} finished trials so far; "
          f"this run adds {describe_limits(trials, trials_from, timeout, timeout_from)}; {workers} worker(s) on {device}"
          + (f", {threads} thread(s) each ({why})" if why else ""), flush=True)
    print(f"space: {space.path}\n{describe_classes(args, splits.classes)}", flush=True)
    with storage_failures(args.storage):
        if workers == 1:
            code = worker_loop(args, space, plan)
        else:
            code = run_workers(args, space, plan)
        study = optuna.load_study(study_name=study.study_name, storage=open_storage(args.storage, heartbeat=False))
        total, _ = count_states(study)
        added, _ = count_states(study, plan.run_id)
        cut = describe_deadline_stops(study, plan.run_id)
    print(f"\nstudy {study.study_name!r}: {total} finished trials ({added} added by this run{cut})")
    print_best(study)
    print_next_steps(args, study.study_name)
    return code


def describe_limits(trials: int | None, trials_from: str | None, timeout: int | None, timeout_from: str | None) -> str:
    """What ends the run, and where each limit comes from: 'up to 4 trials (TRIALS); no time limit'."""
    time_limit = None if timeout is None else (f"{timeout / 60:.1f} min ({timeout} s, {timeout_from}), then stops "
                                               f"the trials still training (PRUNED)")
    if trials is not None and time_limit:
        return f"up to {trials} trials ({trials_from}) and trains for up to {time_limit}"
    if trials is not None:
        return f"up to {trials} trials ({trials_from}); no time limit"
    if time_limit:
        return f"trials for up to {time_limit}; no trial limit"
    return "trials with no trial or time limit: it runs until stopped (Ctrl-C)"


def describe_deadline_stops(study: optuna.Study, run_id: str) -> str:
    """', 3 of them stopped by the deadline': this run's trials that TIMEOUT cut short, or did not let start."""
    stopped = [t.state for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.FAIL))
               if t.user_attrs.get(RUN_ATTR) == run_id and t.user_attrs.get("stopped") == STOPPED_BY_DEADLINE]
    cut, unstarted = stopped.count(TrialState.PRUNED), stopped.count(TrialState.FAIL)
    text = f", {cut} of them stopped by the deadline (PRUNED)" if cut else ""
    return text + (f"; {unstarted} asked but not trained before the deadline (FAIL)" if unstarted else "")


def cap_workers(requested: int, trials: int | None, fuse: int, cores: int | None = None,
                memory: float | None = None) -> tuple[int, str]:
    """WORKERS lowered to what can run, and a one-line note saying why ("" when all can).

    A worker beyond the trials left has nothing to ask; beyond the cores it only
    slows the others (each imports torch and trains on at least one thread);
    beyond memory it is killed. 64 workers on 2 cores showed no trial in 200 s
    where one worker took 7 s. `cores` and `memory` (bytes available) default to this machine's.
    """
    cores = cores or usable_cores()
    memory = available_memory() if memory is None else memory
    limits = {}
    if trials is not None:
        per = f", up to {fuse} per worker (FUSE)" if fuse > 1 else ""
        limits[math.ceil(trials / fuse)] = f"{trials} trials left to run{per}"
    limits.setdefault(cores, f"{cores} CPU cores")
    if memory is not None:
        fits = max(1, int(memory // WORKER_MEMORY))
        limits.setdefault(fits, f"memory for {fits} ({memory / 2 ** 30:.1f} GiB available, "
                                f"about {WORKER_MEMORY / 2 ** 30:.1f} GiB a worker)")
    workers = min(requested, *limits)
    if workers == requested:
        return requested, ""
    return workers, f"note: WORKERS={requested} lowered to {workers}: {limits[workers]}"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's cpuset), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_memory() -> float | None:
    """Bytes of memory available for new processes (Linux MemAvailable, else free pages); None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
