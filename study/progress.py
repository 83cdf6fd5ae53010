"""Per-epoch progress of long work (a trial, a retrain seed, a fold model), so a run is never silent.

On a terminal it is one bar, redrawn in place and erased when the work ends
(or when `clear` is called before other output); in a log (stderr not a
terminal) it is one line every `ceil(total / LOG_LINES)` epochs, never both.
A 100-epoch trial on the 2-core CPU takes minutes: ~10 lines is enough to
see it move without burying the trial lines. Progress goes to stderr, so
stdout keeps only results and hints.
"""

from __future__ import annotations

import math
import sys
import time

LOG_LINES = 10  # at most about this many lines per trial, seed or fold in a log
BAR_WIDTH = 20


class Progress:
    def __init__(self, stream=None, bar: bool | None = None, prefix: str = ""):
        self.stream = stream  # None: sys.stderr at the time of writing (tests and redirections swap it)
        self.bar = bar  # None: a bar exactly when the stream is a terminal
        self.prefix = prefix  # e.g. "[w1] " in a worker process
        self.drawn = False
        self.started: dict[str, tuple[float, int]] = {}

    def _out(self):
        return self.stream or sys.stderr

    def _use_bar(self, out) -> bool:
        if self.bar is not None:
            return self.bar
        isatty = getattr(out, "isatty", None)
        return bool(isatty and isatty())

    def _eta(self, label: str, epoch: int, total: int | None) -> str:
        now = time.monotonic()
        first = self.started.setdefault(label, (now, epoch))
        if epoch <= first[1]:
            self.started[label] = first = (now, epoch)  # a new run under the same label
        if not total or epoch == first[1]:
            return ""
        per_epoch = (now - first[0]) / (epoch - first[1])
        left = per_epoch * (total - epoch)
        rate = f"{per_epoch:.2f}" if per_epoch < 10 else f"{per_epoch:.0f}"
        return f", {rate} s/epoch" + (f", ~{minutes(left)} left" if left > 0 else "")

    def epoch(self, label: str, epoch: int, total_epochs: int | None, macro_accuracy: float,
              metric: str = "dev macro") -> None:
        out = self._out()
        of = f"/{total_epochs}" if total_epochs else ""
        score = f", {metric} {macro_accuracy:.3f}" if not math.isnan(macro_accuracy) else ""  # nan: not evaluated
        detail = f"epoch {epoch}{of}{score}{self._eta(label, epoch, total_epochs)}"
        done = bool(total_epochs) and epoch >= total_epochs
        if self._use_bar(out):
            filled = round(BAR_WIDTH * epoch / total_epochs) if total_epochs else 0
            bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " if total_epochs else ""
            out.write(f"\r\x1b[K{self.prefix}{label} {bar}{detail}")
            self.drawn = True
            if done:
                self.clear()
        else:
            every = math.ceil(total_epochs / LOG_LINES) if total_epochs else 1
            if epoch == 1 or done or epoch % every == 0:
                out.write(f"{self.prefix}{label}: {detail}\n")
        out.flush()

    def clear(self) -> None:
        """Erase a bar before other output, so a result line never lands on top of it."""
        if self.drawn:
            out = self._out()
            out.write("\r\x1b[K")
            out.flush()
            self.drawn = False


def minutes(seconds: float) -> str:
    """A duration for a progress line: "20 s" below 90 seconds, else "1.5 min"."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


_progress = Progress()


def epoch(label: str, epoch: int, total_epochs: int | None, macro_accuracy: float, metric: str = "dev macro") -> None:
    """Report one finished epoch of the work called `label` ("trial 12", "seed 0", "fold 2/5").

    metric names what macro_accuracy measures (the audit's training dynamics: "in-sample macro").
    """
    _progress.epoch(label, epoch, total_epochs, macro_accuracy, metric)


def clear() -> None:
    _progress.clear()


def configure(bar: bool | None = None, prefix: str = "") -> None:
    """Worker processes share one terminal: lines, not bars that overwrite each other, with their tag."""
    _progress.bar, _progress.prefix = bar, prefix
