"""`make dashboard` and the per-trial report artifacts it shows.

The server test starts `python -m study dashboard` as a subprocess on a free
port against the shared smoke study, reads optuna-dashboard's own HTTP API
(the one its web page uses), downloads a trial's artifacts, then stops the
server with SIGTERM and expects a clean exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from study import cli
from study.search.artifacts import attach_trial_artifacts, report_svg, trial_report_data
from study.search.dashboard import DEFAULT_HOST, add_arguments
from study.search.storage import open_storage

from test_export import smoke_study  # noqa: F401 - fixture shared with test_export
from conftest import STUDY_ENV

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["car", "truck", "cat"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.headers.get("Content-Type", ""), response.read()


def get_json(url: str):
    return json.loads(get(url)[1])


pytestmark = pytest.mark.usefixtures("no_study_env")  # conftest: no Makefile variable leaks in


# --- the report attached to each trial ------------------------------------------------

def finished_trial_attrs() -> dict:
    """User attributes of a trained trial, as objective.record_result and record_curves write them."""
    return {"classes": CLASSES, "config": {"optimizer": "adam", "lr": 0.001, "epochs": 3},
            "dev_macro_accuracy": 0.6, "dev_per_class": {"car": 0.9, "truck": 0.4, "cat": 0.5},
            "dev_confusion_matrix": [[45, 3, 2], [10, 8, 2], [8, 2, 10]], "train_macro_accuracy": 0.7,
            "train_per_class": {"car": 0.95, "truck": 0.55, "cat": 0.6}, "curve_train_loss": [1.1, 0.9, 0.8],
            "curve_dev_loss": [1.0, 0.95, 0.97], "curve_dev_macro_accuracy": [0.4, 0.55, 0.6],
            "epochs_run": 3, "train_seconds": 2.5, "device": "cpu"}


def running_trial(tmp_path: Path) -> tuple[optuna.Study, optuna.Trial]:
    study = optuna.create_study(study_name="t", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    for key, value in finished_trial_attrs().items():
        trial.set_user_attr(key, value)
    return study, trial


def test_a_trial_gets_a_figure_and_its_numbers_as_optuna_artifacts(tmp_path):
    study, trial = running_trial(tmp_path)
    ids = attach_trial_artifacts(study, trial, tmp_path)  # the results folder, beside the SQLite file here
    study.tell(trial, 0.6)
    metas = optuna.artifacts.get_all_artifact_meta(study.trials[0], storage=study._storage)
    assert sorted(m.filename for m in metas) == ["trial-0-metrics.json", "trial-0-report.svg"]
    assert {m.artifact_id for m in metas} == set(ids)
    store = tmp_path / "artifacts"  # beside the SQLite file: RESULTS/artifacts for the default storage
    by_name = {m.filename: store / m.artifact_id for m in metas}
    numbers = json.loads(by_name["trial-0-metrics.json"].read_text())
    assert numbers["dev"]["per_class"] == finished_trial_attrs()["dev_per_class"]
    assert numbers["dev"]["confusion_matrix"] == finished_trial_attrs()["dev_confusion_matrix"]
    assert by_name["trial-0-report.svg"].read_text().startswith("<svg")


def test_a_trial_gets_a_note_with_its_per_class_table(tmp_path):
    from optuna_dashboard._note import get_note_from_system_attrs  # noqa: PLC0415

    study, trial = running_trial(tmp_path)
    attach_trial_artifacts(study, trial, tmp_path)
    note = get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), trial._trial_id)
    assert "| truck | 0.400 | 0.550 | 20 |" in note["body"]
    assert "dev macro accuracy 0.600" in note["body"]


def test_the_report_svg_is_well_formed_and_names_every_class(tmp_path):
    import xml.etree.ElementTree as ElementTree  # noqa: PLC0415

    study, trial = running_trial(tmp_path)
    svg = report_svg(trial_report_data(study, trial))
    texts = [e.text for e in ElementTree.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    for name in CLASSES:
        assert texts.count(name) >= 3, name  # matrix rows, matrix columns, bars
    assert "45" in texts and "0.90" in texts


def test_an_artifact_upload_that_fails_only_warns_and_the_trial_still_completes(tmp_path):
    study, trial = running_trial(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder's parent should be")
    with pytest.warns(RuntimeWarning, match="could not attach its report"):
        assert attach_trial_artifacts(study, trial, results_dir=blocker) == []
    study.tell(trial, 0.6)
    assert study.trials[0].state == TrialState.COMPLETE


def test_every_trained_smoke_trial_carries_its_report(smoke_study):
    for trial in smoke_study.trials:
        if "dev_confusion_matrix" not in trial.user_attrs:
            continue  # diverged or failed before evaluation: nothing to show
        names = sorted(m.filename for m in optuna.artifacts.get_all_artifact_meta(trial, storage=smoke_study.study._storage))
        assert names == [f"trial-{trial.number}-metrics.json", f"trial-{trial.number}-report.svg"], trial.state


# --- the command ---------------------------------------------------------------------------

def test_the_dashboard_listens_on_loopback_unless_host_is_given_on_its_command_line(monkeypatch):
    """Shells and containers export HOST=0.0.0.0 for other servers: only --host may widen the bind."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).host == DEFAULT_HOST == "127.0.0.1"
    assert parser.parse_args([]).port == 8080
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "9000")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert (parser.parse_args([]).host, parser.parse_args([]).port) == ("127.0.0.1", 9000)
    assert parser.parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


def test_a_storage_without_studies_is_a_one_line_error(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    open_storage(url, heartbeat=False)  # tables, no study
    code = cli.main(["dashboard", "--storage", url, "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2 and "holds no study yet" in err and len(err.strip().splitlines()) == 1


def test_a_missing_storage_file_is_an_error_and_is_not_created(tmp_path, capsys):
    code = cli.main(["dashboard", "--storage", f"sqlite:///{tmp_path / 'typo.db'}", "--port", str(free_port())])
    assert code == 2 and "no storage file at" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()


def test_a_port_in_use_is_a_one_line_error(smoke_study, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["dashboard", "--storage", smoke_study.url, "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"port {port} on 127.0.0.1 is already in use" in err


@pytest.mark.slow
def test_dashboard_serves_the_study_and_a_trials_artifacts_then_stops_cleanly(smoke_study):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in STUDY_ENV}
    server = subprocess.Popen([sys.executable, "-m", "study", "dashboard", "--storage", smoke_study.url,
                               "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                studies = get_json(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stdout.read()
                assert time.time() < deadline, "the dashboard did not answer within 120 s"
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == ["smoke"]
        assert get_json(f"{base}/api/meta")["artifact_is_available"] is True
        study_id = studies[0]["study_id"]
        trials = get_json(f"{base}/api/studies/{study_id}")["trials"]
        assert len(trials) == len(smoke_study.trials)
        trial = next(t for t in trials if t["state"] == "Complete")
        by_name = {a["filename"]: a for a in trial["artifacts"]}
        number = trial["number"]
        assert set(by_name) == {f"trial-{number}-report.svg", f"trial-{number}-metrics.json"}
        kind, body = get(f"{base}/artifacts/{study_id}/{trial['trial_id']}/{by_name[f'trial-{number}-report.svg']['artifact_id']}")
        assert kind.startswith("image/svg+xml") and body.startswith(b"<svg")
        _, body = get(f"{base}/artifacts/{study_id}/{trial['trial_id']}/{by_name[f'trial-{number}-metrics.json']['artifact_id']}")
        assert set(json.loads(body)["dev"]["per_class"]) == set(CLASSES)
        assert "dev macro accuracy" in trial["note"]["body"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            output, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
            pytest.fail(f"the dashboard did not stop within 60 s of SIGTERM:\n{output}")
    assert server.returncode == 0, output
    assert f"http://127.0.0.1:{port}/dashboard" in output and "dashboard stopped" in output
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(f"{base}/api/studies", timeout=5)
