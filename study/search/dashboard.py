"""Browse the study storage in optuna-dashboard, with each trial's report artifacts (`make dashboard`).

Serves STORAGE on 127.0.0.1:PORT (8080 unless PORT says otherwise).
The dashboard can edit and delete studies, so it listens on the loopback
interface only, unless its command line says `--host` (`make dashboard
HOST=...` passes one; a HOST exported by the shell is ignored). To look
from another machine, an SSH tunnel (`ssh -L 8080:127.0.0.1:8080 host`) keeps it private.

Each trial's page shows a note (per-class accuracy, confusion matrix) and,
under Artifacts, the report figure (SVG) and its numbers (JSON) that
`make search` attached (study/search/artifacts.py). They live in a file-system
artifact store: the folder the studies recorded, else RESULTS/artifacts.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

import optuna

from .artifacts import artifact_dir, default_results_dir, recorded_artifact_dirs
from ..errors import UserError
from ..options import add_storage_option, whole_number
from .storage import open_storage
from .storage_url import redact, storage_file

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def add_arguments(parser) -> None:
    add_storage_option(parser)
    parser.add_argument("--results", default=os.environ.get("RESULTS") or None,
                        help="results folder whose artifacts/ holds the trial reports (env RESULTS)")
    parser.add_argument("--artifacts", default=None,
                        help="artifact folder (default: the one recorded by the studies, else RESULTS/artifacts)")
    parser.add_argument("--host", default=DEFAULT_HOST,  # never from the environment: containers export HOST=0.0.0.0
                        help=f"interface to listen on (default {DEFAULT_HOST}, this machine only)")
    parser.add_argument("--port", type=whole_number("PORT", 1, 65535), default=os.environ.get("PORT") or str(DEFAULT_PORT),
                        help=f"port (env PORT, default {DEFAULT_PORT})")


def choose_artifact_dir(args, storage) -> tuple[Path, str]:
    """The artifact folder to serve, and why that one."""
    if args.artifacts:
        return Path(args.artifacts), "given with --artifacts"
    recorded = sorted(p for p in recorded_artifact_dirs(storage) if Path(p).is_dir())
    if len(recorded) == 1:
        return Path(recorded[0]), "recorded by the studies"
    if len(recorded) > 1:
        print(f"note: studies recorded several artifact folders ({', '.join(recorded)}); serving one; "
              "choose with --artifacts", file=sys.stderr)
        return Path(recorded[0]), "recorded by the studies (first of several)"
    results = Path(args.results) if args.results else default_results_dir(args.storage)
    return artifact_dir(results), "RESULTS/artifacts"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Fail with one line before the server prints that it is listening."""
    if not 0 < port < 65536:
        raise UserError(f"PORT {port} is not a port number (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(f"HOST {host!r} is not an address of this machine ({error.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use; choose another with PORT=...") from None
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror})") from None


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from optuna.artifacts import FileSystemArtifactStore  # noqa: PLC0415
    from optuna_dashboard import run_server  # noqa: PLC0415

    path = storage_file(args.storage)
    if path is not None and not path.is_file():
        raise UserError(f"no storage file at {path}; run `make search` first, or set STORAGE=... to the one it wrote")
    storage = open_storage(args.storage, heartbeat=False, read_only=True)
    studies = optuna.get_all_study_summaries(storage, include_best_trial=False)
    if not studies:
        raise UserError(f"storage {redact(args.storage)} holds no study yet; run `make search` first "
                        "(or point STORAGE=... at the storage that has one)")
    folder, why = choose_artifact_dir(args, storage)
    folder.mkdir(parents=True, exist_ok=True)
    check_port_free(args.host, args.port)
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine on port {args.port} can read, "
              "edit and delete these studies", file=sys.stderr)
    names = ", ".join(f"{s.study_name} ({s.n_trials} trials)" for s in studies)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"optuna-dashboard for {redact(args.storage)}: {names}\n"
          f"artifacts: {folder} ({why})\n"
          f"open http://{host}:{args.port}/dashboard   (Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        run_server(storage, host=args.host, port=args.port, artifact_store=FileSystemArtifactStore(folder))
    except KeyboardInterrupt:
        pass
    print("dashboard stopped", flush=True)
    return 0
