"""The training step: a group of K configs trains, member by member, what each config trains alone.

One step implementation serves every K (cnnlib.step.StackedStep); a lone
trial is a group of one. Two references pin it down, on the CPU in float32:
- a group of K against its K configs trained one at a time (K=1 through the
  same step), fed the same batch order (`order_seed`, the first member's
  seed) and the same seeds: every lever, stopping, passes, threads;
- a group of one against a plain SeedCNN trained with torch.optim, LambdaLR,
  nn.Dropout and the nn.Module loss, written here (`reference_run`), on the
  loop's batches: every optimizer, schedule, weight decay, imbalance method,
  label smoothing and dropout.
The step and the references use different kernels (one grouped convolution
and batched matmuls instead of small ones, torch's fused optimizer kernel
per row), so values agree to rounding, not bit for bit, and training
amplifies rounding: the plain loop itself, rerun with 2 threads instead of
1 (or in another process: MKL's results depend on buffer alignment), moves
by as much as the step and it differ. Measured on this CPU, 3 epochs on 500
images:
- without dropout: losses within 5e-7, weights within 2e-6 (relative norm
  per tensor), dev confusion matrices identical;
- with dropout (each member replays nn.Dropout's masks bit for bit): losses
  within 2e-4, weights within 2e-3, confusion matrices identical; the plain
  loop at 2 threads vs 1 differed from itself by the same 2e-4 / 2e-3.
On another machine (the H200 host's 16-core CPU with torch 2.11) the same
runs agreed in epoch 1 but differed by up to 2.5e-3 in epoch 2's dev loss:
other kernels, same amplification.
Tolerances: epoch 1's losses 1e-4, which a stacking bug (a member's lr,
weights or loss mixed up) misses by orders of magnitude; later epochs' losses
1e-2 (2e-2 with dropout), weights 5e-2 (1e-1 with dropout), at most six of
the 300 dev images predicted differently (near-ties flip).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from cnnlib import passes, stacked_model, step as step_module
from cnnlib.config import PER_MEMBER as PER_MEMBER_FIELDS, SHARED as SHARED_FIELDS, group_key
from cnnlib.config import TrainConfig
from cnnlib.config import check_group, group_configs
from cnnlib.errors import DivergedError
from cnnlib.losses import MemberLoss, member_losses
from cnnlib.losses import class_weights, make_criterion
from cnnlib.member_dropout import MemberDropout
from cnnlib.model import SeedCNN
from cnnlib.schedules import lr_factors
from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.stacked_optimizer import StackedOptimizer
from cnnlib.training import (DeviceData, EpochStats, LoopOptions, MemberResult, epoch_batches, evaluate, train,
                             train_group, train_group_epochs)

FIRST_EPOCH_TOLERANCE = 1e-4
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-2, 5e-2
DROPOUT_LOSS_TOLERANCE, DROPOUT_WEIGHT_TOLERANCE = 2e-2, 1e-1
MAX_DEV_IMAGES_MOVED = 6

CPU = torch.device("cpu")
SHARED = dict(batch_size=32, epochs=3, imbalance="weighted_loss")
# One of each kind a search produces: both optimizers, momentum and weight decay on
# and off, different learning rates and seeds.
MIXED = [
    dict(optimizer="adam", lr=3e-3, weight_decay=0.0, seed=11),
    dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-3, seed=12),
    dict(optimizer="adam", lr=1e-3, weight_decay=1e-2, seed=13),
    dict(optimizer="sgd", lr=0.02, momentum=0.0, weight_decay=0.0, seed=14),
]


# The levers beyond the user's knobs, one member each, in one group: both schedules with
# and without warm-up, AdamW, Nesterov, logit adjustment, label smoothing, no imbalance method.
LEVERS = [
    dict(optimizer="adamw", lr=3e-3, weight_decay=0.05, schedule="one_cycle", warmup=0.3, seed=21),
    dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine", seed=22,
         imbalance="logit_adjusted"),
    dict(optimizer="adam", lr=1e-3, weight_decay=1e-3, imbalance="logit_adjusted", tau=0.5, label_smoothing=0.1,
         seed=23),
    dict(optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=0.0, schedule="one_cycle", warmup=0.2, seed=24,
         imbalance="none", label_smoothing=0.2),
    dict(optimizer="adamw", lr=1e-3, weight_decay=0.0, schedule="cosine", seed=25),
]


@pytest.fixture(scope="module")
def small_splits(real_data, tmp_path_factory):
    """500 training images in the user's 80/12/8 % proportions, 300 balanced dev images."""
    config = DataConfig(real_data, train_counts=(400, 60, 40), dev_counts=(100, 100, 100), test_counts=(0, 0, 0))
    return prepare_splits(config, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def cpu_data(small_splits):
    return DeviceData(small_splits, CPU)


@pytest.fixture
def pass_widths(monkeypatch):
    """The number of members of every stacked forward pass, in order (one torch thread: one pass at a
    time, split by members_per_pass alone, whatever thread count an earlier test left behind)."""
    widths = []
    forward = stacked_model.StackedSeedCNN.forward

    def counting_forward(self, x, masks=None):
        widths.append(self.k)
        return forward(self, x, masks)

    monkeypatch.setattr(stacked_model.StackedSeedCNN, "forward", counting_forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield widths
    torch.set_num_threads(threads)


def configs_of(members, **shared):
    return [TrainConfig(**{**SHARED, **shared, **member}) for member in members]


def separate_runs(configs, data):
    """What the unfused loop gives each member, fed the group's batch order."""
    return [train(config, data, order_seed=configs[0].seed) for config in configs]


# torch.optim's own optimizers, as a config names them: the reference the stacked optimizer must match.
REFERENCE_OPTIMIZERS = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                             weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}


def reference_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    return REFERENCE_OPTIMIZERS[config.optimizer](list(params), config)


def reference_run(config: TrainConfig, data: DeviceData, order_seed: int) -> MemberResult:
    """A plain SeedCNN with torch.optim, LambdaLR, nn.Dropout and the nn.Module loss, on the loop's batches."""
    torch.manual_seed(config.seed)  # the weights, then nn.Dropout's masks
    model = SeedCNN(data.n_classes, config.dropout, data.image_size)
    optimizer = reference_optimizer(model.parameters(), config)
    factors = lr_factors(config, config.epochs * math.ceil(len(data.train) / config.batch_size)).tolist()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factors[min(s, len(factors) - 1)])
    criterion = make_criterion(config, data.train.y, data.n_classes)
    generator = torch.Generator().manual_seed(order_seed)
    result = MemberResult(model, config)
    for epoch in range(1, config.epochs + 1):
        model.train()
        total = 0.0
        for _, x, y in epoch_batches(data, config, generator):
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
        dev = evaluate(model, data.dev, data.classes, criterion)
        result.history.append(EpochStats(epoch, total / len(data.train), dev.loss, dev, 0.0))
    return result


def assert_same_run(fused_result, separate, loss_tolerance=LOSS_TOLERANCE, weight_tolerance=WEIGHT_TOLERANCE):
    """Epoch 1 must agree to FIRST_EPOCH_TOLERANCE; later epochs to the looser tolerances.

    Training amplifies rounding differences (another CPU's kernels, another torch
    build, TF32 on a GPU) from ~1e-7 to ~1e-3 over a few epochs, while a real
    fusion bug (a member's lr, weights or loss mixed up) is off by >= 1e-2 from
    the first epoch on: the first epoch is where the check is sharp.
    """
    assert len(fused_result.history) == len(separate.history)
    for a, b in zip(fused_result.history, separate.history):
        assert a.epoch == b.epoch
        tolerance = min(loss_tolerance, FIRST_EPOCH_TOLERANCE) if a.epoch == 1 else loss_tolerance
        assert a.train_loss == pytest.approx(b.train_loss, abs=tolerance), a.epoch
        assert a.dev_loss == pytest.approx(b.dev_loss, abs=tolerance), a.epoch
        moved = np.abs(a.dev.confusion - b.dev.confusion).sum() // 2
        assert moved <= MAX_DEV_IMAGES_MOVED, (a.epoch, a.dev.confusion, b.dev.confusion)
    for (name, p), q in zip(fused_result.model.named_parameters(), separate.model.parameters()):
        relative = ((p - q).norm() / q.norm()).item()
        assert relative <= weight_tolerance, (name, relative)


# --- the step at K=1 is a plain SeedCNN with torch.optim -----------------------

# Every lever, one config each: the optimizers with and without momentum, Nesterov and weight
# decay, every schedule with and without warm-up, every imbalance method, label smoothing,
# dropout at several rates; crop, flip, jitter and the weighted sampler's batch order.
REFERENCE_CASES = ([dict(member, dropout=0.0, crop=2, flip=True) for member in LEVERS]
                   + [dict(member, dropout=rate) for member, rate in zip(MIXED, (0.1, 0.5, 0.0, 0.3))]
                   + [dict(MIXED[0], dropout=0.0, imbalance="weighted_sampler", jitter=0.2)])


@pytest.mark.parametrize("member", REFERENCE_CASES, ids=lambda m: f"{m['optimizer']}-{m['seed']}-{m['dropout']}")
def test_a_group_of_one_trains_what_a_plain_seed_cnn_with_torch_optim_trains(cpu_data, member):
    config = configs_of([member])[0]
    tolerances = (DROPOUT_LOSS_TOLERANCE, DROPOUT_WEIGHT_TOLERANCE) if config.dropout else ()
    assert_same_run(train(config, cpu_data), reference_run(config, cpu_data, config.seed), *tolerances)


# --- a group of K == its configs trained one at a time, member by member ---------

def test_fused_group_matches_separate_runs_member_by_member(cpu_data):
    configs = configs_of(MIXED, dropout=0.0)
    results = train_group(configs, cpu_data)
    for result, separate in zip(results, separate_runs(configs, cpu_data)):
        assert result.config == separate.config
        assert_same_run(result, separate)


def test_every_lever_matches_separate_runs_member_by_member_with_crop_and_flip(cpu_data):
    configs = configs_of(LEVERS, dropout=0.0, crop=2, flip=True)
    results = train_group(configs, cpu_data)
    for result, separate in zip(results, separate_runs(configs, cpu_data)):
        assert result.config == separate.config
        assert_same_run(result, separate)
    # The levers are not no-ops: the members' first-epoch losses all differ.
    first = [round(r.history[0].train_loss, 4) for r in results]
    assert len(set(first)) == len(first), first


def test_bf16_autocast_trains_the_same_group_close_to_fp32_but_not_bitwise(cpu_data):
    configs = configs_of(MIXED, dropout=0.0)
    fp32 = train_group(configs, cpu_data)
    bf16 = list(train_group_epochs(configs, cpu_data, options=LoopOptions(precision="bf16")))[-1]
    for a, b in zip(fp32, bf16):
        assert b.error is None and b.model is not None
        first_a, first_b = a.history[0].train_loss, b.history[0].train_loss
        assert first_b != first_a  # the autocast really ran in bfloat16 ...
        assert first_b == pytest.approx(first_a, rel=0.05)  # ... and trained the same model
        assert next(b.model.parameters()).dtype == torch.float32  # fp32 master weights


def test_a_precision_the_step_does_not_know_is_refused(cpu_data):
    configs = configs_of(MIXED, dropout=0.0)
    with pytest.raises(ValueError, match="precision"):
        next(train_group_epochs(configs, cpu_data, options=LoopOptions(precision="fp8")))


def test_members_with_other_epochs_follow_their_own_schedules(cpu_data):
    # A schedule spans the member's own epochs: the 2-epoch one-cycle member decays twice as fast.
    members = [{**LEVERS[0], "epochs": 3}, {**LEVERS[0], "epochs": 2, "seed": 31}, {**LEVERS[1], "epochs": 1}]
    configs = [TrainConfig(**{**SHARED, **member, "dropout": 0.0}) for member in members]
    for result, separate in zip(train_group(configs, cpu_data), separate_runs(configs, cpu_data)):
        assert_same_run(result, separate)


def test_dropout_masks_are_the_unfused_runs_own_on_cpu(cpu_data):
    # Each member draws its masks from its own seed's stream, exactly as the
    # unfused run's nn.Dropout does: same losses even with different rates.
    members = [{**m, "dropout": rate} for m, rate in zip(MIXED, (0.1, 0.5, 0.0, 0.3))]
    configs = configs_of(members)
    for result, separate in zip(train_group(configs, cpu_data), separate_runs(configs, cpu_data)):
        assert_same_run(result, separate, DROPOUT_LOSS_TOLERANCE, DROPOUT_WEIGHT_TOLERANCE)


def test_weighted_sampler_flip_and_jitter_follow_the_first_members_seed(cpu_data):
    configs = configs_of(MIXED[:3], epochs=2, imbalance="weighted_sampler", flip=True, jitter=0.2, dropout=0.0)
    for result, separate in zip(train_group(configs, cpu_data), separate_runs(configs, cpu_data)):
        assert_same_run(result, separate)


def test_fused_training_runs_on_the_test_device(small_splits, device, monkeypatch):
    # On CUDA, with TF32 off so that both paths compute in float32, grouped and
    # batched kernels still round differently from the unfused ones: the same
    # run, looser tolerance. On the CPU this is the equivalence test again, K=2.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    data = DeviceData(small_splits, device)
    configs = configs_of(MIXED[:2], epochs=2, dropout=0.0)
    tolerance = LOSS_TOLERANCE
    try:
        pairs = list(zip(train_group(configs, data), separate_runs(configs, data)))
    finally:
        torch.set_float32_matmul_precision(precision)
    for result, separate in pairs:
        assert result.device == str(device)
        assert_same_run(result, separate, loss_tolerance=tolerance, weight_tolerance=5 * tolerance)


def test_cuda_graphs_train_what_the_eager_step_trains(small_splits, device):
    """LoopOptions.cuda_graphs: on CUDA the step is captured after its warm-up, re-captured when a member
    leaves (one member stops after epoch 2), and the short last batch of every epoch (500 = 15 x 32 + 20)
    runs eagerly; it must train what the eager step trains. On the CPU it is the fallback: the same eager step."""
    data = DeviceData(small_splits, device)
    configs = [TrainConfig(**{**SHARED, **member, "dropout": 0.1, "epochs": 2 if i == 0 else 3})
               for i, member in enumerate(LEVERS[:3])]

    def last(options):
        for results in train_group_epochs(configs, data, options=options):
            pass
        return results

    eager, graphed = last(LoopOptions()), last(LoopOptions(cuda_graphs=True))
    for a, b in zip(eager, graphed):
        assert [s.epoch for s in a.history] == [s.epoch for s in b.history]
        if device.type == "cpu":
            assert [s.train_loss for s in a.history] == [s.train_loss for s in b.history]
            for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
                assert torch.equal(x, y)
        else:  # the same kernels in another order of launch: rounding, and dropout draws that may differ
            assert abs(a.history[-1].dev_macro_accuracy - b.history[-1].dev_macro_accuracy) < 0.1
            assert a.history[-1].train_loss == pytest.approx(b.history[-1].train_loss, rel=0.1)


def test_only_a_cuda_device_captures_graphs():
    dropout = MemberDropout([0.1], [torch.get_rng_state()], 0, CPU)
    assert not passes.can_capture(CPU, dropout)
    assert not passes.can_capture(CPU, MemberDropout([0.0], [torch.get_rng_state()], 0, CPU))


# --- results look exactly like train's ------------------------------------------

def test_each_result_is_a_train_result_with_a_real_seed_cnn_holding_its_weights(cpu_data):
    configs = configs_of(MIXED[:2], epochs=2)
    results = train_group(configs, cpu_data)
    for config, result in zip(configs, results):
        assert isinstance(result, MemberResult) and result.error is None and not result.failed
        assert result.config is config and not result.stopped_early and result.seconds > 0
        assert isinstance(result.model, SeedCNN) and result.model.training
        assert result.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert [h.epoch for h in result.history] == [1, 2]
        assert all(isinstance(h, EpochStats) and h.dev.classes == cpu_data.classes for h in result.history)
        # The model is the member's own: evaluating it reproduces its last dev evaluation.
        again = evaluate(result.model, cpu_data.dev, cpu_data.classes,
                         make_criterion(config, cpu_data.train.y, cpu_data.n_classes))
        assert np.abs(again.confusion - result.dev.confusion).sum() // 2 <= MAX_DEV_IMAGES_MOVED
        assert again.loss == pytest.approx(result.dev.loss, abs=LOSS_TOLERANCE)
    assert results[0].dev.loss != results[1].dev.loss


# --- stopping and divergence are per member -------------------------------------------

def test_a_stopped_member_leaves_the_stacked_network_and_the_others_go_on(cpu_data, pass_widths):
    configs = configs_of(MIXED[:3], dropout=0.0)
    calls = []

    def on_epoch(member, stats):
        calls.append((member, stats.epoch))
        return member == 1 and stats.epoch == 1  # prune member 1 after its first epoch

    results = train_group(configs, cpu_data, on_epoch)
    assert calls == [(0, 1), (1, 1), (2, 1), (0, 2), (2, 2), (0, 3), (2, 3)]
    assert results[1].stopped_early and len(results[1].history) == 1 and results[1].model is not None
    assert not results[0].stopped_early and len(results[0].history) == 3
    # Epoch 1 trains and evaluates 3 members, epochs 2 and 3 only 2: the pruned one costs nothing more.
    steps = math.ceil(len(cpu_data.train) / SHARED["batch_size"])
    assert pass_widths == [3] * (steps + 1) + [2] * (steps + 1) * 2
    separate = separate_runs(configs, cpu_data)
    for i in (0, 2):
        assert_same_run(results[i], separate[i])
    assert results[1].history[0].train_loss == pytest.approx(separate[1].history[0].train_loss, abs=LOSS_TOLERANCE)


def test_a_member_with_fewer_epochs_finishes_first_as_its_unfused_run_would(cpu_data, pass_widths):
    configs = [TrainConfig(**{**SHARED, **member, "dropout": 0.0, "epochs": epochs})
               for member, epochs in zip(MIXED[:3], (3, 1, 2))]
    results = train_group(configs, cpu_data)
    assert [len(r.history) for r in results] == [3, 1, 2]
    assert not any(r.stopped_early for r in results) and all(r.model is not None for r in results)
    steps = math.ceil(len(cpu_data.train) / SHARED["batch_size"])
    assert pass_widths == [3] * (steps + 1) + [2] * (steps + 1) + [1] * (steps + 1)
    for result, separate in zip(results, separate_runs(configs, cpu_data)):
        assert_same_run(result, separate)


def test_members_split_over_several_passes_share_batches_and_still_match_separate_runs(cpu_data, pass_widths):
    configs = configs_of(MIXED, epochs=2, dropout=0.0)
    results = train_group(configs, cpu_data, lambda member, stats: member == 1, members_per_pass=2)
    # Passes {0, 1} and {2, 3} take every batch in turn; after epoch 1 the first pass has member 0 alone.
    steps = math.ceil(len(cpu_data.train) / SHARED["batch_size"])
    assert pass_widths == [2, 2] * (steps + 1) + [1, 2] * (steps + 1)
    assert len(results[1].history) == 1 and results[1].stopped_early
    separate = separate_runs(configs, cpu_data)
    for i in (0, 2, 3):
        assert_same_run(results[i], separate[i])


def _last_results(configs, data, **kwargs):
    for results in train_group_epochs(configs, data, **kwargs):
        pass
    return results


def test_passes_stepped_at_the_same_time_train_what_they_train_one_after_the_other(cpu_data):
    # pass_threads=2 splits 4 members into passes {0, 1} and {2, 3}, each stepped in its own thread
    # with one intra-op thread; the same two passes stepped in turn by the caller (1 thread, as the
    # tests run) must give the same bits. Member 2 stops after epoch 1 (its pass goes on concurrently),
    # members 0 and 1 after epoch 2 (pass {2, 3} is then alone and steps in the caller's thread).
    configs = configs_of(MIXED, epochs=3, dropout=0.1)
    stops = {(2, 1), (0, 2), (1, 2)}

    def on_epoch(member, stats):
        return (member, stats.epoch) in stops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the passes in turn: the caller's kernels on one thread, as a pass thread's
    try:
        together = _last_results(configs, cpu_data, on_epoch=on_epoch, options=LoopOptions(pass_threads=2))
        assert torch.get_num_threads() == 1  # the pass threads' own count is theirs
        in_turn = _last_results(configs, cpu_data, on_epoch=on_epoch, members_per_pass=2,
                                options=LoopOptions(pass_threads=1))
    finally:
        torch.set_num_threads(threads)
    assert [len(r.history) for r in together] == [2, 2, 1, 3]
    for a, b in zip(together, in_turn):
        assert [s.train_loss for s in a.history] == [s.train_loss for s in b.history]
        assert [s.dev_loss for s in a.history] == [s.dev_loss for s in b.history]
        for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
            assert torch.equal(x, y)


def test_uneven_concurrent_passes_are_re_split_and_their_members_train_on_as_alone(cpu_data, monkeypatch):
    # 6 members in passes {0, 1, 2} and {3, 4, 5}; members 0 and 1 stop after epoch 1, leaving 1 + 3:
    # the step re-splits them 2 + 2, moving a member's weights, optimizer state, lr schedule,
    # dropout stream and loss terms. Mixed optimizers, epochs (lr tables of other widths), logit
    # adjustment and smoothing on some members only: each survivor still trains as its unfused run.
    members = [{**MIXED[0], "epochs": 3}, {**MIXED[1], "epochs": 3},
               {**MIXED[2], "epochs": 2, "imbalance": "logit_adjusted", "tau": 1.0},
               {**MIXED[3], "epochs": 3, "label_smoothing": 0.1},
               {**MIXED[0], "seed": 21, "optimizer": "adamw", "weight_decay": 0.05, "epochs": 3},
               {**MIXED[1], "seed": 22, "nesterov": True, "epochs": 3}]
    configs = configs_of(members, dropout=0.1)
    sizes = []
    keep = step_module.StackedStep.keep

    def recording_keep(self, members):
        keep(self, members)
        sizes.append(sorted(len(pass_.members) for pass_ in self.passes))

    monkeypatch.setattr(step_module.StackedStep, "keep", recording_keep)
    results = _last_results(configs, cpu_data, on_epoch=lambda member, stats: member in (0, 1),
                            options=LoopOptions(pass_threads=2))
    assert sizes[0] == [2, 2]  # 1 + 3 re-split
    assert sizes[1] == [1, 2]  # member 2 reached its epochs: 1 + 2 differ by one, left as they are
    assert [len(r.history) for r in results] == [1, 1, 2, 3, 3, 3]
    for result, separate in zip(results[2:], separate_runs(configs, cpu_data)[2:]):
        assert_same_run(result, separate, DROPOUT_LOSS_TOLERANCE, DROPOUT_WEIGHT_TOLERANCE)


def test_an_error_in_a_pass_thread_reaches_the_caller_and_the_threads_go(cpu_data, monkeypatch):
    configs = configs_of(MIXED[:2], epochs=2)
    step = passes.Pass.step
    calls = []

    def failing_step(self, x, y):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("a kernel failed")
        return step(self, x, y)

    monkeypatch.setattr(passes.Pass, "step", failing_step)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="a kernel failed"):
        _last_results(configs, cpu_data, options=LoopOptions(pass_threads=2))
    assert set(calls) == {"fused-pass"}  # the passes did step in their own threads
    for _ in range(100):  # the pass threads end once they see the loop closed them
        if threading.active_count() <= before:
            break
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_pass_threads_must_be_positive(cpu_data):
    with pytest.raises(ValueError, match="pass_threads must be at least 1"):
        step_module.StackedStep(configs_of(MIXED[:2]), cpu_data, 4, pass_threads=0)


def test_a_diverging_member_is_reported_alone_and_the_others_are_untouched(cpu_data):
    blow_up = dict(optimizer="sgd", lr=1e6, momentum=0.9, weight_decay=0.0, seed=5)
    configs = configs_of([MIXED[0], blow_up, MIXED[2]], epochs=2, dropout=0.0)
    with pytest.raises(DivergedError):  # what the unfused loop does with it
        train(configs[1], cpu_data, order_seed=configs[0].seed)
    called = []
    results = train_group(configs, cpu_data, lambda member, stats: called.append(member))
    failed = results[1]
    assert isinstance(failed.error, DivergedError) and failed.error.epoch == 1 and failed.failed
    assert failed.model is None and failed.history == [] and 1 not in called
    separate = separate_runs([configs[0], configs[2]], cpu_data)
    for result, reference in zip((results[0], results[2]), separate):
        assert result.error is None
        assert_same_run(result, reference)


# --- groups ----------------------------------------------------------------------------------------

def test_every_train_config_field_is_declared_shared_or_per_member():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names == set(SHARED_FIELDS) | set(PER_MEMBER_FIELDS)
    assert not set(SHARED_FIELDS) & set(PER_MEMBER_FIELDS)


def test_a_config_with_an_undeclared_field_is_refused_by_grouping():
    @dataclasses.dataclass
    class WithNewLever(TrainConfig):
        mixup: float = 0.0

    with pytest.raises(TypeError, match="mixup"):
        check_group([WithNewLever(), WithNewLever(seed=1)])
    with pytest.raises(TypeError, match="mixup"):
        group_configs([WithNewLever()])


def test_members_must_agree_on_crop_and_on_the_weighted_sampler():
    with pytest.raises(ValueError, match="crop=4"):
        check_group([TrainConfig(crop=2), TrainConfig(crop=4)])
    with pytest.raises(ValueError, match="weighted sampler"):
        check_group([TrainConfig(imbalance="none"), TrainConfig(imbalance="weighted_sampler")])
    check_group([TrainConfig(imbalance="none"), TrainConfig(imbalance="logit_adjusted", optimizer="adamw")])


def test_members_that_cannot_share_a_batch_are_refused_with_the_setting_named():
    configs = [TrainConfig(batch_size=32, seed=0), TrainConfig(batch_size=64, seed=1)]
    with pytest.raises(ValueError, match="batch_size=64"):
        check_group(configs)
    with pytest.raises(ValueError, match="flip"):
        train_group([TrainConfig(), TrainConfig(flip=True)], data=None)
    with pytest.raises(ValueError, match="at least one"):
        check_group([])


def test_group_configs_splits_by_shared_settings_and_caps_the_size():
    configs = [TrainConfig(batch_size=32, lr=0.1), TrainConfig(batch_size=64), TrainConfig(batch_size=32, lr=0.2),
               TrainConfig(batch_size=32, optimizer="sgd", dropout=0.5, epochs=3),
               TrainConfig(batch_size=32, imbalance="weighted_sampler"), TrainConfig(batch_size=64, epochs=7, seed=4),
               TrainConfig(batch_size=32, imbalance="logit_adjusted", schedule="cosine", label_smoothing=0.1)]
    # Losses are per member: only a weighted sampler (another batch order) needs its own group.
    assert group_configs(configs) == [[0, 2, 3, 6], [1, 5], [4]]
    assert group_configs(configs, max_size=2) == [[0, 2], [3, 6], [1, 5], [4]]
    assert group_key(configs[0]) == group_key(configs[3]) != group_key(configs[1])


# --- the pieces: optimizer math, loss, dropout ---------------------------------------------------

def _step_both(ours, stacked, references, optimizers, schedulers=()) -> None:
    """One step of the stacked optimizer and of each row's torch.optim reference, on the same random gradients."""
    grads = torch.randn(stacked.shape)
    ours.step(stacked, grads)
    for p, optimizer, g in zip(references, optimizers, grads):
        p.grad = g.clone()
        optimizer.step()
    for scheduler in schedulers:
        scheduler.step()


@pytest.mark.parametrize("kernels", ["rows", "block"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_stacked_optimizer_matches_torch_optim_row_by_row(kind, kernels):
    torch.manual_seed(0)
    rows = [dict(lr=0.1, momentum=0.9, weight_decay=0.01), dict(lr=0.003, momentum=0.0, weight_decay=0.0),
            dict(lr=0.5, momentum=0.5, weight_decay=0.1)]
    configs = [TrainConfig(optimizer=kind, **row) for row in rows]
    start = torch.randn(len(rows), 50)
    stacked = start.clone()
    references = [nn.Parameter(start[i].clone()) for i in range(len(rows))]
    optimizers = [torch.optim.SGD([p], lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, foreach=True)
                  if kind == "sgd" else torch.optim.Adam([p], lr=c.lr, weight_decay=c.weight_decay, foreach=True)
                  for p, c in zip(references, configs)]
    ours = StackedOptimizer(configs, 50, CPU, kernels=kernels)
    for _ in range(20):
        _step_both(ours, stacked, references, optimizers)
    expected = torch.stack([p.detach() for p in references])
    assert torch.allclose(stacked, expected, atol=1e-6, rtol=1e-6), (stacked - expected).abs().max()


@pytest.mark.parametrize("kernels", ["rows", "block"])
def test_stacked_optimizer_rows_that_stay_keep_their_state_when_others_leave(kernels):
    torch.manual_seed(0)
    configs = [TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
               TrainConfig(optimizer="sgd", lr=0.05, momentum=0.5), TrainConfig(optimizer="adam", lr=0.01),
               TrainConfig(optimizer="adamw", lr=0.003, weight_decay=0.1)]
    start = torch.randn(len(configs), 40)
    stacked = start.clone()
    references = [nn.Parameter(start[i].clone()) for i in range(len(configs))]
    optimizers = [reference_optimizer([p], c) for p, c in zip(references, configs)]
    ours = StackedOptimizer(configs, 40, CPU, kernels=kernels)
    kept = [0, 3]
    for step in range(12):
        if step == 6:  # members 1 and 2 stop
            ours.select(kept)
            stacked, references, optimizers = stacked[kept].clone(), [references[i] for i in kept], \
                [optimizers[i] for i in kept]
        _step_both(ours, stacked, references, optimizers)
    expected = torch.stack([p.detach() for p in references])
    assert torch.allclose(stacked, expected, atol=1e-6, rtol=1e-5), (stacked - expected).abs().max()


def test_the_stacked_optimizer_refuses_kernels_it_does_not_have():
    with pytest.raises(ValueError, match="kernels must be 'rows' or 'block'"):
        StackedOptimizer([TrainConfig()], 4, CPU, kernels="magic")


@pytest.mark.parametrize("member", [dict(optimizer="adamw", weight_decay=0.05, schedule="one_cycle", warmup=0.25),
                                    dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3,
                                         schedule="cosine"),
                                    dict(optimizer="adam", weight_decay=1e-2, schedule="cosine", warmup=0.5)])
@pytest.mark.parametrize("kernels", ["rows", "block"])
def test_stacked_optimizer_follows_torch_optim_and_lambda_lr_row_by_row(member, kernels):
    torch.manual_seed(0)
    configs = [TrainConfig(**{**member, "lr": lr, "epochs": 1}) for lr in (0.1, 0.003, 0.02)]
    configs.sort(key=lambda c: c.optimizer != "sgd")
    steps = 20
    start = torch.randn(len(configs), 50)
    stacked = start.clone()
    references = [nn.Parameter(start[i].clone()) for i in range(len(configs))]
    optimizers, schedulers = [], []
    for p, c in zip(references, configs):
        optimizer = reference_optimizer([p], c)
        factors = lr_factors(c, steps).tolist()
        optimizers.append(optimizer)
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, f=factors: f[min(s, steps - 1)]))
    ours = StackedOptimizer(configs, 50, CPU, steps_per_epoch=steps, kernels=kernels)
    for _ in range(steps):
        _step_both(ours, stacked, references, optimizers, schedulers)
    expected = torch.stack([p.detach() for p in references])
    assert torch.allclose(stacked, expected, atol=1e-6, rtol=1e-5), (stacked - expected).abs().max()
    assert not torch.allclose(stacked, start, atol=1e-3)


def test_member_losses_with_logit_offsets_and_smoothing_are_each_members_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(3, 40, 3), torch.randint(0, 3, (40,))
    labels = torch.tensor([0] * 8 + [1] * 2 + [2])
    configs = [TrainConfig(imbalance="weighted_loss", label_smoothing=0.1),
               TrainConfig(imbalance="logit_adjusted", tau=1.0),
               TrainConfig(imbalance="logit_adjusted", tau=0.5, label_smoothing=0.2)]
    expected = torch.stack([make_criterion(c, labels, 3)(member, y) for member, c in zip(logits, configs)])
    assert torch.allclose(MemberLoss(configs, labels, 3)(logits, y), expected, atol=1e-6)


def test_member_losses_are_each_members_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(3, 40, 3), torch.randint(0, 3, (40,))
    weights = torch.stack([class_weights(torch.tensor([0, 0, 0, 1, 2]), 3), torch.ones(3), torch.tensor([1., 2., 9.])])
    expected = torch.stack([nn.CrossEntropyLoss(weight=w)(member, y) for member, w in zip(logits, weights)])
    assert torch.allclose(member_losses(logits, y, weights), expected, atol=1e-6)


def _unfused_masks(rate, state, steps):
    """What the unfused run's two dropout layers draw, step by step: F.dropout's bernoulli_ then div_."""
    generator = torch.Generator()
    generator.set_state(state)
    out = []
    for batch in steps:
        out.append([torch.empty(batch, width).bernoulli_(1 - rate, generator=generator).div_(1 - rate)
                    if rate > 0 else torch.ones(batch, width) for width in (120, 84)])
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_exact_masks_drawn_ahead_are_the_unfused_runs_step_by_step(threads):
    # Drawn a few steps ahead (ahead=5000 draws: refills mid-stream, leftovers carried over),
    # the members' generators in parallel threads or not, across a short last batch and a
    # member leaving: every mask is the one the member's unfused run draws at that step.
    rates, seeds = [0.1, 0.0, 0.5, 0.3], [11, 12, 13, 14]
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    steps = [32, 32, 7, 32, 32, 32, 16]
    expected = [_unfused_masks(rate, state, steps) for rate, state in zip(rates, states)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dropout = MemberDropout(rates, states, group_seed=0, device=CPU, ahead=5000)
        rows = list(range(len(rates)))
        for step, batch in enumerate(steps):
            if step == 4:  # member 1 leaves
                dropout.select([0, 2, 3])
                rows = [0, 2, 3]
            masks = dropout.masks(batch, [120, 84])
            for layer, mask in enumerate(masks):
                assert mask.shape == (len(rows), batch, (120, 84)[layer])
                for row, member in enumerate(rows):
                    assert torch.equal(mask[row], expected[member][step][layer]), (step, layer, member)
    finally:
        torch.set_num_threads(previous)


def test_the_fused_forward_adds_each_conv_bias_after_its_pool_with_the_same_values():
    # max(a + b, c + b) == max(a, c) + b in floats: the stacked network's logits are each
    # member's SeedCNN's (eval mode), to float32 rounding.
    torch.manual_seed(0)
    models = [SeedCNN(3, 0.0, 32) for _ in range(3)]
    for model in models:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.uniform_(-0.5, 0.5)  # biases large enough to matter
    net = stacked_model.StackedSeedCNN.from_models(models, CPU)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        stacked = net(x)
        for row, model in enumerate(models):
            assert torch.allclose(stacked[row], model.eval()(x), atol=1e-5, rtol=1e-5), row


def test_fused_evaluation_does_not_depend_on_its_chunk_size(cpu_data, monkeypatch):
    configs = configs_of(MIXED[:3], epochs=1)
    step = step_module.StackedStep(configs, cpu_data, 4)
    whole = step.evaluate(cpu_data.dev, cpu_data.classes)
    monkeypatch.setitem(stacked_model.EVAL_ACTIVATION_FLOATS, "cpu", 7 * 3 * 6 * 28 * 28)  # chunks of 7 images
    chunked = step.evaluate(cpu_data.dev, cpu_data.classes)
    for member in whole:
        assert np.array_equal(whole[member].confusion, chunked[member].confusion)
        assert whole[member].loss == pytest.approx(chunked[member].loss, rel=1e-5)


def test_batched_dropout_masks_keep_each_members_rate_independently():
    # The CUDA path (one draw for the group), checked on the CPU: 120 x 4096
    # draws per member put the kept share within 0.005 of 1 - p (> 10 sigma).
    rates = [0.0, 0.1, 0.5, 0.5]
    dropout = MemberDropout(rates, [], group_seed=3, device=CPU, exact=False)
    mask, = dropout.masks(4096, [120])
    assert mask.shape == (4, 4096, 120)
    assert torch.equal(mask[0], torch.ones_like(mask[0]))
    for row, p in enumerate(rates):
        kept = mask[row] > 0
        assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)
        assert torch.allclose(mask[row][kept], torch.full_like(mask[row][kept], 1 / (1 - p)))
    assert not torch.equal(mask[2], mask[3])  # same rate, independent masks
    agreement = ((mask[2] > 0) == (mask[3] > 0)).float().mean().item()
    assert agreement == pytest.approx(0.5, abs=0.005)


# --- the benchmark section ----------------------------------------------------------------------------

def test_bench_reports_trial_epochs_per_second_and_memory_per_member(small_splits, cpu_data):
    from study.bench.fused import format_summary, format_table, measure_fused, summary

    rows = measure_fused(cpu_data, ks=(1, 2), epochs=1, warmup=0, splits=small_splits, progress=None)
    assert [row["k"] for row in rows] == [1, 2]
    for row in rows:
        for clock in ("wall", "cpu"):
            fused = row["fused"][clock]
            rate = row["k"] / fused["seconds_per_epoch"]
            assert fused["trial_epochs_per_second"] == pytest.approx(rate) and len(fused["epoch_seconds"]) == 1
            assert row[f"speedup_vs_unfused_{clock}"] == pytest.approx(rate * row["unfused"][clock]["seconds_per_epoch"])
            assert row[f"speedup_vs_naive_{clock}"] == pytest.approx(rate * row["naive"][clock]["seconds_per_epoch"])
        # SeedCNN has 61,411 parameters (3 classes): parameters + gradients + 1 (SGD) or 2 (Adam) state tensors.
        assert 61_411 * 4 * 3 <= row["memory_per_member"]["state_bytes"] <= 61_411 * 4 * 4
    assert "vs naive" in format_table(rows)
    assert all(0.0 <= row["mean_last_dev_macro"]["fused"] <= 1.0 for row in rows)
    best = summary(rows)
    fastest = max(rows, key=lambda row: row["fused"]["wall"]["trial_epochs_per_second"])
    assert best["k"] == fastest["k"]
    assert best["seconds_for_user_tuning"] == pytest.approx(100 * 100 / fastest["fused"]["wall"]["trial_epochs_per_second"])
    assert f"K={best['k']}" in format_summary(best) and "100 trials x 100 epochs would take" in format_table(rows)


def test_bench_times_bf16_autocast_beside_fp32_when_asked(small_splits, cpu_data):
    from study.bench.fused import format_table, measure_fused

    (row,) = measure_fused(cpu_data, ks=(2,), epochs=1, warmup=0, splits=small_splits, naive=False, progress=None,
                           bf16=True)
    for clock in ("wall", "cpu"):
        ratio = row["fused bf16"][clock]["trial_epochs_per_second"] / row["fused"][clock]["trial_epochs_per_second"]
        assert row[f"bf16_speedup_{clock}"] == pytest.approx(ratio)
    dev = row["mean_last_dev_macro"]
    assert set(dev) == {"fused", "fused bf16"} and all(0.0 <= v <= 1.0 for v in dev.values())
    assert "bf16 autocast, same groups: K=2" in format_table([row])


def test_passes_step_at_the_same_time_by_default_only_where_that_measured_faster(restore_threads):
    torch.set_num_threads(2)
    plain = [TrainConfig(batch_size=32, seed=i) for i in range(16)]
    assert passes.concurrent_passes_pay(plain)
    assert not passes.concurrent_passes_pay(plain[:8])  # 4 a pass: one pass on every thread is faster
    assert not passes.concurrent_passes_pay([dataclasses.replace(c, batch_size=64) for c in plain])
    assert not passes.concurrent_passes_pay([dataclasses.replace(c, crop=4, flip=True) for c in plain])
    torch.set_num_threads(1)
    assert not passes.concurrent_passes_pay(plain)


def test_default_concurrent_passes_merge_into_one_when_too_few_members_are_left(cpu_data, restore_threads):
    torch.set_num_threads(2)
    configs = [TrainConfig(batch_size=32, seed=i, optimizer="sgd" if i % 2 else "adam") for i in range(16)]
    step = step_module.StackedStep(configs, cpu_data, 4)
    try:
        assert [len(pass_.members) for pass_ in step.passes] == [8, 8] and len(step.workers) == 2
        step.keep(set(range(2, 16)))  # 14 left: fewer than 8 a pass, one pass on every thread
        assert [len(pass_.members) for pass_ in step.passes] == [14] and step.members == list(range(2, 16))
        assert not step._concurrent()
    finally:
        step.close()
