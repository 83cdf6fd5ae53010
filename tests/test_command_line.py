"""What a user typing commands sees: one-line errors for bad values, `--help` with defaults, `cnn-hpo`.

Every Makefile variable reaches Python as an environment variable, so a typo
in one (`make search TRIALS=abc`) must end like any other user error: one
line naming the variable and the value, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_image_tree, run_cli
from study import cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


def assert_one_line_error(code: int, err: str, *culprits: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    return lines[0]


def run_cli_exit(*argv) -> tuple[int, str, str]:
    """run_cli, counting argparse's SystemExit as the exit code it carries."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as done:
            code = int(done.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def tiny_tree(tmp_path):
    return build_image_tree(tmp_path / "data", {c: 6 for c in ("car", "truck", "cat")},
                            {c: 6 for c in ("car", "truck", "cat")})


BAD_VALUES = {
    "TRIALS=abc": ("search", "TRIALS", "abc"),
    "TRIALS=-1": ("search", "TRIALS", "-1"),
    "WORKERS=abc": ("search", "WORKERS", "abc"),
    "WORKERS=0": ("search", "WORKERS", "0"),
    "TIMEOUT=1.5": ("search", "TIMEOUT", "1.5"),
    "FUSE=x": ("search", "FUSE", "x"),
    "DEVICE=gpu": ("search", "DEVICE", "gpu"),
    "PORT=abc": ("dashboard", "PORT", "abc"),
    "PORT=70000": ("dashboard", "PORT", "70000"),
    "SEEDS=abc": ("final", "SEEDS", "abc"),
    "SPLIT_SEED=x": ("data", "SPLIT_SEED", "x"),
    "TRAIN_COUNTS=4,x,1": ("data", "TRAIN_COUNTS", "4,x,1"),
    "DEVICE=gpu (train)": ("train", "DEVICE", "gpu"),
}


@pytest.mark.parametrize("command, variable, value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_a_bad_variable_value_is_one_line_naming_the_variable_and_value(command, variable, value, tmp_path,
                                                                          monkeypatch, tiny_tree):
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DATA", str(tiny_tree))
    code, out, err = run_cli_exit(command)
    assert_one_line_error(code, err, variable, value)
    assert "Traceback" not in err
    assert not (tmp_path / "results" / "optuna.db").exists(), "a bad value must stop the run before it starts"


def test_a_bad_flag_value_is_one_line_too():
    code, _, err = run_cli_exit("search", "--trials", "abc")
    assert_one_line_error(code, err, "--trials", "abc")


def test_device_cuda_on_a_machine_without_one_is_one_line(monkeypatch, tmp_path, tiny_tree):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli("search", "--space", SMOKE, "--device", "cuda", "--data", tiny_tree,
                             "--results", tmp_path / "r", "--train-counts", "4,2,2", "--dev-counts", "2,2,2",
                             "--test-counts", "2,2,2")
    line = assert_one_line_error(code, err, "cuda")
    assert "DEVICE=cpu" in line or "DEVICE=auto" in line
    assert not (tmp_path / "r" / "optuna.db").exists()


# --- --help ------------------------------------------------------------------------

def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_names_no_code_internals(command, capsys):
    text = help_text(command, capsys)
    for internal in (r"\.py\b", r"\bissue \d", r"\bcnnlib\b", r"\bstudy/", "Traceback"):
        assert not re.search(internal, text), f"{command} --help mentions {internal!r}:\n{text}"


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_shows_every_default(command):
    """Every option that has a default (not None, not an off switch) says what it is in its help."""
    parser = cli.Parser(prog="cnn-hpo", formatter_class=cli.HelpFormatter)
    cli._load(command).add_arguments(parser)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and not isinstance(action, argparse._HelpAction):
            assert "default" in formatter._get_help_string(action).lower(), (command, action.option_strings)


def test_search_help_shows_the_values_it_will_use(capsys):
    text = " ".join(help_text("search", capsys).split())
    assert ("--workers WORKERS worker processes sharing the study, at most what can run: trials left, CPU cores, "
            "memory (env WORKERS; default: 1)") in text
    assert "default.yaml" in text


def test_usage_names_cnn_hpo_when_started_as_cnn_hpo(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/cnn-hpo", "search", "--help"])
    text = help_text("search", capsys)
    assert text.startswith("usage: cnn-hpo search")


# --- Makefile variables: the ones --help and the docs name are the ones make passes ----------------

def variables_named_in_help() -> set[str]:
    """Every environment variable an option's --help names (`(env TRIALS; ...)`), over all commands."""
    named = set()
    for command in cli.COMMANDS:
        parser = cli.Parser(prog="cnn-hpo", formatter_class=cli.HelpFormatter)
        cli._load(command).add_arguments(parser)
        for action in parser._actions:
            named.update(re.findall(r"\benv ([A-Z][A-Z0-9_]*)", action.help or ""))
    return named


def variables_named_in_docs() -> set[str]:
    """The README's table of variables, and every `make <target> NAME=...` in the README and docs/."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Variables", 1)[1].split("\n## ", 1)[0]
    named = {name for row in table.splitlines() if row.startswith("| `")
             for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row.split("|")[1])}
    for page in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for command in re.findall(r"make [a-z-]+(?: [A-Z][A-Z0-9_]*=\S*)+", page.read_text()):
            named.update(re.findall(r" ([A-Z][A-Z0-9_]*)=", command))
    return named


def make_environment(*variables: str) -> subprocess.CompletedProcess:
    """What a recipe of the Makefile sees in its environment, `env` run as make runs a command."""
    outside = {k: v for k, v in os.environ.items()
               if not re.fullmatch(r"[A-Z][A-Z0-9_]*", k) or k in ("PATH", "HOME", "LANG")}
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "--eval", "show-environment: ; @env",
                           "show-environment", *variables], capture_output=True, text=True, timeout=60, env=outside)


def test_every_variable_that_help_or_the_docs_name_is_one_make_passes_to_the_command():
    shown = make_environment()
    passed = {line.split("=", 1)[0] for line in shown.stdout.splitlines()}

    named = variables_named_in_help() | variables_named_in_docs()
    assert {"EVAL_JSON", "PLOTS_OUT", "TRIALS", "FUSED_KS"} <= named  # the scan finds them
    assert shown.returncode == 0, shown.stderr
    assert sorted(named - passed) == []


def test_a_variable_make_does_not_know_is_refused_in_one_line_not_dropped():
    """`make plots OUT=...` used to write the report to the default place as if OUT were not there."""
    refused = make_environment("OUT=/tmp/elsewhere")
    known = make_environment("PLOTS_OUT=/tmp/elsewhere", "EVAL_JSON=/tmp/eval.json")

    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "OUT is not a variable" in lines[0], refused.stderr
    assert "README.md" in lines[0] and refused.stdout == ""
    assert known.returncode == 0, known.stderr
    assert {"PLOTS_OUT=/tmp/elsewhere", "EVAL_JSON=/tmp/eval.json"} <= set(known.stdout.splitlines())


# --- a write that fails in an output place is one line naming that place ---------------------------

@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC])
def test_a_failed_write_inside_results_is_one_line_naming_results(code, tmp_path):
    """The one mapping every command's writes fall back on; the table in test_bad_values.py runs real mounts."""
    results = tmp_path / "results"
    failed = OSError(code, os.strerror(code), str(results / "final" / "s" / "metrics.json"))

    line = cli.output_failure(argparse.Namespace(results=str(results)), failed)

    assert line == f"RESULTS={str(results)!r}: cannot write {results}/final/s/metrics.json ({os.strerror(code)})"


def test_a_failed_write_beside_a_json_target_names_the_option_not_results(tmp_path):
    """An atomic write fails on its temporary file, beside the target: that is still the --json path's failure."""
    target = tmp_path / "eval.json"
    failed = OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".eval.json.k1ll3d.tmp"))

    line = cli.output_failure(argparse.Namespace(results=str(tmp_path / "results"), json=target), failed)

    assert line.startswith(f"EVAL_JSON / --json {str(target)!r}: cannot write ")


def test_an_error_outside_every_output_place_is_left_as_it_was(tmp_path):
    unreadable = OSError(errno.EACCES, "Permission denied", str(tmp_path / "data" / "train" / "car" / "0.jpg"))
    elsewhere = argparse.Namespace(results=str(tmp_path / "results"))

    assert cli.output_failure(elsewhere, unreadable) is None
    assert cli.output_failure(elsewhere, ValueError("not a write")) is None
