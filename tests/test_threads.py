"""Every command that trains chooses its CPU threads (THREADS, or by load), not torch's default."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import run_cli
from study.errors import UserError
from study.threads import use_cpu_threads


def test_threads_set_by_the_variable_are_what_torch_then_uses(monkeypatch, restore_threads):
    monkeypatch.setenv("THREADS", "1")
    torch.set_num_threads(2)
    assert use_cpu_threads(torch.device("cpu")) == "1 thread(s): requested"
    assert torch.get_num_threads() == 1


def test_without_the_variable_a_busy_machine_gets_one_thread(monkeypatch, restore_threads):
    monkeypatch.delenv("THREADS", raising=False)
    monkeypatch.setattr("cnnlib.device.busy_cores", lambda: 1.9)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    torch.set_num_threads(2)
    assert use_cpu_threads(torch.device("cpu")) == "1 thread(s): 1.9 of 2 cores busy with other work"
    assert torch.get_num_threads() == 1


def test_a_machine_gone_quiet_gets_its_cores_whatever_the_load_average_still_says(monkeypatch, restore_threads):
    monkeypatch.delenv("THREADS", raising=False)
    monkeypatch.setattr("cnnlib.device.busy_cores", lambda: 0.1)
    monkeypatch.setattr("os.getloadavg", lambda: (2.0, 2.0, 2.0))  # a search that just ended
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert use_cpu_threads(torch.device("cpu")).startswith("2 thread(s)")
    assert torch.get_num_threads() == 2


def test_busy_cores_counts_another_process_spinning():
    import subprocess
    import sys

    from cnnlib.device import busy_cores

    if not sys.platform.startswith("linux"):
        pytest.skip("busy_cores reads /proc/stat; elsewhere the load average decides")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy_cores(0.2)  # the spinner starts up
        busy = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.8 <= busy <= (__import__("os").cpu_count() or 1) + 0.01


def test_another_device_leaves_the_threads_alone(monkeypatch, restore_threads):
    monkeypatch.setenv("THREADS", "1")
    torch.set_num_threads(2)
    assert use_cpu_threads(torch.device("cuda")) == ""
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["abc", "0", "1.5"])
def test_a_bad_threads_value_is_one_line_naming_it(monkeypatch, value):
    monkeypatch.setenv("THREADS", value)
    with pytest.raises(UserError, match=f"THREADS '{value}'"):
        use_cpu_threads(torch.device("cpu"))


@pytest.mark.parametrize("command", ["search", "audit"])
def test_every_command_refuses_a_bad_threads_value_before_it_starts(command, tiny_inputs, tmp_path, monkeypatch,
                                                                    capsys):
    """make search once ignored THREADS=abc (and chose by load) where make train refused it."""
    _, _, data = tiny_inputs
    monkeypatch.setenv("THREADS", "abc")
    monkeypatch.setenv("RESULTS", str(tmp_path))
    from study.cli import main

    try:
        code = main([command, *data, "--device", "cpu"])
    except SystemExit as exit_:  # argparse's own one-line error
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "THREADS" in err and "'abc'" in err and "Traceback" not in err


def test_make_train_says_and_uses_the_threads_it_chose(tiny_inputs, tmp_path, monkeypatch, restore_threads):
    monkeypatch.setenv("THREADS", "1")
    torch.set_num_threads(2)
    _, space, options = tiny_inputs
    code, out, err = run_cli("train", "--space", space, "--results", tmp_path, "--device", "cpu", *options)
    assert code == 0, err
    assert "device: cpu (1 thread(s): requested)" in out
    assert torch.get_num_threads() == 1


def test_a_fused_steps_activations_reuse_resident_pages():
    """cnnlib.allocator: with glibc's defaults this step faulted ~2,700 fresh pages every time (K=16, batch 32)."""
    import resource
    import sys
    from types import SimpleNamespace

    from cnnlib.allocator import keep_freed_memory
    from cnnlib.step import StackedStep
    from cnnlib.config import TrainConfig

    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's; elsewhere keep_freed_memory is a no-op by design")
    assert keep_freed_memory()
    data = SimpleNamespace(n_classes=3, image_size=32, device=torch.device("cpu"),
                           train=SimpleNamespace(y=torch.arange(300) % 3))
    configs = [TrainConfig(optimizer="sgd" if i % 2 else "adamw", seed=i, epochs=2) for i in range(16)]
    step = StackedStep(configs, data, 10)
    x, y = torch.rand(32, 3, 32, 32), torch.arange(32) % 3
    step.start_epoch()
    for _ in range(5):  # the heap grows to the step's size
        step.step(x, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step.step(x, y)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults < 300, f"{faults:.0f} page faults a step: freed activations went back to the OS"


TWO_TESTS_IN_ORDER = '''\
import torch
from study.threads import use_cpu_threads


def test_a_command_run_in_process_on_a_quiet_machine(monkeypatch):
    monkeypatch.setattr("cnnlib.device.busy_cores", lambda: 0.0)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    use_cpu_threads(torch.device("cpu"))  # what `train`, `final` and `evaluate` do: 2 threads here
    torch.set_flush_denormal(False)


def test_the_next_test_starts_from_the_sessions_state():
    flushed = (torch.tensor([2.0 ** -127]) * 1.0).item() == 0.0
    assert torch.get_num_threads() == 1
    assert flushed or not torch.set_flush_denormal(True)  # denormals flushed, where the CPU can
'''


def test_no_torch_state_a_test_sets_reaches_the_next_test(tmp_path):
    """Threads and denormal mode are process-wide: a command run in-process chooses them by the machine's
    load, so whatever test followed it saw a thread count that depended on how busy the CPU was."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    (tmp_path / "test_order.py").write_text(TWO_TESTS_IN_ORDER)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                          "-p", "conftest", str(tmp_path / "test_order.py")], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 passed" in run.stdout
