"""`make audit` with models no better than chance warns, and marks its output, instead of passing off the
models' bias ("every cat -> car") as suspected label errors."""

from __future__ import annotations

import json

import pytest

import numpy as np

from conftest import run_cli, write_image
from study.audit.probabilities import chance_warning

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in




def test_models_at_chance_get_a_warning_that_says_so():
    warning = chance_warning(0.334, 3)
    assert warning is not None and "chance" in warning and "0.334" in warning and "0.333" in warning


def test_models_that_learned_get_no_warning():
    assert chance_warning(0.79, 3) is None
    assert chance_warning(0.78, 2) is None


@pytest.mark.parametrize("method", ["training_dynamics", "out_of_fold"])
def test_an_audit_whose_models_cannot_learn_warns_and_marks_its_output(tmp_path, method):
    """Every image of this tree is the same grey, whatever its folder: no model can beat a constant guess."""
    tree = tmp_path / "grey"
    for split, n in (("train", 16), ("test", 8)):
        for name in ("airplane", "bird", "ship"):
            for i in range(n):
                write_image(tree / split / name / f"{i:03d}.png", np.full((32, 32, 3), 128, np.uint8))
    results = tmp_path / "results"
    code, out, err = run_cli("audit", "--data", tree, "--results", results, "--device", "cpu",
                             *(["--folds", "2"] if method == "out_of_fold" else []), "--epochs", "1", "--top", "4",
                             "--run", "noise", "--train-counts", "16,10,6",
                             "--dev-counts", "4,4,4", "--test-counts", "2,2,2", "--threads", "1", "--method", method)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: audit models")]
    assert len(warnings) == 1 and "chance" in warnings[0], err
    folder = results / "audit" / "noise"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["models_at_chance"] is True and "chance" in summary["warning"]
    assert "chance" in (folder / "WARNING.txt").read_text()
    assert "audit models at chance" in (folder / "contact_sheet.html").read_text()
