"""The layers written in pyproject.toml ([tool.importlinter]) hold: `lint-imports` passes.

Commands sit above search, report and bench, those above what a study records,
that above the shared plumbing, and all of it above cnnlib, which imports
neither Optuna nor study/. An import that goes the wrong way fails here, with
import-linter's account of the chain that breaks the layering.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_layers_of_pyproject_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")  # the venv's, installed by the dev extra
    assert lint_imports.is_file(), f"{lint_imports}: missing; install the dev extra (pip install -e '.[dev]')"
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
