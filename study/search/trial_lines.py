"""The line a search prints for each trial as it is told, with the run's progress and time budget under it."""

from __future__ import annotations

import time


def _bar(done: int, total: int | None, width: int = 24) -> str:
    if not total:
        return f"{done} finished"
    filled = min(width, round(width * done / total))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def budget_text(started: float, deadline: float, now: float | None = None) -> str:
    """'4.5 min elapsed, 8.5 min of 13.0 left': how much of the run's time budget remains."""
    now = time.time() if now is None else now
    text = f"{(now - started) / 60:.1f} min elapsed"
    if deadline == float("inf"):
        return text
    left = deadline - now
    if left <= 0:
        return f"{text}, time budget used up"
    return f"{text}, {left / 60:.1f} min of {(deadline - started) / 60:.1f} left"


def format_trial_line(frozen, run_done: int, run_total: int | None, started: float, worker: str,
                      deadline: float = float("inf")) -> str:
    params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in frozen.params.items())
    value = "" if frozen.values is None else " value=" + ",".join(f"{v:.4f}" for v in frozen.values)
    per = frozen.user_attrs.get("dev_per_class")
    per_text = f" ({' '.join(f'{c} {a:.2f}' for c, a in per.items())})" if per else ""
    reason = frozen.user_attrs.get("pruned_reason") or frozen.user_attrs.get("fail_reason") or ""
    seconds = frozen.user_attrs.get("train_seconds")
    return (f"{worker}trial {frozen.number:>4} {frozen.state.name:<8}{value}{per_text}"
            f"{f' {seconds:.1f}s' if seconds else ''}  {params}{f'  [{reason}]' if reason else ''}\n"
            f"      {_bar(run_done, run_total)} this run, {budget_text(started, deadline)}")
