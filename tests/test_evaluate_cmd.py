"""`python -m study evaluate`: a checkpoint on a split, with the majority-class baseline on request."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


def evaluate_cli(tiny_inputs, *more):
    base, _, options = tiny_inputs
    return run_cli("evaluate", "--results", base / "results", "--device", "cpu", *options, *more)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["dev", "test", "train"])
def test_evaluate_reproduces_the_training_runs_figures(tiny_inputs, tiny_run, tmp_path, split):
    run_dir, _ = tiny_run
    out_json = tmp_path / "eval.json"
    code, out, err = evaluate_cli(tiny_inputs, "--checkpoint", run_dir / "model.pt", "--split", split, "--json", out_json)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())[split]
    assert report["evaluation"]["confusion_matrix"] == trained["confusion_matrix"]
    assert report["evaluation"]["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert f"{trained['macro_accuracy']:6.1%}".strip() in out and "confusion (rows true, columns predicted)" in out


@pytest.mark.slow
def test_the_baseline_shows_the_one_third_floor_by_default(tiny_inputs, tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out_json = tmp_path / "eval.json"
    code, out, err = evaluate_cli(tiny_inputs, "--checkpoint", run_dir / "model.pt", "--json", out_json)
    assert code == 0, err
    assert "majority-class baseline (always 'car'" in out and "macro accuracy: 33.3%" in out
    baseline = json.loads(out_json.read_text())["majority_baseline"]
    assert baseline["per_class"] == {"car": 1.0, "truck": 0.0, "cat": 0.0}
    assert baseline["confusion_matrix"] == [[4, 0, 0], [3, 0, 0], [2, 0, 0]]


def test_evaluate_without_a_checkpoint_says_how_to_give_one(tiny_inputs, tmp_path):
    _, _, options = tiny_inputs
    code, _, err = run_cli("evaluate", "--results", tmp_path, *options)
    assert code == 2 and "no checkpoint given" in err and "CHECKPOINT=" in err


def test_evaluate_with_a_missing_checkpoint_names_it(tiny_inputs, tmp_path):
    code, _, err = evaluate_cli(tiny_inputs, "--checkpoint", tmp_path / "nope.pt")
    assert code == 2 and "nope.pt: checkpoint not found" in err


@pytest.mark.slow
def test_evaluate_refuses_data_read_in_another_class_order(tiny_inputs, tiny_run):
    run_dir, _ = tiny_run
    code, _, err = evaluate_cli(tiny_inputs, "--checkpoint", run_dir / "model.pt", "--classes", "cat,truck,car")
    assert code == 2 and "trained for classes car,truck,cat" in err


@pytest.mark.slow
def test_no_baseline_hides_it(tiny_inputs, tiny_run):
    run_dir, _ = tiny_run
    code, out, err = evaluate_cli(tiny_inputs, "--checkpoint", run_dir / "model.pt", "--no-baseline")
    assert code == 0, err
    assert "majority-class baseline" not in out


@pytest.mark.slow
def test_evaluate_uses_the_checkpoints_tta_unless_told_another(tiny_inputs, tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out_json = tmp_path / "eval.json"
    code, out, err = evaluate_cli(tiny_inputs, "--checkpoint", run_dir / "model.pt", "--json", out_json)
    assert code == 0, err
    assert json.loads(out_json.read_text())["tta"] == "none" and "tta:        none\n" in out
    code, out, err = evaluate_cli(tiny_inputs, "--checkpoint", run_dir / "model.pt", "--tta", "flip", "--json", out_json)
    assert code == 0, err
    assert json.loads(out_json.read_text())["tta"] == "flip" and "tta:        flip (the checkpoint says none)" in out


@pytest.mark.slow
def test_evaluate_takes_a_seed_ensemble_and_scores_its_mean_softmax(tiny_inputs, tiny_run, tmp_path):
    from cnnlib.checkpoint import load_checkpoint, save_checkpoint
    from cnnlib.ensemble import Ensemble
    from cnnlib.model import SeedCNN

    run_dir, _ = tiny_run
    model, config, classes, _ = load_checkpoint(run_dir / "model.pt")
    path = save_checkpoint(tmp_path / "ensemble.pt", Ensemble([model, SeedCNN(len(classes)).eval()]), config, classes)
    out_json = tmp_path / "eval.json"
    code, out, err = evaluate_cli(tiny_inputs, "--checkpoint", path, "--split", "test", "--json", out_json)
    assert code == 0, err
    alone = json.loads((run_dir / "metrics.json").read_text())["test"]
    together = json.loads(out_json.read_text())["evaluation"]
    assert sum(map(sum, together["confusion_matrix"])) == sum(map(sum, alone["confusion_matrix"]))
    assert together["loss"] != pytest.approx(alone["loss"])  # the second member counts


@pytest.mark.slow
def test_eval_json_from_the_environment_is_where_the_evaluation_goes(tiny_inputs, tiny_run, tmp_path, monkeypatch):
    """`make evaluate EVAL_JSON=...` hands the path over as EVAL_JSON; it was once dropped without a word."""
    run_dir, _ = tiny_run
    monkeypatch.setenv("EVAL_JSON", str(tmp_path / "eval.json"))
    code, out, err = evaluate_cli(tiny_inputs, "--checkpoint", run_dir / "model.pt")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["split"] == "dev"
    assert f"wrote: {tmp_path / 'eval.json'}" in out


@pytest.mark.parametrize("members, tta, line", [
    (3, "flip_translate", "model:      ensemble of 3 networks (seeds 0, 1, 2), each seeing 10 views (tta flip_translate): "
                          "30 forwards an image\n"),
    (1, "none", "model:      one network (seed 7), seeing 1 view (tta none)\n"),
], ids=["the ensemble make final keeps", "one network"])
def test_evaluate_says_what_the_model_is_and_shows_no_single_seed_for_an_ensemble(tiny_inputs, tmp_path, members, tta,
                                                                                  line):
    """An ensemble's config is its first member's: its seed 0 alone would misdescribe three networks."""
    from cnnlib.checkpoint import save_checkpoint
    from cnnlib.ensemble import Ensemble
    from cnnlib.model import SeedCNN
    from cnnlib.training import TrainConfig

    networks = [SeedCNN().eval() for _ in range(members)]
    model = Ensemble(networks) if members > 1 else networks[0]
    config = TrainConfig(epochs=1, tta=tta, seed=0 if members > 1 else 7)
    extra = {"seeds": list(range(members))} if members > 1 else {"seed": 7}
    path = save_checkpoint(tmp_path / "model.pt", model, config, ("car", "truck", "cat"), extra=extra)
    out_json = tmp_path / "eval.json"

    code, out, err = evaluate_cli(tiny_inputs, "--checkpoint", path, "--split", "test", "--json", out_json)

    assert code == 0, err
    assert line in out
    config_line = next(text for text in out.splitlines() if text.startswith("checkpoint: "))
    assert ("'seed'" in config_line) == (members == 1)
    report = json.loads(out_json.read_text())
    assert report["model"] == {"members": members, "seeds": extra.get("seeds", [7]),
                               "views": 10 if tta == "flip_translate" else 1, "tta": tta}
    assert ("seed" in report["config"]) == (members == 1)
