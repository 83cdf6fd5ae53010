"""The worker processes of a run with WORKERS > 1: how many can run, starting them, replacing one that dies, stopping them.

Workers are spawned processes on the shared storage; each runs worker.worker_loop.
No worker outlives the search (study/lifetime.py): one whose search is killed
follows it, and after an interrupt every worker is told to stop, then killed.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from pathlib import Path

import optuna
import torch

from cnnlib.allocator import keep_freed_memory
from cnnlib.device import flush_denormals
from cnnlib.errors import CnnlibError

from .. import lifetime, progress
from ..errors import UserError
from ..lifetime import follow_parent
from .plan import RunPlan, count_states
from .space import SearchSpace
from .space_file import load_space
from .storage import open_storage
from .storage_errors import storage_failures
from .worker import POLL_SECONDS, worker_loop

MAX_RESPAWNS_PER_WORKER = 3
STOP_SECONDS = 30  # after an interrupt, how long a worker may take to tell its trial FAIL before it is killed
# Memory one worker needs, with a margin: a search process peaked at 1.3 GB resident training a fused
# group of 4 smoke trials on the shared data (2-core CPU, torch 2.14.1+cu130, /usr/bin/time -v, n=1).
WORKER_MEMORY = 1.5 * 2 ** 30


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


def _worker_process(args, index: int, plan: RunPlan) -> None:
    """Entry point of one worker process; threads split the cores so workers do not oversubscribe them."""
    lifetime.install_sigterm()  # run_workers passes SIGTERM on: stop as on Ctrl-C
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
        lifetime.stop_begun()  # more parent-death signals must not cut the exit short
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
            lifetime.check_interrupt()
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
    except KeyboardInterrupt as stop:
        lifetime.stop_begun()
        stop_workers(list(procs.values()), workers_interrupted=str(stop) != "SIGTERM")
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
