"""Search-space files: what a valid one means, and how each mistake is reported before any training."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from study import cli
from study.search.space import SpaceError
from study.search.space_file import load_space

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "search_spaces").rglob("*.yaml"))

VALID = """\
description: a small valid space the bad ones below are variations of
sampler: {name: TPESampler, seed: 0}
pruner: {name: MedianPruner, n_warmup_steps: 1}
params:
  optimizer: {type: categorical, choices: [sgd, adam]}
  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  momentum: {type: float, low: 0.5, high: 0.95, when: {optimizer: sgd}}
  batch_size: {type: categorical, choices: [32, 64]}
  epochs: {type: int, low: 2, high: 4}
  weight_decay: 1.0e-3
"""


def write_space(folder: Path, text: str, name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def replace_line(start: str, new: str) -> str:
    """VALID with the line that starts with `start` replaced by `new` (or removed when new is empty)."""
    lines = VALID.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(start))
    lines[index:index + 1] = [new] if new else []
    return "\n".join(lines) + "\n"


# --- valid files --------------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "search_spaces")))
def test_every_shipped_space_file_loads(path):
    space = load_space(path)
    assert space.params and space.objectives
    space.make_sampler(), space.make_pruner()


def test_a_conditional_param_is_asked_only_when_its_condition_holds(tmp_path):
    """momentum exists for SGD only: an Adam trial must not carry a meaningless momentum param."""
    space = load_space(write_space(tmp_path, VALID))
    fixed = {"lr": 1e-2, "batch_size": 32, "epochs": 2}
    adam = optuna.trial.FixedTrial({**fixed, "optimizer": "adam"})
    sgd = optuna.trial.FixedTrial({**fixed, "optimizer": "sgd", "momentum": 0.7})

    adam_config, sgd_config = space.suggest(adam), space.suggest(sgd)

    assert "momentum" not in adam.params and adam_config.optimizer == "adam"
    assert sgd.params["momentum"] == 0.7 and sgd_config.momentum == 0.7
    assert adam_config.weight_decay == sgd_config.weight_decay == 1e-3  # the fixed value


def test_the_study_is_named_after_the_space_file(tmp_path):
    assert load_space(write_space(tmp_path, VALID, "my_box.yaml")).name == "my_box"


def test_every_trial_draws_from_its_own_seed_and_a_single_run_is_reproducible(tmp_path):
    """Each process (worker, run, machine) builds its own sampler: a seed shared by all would make them propose
    identical trials. The seed goes with the trial's number, which the storage makes unique in the study."""
    space = load_space(write_space(tmp_path, VALID))

    def lrs(samplers: int, trials: int) -> list[float]:
        """`trials` trials of one study, asked in turn by `samplers` processes' samplers (like runs started together)."""
        storage = optuna.storages.InMemoryStorage()
        studies = [optuna.create_study(storage=storage, study_name="s", sampler=space.make_sampler(),
                                       direction="maximize", load_if_exists=True) for _ in range(samplers)]
        return [studies[i % samplers].ask().suggest_float("lr", 1e-4, 1e-1, log=True) for i in range(trials)]

    assert lrs(1, 4) == lrs(1, 4)  # the file's seed makes a run reproducible
    assert len(set(lrs(2, 4))) == 4  # two processes' samplers never repeat each other
    assert lrs(2, 4) == lrs(1, 4)  # trial n draws the same, whichever process asks it


# --- invalid files: one message naming the file and the key -------------------

INVALID = {
    "unknown type": (replace_line("  lr:", "  lr: {type: floating, low: 1.0e-4, high: 1.0e-1}"),
                     "params.lr.type", "unknown type 'floating'"),
    "low above high": (replace_line("  epochs:", "  epochs: {type: int, low: 9, high: 3}"),
                       "params.epochs", "low (9) > high (3)"),
    "log with low zero": (replace_line("  lr:", "  lr: {type: float, low: 0.0, high: 1.0e-1, log: true}"),
                          "params.lr.low", "log scale needs low > 0"),
    "log with negative low": (replace_line("  lr:", "  lr: {type: float, low: -1.0, high: 1.0e-1, log: true}"),
                              "params.lr.low", "log scale needs low > 0"),
    "unknown top-level key": (VALID + "samplr: {name: RandomSampler}\n", "samplr", "unknown key"),
    "unknown key in a param": (replace_line("  lr:", "  lr: {type: float, low: 1.0e-4, high: 1.0e-1, lgo: true}"),
                               "params.lr.lgo", "unknown key"),
    "unknown hyperparameter": (VALID + "  learning_rate: 0.1\n", "params.learning_rate", "unknown hyperparameter"),
    "condition on a later param": (
        VALID.replace("  optimizer: {type: categorical, choices: [sgd, adam]}\n", "")
        + "  optimizer: {type: categorical, choices: [sgd, adam]}\n",
        "params.momentum.when", "must be a param listed before it"),
    "condition on an unknown param": (
        replace_line("  momentum:", "  momentum: {type: float, low: 0.5, high: 0.9, when: {solver: sgd}}"),
        "params.momentum.when", "'solver', which is not a param"),
    "condition that never holds": (
        replace_line("  momentum:", "  momentum: {type: float, low: 0.5, high: 0.9, when: {optimizer: SGD}}"),
        "params.momentum.when", "optimizer is never 'SGD'"),
    "range end training rejects": (replace_line("  lr:", "  lr: {type: float, low: 0.0, high: 1.0e-1}"),
                                   "params.lr", "lr=0.0 is out of range"),
    "choice training rejects": (replace_line("  optimizer:", "  optimizer: {type: categorical, choices: [sgd, rmsprop]}"),
                                "params.optimizer", "'rmsprop'"),
    "fixed value training rejects": (replace_line("  weight_decay:", "  weight_decay: -1.0"),
                                     "params.weight_decay", "out of range"),
    "number YAML reads as text": (replace_line("  lr:", "  lr: {type: float, low: 1e-4, high: 1.0e-1}"),
                                  "params.lr.low", "write 1.0e-3"),
    "int range with a float bound": (replace_line("  epochs:", "  epochs: {type: int, low: 2, high: 4.5}"),
                                     "params.epochs.high", "expected an integer"),
    "empty choices": (replace_line("  batch_size:", "  batch_size: {type: categorical, choices: []}"),
                      "params.batch_size.choices", "non-empty list"),
    "fixed without value": (replace_line("  weight_decay:", "  weight_decay: {type: fixed}"),
                            "params.weight_decay.value", "needs a value"),
    "unknown sampler": (replace_line("sampler:", "sampler: {name: BestSampler}"), "sampler.name", "'BestSampler'"),
    "bad pruner argument": (replace_line("pruner:", "pruner: {name: MedianPruner, warmup: 3}"), "pruner: ", "warmup"),
    "unknown objective": (VALID + "objective: test_accuracy\n", "objective", "'test_accuracy'"),
    "no params": ("sampler: {name: TPESampler}\n", "params", "missing or empty"),
    "bad YAML": (VALID + "  epochs: [2, 3\n", "not valid YAML", "line "),
    "not a mapping": ("- just\n- a list\n", "expected a mapping", ""),
}


@pytest.mark.parametrize("text, key, detail", INVALID.values(), ids=INVALID.keys())
def test_an_invalid_space_file_names_the_file_and_the_key(tmp_path, text, key, detail):
    path = write_space(tmp_path, text)

    with pytest.raises(SpaceError) as caught:
        load_space(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: ") and message.count(str(path)) == 1, message
    assert key in message and detail in message, message
    assert "\n" not in message


def test_a_missing_space_file_is_named(tmp_path):
    with pytest.raises(SpaceError, match="search-space file not found"):
        load_space(tmp_path / "nope.yaml")


def test_search_with_an_invalid_space_stops_before_touching_data_or_storage(tmp_path, capsys):
    """The error must come before the (slow) split is built and before a study is created."""
    path = write_space(tmp_path, INVALID["low above high"][0])
    results, database = tmp_path / "results", tmp_path / "results" / "optuna.db"

    code = cli.main(["search", "--space", str(path), "--storage", f"sqlite:///{database}", "--results", str(results),
                     "--data", str(tmp_path / "no-data-here"), "--trials", "1"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: {path}: params.epochs: low (9) > high (3)"
    assert not results.exists()  # no storage file, no split cache


def test_a_grid_sampler_keeps_the_files_seed_in_every_process(tmp_path):
    """Grid trial n runs grid point n of a seed-shuffled order: processes with other seeds would redo and skip points."""
    space = load_space(write_space(tmp_path, """\
        sampler: {name: GridSampler, seed: 3}
        params:
          lr: {type: categorical, choices: [1.0e-1, 1.0e-2, 1.0e-3, 1.0e-4]}
        """))

    storage = optuna.storages.InMemoryStorage()
    studies = [optuna.create_study(storage=storage, study_name="grid", sampler=space.make_sampler(),
                                   direction="maximize", load_if_exists=True) for _ in range(2)]
    alone = optuna.create_study(sampler=space.make_sampler(), direction="maximize")

    shared = [studies[i % 2].ask().suggest_categorical("lr", [1e-1, 1e-2, 1e-3, 1e-4]) for i in range(4)]

    assert shared == [alone.ask().suggest_categorical("lr", [1e-1, 1e-2, 1e-3, 1e-4]) for _ in range(4)]
    assert sorted(shared) == [1e-4, 1e-3, 1e-2, 1e-1]  # every point once


WARM = """
params:
  optimizer: {type: categorical, choices: [sgd, adamw]}
  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  epochs: 3
enqueue:
  - {optimizer: adamw, lr: 3.0e-3}
  - {optimizer: sgd, lr: 0.05}
"""


def test_enqueued_points_are_read_and_must_lie_in_the_space(tmp_path):
    space = load_space(write_space(tmp_path, WARM))
    assert space.enqueue == [{"optimizer": "adamw", "lr": 3e-3}, {"optimizer": "sgd", "lr": 0.05}]
    for bad, detail in (("{optimizer: adam, lr: 3.0e-3}", "not one of its choices"),
                        ("{optimizer: sgd, lr: 2.0}", "outside its range"),
                        ("{epochs: 0}", "not usable"), ("{epochs: 2.5}", "expected an integer"),
                        ("{optimizer: sgd, momentum: 0.9}", "not a param of this file")):
        text = WARM.replace("{optimizer: sgd, lr: 0.05}", bad)
        with pytest.raises(SpaceError, match=detail):
            load_space(write_space(tmp_path, text, "bad.yaml"))


def test_a_new_study_evaluates_the_enqueued_points_first(tmp_path):
    from study.search.study_setup import create_study
    from types import SimpleNamespace

    space = load_space(write_space(tmp_path, WARM, "warm.yaml"))
    storage = optuna.storages.InMemoryStorage()
    study = create_study(SimpleNamespace(study=None, storage="in-memory"), space, storage)
    create_study(SimpleNamespace(study=None, storage="in-memory"), space, storage)  # a second open enqueues nothing more
    first, second = study.ask(), study.ask()
    assert [space.suggest(t).optimizer for t in (first, second)] == ["adamw", "sgd"]
    assert first.params["lr"] == 3e-3 and second.params["lr"] == 0.05
    assert [t.user_attrs["warm_start_point"] for t in (first, second)] == [0, 1]  # make final retrains them
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 0


def test_an_enqueued_point_may_give_a_fixed_param_its_own_value_for_that_trial_alone(tmp_path):
    from study.search.study_setup import create_study
    from types import SimpleNamespace

    text = WARM.replace("{optimizer: sgd, lr: 0.05}", "{optimizer: sgd, lr: 0.05, epochs: 5}")
    space = load_space(write_space(tmp_path, text, "warm.yaml"))
    study = create_study(SimpleNamespace(study=None, storage="in-memory"), space, optuna.storages.InMemoryStorage())
    configs = [space.suggest(study.ask()) for _ in range(3)]
    assert [(c.optimizer, c.lr, c.epochs) for c in configs[:2]] == [("adamw", 3e-3, 3), ("sgd", 0.05, 5)]
    assert configs[2].epochs == 3  # a sampled trial keeps the file's fixed value
    assert space.config_from_params(space.enqueue[1]).epochs == 5


def test_the_default_space_enqueues_the_users_recipe():
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "default.yaml")
    recipe = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "seed_final.yaml").fixed_config()
    configs = [space.config_from_params(point) for point in space.enqueue]
    assert any({k: v for k, v in c.to_dict().items() if k != "seed"} ==
               {k: v for k, v in recipe.to_dict().items() if k != "seed"} for c in configs)
