"""Commands treat denormal floats as zero: late in training they made every step take a slow path."""

from __future__ import annotations

import subprocess
import sys

from cnnlib.device import flush_denormals

# Half of float32's smallest normal number: a denormal, which DAZ reads as zero.
DENORMAL = 2.0 ** -127


def test_flushing_makes_denormal_arithmetic_give_zero_in_the_thread_and_in_threads_made_after():
    code = (
        "import threading, torch\n"
        "from cnnlib.device import flush_denormals\n"
        f"x = torch.tensor([{DENORMAL!r}])\n"
        "before = (x * 1.0).item()\n"
        "able = flush_denormals()\n"
        "after = (x * 1.0).item()\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append((x * 1.0).item())); t.start(); t.join()\n"
        "print(before > 0, able, after, seen[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    flushed = "0.0" if out[1] == "True" else repr(DENORMAL)  # a CPU without FTZ/DAZ keeps them (and says so)
    assert out == ["True", out[1], flushed, flushed], out


def test_a_command_flushes_denormals_before_it_runs(tmp_path):
    # `data` on a folder that does not exist: parsed, set up, then a one-line error.
    code = (
        "import torch\n"
        "from study import cli\n"
        f"x = torch.tensor([{DENORMAL!r}])\n"
        "before = (x * 1.0).item()\n"
        f"status = cli.main(['data', '--data', {str(tmp_path / 'missing')!r}, '--results', {str(tmp_path)!r}])\n"
        "print(before > 0, status, (x * 1.0).item(), torch.set_flush_denormal(True))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = run.stdout.split()
    assert out[:3] == ["True", "2", "0.0" if out[3] == "True" else repr(DENORMAL)], run.stdout + run.stderr


def test_flush_denormals_reports_whether_the_cpu_can():
    assert flush_denormals() in (True, False)  # the session flushes them already (conftest)
