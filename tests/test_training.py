"""Training: class weighting works, the same seed gives the same model, divergence is an error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cnnlib.errors import DivergedError
from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.config import TrainConfig
from cnnlib.losses import class_weights
from cnnlib.training import DeviceData, epoch_order, evaluate, train, train_group_epochs

# Quick settings: a few epochs on a few hundred images, enough to see each behaviour.
QUICK = dict(optimizer="adam", lr=3e-3, weight_decay=0.0, batch_size=32, epochs=3)


@pytest.fixture(scope="module")
def imbalanced(real_data, tmp_path_factory):
    """400 car / 60 truck / 40 cat for training (the user's 80/12/8 %), a balanced 100 per class to judge."""
    config = DataConfig(real_data, train_counts=(400, 60, 40), dev_counts=(100, 100, 100), test_counts=(0, 0, 0))
    return prepare_splits(config, tmp_path_factory.mktemp("cache"))


def _minority_accuracy(result) -> float:
    per_class = result.dev.per_class
    return (per_class["truck"] + per_class["cat"]) / 2


def test_weighted_loss_raises_minority_class_accuracy_over_no_weighting(imbalanced, device):
    data = DeviceData(imbalanced, device)
    gains = []
    for seed in (0, 1):
        plain = train(TrainConfig(**QUICK, imbalance="none", seed=seed), data)
        weighted = train(TrainConfig(**QUICK, imbalance="weighted_loss", seed=seed), data)
        gains.append(_minority_accuracy(weighted) - _minority_accuracy(plain))
    # Measured on CPU: unweighted models predict (almost) only "car" (minority accuracy ~0),
    # weighted ones reach ~0.4-0.6 on truck and cat. 0.2 leaves room for other devices' numerics.
    assert np.mean(gains) > 0.2, gains


def test_same_seed_same_device_gives_identical_history_and_weights(imbalanced, device):
    config = TrainConfig(**{**QUICK, "epochs": 2}, imbalance="weighted_sampler", flip=True, jitter=0.2, seed=7)
    data = DeviceData(imbalanced, device)
    first, second = train(config, data), train(config, data)
    assert [(h.train_loss, h.dev_loss) for h in first.history] == [(h.train_loss, h.dev_loss) for h in second.history]
    assert [h.dev.confusion.tolist() for h in first.history] == [h.dev.confusion.tolist() for h in second.history]
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_evaluating_dev_only_at_the_end_trains_the_same_model(imbalanced, device):
    configs = [TrainConfig(**{**QUICK, "epochs": 3}, tta="flip", seed=3), TrainConfig(**{**QUICK, "epochs": 2}, seed=3)]
    data = DeviceData(imbalanced, device)
    every = list(train_group_epochs(configs, data))[-1]
    last = list(train_group_epochs(configs, data, dev_epochs=1))[-1]
    for full, lean in zip(every, last):
        assert [h.dev is None for h in lean.history] == [True] * (len(lean.history) - 1) + [False]
        assert math.isnan(lean.history[0].dev_macro_accuracy) and math.isnan(lean.history[0].dev_loss)
        assert lean.dev.confusion.tolist() == full.dev.confusion.tolist()
        assert lean.history[-1].dev_loss == pytest.approx(full.history[-1].dev_loss)
        assert [h.train_loss for h in lean.history] == [h.train_loss for h in full.history]


def test_test_time_views_come_only_in_the_last_epochs_and_a_plain_curve_runs_through_all(imbalanced, device):
    configs = [TrainConfig(**{**QUICK, "epochs": 4}, tta="flip", seed=3), TrainConfig(**{**QUICK, "epochs": 4}, seed=3)]
    data = DeviceData(imbalanced, device)
    every = list(train_group_epochs(configs, data))[-1]
    windowed = list(train_group_epochs(configs, data, tta_epochs=2))[-1]
    viewed, plain = windowed
    assert [h.dev is None for h in viewed.history] == [True, True, False, False]
    assert all(h.plain_dev is not None for h in viewed.history)
    assert [h.dev is None or h.plain_dev is not None for h in plain.history] == [False] * 4, "no views: dev only"
    for full, lean in zip(every, windowed):
        assert lean.dev.confusion.tolist() == full.dev.confusion.tolist()  # the same model, the same views at the end
    flipped_end = viewed.history[-1]
    assert flipped_end.plain_dev.confusion.tolist() == evaluate(viewed.model, data.dev, data.classes).confusion.tolist()
    assert flipped_end.curve_dev is flipped_end.plain_dev and flipped_end.dev is not flipped_end.plain_dev


def test_a_different_seed_gives_a_different_model(imbalanced, device):
    data = DeviceData(imbalanced, device)
    a = train(TrainConfig(**{**QUICK, "epochs": 1}, seed=0), data)
    b = train(TrainConfig(**{**QUICK, "epochs": 1}, seed=1), data)
    assert not torch.equal(a.model.classifier[-1].weight, b.model.classifier[-1].weight)


def test_huge_learning_rate_raises_diverged_instead_of_returning_a_model(imbalanced, device):
    with pytest.raises(DivergedError, match="diverged: training loss became (nan|inf) in epoch 1") as caught:
        train(TrainConfig(optimizer="sgd", lr=1e6, momentum=0.9, batch_size=64, epochs=3), imbalanced, device)
    assert caught.value.epoch == 1 and not math.isfinite(caught.value.loss)


def test_on_epoch_sees_every_epoch_and_can_stop_training(imbalanced, device):
    seen = []

    def on_epoch(stats):
        seen.append((stats.epoch, stats.dev_macro_accuracy, set(stats.dev.per_class)))
        return stats.epoch == 2  # a pruner saying stop

    result = train(TrainConfig(**{**QUICK, "epochs": 5}), imbalanced, device, on_epoch=on_epoch)
    assert [epoch for epoch, _, _ in seen] == [1, 2]
    assert result.stopped_early and len(result.history) == 2
    assert all(0 <= macro <= 1 and classes == {"car", "truck", "cat"} for _, macro, classes in seen)


def test_on_batch_sees_every_train_image_once_an_epoch_with_the_logits_of_its_training_forward(imbalanced, device):
    seen = {}

    def on_batch(epoch, index, logits):
        assert logits.shape == (len(index), 3) and not logits.requires_grad and torch.isfinite(logits).all()
        seen.setdefault(epoch, []).append(index.cpu())

    train(TrainConfig(**{**QUICK, "epochs": 2}), imbalanced, device, on_batch=on_batch)

    assert sorted(seen) == [1, 2]
    for indices in seen.values():
        assert torch.cat(indices).sort().values.tolist() == list(range(len(imbalanced.train)))


def test_on_batch_is_refused_for_a_fused_group_rather_than_ignored(imbalanced, device):
    configs = [TrainConfig(**{**QUICK, "epochs": 1, "seed": s}) for s in (0, 1)]
    with pytest.raises(ValueError, match="on_batch records one model's training predictions"):
        next(train_group_epochs(configs, imbalanced, on_batch=lambda *_: None))


def test_a_model_that_does_not_stack_trains_alone_through_the_same_step(imbalanced, device):
    # small_vgg (batch norm, its own dropout) is a stack of one: the returned model carries its
    # weights and batch-norm statistics, and the same seed gives the same run.
    from cnnlib.model import SmallVGG

    config = TrainConfig(**{**QUICK, "epochs": 2}, model="small_vgg", dropout=0.2, seed=3)
    data = DeviceData(imbalanced, device)
    first, second = train(config, data), train(config, data)
    assert isinstance(first.model, SmallVGG) and first.history[0].train_loss != first.history[1].train_loss
    assert [h.train_loss for h in first.history] == [h.train_loss for h in second.history]
    again = evaluate(first.model, data.dev, imbalanced.classes)
    assert again.confusion.tolist() == first.dev.confusion.tolist()
    with pytest.raises(ValueError, match="only the seed CNN trains as a stacked group"):
        next(train_group_epochs([config, TrainConfig(**{**QUICK, "epochs": 2}, model="small_vgg", seed=4)], data))


def test_history_reports_finite_losses_and_the_dev_evaluation(imbalanced, device):
    result = train(TrainConfig(**{**QUICK, "epochs": 2}), imbalanced, device)
    last = result.history[-1]
    assert math.isfinite(last.train_loss) and math.isfinite(last.dev_loss) and last.seconds > 0
    assert last.dev.confusion.sum() == 300
    again = evaluate(result.model, DeviceData(imbalanced, device).dev, imbalanced.classes)
    assert again.confusion.tolist() == last.dev.confusion.tolist()  # evaluation is deterministic (dropout off)


def test_class_weights_are_inverse_frequency():
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([4000, 600, 400]))
    expected = [5000 / (3 * 4000), 5000 / (3 * 600), 5000 / (3 * 400)]
    assert class_weights(labels, 3).tolist() == pytest.approx(expected)


def test_weighted_sampler_draws_classes_about_equally():
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([4000, 600, 400]))
    order = epoch_order(len(labels), labels, 3, "weighted_sampler", torch.Generator().manual_seed(0))
    shares = torch.bincount(labels[order], minlength=3).float() / len(order)
    assert shares.tolist() == pytest.approx([1 / 3] * 3, abs=0.03)


def test_plain_epoch_order_is_a_permutation():
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 3, 2]))
    order = epoch_order(10, labels, 3, "none", torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(10))


def test_device_data_holds_images_in_unit_range_on_the_device(imbalanced, device):
    data = DeviceData(imbalanced, device)
    assert data.train.x.device.type == device.type and data.train.x.shape == (500, 3, 32, 32)
    assert 0.0 <= float(data.train.x.min()) and float(data.train.x.max()) <= 1.0
    assert torch.bincount(data.train.y).tolist() == [400, 60, 40]


@pytest.mark.parametrize("bad", [{"optimizer": "rmsprop"}, {"imbalance": "oversample"}, {"lr": 0}, {"epochs": 0}])
def test_train_config_rejects_bad_values_by_name(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        TrainConfig(**bad)


def test_train_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown training setting.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})


# --- the levers' building blocks ------------------------------------------------------

def test_random_crop_is_a_reflect_padded_window_of_each_image():
    import torch.nn.functional as F
    from cnnlib.augment import random_crop

    x = torch.rand(6, 8, 8, 3).permute(0, 3, 1, 2)  # channels-last, as DeviceSplit holds it
    out = random_crop(x, 2, torch.Generator().manual_seed(3))
    shifts = torch.randint(-2, 3, (2, 6, 1), generator=torch.Generator().manual_seed(3))
    padded = F.pad(x.contiguous(), (2, 2, 2, 2), mode="reflect")
    for i in range(6):
        dy, dx = shifts[0, i, 0].item() + 2, shifts[1, i, 0].item() + 2
        assert torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(out, x)


def test_schedules_warm_up_then_follow_their_shape_over_the_members_own_steps():
    from cnnlib.schedules import lr_factors

    constant = lr_factors(TrainConfig(), 10)
    assert torch.equal(constant, torch.ones(10, dtype=torch.float64))
    cycle = lr_factors(TrainConfig(schedule="one_cycle", warmup=0.2), 10).tolist()
    assert cycle[:2] == [0.5, 1.0] and cycle[2] == 1.0
    assert all(a > b for a, b in zip(cycle[2:], cycle[3:])) and 0 < cycle[-1] <= 0.125 + 1e-12
    cosine = lr_factors(TrainConfig(schedule="cosine"), 100)
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[-1] < 0.001


def test_logit_adjusted_loss_adds_tau_log_prior_and_evaluation_stays_plain():
    from cnnlib.losses import make_criterion

    labels = torch.tensor([0] * 8 + [1] * 2)
    criterion = make_criterion(TrainConfig(imbalance="logit_adjusted", tau=1.0), labels, 2)
    logits, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    prior = torch.tensor([0.8, 0.2])
    assert criterion(logits, y).item() == pytest.approx(nn.functional.cross_entropy(prior.log().expand(4, 2), y).item())
    assert make_criterion(TrainConfig(imbalance="none"), labels, 2).offset is None


def test_new_settings_are_validated_with_their_name():
    for bad in (dict(optimizer="rmsprop"), dict(schedule="step"), dict(warmup=1.0), dict(crop=-1),
                dict(label_smoothing=1.0), dict(tau=-1.0), dict(imbalance="focal"), dict(model="resnet"),
                dict(optimizer="sgd", momentum=0.0, nesterov=True), dict(batch_size=True), dict(epochs=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad)) if "nesterov" not in bad else "nesterov"):
            TrainConfig(**bad)
