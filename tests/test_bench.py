"""`make bench`: the naive and project loops train the same function, the report has every section it promises."""

from __future__ import annotations

import json

import pytest
import torch

from cnnlib import training
from cnnlib.model import INPUT_MEAN, INPUT_STD, model_flops_per_image
from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.stacked_model import make_model
from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData, train
from study.bench import machine
from study.bench import training_loop as bench
from study.cli import main
from study.bench.interleave import lone_trial_epochs
from study.bench.naive_loop import make_naive_model, naive_train_epochs

# Tinted classes (see conftest) are separable by colour: a loop that learns at all
# gets far above chance (1/3) in a few epochs; one that is broken stays near it.
TINY = {"car": 48, "truck": 48, "cat": 48}
TINY_TEST = {"car": 16, "truck": 16, "cat": 16}
TINY_COUNTS = ["--train-counts", "48,48,48", "--dev-counts", "12,12,12", "--test-counts", "4,4,4"]


@pytest.fixture
def tiny_splits(image_tree, tmp_path):
    root = image_tree(train=TINY, test=TINY_TEST)
    config = DataConfig(root, train_counts=(48, 48, 48), dev_counts=(12, 12, 12), test_counts=(4, 4, 4))
    return prepare_splits(config, tmp_path / "cache")


def test_naive_model_computes_the_project_models_function_on_normalized_input():
    config = TrainConfig(seed=3)
    torch.manual_seed(config.seed)
    project = make_model(3, config, 32, "cpu").eval()
    torch.manual_seed(config.seed)
    naive = make_naive_model(3, config, 32, "cpu").eval()
    x = torch.rand(5, 3, 32, 32)
    mean, std = torch.tensor(INPUT_MEAN).view(1, 3, 1, 1), torch.tensor(INPUT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(naive((x - mean) / std), project(x))


def test_train_gives_the_same_history_for_the_same_seed(tiny_splits):
    config = TrainConfig(epochs=2, batch_size=16, seed=5, dropout=0.3)
    first, second = train(config, tiny_splits, "cpu"), train(config, tiny_splits, "cpu")
    assert [h.train_loss for h in first.history] == [h.train_loss for h in second.history]
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_an_interleaved_run_is_the_run_a_user_gets_alone(tiny_splits):
    config = TrainConfig(epochs=3, batch_size=16, seed=1, dropout=0.3)  # dropout draws from the global RNG
    alone = train(config, tiny_splits, "cpu")
    data = DeviceData(tiny_splits, "cpu")
    runs = {"naive": naive_train_epochs(config, tiny_splits, "cpu"), "project": lone_trial_epochs(config, data)}
    interleaved = bench.interleave(runs, torch.device("cpu"))["project"].result
    assert [h.train_loss for h in interleaved.history] == [h.train_loss for h in alone.history]


def test_a_flipped_lever_holds_inside_its_own_run_only(tiny_splits):
    config = TrainConfig(epochs=1, batch_size=16)
    data = DeviceData(tiny_splits, "cpu")
    shipped = training.CHANNELS_LAST
    run = lone_trial_epochs(config, data, training.LoopOptions(channels_last=not shipped))
    conv = next(run).model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) is (not shipped)
    assert training.CHANNELS_LAST is shipped


def test_accuracy_check_calls_a_gap_wider_than_the_seed_spread_a_difference():
    same = bench.accuracy_check({0: {"naive": 0.70, "project": 0.72}, 1: {"naive": 0.74, "project": 0.71}})
    assert same["noise"] == pytest.approx(0.04) and same["within_noise"] is True
    apart = bench.accuracy_check({0: {"naive": 0.50, "project": 0.72}, 1: {"naive": 0.51, "project": 0.71}})
    assert apart["within_noise"] is False


def test_cpu_peak_is_cores_times_clock_times_fma_width(monkeypatch):
    core = {"model name": "Test CPU", "cpu MHz": "2000.000", "flags": "fpu sse avx fma avx2", "physical id": "0"}
    monkeypatch.setattr(machine, "_cpuinfo", lambda: [{**core, "core id": "0"}, {**core, "core id": "1"}])
    peak = machine.cpu_peak()
    assert peak["flops"] == 2 * 2000e6 * 32
    assert "/proc/cpuinfo" in peak["source"]


def test_bench_rejects_a_batch_size_list_that_is_not_integers(tmp_path, capsys):
    assert main(["bench", "--batch-sizes", "16,big", "--results", str(tmp_path)]) == 2
    assert "16,big" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_writes_the_documented_report_and_both_loops_learn(image_tree, tmp_path, capsys):
    root = image_tree(train=TINY, test=TINY_TEST)
    results = tmp_path / "results"
    code = main(["bench", "--data", str(root), *TINY_COUNTS, "--results", str(results), "--device", "cpu",
                 "--warmup", "1", "--epochs", "2", "--batch-sizes", "16,32", "--seeds", "0,1", "--threads", "1"])
    assert code == 0
    report = json.loads((results / "bench" / "bench.json").read_text())
    assert len(list((results / "bench").glob("bench-*.json"))) == 1  # the timestamped copy

    device = report["device"]
    assert device["device"] == "cpu" and device["torch"] == torch.__version__ and device["threads"] == 1
    assert device["peak"]["flops"] > 0 and device["peak"]["source"]
    assert report["flops_per_image"] == model_flops_per_image(32, 3)
    assert set(report["batch_sizes"]) == {"16", "32"}
    for row in report["batch_sizes"].values():
        naive, project = row["naive"], row["project"]
        assert row["speedup"] == pytest.approx(naive["seconds_per_epoch"] / project["seconds_per_epoch"])
        for loop in (naive, project):
            assert len(loop["epoch_seconds"]) == len(loop["epoch_cpu_seconds"]) == 3 and loop["timed_epochs"] == 2
            assert loop["cpu_seconds_per_epoch"] > 0
            assert loop["images_per_second"] == pytest.approx(144 / loop["seconds_per_epoch"])
            assert 0 < loop["share_of_peak"] < 1
    accuracy = report["accuracy"]
    assert accuracy["seeds"] == [0, 1] and accuracy["noise"] is not None and "within_noise" in accuracy
    assert min(accuracy["naive"]) > 0.6 and min(accuracy["project"]) > 0.6  # chance is 1/3
    assert "speedup" in capsys.readouterr().out


def test_the_denormals_section_times_one_group_flushed_and_kept_in_child_processes(image_tree, tmp_path):
    from study.bench.denormals import format_denormals, measure_denormals

    root = image_tree(train=TINY, test=TINY_TEST)
    config = DataConfig(root, train_counts=(48, 48, 48), dev_counts=(12, 12, 12), test_counts=(4, 4, 4))

    report = measure_denormals(config, tmp_path / "cache", epochs=4, threads=1, k=2, log=lambda line: None)

    assert "error" not in report, report
    assert set(report["runs"]) == {"flushed", "kept"} and report["k"] == 2 and report["epochs"] == 4
    for name in ("flushed", "kept"):
        run = report["runs"][name]
        assert len(run["epoch_seconds"]) == 4 and all(s > 0 for s in run["epoch_seconds"])
        assert len(run["last_dev_macro"]) == 2 and all(0 <= m <= 1 for m in run["last_dev_macro"])
        assert report[name]["total_s"] == pytest.approx(sum(run["epoch_seconds"]))
    assert report["speedup_total"] == pytest.approx(report["kept"]["total_s"] / report["flushed"]["total_s"])
    assert "flushed" in format_denormals(report) and "kept" in format_denormals(report)
