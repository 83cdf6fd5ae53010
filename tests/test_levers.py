"""Cutout and test-time augmentation: what each does to a batch, and that every evaluation uses the same views."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnlib.attacks import attack_sweep, fgsm
from cnnlib.augment import augment_batch, random_cutout
from cnnlib.checkpoint import load_checkpoint, save_checkpoint
from cnnlib.losses import MemberLoss
from cnnlib.model import SeedCNN
from cnnlib.passes import evaluate_members
from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.stacked_model import StackedSeedCNN
from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData, evaluate, train, train_group
from cnnlib.tta import TTAModel, VIEW_COUNTS, as_evaluated, log_mean_softmax, view


def _batch(n: int = 8, side: int = 16) -> torch.Tensor:
    return torch.rand(n, side, side, 3, generator=torch.Generator().manual_seed(5)).permute(0, 3, 1, 2)


# --- cutout ---------------------------------------------------------------------------------

def test_cutout_hides_one_square_per_image_at_its_mean_colour_and_keeps_the_layout():
    x = _batch()
    out = random_cutout(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    hidden = (out != x).any(1)  # (n, h, w)
    for i in range(x.shape[0]):
        rows, cols = torch.nonzero(hidden[i], as_tuple=True)
        assert 0 < rows.numel() <= 16
        # One axis-aligned square (cut by the border): every pixel of its bounding box is hidden.
        assert rows.numel() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert torch.allclose(out[i][:, hidden[i]], x[i].mean((1, 2)).view(3, 1).expand(3, rows.numel()))
    assert len({tuple(torch.nonzero(h).flatten().tolist()) for h in hidden}) > 1  # per-image squares


def test_cutout_is_decided_by_the_generator():
    x = _batch()
    a = random_cutout(x, 6, torch.Generator().manual_seed(1))
    b = random_cutout(x, 6, torch.Generator().manual_seed(1))
    c = random_cutout(x, 6, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cutout_0_is_a_no_op_that_draws_nothing():
    x = _batch()
    generator = torch.Generator().manual_seed(3)
    out = augment_batch(x, crop=2, flip=True, jitter=0.0, generator=generator, cutout=0)
    again = torch.Generator().manual_seed(3)
    assert torch.equal(out, augment_batch(x, crop=2, flip=True, jitter=0.0, generator=again))
    assert torch.equal(generator.get_state(), again.get_state())


def test_cutout_is_shared_by_a_fused_group():
    from cnnlib.config import SHARED, group_key

    assert "cutout" in SHARED
    assert group_key(TrainConfig(cutout=8)) != group_key(TrainConfig(cutout=0))
    with pytest.raises(ValueError, match="cutout"):
        TrainConfig(cutout=17)


# --- test-time augmentation -------------------------------------------------------------------

def test_views_are_the_image_its_mirror_and_reflect_padded_shifts():
    x = _batch(2, 8)
    assert torch.equal(view(x, 0), x) and torch.equal(view(x, 1), x.flip(3))
    padded = F.pad(x.contiguous(), (2, 2, 2, 2), mode="reflect")
    assert torch.equal(view(x, 2), padded[:, :, 2:10, 4:12])  # content moved 2 px left (window 2 px right)
    assert torch.equal(view(x, 3), padded[:, :, 2:10, 4:12].flip(3))
    assert torch.equal(view(x, 8), padded[:, :, 0:8, 2:10])
    assert VIEW_COUNTS == {"none": 1, "flip": 2, "flip_translate": 10}


def test_tta_model_is_the_log_of_the_mean_softmax_and_none_is_the_model_itself():
    torch.manual_seed(0)
    model = SeedCNN(3, 0.0, 16).eval()
    x = _batch(4, 16)
    assert as_evaluated(model, "none") is model
    with torch.no_grad():
        expected = ((model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2).log()
        assert torch.allclose(TTAModel(model, "flip")(x), expected, atol=1e-6)
        many = TTAModel(model, "flip_translate")(x)
        assert torch.allclose(many.exp().sum(1), torch.ones(4), atol=1e-5)


def test_per_member_views_give_each_member_its_own_average():
    torch.manual_seed(0)
    models = [SeedCNN(3, 0.0, 16).eval() for _ in range(3)]
    x = _batch(4, 16)

    def stacked(images):  # (K, B, C), as a stacked network gives them
        return torch.stack([m(images) for m in models])

    with torch.no_grad():
        together = log_mean_softmax(stacked, x, [1, 2, 10])
        assert torch.equal(together[0], models[0](x))  # one view: the model's own logits, untouched
        for row, mode in ((1, "flip"), (2, "flip_translate")):
            assert torch.allclose(together[row], TTAModel(models[row], mode)(x), atol=1e-6)


@pytest.fixture(scope="module")
def small_data(real_data, tmp_path_factory):
    config = DataConfig(real_data, train_counts=(200, 40, 40), dev_counts=(40, 20, 20), test_counts=(20, 20, 20))
    return DeviceData(prepare_splits(config, tmp_path_factory.mktemp("cache")), "cpu")


def test_fused_dev_evaluation_uses_each_members_views(small_data):
    base = dict(optimizer="adam", lr=3e-3, weight_decay=0.0, batch_size=32, epochs=2, seed=4)
    modes = ("none", "flip", "flip_translate")
    results = train_group([TrainConfig(**base, tta=mode) for mode in modes], small_data)
    plain = evaluate(results[0].model, small_data.dev, small_data.classes)
    for result, mode in zip(results, modes):
        # Same training (tta is evaluation only): the same weights in every member, to the rounding of
        # the stacked kernels (members in other lanes of one convolution).
        assert torch.allclose(result.model.classifier[-1].weight, results[0].model.classifier[-1].weight, atol=1e-5)
        alone = evaluate(as_evaluated(result.model, mode), small_data.dev, small_data.classes)
        assert result.dev.confusion.tolist() == alone.confusion.tolist()
    assert results[0].dev.confusion.tolist() == plain.confusion.tolist()


def test_a_fused_evaluation_gives_each_member_its_own_views_and_pays_for_no_more(small_data, monkeypatch):
    torch.manual_seed(0)
    models = [SeedCNN(3, 0.0, 32).eval() for _ in range(3)]
    modes = ("flip_translate", "none", "flip")
    net = StackedSeedCNN.from_models(models, "cpu")
    loss = MemberLoss([TrainConfig()] * 3, small_data.train.y, 3)
    member_forwards = []
    forward = StackedSeedCNN.forward
    monkeypatch.setattr(StackedSeedCNN, "forward", lambda self, x, masks=None: member_forwards.append(
        self.k * len(x)) or forward(self, x, masks))
    together = evaluate_members(net, small_data.dev, small_data.classes, loss, [VIEW_COUNTS[m] for m in modes])
    assert sum(member_forwards) == sum(VIEW_COUNTS[m] for m in modes) * len(small_data.dev)  # 13 views, not 30
    for model, mode, evaluation in zip(models, modes, together):
        alone = evaluate(as_evaluated(model, mode), small_data.dev, small_data.classes)
        assert evaluation.confusion.tolist() == alone.confusion.tolist()


def test_attacks_differentiate_through_the_views(small_data):
    torch.manual_seed(0)
    model = SeedCNN(3, 0.0, 32).eval()
    x, y = small_data.test.x[:8], small_data.test.y[:8]
    deployed = TTAModel(model, "flip")
    attacked = fgsm(deployed, x, y, 0.05)
    with torch.enable_grad():
        images = x.clone().requires_grad_(True)
        p = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
        (grad,) = torch.autograd.grad(F.nll_loss(p.log(), y, reduction="sum"), images)
    assert torch.equal(attacked, (x + 0.05 * grad.sign()).clamp(0, 1))
    assert not torch.equal(attacked, fgsm(model, x, y, 0.05))
    (clean,) = attack_sweep(deployed, small_data.test, small_data.classes, [0.0], "fgsm", "test")
    assert clean.evaluation.confusion.tolist() == evaluate(deployed, small_data.test, small_data.classes).confusion.tolist()


def test_the_checkpoint_keeps_the_tta_beside_the_weights(tmp_path):
    model = SeedCNN(3)
    save_checkpoint(tmp_path / "m.pt", model, TrainConfig(tta="flip_translate"), ("car", "truck", "cat"))
    _, config, _, _ = load_checkpoint(tmp_path / "m.pt")
    assert config.tta == "flip_translate"
    with pytest.raises(ValueError, match="tta"):
        TrainConfig(tta="rotate")


# --- weight averaging -------------------------------------------------------------------------

def test_the_average_is_the_bias_corrected_moving_average_of_each_rows_weights():
    from cnnlib.weight_average import WeightAverage

    steps = [torch.randn(3, 5, generator=torch.Generator().manual_seed(t)) for t in range(6)]
    decays = [0.0, 0.5, 0.9]
    average = WeightAverage(decays, torch.full((3, 5), 100.0))  # the initial weights are forgotten at step 1
    for flat in steps:
        average.update(flat)
    for row, d in enumerate(decays):
        weights = [d ** (len(steps) - 1 - t) for t in range(len(steps))]
        expected = sum(w * flat[row].double() for w, flat in zip(weights, steps)) / sum(weights)
        assert torch.allclose(average.average[row].double(), expected, atol=1e-5)
    assert torch.equal(average.average[0], steps[-1][0])  # decay 0: a copy of the weights, bit for bit


QUICK = dict(optimizer="adamw", lr=3e-3, weight_decay=0.05, batch_size=32, epochs=3, dropout=0.0, crop=2, flip=True,
             schedule="one_cycle", warmup=0.2)


def test_members_with_different_decays_train_what_they_train_alone(small_data):
    configs = [TrainConfig(**QUICK, ema=ema, seed=seed) for ema, seed in ((0.0, 1), (0.9, 2), (0.99, 3))]
    for result, config in zip(train_group(configs, small_data), configs):
        alone = train(config, small_data, order_seed=configs[0].seed)
        for a, b in zip(result.history, alone.history):
            assert a.train_loss == pytest.approx(b.train_loss, abs=1e-4)
            assert a.dev_loss == pytest.approx(b.dev_loss, abs=1e-3)
            assert abs(a.dev.confusion - b.dev.confusion).sum() // 2 <= 2
        for p, q in zip(result.model.parameters(), alone.model.parameters()):
            assert ((p - q).norm() / q.norm()).item() < 1e-3


def test_evaluation_and_the_model_are_the_averaged_weights_and_training_is_untouched(small_data):
    raw, averaged = train_group([TrainConfig(**QUICK, ema=0.0), TrainConfig(**QUICK, ema=0.9)], small_data)
    assert [h.train_loss for h in raw.history] == pytest.approx([h.train_loss for h in averaged.history], abs=1e-5)
    assert not torch.allclose(raw.model.classifier[-1].weight, averaged.model.classifier[-1].weight, atol=1e-4)
    alone = evaluate(averaged.model, small_data.dev, small_data.classes)
    assert abs(alone.confusion - averaged.dev.confusion).sum() // 2 <= 1


def test_ema_off_is_the_step_without_averaging_bit_for_bit(small_data, monkeypatch):
    from cnnlib import weight_average

    configs = [TrainConfig(**QUICK, seed=5), TrainConfig(**QUICK, seed=6)]
    before = train_group(configs, small_data)
    # A member without averaging beside one that averages: its row of the average is a copy of its weights.
    mixed = train_group([configs[0], TrainConfig(**{**configs[1].to_dict(), "ema": 0.9})], small_data)
    for a, b in zip(before[0].history, mixed[0].history):
        assert (a.train_loss, a.dev_loss, a.dev.confusion.tolist()) == (b.train_loss, b.dev_loss, b.dev.confusion.tolist())
    for p, q in zip(before[0].model.parameters(), mixed[0].model.parameters()):
        assert torch.equal(p, q)

    def refuse(*args, **kwargs):
        raise AssertionError("a group without averaging built an average")

    monkeypatch.setattr(weight_average.WeightAverage, "__init__", refuse)
    train_group(configs, small_data)  # no member averages: nothing is built, nothing is updated


def test_ema_is_per_member_and_only_for_models_without_batch_norm():
    from cnnlib.config import PER_MEMBER, group_key

    assert "ema" in PER_MEMBER and group_key(TrainConfig(ema=0.99)) == group_key(TrainConfig())
    for bad in (dict(ema=1.0), dict(ema=-0.1), dict(ema=0.9, model="small_vgg")):
        with pytest.raises(ValueError, match="ema"):
            TrainConfig(**bad)


def test_averages_move_with_their_members_when_passes_are_re_split(small_data):
    from cnnlib.training import LoopOptions, train_group_epochs

    # Passes {0, 1, 2} and {3, 4, 5} on two threads; 0 and 1 stop after epoch 1, the 4 left are merged
    # and re-split 2 + 2 (cnnlib.step.StackedStep._rebalance), their averages with them.
    configs = [TrainConfig(**QUICK, ema=ema, seed=10 + i) for i, ema in enumerate((0.9, 0.0, 0.5, 0.99, 0.0, 0.8))]
    for results in train_group_epochs(configs, small_data, lambda m, s: m in (0, 1),
                                      options=LoopOptions(pass_threads=2)):
        pass
    for result, config in list(zip(results, configs))[2:]:
        alone = train(config, small_data, order_seed=configs[0].seed)
        assert [h.train_loss for h in result.history] == pytest.approx([h.train_loss for h in alone.history], abs=1e-4)
        for p, q in zip(result.model.parameters(), alone.model.parameters()):
            assert ((p - q).norm() / q.norm()).item() < 1e-3
