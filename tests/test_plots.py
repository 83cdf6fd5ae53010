"""`make plots`: every figure from the exported CSVs alone, in one offline HTML file that a real browser renders.

The browser check drives Debian's headless Chromium over the DevTools
protocol (through a pipe, so no extra package): it loads the report from a
file:// URL, records console errors, uncaught exceptions and every network
request, counts the rendered plots and takes a screenshot.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from base64 import b64decode
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import plotly
import pytest
from PIL import Image

from study import cli
from study.errors import UserError
from study.report.optuna_figures import param_importances, rebuild_study
from study.report.plots import make_report, read_csv

from test_export import smoke_export, smoke_study  # noqa: F401 - fixtures shared with test_export

FIGURES = ["class-distribution", "optimization-history", "param-importances", "parallel-coordinates",
           "accuracy-vs-batch-size", "accuracy-vs-epochs", "accuracy-vs-weight-decay", "sgd-vs-adam",
           "learning-curves", "best-trial-confusion", "top-trials"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report(smoke_export, tmp_path_factory):
    """The report of the smoke export, built from a copy of its three CSVs in a folder of their own."""
    folder = tmp_path_factory.mktemp("copied-export") / "smoke"
    folder.mkdir()
    for name in ("trials.csv", "epochs.csv", "data.csv"):
        shutil.copy(smoke_export.folder / name, folder / name)
    index, figures, note = make_report(folder / "trials.csv", png=False)
    return index, {f.key: f for f in figures}, note


# --- the figures ------------------------------------------------------------------

def test_every_figure_is_built_from_the_smoke_csvs(report):
    _, figures, _ = report
    assert list(figures) == FIGURES
    missing = {k: f.missing for k, f in figures.items() if f.figure is None}
    assert not missing


def test_every_figure_has_a_title_and_its_axes_are_labelled(report):
    _, figures, _ = report
    for key, item in figures.items():
        layout = item.figure.layout
        assert layout.title.text, key
        if key in ("param-importances", "optimization-history", "class-distribution", "best-trial-confusion") \
                or key.startswith("accuracy-vs"):
            assert layout.xaxis.title.text and layout.yaxis.title.text, key


def test_history_running_best_never_decreases(report):
    _, figures, _ = report
    best = next(t for t in figures["optimization-history"].figure.data if t.name.startswith("running best"))
    assert np.all(np.diff(np.asarray(best.y, dtype=float)) >= 0)


def test_learning_curves_have_one_line_per_trial_and_panel(report, smoke_export):
    _, figures, _ = report
    n_trials = smoke_export.epochs["trial"].nunique()
    assert len(figures["learning-curves"].figure.data) == 2 * n_trials


def test_class_distribution_shows_the_split_counts(report, smoke_export):
    _, figures, _ = report
    bars = {t.name: list(t.y) for t in figures["class-distribution"].figure.data}
    assert bars["car"] == [200, 50, 20] and bars["truck"] == [60, 20, 20] and bars["cat"] == [40, 20, 20]


def test_importances_come_from_optuna_on_a_study_rebuilt_from_the_csv(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    lr = 10 ** rng.uniform(-4, -1, n)
    trials = pd.DataFrame({"number": range(n), "state": "COMPLETE", "params_lr": lr,
                           "params_batch_size": rng.choice([32, 64, 128], n),
                           "params_optimizer": rng.choice(["sgd", "adam"], n)})
    trials["value"] = 0.3 + 0.1 * np.log10(lr) ** 2 / 16 + rng.normal(0, 1e-3, n)  # only lr matters
    study = rebuild_study(trials, ["value"])
    assert len(study.trials) == n
    assert study.trials[0].distributions["lr"].log  # a positive float spanning decades is log-scaled
    bars = param_importances(trials, ["value"]).data[0]
    ranked = dict(zip(bars.y, bars.x))
    assert max(ranked, key=ranked.get) == "lr"
    assert sum(ranked.values()) == pytest.approx(1.0)


# --- the HTML file ---------------------------------------------------------------

def test_report_loads_plotly_js_once_from_beside_it_and_nothing_from_the_network(report):
    index, _, _ = report
    text = index.read_text()
    assert text.count(plotly.offline.get_plotlyjs()[:400]) == 0, "embedded, plotly.js made every report ~5 MB"
    assert re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", text) == ["plotly.min.js"]
    assert (index.parent / "plotly.min.js").read_text() == plotly.offline.get_plotlyjs()
    assert not re.search(r"<link[^>]*href=[\"']?https?:", text)
    assert not re.search(r"<img[^>]*src=[\"']?https?:", text)


def test_report_has_a_section_per_figure(report):
    index, _, _ = report
    text = index.read_text()
    for key in FIGURES:
        assert f'data-figure="{key}"' in text and f'id="plot-{key}"' in text, key


@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_errors_or_network(report, tmp_path):
    index, _, _ = report
    with HeadlessChromium(tmp_path) as browser:
        page = browser.load(index.resolve().as_uri(), wait_for=f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {len(FIGURES)}")
        rendered = browser.evaluate("Array.from(document.querySelectorAll('section[data-figure]'))"
                                    ".filter(s => s.querySelector('.js-plotly-plot .main-svg')).map(s => s.id)")
        shot = browser.screenshot()
    assert page["errors"] == [], page["errors"]
    assert page["requests"] == [], f"the report fetched {page['requests']}"
    assert rendered == FIGURES
    image = np.asarray(Image.open(BytesIO(shot)).convert("L"), dtype=float)
    assert image.shape[0] > 2000, "the screenshot should cover the whole report"
    assert image.std() > 20 and (image < 128).mean() > 0.005, "the screenshot looks blank"


def test_report_from_the_cli_finds_the_only_export_under_results(smoke_export, capsys):
    code = cli.main(["plots", "--results", str(smoke_export.folder.parent), "--no-png"])
    assert code == 0
    assert (smoke_export.folder / "plots" / "index.html").is_file()
    assert "11 of 11 figures" in capsys.readouterr().out


def test_plots_out_from_the_environment_is_where_the_report_goes(smoke_export, tmp_path, monkeypatch):
    """`make plots PLOTS_OUT=...` hands the folder over as PLOTS_OUT; OUT was once dropped without a word."""
    monkeypatch.setenv("PLOTS_OUT", str(tmp_path / "report"))
    code = cli.main(["plots", "--csv", str(smoke_export.folder / "trials.csv"), "--no-png"])
    assert code == 0
    assert (tmp_path / "report" / "index.html").is_file()


@pytest.mark.slow
def test_pngs_are_written_for_every_figure_where_chromium_exists(smoke_export, tmp_path):
    _, figures, note = make_report(smoke_export.folder / "trials.csv", out=tmp_path, png=True)
    assert note.startswith("wrote"), note
    for key in FIGURES:
        image = Image.open(tmp_path / f"{key}.png")
        assert image.size[0] >= 1000 and np.asarray(image.convert("L")).std() > 10, key


# --- malformed input ---------------------------------------------------------------

def test_a_trials_csv_without_a_required_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "trials.csv"
    pd.DataFrame({"number": [0], "value": [0.5]}).to_csv(path, index=False)
    with pytest.raises(UserError, match=r"trials\.csv: missing column 'state'"):
        make_report(path, png=False)


def test_a_trials_csv_without_any_value_column_is_an_error(tmp_path):
    path = tmp_path / "trials.csv"
    pd.DataFrame({"number": [0], "state": ["COMPLETE"]}).to_csv(path, index=False)
    with pytest.raises(UserError, match=r"trials\.csv: missing column 'value'"):
        make_report(path, png=False)


def test_a_malformed_epochs_csv_beside_it_is_named(smoke_export, tmp_path):
    shutil.copy(smoke_export.folder / "trials.csv", tmp_path / "trials.csv")
    smoke_export.epochs.drop(columns=["train_loss"]).to_csv(tmp_path / "epochs.csv", index=False)
    with pytest.raises(UserError, match=r"epochs\.csv: missing column 'train_loss'"):
        make_report(tmp_path / "trials.csv", png=False)


def test_a_missing_csv_is_a_one_line_cli_error(tmp_path, capsys):
    code = cli.main(["plots", "--csv", str(tmp_path / "nope" / "trials.csv"), "--no-png"])
    err = capsys.readouterr().err
    assert code == 2 and "nope/trials.csv: file not found" in err and len(err.strip().splitlines()) == 1


def test_a_csv_that_is_not_a_csv_is_named(tmp_path):
    path = tmp_path / "trials.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    with pytest.raises(UserError, match=r"trials\.csv"):
        read_csv(path, ("number", "state"))


# --- a small DevTools-protocol client ------------------------------------------------

class HeadlessChromium:
    """Chromium with --remote-debugging-pipe: JSON messages, NUL-terminated, on file descriptors 3 (in) and 4 (out)."""

    def __init__(self, profile: Path, width: int = 1200, height: int = 900):
        self.profile, self.width, self.height = profile, width, height
        self.next_id, self.events, self.session = 0, [], None

    def __enter__(self):
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()

        def wire_pipes():  # in the child: its fd 3 reads our commands, fd 4 writes its replies
            read_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={self.profile / 'profile'}",
             f"--window-size={self.width},{self.height}"],
            preexec_fn=wire_pipes, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        self.writer, self.reader = os.fdopen(to_browser_w, "wb"), os.fdopen(from_browser_r, "rb")
        self.buffer = b""
        target = self.send("Target.createTarget", url="about:blank", browser=True)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True, browser=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        return self

    def __exit__(self, *exc):
        try:
            self.send("Browser.close", browser=True)
        except (OSError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.writer.close()
        self.reader.close()

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.time() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.reader.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, browser: bool = False, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not browser:
            message["sessionId"] = self.session
        self.writer.write(json.dumps(message).encode() + b"\0")
        self.writer.flush()
        deadline = time.time() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def load(self, url: str, wait_for: str, timeout: float = 60) -> dict:
        """Navigate, wait until `wait_for` is true, and return the page's errors and non-local requests."""
        self.events.clear()
        self.send("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not self.evaluate(f"document.readyState === 'complete' && ({wait_for})"):
            if time.time() > deadline:
                raise TimeoutError(f"{url}: {wait_for} still false after {timeout} s")
            time.sleep(0.25)
        errors, requests = [], []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(params["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent":
                request_url = params["request"]["url"]
                if not request_url.startswith(("file:", "data:", "about:", "blob:")):
                    requests.append(request_url)
        return {"errors": errors, "requests": requests}

    def screenshot(self) -> bytes:
        """The whole page, not just the window."""
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1,
                  mobile=False)
        return b64decode(self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])


def test_a_grid_sweep_with_zero_weight_decay_and_failed_trials_still_plots(tmp_path):
    """The user's sweeps: categorical grids, weight decay 0 (no log axis possible), a failed trial, a sparse CSV."""
    rows, epochs = [], []
    grid = [(o, wd) for o in ("sgd", "adam") for wd in (0.0, 1e-4, 1e-3, 1e-2, 1e-1)]
    for number, (optimizer, wd) in enumerate(grid):
        failed = number == 3
        value = np.nan if failed else 0.7 - wd - (0.05 if optimizer == "sgd" else 0)
        rows.append({"number": number, "state": "FAIL" if failed else "COMPLETE", "value": value,
                     "params_optimizer": optimizer, "params_weight_decay": wd, "user_attrs_config_lr": 1e-3,
                     "user_attrs_config_batch_size": 32, "user_attrs_config_epochs": 5,
                     "user_attrs_fail_reason": "out of memory" if failed else None})
        for epoch in range(1, 6 if not failed else 2):
            epochs.append({"trial": number, "state": rows[-1]["state"], "epoch": epoch, "train_loss": 1 / epoch,
                           "dev_loss": 1.1 / epoch, "dev_macro_accuracy": value * epoch / 5,
                           "params_optimizer": optimizer, "params_weight_decay": wd, "user_attrs_config_lr": 1e-3})
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    pd.DataFrame(epochs).to_csv(tmp_path / "epochs.csv", index=False)
    _, figures, _ = make_report(tmp_path / "trials.csv", png=False)
    missing = {f.key: f.missing for f in figures if f.figure is None}
    assert list(missing) == ["class-distribution", "best-trial-confusion"], missing  # no data.csv, no dev_cm columns
    by_key = {f.key: f.figure for f in figures}
    assert by_key["accuracy-vs-weight-decay"].layout.xaxis.type == "category"  # 0 has no place on a log axis
    assert list(by_key["accuracy-vs-weight-decay"].layout.xaxis.categoryarray) == ["0", "0.0001", "0.001", "0.01", "0.1"]
    table = by_key["sgd-vs-adam"].data[-1].cells.values
    assert list(table[0]) == ["adam", "sgd"] and list(table[3]) == [0, 1]  # the failed trial is counted, not plotted
