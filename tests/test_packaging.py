"""`cnn-hpo` as an installed program: a console script, search spaces inside the package, defaults
that do not depend on the working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from study import options
from study.search.space_file import find_space, load_space

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_cnn_hpo_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["cnn-hpo"] == "study.cli:main"


@pytest.mark.parametrize("name", ["smoke", "smoke.yaml", "search_spaces/smoke.yaml"])
def test_a_shipped_space_is_found_from_any_working_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = load_space(name)
    assert space.path.is_absolute() and space.path.samefile(ROOT / "search_spaces" / "smoke.yaml")
    assert space.name == "smoke"  # the study name does not depend on how the file was named


def test_a_shipped_sweep_is_found_by_its_folder_and_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_space("sweeps/lr").samefile(ROOT / "search_spaces" / "sweeps" / "lr.yaml")


def test_a_space_file_in_the_working_directory_wins_over_a_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke.yaml").write_text("params: {lr: 1.0e-3}\n")
    assert find_space("smoke.yaml") == Path("smoke.yaml")


def test_the_default_data_is_found_from_any_working_directory(tmp_path, monkeypatch, real_data):
    monkeypatch.chdir(tmp_path)
    assert Path(options.default_data()).resolve() == real_data.resolve()


@pytest.mark.slow
def test_the_wheel_ships_the_spaces_and_its_cnn_hpo_runs_from_another_folder(tmp_path, real_data):
    """Build the wheel from the tracked files, unpack it as pip would, and run its entry point elsewhere."""
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("cnn_hpo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        archive.extractall(tmp_path / "site")
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "search_spaces").rglob("*.yaml")}
    assert {f"study/{p}" for p in shipped} <= names
    assert "cnn-hpo = study.cli:main" in entry_points

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # What the generated cnn-hpo script does, with only the unpacked wheel on the path (not this checkout).
    script = "import sys; sys.argv[0] = 'cnn-hpo'; from study.cli import main; sys.exit(main())"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPACE", "DATA", "RESULTS", "STORAGE",
                                                         "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    done = subprocess.run([sys.executable, "-c", script, "search", "--space", "smoke", "--trials", "1",
                           "--data", str(real_data), "--device", "cpu", "--train-counts", "60,20,20",
                           "--dev-counts", "20,10,10", "--test-counts", "10,10,10"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"space: {tmp_path / 'site' / 'study' / 'search_spaces' / 'smoke.yaml'}" in done.stdout
    assert (elsewhere / "results" / "optuna.db").is_file()
    assert "retrain the best:     cnn-hpo final " in done.stdout  # its hints name the program that printed them
