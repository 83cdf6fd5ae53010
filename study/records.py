"""What a study records about its trials and its data, and how a later stage reads it back.

`make search` writes these marks (search/objective.py, search/space.py,
search/study_setup.py); `make final`, `make hpo-bench` and the export read
them. One module below every stage, so that no stage reaches into another's
insides to learn what a user attribute means.
"""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState

from cnnlib.config import TrainConfig

from .errors import UserError

# Why a PRUNED trial stopped (user attribute "stopped"): export, notes and hpo-bench tell a
# trial the run's deadline cut short from one the pruner judged.
STOPPED_BY_PRUNER, STOPPED_COLLAPSED, STOPPED_DIVERGED, STOPPED_BY_DEADLINE = "pruner", "collapsed", "diverged", "deadline"
# The user attribute that marks a trial of a space file's known point: its index in `enqueue:`.
# make final always retrains these beside the search's top trials (study.final.choice.warm_start_trials).
WARM_START_ATTR = "warm_start_point"
# The states of a finished trial: its value is in (COMPLETE), or it stopped with one (PRUNED).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial that the run's deadline stopped after this share of its epochs still ranks its config:
# `make final` retrains every candidate for all its epochs. On a busy 2-core CPU a default search
# cut the two enqueued 100-epoch recipes at epoch 98; without this they could not compete.
NEARLY_DONE = 0.8


# --- a trial: its config, its epochs, why it stopped ----------------------------

def trial_config(trial: FrozenTrial) -> tuple[TrainConfig, str]:
    """The trial's full config from user attr "config"; else its params over TrainConfig defaults."""
    try:
        if isinstance(trial.user_attrs.get("config"), dict):
            return TrainConfig.from_dict(trial.user_attrs["config"]), "user attribute 'config'"
        known = set(TrainConfig().to_dict())
        params = {k: v for k, v in trial.params.items() if k in known}
        return TrainConfig.from_dict(params), "trial params over TrainConfig defaults (no 'config' attribute)"
    except ValueError as error:
        raise UserError(f"trial {trial.number}: its config cannot be rebuilt ({error})") from None


def epochs_trained(trial: FrozenTrial) -> tuple[int, int | None]:
    """(epochs reported, epochs asked for): a trial reports once per epoch."""
    config = trial.user_attrs.get("config")
    asked = config.get("epochs") if isinstance(config, dict) else trial.params.get("epochs")
    return len(trial.intermediate_values), (int(asked) if isinstance(asked, (int, float)) else None)


def nearly_done(trial: FrozenTrial) -> bool:
    """A PRUNED trial that the deadline (not the pruner) stopped after NEARLY_DONE of its epochs."""
    done, asked = epochs_trained(trial)
    return (trial.state == TrialState.PRUNED and trial.user_attrs.get("stopped") == STOPPED_BY_DEADLINE
            and trial.value is not None and bool(asked) and done >= NEARLY_DONE * asked)


# --- the study: the split it was searched on ---------------------------------------

def split_text(summary: dict) -> str:
    """'train 4000/600/400, dev 503/51/71, test 400/400/400' in the class order."""
    classes = summary.get("classes") or []
    return ", ".join(f"{name} {'/'.join(str(counts.get(c, 0)) for c in classes)}"
                     for name, counts in (summary.get("splits") or {}).items())


def check_recorded_data(study, splits, corrections: str | None = None,
                        fix: str = "pass the same DATA, CLASSES, *_COUNTS, SPLIT_SEED and CORRECTIONS as the search"
                        ) -> None:
    """Refuse data options that give another split than the one the study recorded (studies that recorded
    nothing, from before, are taken as they are): its trials' scores say nothing about another split."""
    attrs = study.user_attrs
    if "corrections_digest" in attrs and attrs["corrections_digest"] != splits.corrections_digest:
        def name(digest):
            return f"corrections sha256 {digest[:12]}" if digest else "no corrections"
        raise UserError(f"study {study.study_name!r} was searched with {name(attrs['corrections_digest'])}, but "
                        f"CORRECTIONS={corrections or '(empty)'} is {name(splits.corrections_digest)}; {fix}")
    summary = attrs.get("data_summary")
    now = splits.summary()
    if isinstance(summary, dict) and (summary.get("classes"), summary.get("splits")) != (now["classes"], now["splits"]):
        raise UserError(f"study {study.study_name!r} was searched on split {split_text(summary)} "
                        f"({','.join(summary.get('classes') or [])}), but the data options give "
                        f"{split_text(now)} ({','.join(now['classes'])}); {fix}")
    key = attrs.get("split_cache_key")
    if key and key != splits.cache_key:
        raise UserError(f"study {study.study_name!r} was searched on split cache key {key}, but the data options "
                        f"give {splits.cache_key} (same class counts, other images or source); {fix}")
