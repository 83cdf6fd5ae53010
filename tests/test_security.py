"""Files and names a user is handed are data, never code: pickles, checkpoints, study names, paths, make variables.

Every attack here tries to create a marker file; the test fails if the marker
ever appears. The dashboard, which can edit and delete studies, must listen
on the loopback interface unless the user asks otherwise on the command line.
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from cnnlib.atomic import atomic_path, write_json
from cnnlib.checkpoint import FORMAT, save_checkpoint
from cnnlib.config import TrainConfig
from cnnlib.errors import OutputError
from cnnlib.model import SeedCNN
from conftest import STUDY_ENV, build_image_tree, class_image, run_cli
from study.output import write_csv
from study.search.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("car", "truck", "cat")


pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


def clean_env(**extra: str) -> dict:
    """This environment without the study variables, nor an outer `make test`'s flags."""
    env = {k: v for k, v in os.environ.items() if k not in STUDY_ENV + ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(extra)
    return env


class WritesMarker:
    """Unpickling this object runs `touch <marker>`: proof of whether a file was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


# --- pickles -----------------------------------------------------------------------------------

def pickle_folder(folder: Path, marker: Path, suffix: str = ".pickle") -> Path:
    """train/dev files that look like the user's legacy pickles, with a code payload inside."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        pairs = [(class_image("car", 0), 0), (WritesMarker(marker), 1)]
        (folder / f"{split}{suffix}").write_bytes(pickle.dumps(pairs))
    return folder


@pytest.mark.parametrize("trust", [None, "0", "no", ""], ids=["unset", "0", "no", "empty"])
def test_a_pickle_that_runs_code_is_refused_without_the_trust_flag(tmp_path, monkeypatch, trust):
    marker = tmp_path / "pwned"
    folder = pickle_folder(tmp_path / "data", marker)
    if trust is not None:
        monkeypatch.setenv("TRUST_PICKLE", trust)

    code, _, err = run_cli("data", "--data", folder, "--results", tmp_path / "results")

    assert code == 2
    assert err.startswith(f"error: {folder / 'train.pickle'}: refusing to unpickle") and "--trust-pickle" in err
    assert not marker.exists()


def test_a_pickle_renamed_to_npz_is_not_unpickled_either(tmp_path):
    """np.load falls back to unpickling a file that is not a zip; the .npz reader must never get there."""
    marker = tmp_path / "pwned"
    folder = pickle_folder(tmp_path / "data", marker, suffix=".npz")

    code, _, err = run_cli("data", "--data", folder, "--results", tmp_path / "results")

    assert code == 2 and "not a readable .npz" in err
    assert not marker.exists()


def test_the_trust_flag_really_is_what_stands_between_a_pickle_and_its_code(tmp_path):
    """The control for the tests above: the same file, trusted, does run its payload."""
    marker = tmp_path / "pwned"
    folder = pickle_folder(tmp_path / "data", marker)

    run_cli("data", "--data", folder, "--results", tmp_path / "results", "--trust-pickle")

    assert marker.exists()


def test_make_data_without_trust_pickle_refuses_the_pickle(tmp_path):
    marker = tmp_path / "pwned"
    folder = pickle_folder(tmp_path / "data", marker)

    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", "data",
                           f"PY={sys.executable}", f"DATA={folder}", f"RESULTS={tmp_path / 'results'}"],
                          capture_output=True, text=True, timeout=300, env=clean_env())

    assert done.returncode != 0 and "refusing to unpickle" in done.stderr
    assert not marker.exists()


# --- checkpoints ------------------------------------------------------------------------------

def test_evaluate_refuses_a_checkpoint_that_carries_code_and_never_runs_it(tmp_path):
    marker = tmp_path / "pwned"
    root = build_image_tree(tmp_path / "data", {c: 6 for c in CLASSES}, {c: 6 for c in CLASSES})
    checkpoint = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "state_dict": {}, "config": TrainConfig().to_dict(), "classes": list(CLASSES),
                "image_size": 32, "extra": {"note": WritesMarker(marker)}}, checkpoint)

    code, _, err = run_cli("evaluate", "--checkpoint", checkpoint, "--data", root, "--results", tmp_path,
                           "--device", "cpu", "--train-counts", "6,6,6", "--dev-counts", "3,3,3",
                           "--test-counts", "3,3,3")

    assert code == 2 and err.startswith(f"error: {checkpoint}: not a loadable checkpoint")
    assert len(err.strip().splitlines()) == 1
    assert "weights_only" not in err and "Re-running" not in err  # torch's advice would run the file's code
    assert not marker.exists()


UNSAFE_LOADS = {
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"allow_pickle=True": "np.load with allow_pickle=True",
    r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(": "unpickling",
    r"yaml\.load\(|yaml\.unsafe_load|yaml\.full_load": "YAML loading that can build objects",
    r"shell=True|os\.system\(|os\.popen\(": "a shell command line",
}


def test_no_code_path_loads_files_unsafely_or_runs_a_shell():
    """The one unpickling call sits behind --trust-pickle (cnnlib/sources.py, marked `noqa: S301`)."""
    found = []
    for path in sorted((ROOT / "cnnlib").glob("*.py")) + sorted((ROOT / "study").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if "noqa: S301" not in line else ""
            found += [f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}"
                      for pattern, what in UNSAFE_LOADS.items() if re.search(pattern, code)]
    assert not found, "\n".join(found)


# --- output paths: a write never replaces a device, a named pipe or a folder ---------------------------

def special_file(folder: Path, kind: str) -> Path:
    """A named pipe, a folder, or a character device made here (major 1, minor 3: what /dev/null is, so a
    write that got through would vanish); never a system device."""
    path = folder / kind
    if kind == "pipe":
        os.mkfifo(path)
    elif kind == "device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("only root may make a device node")
    else:
        path.mkdir()
    return path


def identity(path: Path) -> tuple:
    info = os.lstat(path)
    return info.st_mode, info.st_ino, info.st_rdev


WRITERS = {
    "write_json": lambda path: write_json(path, {"macro_accuracy": 0.5}),
    "write_csv": lambda path: write_csv(path, ["epoch"], [[1]]),
    "save_checkpoint": lambda path: save_checkpoint(path, SeedCNN(), TrainConfig(epochs=1), CLASSES),
}


@pytest.mark.parametrize("kind", ["pipe", "device", "folder"])
@pytest.mark.parametrize("writer", WRITERS)
def test_an_output_write_refuses_a_pipe_a_device_or_a_folder_and_leaves_it_as_it_was(tmp_path, kind, writer):
    """As root, `--json /dev/null` once replaced the system's /dev/null with a regular file."""
    target = special_file(tmp_path, kind)
    before = identity(target)

    with pytest.raises(OutputError, match=f"{re.escape(str(target))} is a .*, not a regular file"):
        WRITERS[writer](target)

    assert identity(target) == before
    assert [p.name for p in tmp_path.iterdir()] == [kind]  # nor a temporary file left beside it


def test_a_pipe_made_while_the_file_is_written_is_not_replaced_either(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(OutputError, match="named pipe"):
        with atomic_path(target) as tmp:
            tmp.write_text("{}")
            os.mkfifo(target)
    assert stat.S_ISFIFO(os.lstat(target).st_mode) and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_link_to_a_device_is_replaced_and_the_device_is_never_written(tmp_path):
    """The rename replaces the link itself: what it points to is never opened."""
    device = special_file(tmp_path, "device")
    before = identity(device)
    link = tmp_path / "eval.json"
    link.symlink_to(device)

    write_json(link, {"macro_accuracy": 0.5})

    assert identity(device) == before and link.is_file() and not link.is_symlink()


# --- the dashboard -------------------------------------------------------------------------------

def listening_addresses(port: int) -> list[str]:
    """Local addresses of the sockets listening on `port`, read from the kernel's tables (IPv4 and IPv6)."""
    found = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))
                found.append(socket.inet_ntop(socket.AF_INET if size == 4 else socket.AF_INET6, raw))
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table from /proc (Linux)")
def test_the_dashboard_listens_only_on_loopback_by_default(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=open_storage(url, heartbeat=False))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "study", "dashboard", "--storage", url, "--port", str(port)],
                              cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (addresses := listening_addresses(port)):
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "the dashboard was not listening within 120 s"
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]

    assert addresses == ["127.0.0.1"], addresses
    assert "warning" not in output


def test_make_dashboard_ignores_a_host_exported_by_the_shell(tmp_path):
    """Containers often export HOST=0.0.0.0 for other servers; only `make dashboard HOST=...` may widen the bind."""
    fake_python = tmp_path / "python"  # prints the --host it is given: the module listens on nothing else
    fake_python.write_text('#!/bin/sh\nwhile [ "$#" -gt 0 ]; do [ "$1" = --host ] && printf "%s" "$2"; shift; done\n')
    fake_python.chmod(0o755)

    def host_seen(*variables: str, **env: str) -> str:
        return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed",
                               "dashboard", f"PY={fake_python}", *variables], capture_output=True, text=True,
                              timeout=60, env=clean_env(**env), check=True).stdout

    assert host_seen() == "127.0.0.1"
    assert host_seen(HOST="0.0.0.0") == "127.0.0.1"
    assert host_seen("HOST=::1", HOST="0.0.0.0") == "::1"


# --- names, paths and make variables are data ------------------------------------------------------

HOSTILE_NAME = """it's "x"; touch {marker} && echo `touch {marker}` | sh # 'end"""


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """train/dev .npz of tinted images in a folder whose name has spaces, quotes and a ';'."""
    folder = tmp_path_factory.mktemp("npz") / "my data; 'x' \"y\""
    folder.mkdir()
    for split, n in (("train", 20), ("dev", 10)):
        labels = np.arange(3 * n) % 3
        images = np.stack([class_image(CLASSES[label], i) for i, label in enumerate(labels)])
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


@pytest.mark.slow
def test_make_search_and_export_treat_hostile_names_and_paths_as_data(tiny_npz, tmp_path):
    marker = tmp_path / "pwned"
    name = HOSTILE_NAME.format(marker=marker)
    results = tmp_path / "results; touch pwned 'q'"
    make = ["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", f"PY={sys.executable}",
            f"STUDY={name}", f"DATA={tiny_npz}", f"RESULTS={results}", "DEVICE=cpu"]

    searched = subprocess.run([*make, "search", "SPACE=search_spaces/smoke.yaml", "TRIALS=1"], capture_output=True,
                              text=True, timeout=600, env=clean_env(), cwd=tmp_path)
    exported = subprocess.run([*make, "export"], capture_output=True, text=True, timeout=300, env=clean_env(),
                              cwd=tmp_path)

    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "pwned").exists() and not (ROOT / "pwned").exists()
    storage = open_storage(f"sqlite:///{results / 'optuna.db'}", heartbeat=False)
    (summary,) = optuna.get_all_study_summaries(storage, include_best_trial=False)
    assert summary.study_name == name  # stored verbatim
    assert summary.n_trials == 1
    # The hint for the next run, pasted into a shell, hands make the same name back as one word.
    hint = next(line for line in searched.stdout.splitlines() if line.startswith("continue this study:"))
    assert f"STUDY={name}" in shlex.split(hint.split(":", 1)[1])
    # The export folder is a safe name inside RESULTS, with the study's files in it.
    (folder,) = [p for p in results.iterdir() if (p / "trials.csv").is_file()]
    assert folder.parent == results and re.fullmatch(r"[A-Za-z0-9._-]+\+[0-9a-f]{10}", folder.name)  # name+hash
