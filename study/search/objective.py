"""Optuna trials as cnnlib training runs: one trial alone or several as fused groups, one runner.

cnnlib knows nothing of Optuna: this module turns its epoch callback into
`trial.report` / `should_prune` and its results into user attributes, so that
export, plots, dashboard and `make final` read every trial the same way,
however it was trained. Trials asked together (FUSE=K) that share a batch
(cnnlib.config.group_configs) train as one fused group; the rest, and
FUSE=1, train one at a time through the same loop.

The value is dev macro accuracy after the *last* epoch: epochs is itself a
hyperparameter, and taking the best epoch would select on dev noise that a
retrain of the same config (`make final`) cannot reproduce.

Test-time views (a config's `tta`) are evaluated only in the epochs the
objective reads (the space's `objective_epochs`): the reported curve, the
pruner and the collapse rule follow the plain model through every epoch, and
the value is the model as evaluated. With `flip_translate` (ten views) every
epoch's evaluation had cost 1.4-1.6x the trial-epoch.
"""

from __future__ import annotations

import math
import threading
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from cnnlib.config import TrainConfig
from cnnlib.config import group_configs
from cnnlib.errors import DivergedError
from cnnlib.metrics import Evaluation
from cnnlib.training import DeviceData, EpochStats, TrainResult, evaluate, train_group
from cnnlib.tta import as_evaluated

from .. import lifetime, progress
from ..records import STOPPED_BY_DEADLINE, STOPPED_BY_PRUNER, STOPPED_COLLAPSED, STOPPED_DIVERGED, WARM_START_ATTR
from .artifacts import attach_trial_artifacts
from .deadline import Deadline
from .space import ENQUEUED_FIXED_ATTR, SearchSpace


class Heartbeat:
    """Tells the storage a trial's worker is alive, so a killed worker's trial is noticed and retried."""

    def __init__(self, storage, trial_id: int):
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self):
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a storage hiccup must not kill training; staleness will tell
                pass

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread:
            self.thread.join()


# A trial whose dev predictions are one class, or whose macro accuracy is within
# COLLAPSE_MARGIN of chance (1/K), for COLLAPSE_EPOCHS epochs in a row after its lr
# warm-up has collapsed (e.g. Adam with L2 decay 0.07: 91 epochs of a constant predictor
# in one default search). It is pruned at once, whatever the pruner's start-up
# rules. Warm-up epochs do not count: at a near-zero lr every net still predicts one
# class (the first default search pruned four warming-up trials in epochs 1-3).
COLLAPSE_EPOCHS = 3
COLLAPSE_MARGIN = 0.02


def collapsed(stats: EpochStats) -> str | None:
    """Why this epoch's dev predictions are those of a collapsed model, or None."""
    dev = stats.curve_dev
    predicted = dev.confusion.sum(0)
    classes = dev.classes
    if (predicted > 0).sum() <= 1:
        return f"predicts only {classes[int(predicted.argmax())]}"
    if dev.macro_accuracy <= 1 / len(classes) + COLLAPSE_MARGIN:
        return f"macro accuracy {dev.macro_accuracy:.3f} at chance"
    return None


@dataclass
class EpochReporter:
    """The `on_epoch` callback of one trial: reports, keeps the curves, decides pruning and the deadline stop."""

    trial: optuna.Trial
    can_prune: bool
    curves: dict = field(default_factory=lambda: {"train_loss": [], "dev_loss": [], "dev_macro_accuracy": []})
    pruned_at: int | None = None
    pruned_reason: str | None = None
    stopped: str | None = None  # STOPPED_*: what stopped the trial before its last epoch
    collapsed_epochs: int = 0
    warmup_epochs: int = 0  # epochs of lr warm-up, which the collapse rule does not judge
    epochs: int | None = None  # the trial's planned epochs
    deadline: Deadline = field(default_factory=Deadline)  # the run's: when it stops the trial
    group_size: int = 1  # trials trained with this one, itself included: they are told together

    def __call__(self, stats: EpochStats) -> bool:
        lifetime.check_interrupt()  # a SIGTERM whose interrupt a callback swallowed stops the trial here
        self.curves["train_loss"].append(stats.train_loss)
        self.curves["dev_loss"].append(stats.curve_dev.loss)
        self.curves["dev_macro_accuracy"].append(stats.curve_macro_accuracy)
        progress.epoch(f"trial {self.trial.number}", stats.epoch, self.epochs, stats.curve_macro_accuracy)
        why = collapsed(stats) if stats.epoch > self.warmup_epochs else None
        self.collapsed_epochs = self.collapsed_epochs + 1 if why else 0
        if self.collapsed_epochs >= COLLAPSE_EPOCHS:
            return self._stop(stats.epoch, STOPPED_COLLAPSED,
                              f"constant predictor: {why} on dev for {COLLAPSE_EPOCHS} epochs "
                              f"(epochs {stats.epoch - COLLAPSE_EPOCHS + 1}-{stats.epoch})")
        if self.can_prune:
            # Reported before the deadline check: a trial the deadline stops keeps this epoch's value.
            self.trial.report(stats.curve_macro_accuracy, stats.epoch)
            if self.trial.should_prune():
                return self._stop(stats.epoch, STOPPED_BY_PRUNER)
        last = self.epochs is not None and stats.epoch >= self.epochs
        # Stopped after the last epoch that ends before the deadline, judged by this epoch's length: the
        # run then ends near TIMEOUT instead of an epoch past it. Epochs the pruner has yet to wait for
        # may use the grace, as a trial's last epochs do: a group started with room for them reaches them.
        epochs_left = self.epochs - stats.epoch if self.epochs is not None else None
        if self.before_warmup(stats.epoch):
            warmup_left = self.deadline.warmup_epochs - stats.epoch
            epochs_left = warmup_left if epochs_left is None else min(epochs_left, warmup_left)
        if not last and self.deadline.stops_after(stats.seconds, self.group_size, epochs_left=epochs_left):
            return self._stop(stats.epoch, STOPPED_BY_DEADLINE,
                              f"stopped by the run's deadline after epoch {stats.epoch}"
                              + (f" of {self.epochs}" if self.epochs else "")
                              + ": TIMEOUT left no time for another epoch")
        return False

    def _stop(self, epoch: int, stopped: str, reason: str | None = None) -> bool:
        self.pruned_at, self.stopped, self.pruned_reason = epoch, stopped, reason
        return True

    def before_warmup(self, epoch: int) -> bool:
        """Whether, stopped after `epoch`, the trial has had fewer epochs than the pruner waits for."""
        return self.can_prune and epoch < self.deadline.warmup_epochs

    @property
    def cut_before_warmup(self) -> bool:
        """The deadline stopped it before the pruner would judge it: its value says too little to learn from."""
        return self.stopped == STOPPED_BY_DEADLINE and self.before_warmup(self.pruned_at)


def record_curves(trial: optuna.Trial, curves: dict) -> None:
    for name, values in curves.items():
        trial.set_user_attr(f"curve_{name}", [float(v) for v in values])
    trial.set_user_attr("epochs_run", len(curves["train_loss"]))


def record_result(trial: optuna.Trial, result: TrainResult, data: DeviceData) -> dict:
    """Everything a report needs about a finished run, as JSON-able user attributes.

    Train accuracy is the plain model's (no test-time views): it shows how well
    the net fits, and ten views over the 5000 train images would cost about
    three training epochs per trial for that diagnostic alone.
    """
    dev = final_dev(result, data)
    train_eval = evaluate(result.model, data.train, data.classes)
    attrs = {
        "dev_macro_accuracy": dev.macro_accuracy,
        "dev_per_class": dev.per_class,
        "dev_confusion_matrix": dev.confusion.tolist(),
        "train_macro_accuracy": train_eval.macro_accuracy,
        "train_per_class": train_eval.per_class,
        "train_seconds": result.seconds,
        "seconds_per_epoch": result.seconds / max(1, len(result.history)),
        "device": result.device,
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return attrs


def final_dev(result: TrainResult, data: DeviceData) -> Evaluation:
    """The trained model on dev as its config evaluates it: the last epoch's, or once now for a trial
    stopped before the epochs that the loop evaluates with test-time views."""
    if result.dev is not None:
        return result.dev
    return evaluate(as_evaluated(result.model, result.config.tta), data.dev, data.classes)


def objective_values(space: SearchSpace, result: TrainResult, data: DeviceData, trial: optuna.Trial) -> list[float]:
    values = []
    for objective in space.objectives:
        if objective == "dev_macro_accuracy":
            last = [h.dev_macro_accuracy for h in result.history[-space.objective_epochs:] if h.dev is not None]
            values.append(sum(last) / len(last) if last else final_dev(result, data).macro_accuracy)
        elif objective == "robust_macro_accuracy":
            from cnnlib.attacks import robust_macro_accuracy  # noqa: PLC0415 - only robust spaces need it
            value = robust_macro_accuracy(as_evaluated(result.model, result.config.tta), data.dev, data.classes,
                                          space.robust.get("attack", "fgsm"), float(space.robust["epsilon"]))
            trial.set_user_attr("robust_macro_accuracy", value)
            trial.set_user_attr("robust_attack", f"{space.robust.get('attack', 'fgsm')}@{space.robust['epsilon']}")
            values.append(value)
    return values


def tell(study: optuna.Study, trial: optuna.Trial, values=None, state: TrialState | None = None):
    """`study.tell`, for our ask/tell loop: returns the stored FrozenTrial.

    GridSampler's after_trial calls `study.stop()` once the grid is used up,
    which raises outside `Study.optimize`; Optuna has already stored the
    trial's outcome by then (tell stores it in a `finally`), so that error
    must neither crash the worker nor be recorded as a second outcome.
    Stopping a grid study is the worker loop's job (it counts the grid).
    """
    try:
        return study.tell(trial, values, state=state)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise
        return study._storage.get_trial(trial._trial_id)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def start_trial(trial: optuna.Trial, space: SearchSpace, data: DeviceData) -> TrainConfig:
    config = space.suggest(trial)
    trial.set_user_attr("config", config.to_dict())
    trial.set_user_attr("tta", config.tta)  # its dev values are those of the model as evaluated with these views
    trial.set_user_attr("classes", list(data.classes))
    trial.set_user_attr("device", str(data.device))
    return config


def finish_trial(study: optuna.Study, trial: optuna.Trial, space: SearchSpace, data: DeviceData,
                 reporter: EpochReporter, result: TrainResult | None, error: BaseException | None):
    """Record and `tell` one trial's outcome; returns the FrozenTrial. Never raises for trial errors."""
    record_curves(trial, reporter.curves)
    try:
        if error is None:
            record_result(trial, result, data)
            attach_trial_artifacts(study, trial)  # before tell: a finished trial takes no artifacts; only warns
            if reporter.cut_before_warmup:
                return cut_before_warmup(study, trial, reporter)
            if reporter.pruned_at is not None:
                trial.set_user_attr("stopped", reporter.stopped)
                trial.set_user_attr("pruned_reason", reporter.pruned_reason or
                                    f"pruned by {type(study.pruner).__name__} at epoch {reporter.pruned_at}")
                return tell(study, trial, state=TrialState.PRUNED)
            return tell(study, trial, objective_values(space, result, data, trial))
    except Exception as late:  # e.g. the robust objective failed
        error = late
    reason = f"{type(error).__name__}: {error}"
    if isinstance(error, DivergedError) and len(space.objectives) == 1:
        # A diverging config is a real (bad) result of the search: pruned, so TPE learns to avoid it.
        trial.set_user_attr("stopped", STOPPED_DIVERGED)
        trial.set_user_attr("pruned_reason", str(error))
        return tell(study, trial, state=TrialState.PRUNED)
    if is_out_of_memory(error):
        reason = f"out of memory: {error}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    trial.set_user_attr("fail_reason", reason)
    if not isinstance(error, (DivergedError, KeyboardInterrupt)) and not is_out_of_memory(error):
        trial.set_user_attr("traceback", "".join(traceback.format_exception(error))[-4000:])
    return tell(study, trial, state=TrialState.FAIL)


def run_trials(study: optuna.Study, trials: list[optuna.Trial], space: SearchSpace, data: DeviceData,
               on_told: Callable[[list[FrozenTrial]], None] | None = None, deadline: Deadline | None = None):
    """Train the asked trials and tell each result; returns their FrozenTrials.

    Trials that can share a batch train as one fused group (a lone trial as
    itself). `on_told` gets each group's FrozenTrials as soon as they are told,
    so the trial lines of a finished group do not wait for the next group.
    `deadline` (the run's TIMEOUT): a trial still training when another epoch
    would end past it stops there and is told PRUNED, `stopped: deadline`,
    its reported epochs kept, or FAIL if that is before the pruner's warm-up;
    a group with no room left for its warm-up is told FAIL untrained,
    `stopped: deadline`.
    KeyboardInterrupt marks every trial not yet told FAIL, then re-raises.
    """
    on_told = on_told or (lambda told_now: None)
    deadline = deadline or Deadline()
    frozen, told = [], set()
    with ExitStack() as stack:
        for trial in trials:
            stack.enter_context(Heartbeat(study._storage, trial._trial_id))
        try:
            configs = {}
            for i, trial in enumerate(trials):
                try:
                    configs[i] = start_trial(trial, space, data)
                except Exception as error:  # noqa: BLE001 - recorded on the trial
                    frozen.append(finish_trial(study, trial, space, data, EpochReporter(trial, False), None, error))
                    told.add(i)
                    on_told(frozen[-1:])
            order = list(configs)
            for group in group_configs([configs[i] for i in order]):
                members = [order[g] for g in group]
                # Checked again for the first group too: the ask (16 trials through the sampler) took time.
                if deadline.room_for_group(len(members)):
                    group = _train_group(study, [trials[m] for m in members], [configs[m] for m in members], space,
                                         data, deadline)
                else:
                    group = [not_started(study, trials[m]) for m in members]
                frozen.extend(group)
                told.update(members)
                on_told(group)
                deadline.told(len(group))
                for trial in group:
                    queue_again_if_cut(study, trial)
        except KeyboardInterrupt as stop:
            lifetime.stop_begun()
            for i, trial in enumerate(trials):
                if i not in told:
                    trial.set_user_attr("fail_reason", f"interrupted ({str(stop) or 'SIGINT'}) during training")
                    tell(study, trial, state=TrialState.FAIL)
            raise
    return frozen


def queue_again_if_cut(study: optuna.Study, frozen: FrozenTrial) -> None:
    """A warm-start point the deadline cut short or left untrained is queued again, for the next group or run.

    `make final` always retrains the completed warm-start points (the known recipes); one
    that a short run stopped at epoch 3 would otherwise never complete in this study.
    """
    if frozen.user_attrs.get("stopped") != STOPPED_BY_DEADLINE or WARM_START_ATTR not in frozen.user_attrs:
        return
    attrs = {key: frozen.user_attrs[key] for key in (WARM_START_ATTR, ENQUEUED_FIXED_ATTR) if key in frozen.user_attrs}
    study.enqueue_trial(frozen.system_attrs.get("fixed_params", frozen.params), user_attrs=attrs)


def not_started(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """A trial asked with others whose group had no room left before the run's deadline: FAIL, never trained.

    FAIL, not PRUNED: it says nothing about its params, so the sampler must not learn from it.
    """
    trial.set_user_attr("stopped", STOPPED_BY_DEADLINE)
    trial.set_user_attr("fail_reason", "not trained: the run's deadline (TIMEOUT) left no room for its group")
    return tell(study, trial, state=TrialState.FAIL)


def cut_before_warmup(study: optuna.Study, trial: optuna.Trial, reporter: EpochReporter) -> FrozenTrial:
    """A trial the deadline stopped before the epochs the pruner waits for: FAIL, its epochs kept.

    FAIL, not PRUNED: a value after fewer epochs than the pruner compares trials at would
    enter the sampler's history as a verdict on its params. Its curves stay as recorded.
    """
    trial.set_user_attr("stopped", STOPPED_BY_DEADLINE)
    trial.set_user_attr("fail_reason", f"stopped by the run's deadline after epoch {reporter.pruned_at}, before the "
                                       f"{reporter.deadline.warmup_epochs} epochs the pruner waits for: too short to "
                                       f"compare, so the sampler does not learn from it")
    return tell(study, trial, state=TrialState.FAIL)


def _train_group(study, trials, configs, space, data, deadline):
    can_prune = len(space.objectives) == 1
    reporters = [EpochReporter(trial, can_prune, warmup_epochs=math.ceil(config.warmup * config.epochs),
                               epochs=config.epochs, deadline=deadline, group_size=len(trials))
                 for trial, config in zip(trials, configs)]
    if len(trials) > 1:
        numbers = [trial.number for trial in trials]
        for trial in trials:
            trial.set_user_attr("fused_with", numbers)
    try:
        # Test-time views only where the objective reads them: the curve and the pruner see the plain model.
        results = train_group(configs, data, on_epoch=lambda member, stats: reporters[member](stats),
                              tta_epochs=space.objective_epochs)
    except Exception as error:  # noqa: BLE001 - the whole group failed; each trial records why
        results, errors = [None] * len(trials), [error] * len(trials)
    else:
        errors = [r.error for r in results]
        deadline.observe(results)
        deadline.trained()
    return [finish_trial(study, trial, space, data, reporter, None if error else result, error)
            for trial, reporter, result, error in zip(trials, reporters, results, errors)]
