"""Run or continue an Optuna study over the seed CNN (`make search`): its options, and the run from start to end.

Running it again continues the same study. TRIALS counts the trials this run
adds; WORKERS processes (capped at what can run: worker_processes.cap_workers)
share the storage and together finish exactly that many (COMPLETE or PRUNED).
Each run draws a random id that marks its trials (plan.RUN_ATTR), so the quota
and "added by this run" count this run's own trials whatever other runs add
to the study meanwhile; a file lock around "count, then ask" (locks.py) makes
the quota exact for the run's workers, and heartbeats plus Optuna's retry
callback re-run the trial of a worker that died (journal storage has no
heartbeat and is for one machine: there a dead worker is recognised by its
pid, trial_claims.py).
TIMEOUT is the time the run's trials may train: every worker stops its
trials at the one deadline of the run (deadline.py), so a run ends within
its TIMEOUT plus the set-up and the last trials' reports.
Ctrl-C or SIGTERM marks the running trials FAIL with the reason and stops every
worker; a storage that fails mid-run ends it with one line; the next run
continues either way. No process of a run outlives it (study/lifetime.py), and
docs/parallel.md says what holds under kills and concurrent starts.

The run, in order: the study (study_setup), the plan (plan), the workers
(worker, or worker_processes for WORKERS > 1), the summary (summary).
"""

from __future__ import annotations

import sys

import torch

from cnnlib.device import resolve_device
from cnnlib.step import GROUP_SIZE

from ..data import data_config, describe_classes, describe_split, load_splits
from ..options import MAX_GROUP, add_common_options, add_data_options, add_study_options, env, whole_number
from .plan import DEFAULT_TIMEOUT, choose_limits, count_states, describe_limits, plan_run
from .space_file import load_space
from .storage_errors import storage_failures
from .storage_url import redact
from .study_setup import prepare_study
from .summary import print_best, print_summary
from .worker import worker_loop
from .worker_processes import cap_workers, run_workers


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


def run(args) -> int:
    space = load_space(args.space)  # fails here, before any training, on a bad file
    device = resolve_device(args.device)  # and here on a device this machine does not have
    fuse = args.fuse if args.fuse is not None else GROUP_SIZE.get(device.type, 1)
    splits = load_splits(args)  # build the cached split once, before workers race for it
    study = prepare_study(args, space, splits)
    finished, _ = count_states(study)
    limits = choose_limits(args, space, finished)
    if limits is None:
        print(f"grid study {study.study_name!r} is complete ({finished} trials)")
        print_best(study)
        return 0
    workers, capped = cap_workers(args.workers, limits.trials, fuse)
    if capped:
        print(capped, file=sys.stderr, flush=True)
    plan, why = plan_run(limits, workers, fuse, device)
    if workers == 1:
        torch.set_num_threads(plan.threads)
    print(f"study {study.study_name!r} in {redact(args.storage)}: {finished} finished trials so far; "
          f"this run adds {describe_limits(limits.trials, limits.trials_from, limits.timeout, limits.timeout_from)}; "
          f"{workers} worker(s) on {device}" + (f", {plan.threads} thread(s) each ({why})" if why else ""), flush=True)
    print(f"space: {space.path}\n{describe_classes(args, splits.classes)}\n{describe_split(splits, data_config(args))}",
          flush=True)
    with storage_failures(args.storage):
        code = worker_loop(args, space, plan) if workers == 1 else run_workers(args, space, plan)
    print_summary(args, study.study_name, plan.run_id)
    return code
