"""FGSM and PGD on a small model trained on real images: what an attack may and may not do.

The model is trained once per module on a few hundred real CIFAR images
(balanced, so every class has correctly classified images to flip).
"""

from __future__ import annotations

import pytest
import torch

from cnnlib import attacks
from cnnlib.attacks import attack_sweep, fgsm, pgd, perturb, robust_macro_accuracy
from cnnlib.model import SeedCNN
from cnnlib.splits import DataConfig, prepare_splits
from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData, evaluate, train

TOL = 1e-6  # float32 rounding of x + eps - x


@pytest.fixture(scope="module")
def trained(real_data, tmp_path_factory, device):
    """(model, DeviceData): 5 epochs on 600 real images, ~70% dev macro accuracy, ~3 s on a CPU."""
    torch.set_num_threads(1)
    splits = prepare_splits(DataConfig(real_data, train_counts=(200, 200, 200), dev_counts=(100, 100, 100),
                                       test_counts=(0, 0, 0)), tmp_path_factory.mktemp("attack-split"))
    data = DeviceData(splits, device)
    result = train(TrainConfig(epochs=5, batch_size=32, lr=3e-3, dropout=0.0, weight_decay=1e-4), data)
    assert result.dev.macro_accuracy > 0.55, "the fixture model must be well above chance for these tests to mean anything"
    return result.model, data


def test_epsilon_zero_gives_the_clean_accuracy_and_flips_nothing(trained):
    model, data = trained
    (row,) = attack_sweep(model, data.dev, data.classes, [0.0], "fgsm")
    clean = evaluate(model, data.dev, data.classes)
    assert (row.evaluation.confusion == clean.confusion).all()
    assert row.macro_accuracy == clean.macro_accuracy
    assert row.flipped == 0 and row.success_rate == 0.0


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@pytest.mark.parametrize("epsilon", [0.03, 0.3])
def test_perturbation_stays_within_epsilon_and_the_pixel_range(trained, attack, epsilon):
    model, data = trained
    x, y = data.dev.x[:64], data.dev.y[:64]
    x_adv = perturb(model, x, y, attack, epsilon)
    change = (x_adv - x).abs().amax()
    assert change <= epsilon + TOL
    assert change >= epsilon - TOL, "the attack should use its whole budget on some pixel"
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_fgsm_moves_each_unclamped_pixel_by_epsilon_or_not_at_all(trained):
    """sign(0) = 0: a pixel no max-pool window picks has no gradient and stays put."""
    model, data = trained
    x, y = data.dev.x[:16], data.dev.y[:16]
    x_adv = fgsm(model, x, y, 0.05)
    interior = (x > 0.05 + TOL) & (x < 0.95 - TOL)
    moved = (x_adv - x).abs()[interior]
    at_epsilon = (moved - 0.05).abs() <= TOL
    assert (at_epsilon | (moved == 0)).all()
    assert at_epsilon.float().mean() > 0.5


def test_epsilon_on_the_unit_scale_is_twice_as_large_on_the_users_minus_one_to_one_inputs(trained):
    """The user's report attacked Normalize(0.5, 0.5) inputs: their eps 0.1 is our 0.05."""
    model, data = trained
    x, y = data.dev.x[:16], data.dev.y[:16]
    x_adv = fgsm(model, x, y, 0.05)
    to_user_scale = lambda t: (t - model.mean) / model.std  # noqa: E731 - the model's own normalization
    assert (to_user_scale(x_adv) - to_user_scale(x)).abs().amax().item() == pytest.approx(0.1, abs=1e-5)


def test_attack_lowers_accuracy_on_a_trained_model(trained):
    model, data = trained
    rows = attack_sweep(model, data.dev, data.classes, [0.0, 0.03, 0.1], "fgsm")
    clean, small, large = (r.macro_accuracy for r in rows)
    assert small < clean - 0.1
    assert large < 1 / 3, "at eps 0.1 FGSM should push the model below chance"
    assert rows[1].success_rate < rows[2].success_rate


def test_pgd_is_at_least_as_strong_as_fgsm_at_every_epsilon(trained):
    model, data = trained
    epsilons = [0.01, 0.03, 0.05]
    by_fgsm = attack_sweep(model, data.dev, data.classes, epsilons, "fgsm")
    by_pgd = attack_sweep(model, data.dev, data.classes, epsilons, "pgd", steps=5)
    for f, p in zip(by_fgsm, by_pgd):
        assert p.macro_accuracy <= f.macro_accuracy
        assert p.flipped >= f.flipped
    assert sum(p.macro_accuracy for p in by_pgd) < sum(f.macro_accuracy for f in by_fgsm), "iterating should find more"


def test_every_image_fgsm_fools_is_also_fooled_by_pgd(trained):
    model, data = trained
    x, y = data.dev.x, data.dev.y
    with torch.no_grad():
        fooled_fgsm = model(fgsm(model, x, y, 0.02)).argmax(1) != y
        fooled_pgd = model(pgd(model, x, y, 0.02, steps=3)).argmax(1) != y
    assert not (fooled_fgsm & ~fooled_pgd).any()


def test_attack_runs_with_dropout_off_and_restores_the_callers_mode():
    torch.manual_seed(0)
    model = SeedCNN(3, dropout=0.5)
    model.train()  # as a caller fresh from training would leave it
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(module.training))
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    first, second = fgsm(model, x, y, 0.1), fgsm(model, x, y, 0.1)
    assert torch.equal(first, second), "with dropout on, two attacks would draw different masks"
    assert seen and not any(seen)
    assert model.training


def test_attack_keeps_no_parameter_gradients_and_restores_requires_grad():
    model = SeedCNN(3)
    model.classifier[-1].weight.requires_grad_(False)  # a caller's own freezing survives the attack
    before = [p.requires_grad for p in model.parameters()]
    pgd(model, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), 0.05, steps=2)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == before


def test_sweep_gives_the_same_rows_in_small_batches(trained, monkeypatch):
    model, data = trained
    whole = attack_sweep(model, data.dev, data.classes, [0.0, 0.05], "fgsm")
    monkeypatch.setattr(attacks, "ATTACK_BATCH", 37)
    batched = attack_sweep(model, data.dev, data.classes, [0.0, 0.05], "fgsm")
    for a, b in zip(whole, batched):
        assert (a.evaluation.confusion == b.evaluation.confusion).all()
        assert (a.clean_correct, a.flipped) == (b.clean_correct, b.flipped)


def test_pgd_with_the_same_seed_gives_the_same_images(trained):
    model, data = trained
    x, y = data.dev.x[:32], data.dev.y[:32]
    assert torch.equal(pgd(model, x, y, 0.03, steps=3, seed=1), pgd(model, x, y, 0.03, steps=3, seed=1))


def test_robust_macro_accuracy_is_the_sweeps_macro_accuracy_at_that_epsilon(trained):
    model, data = trained
    (row,) = attack_sweep(model, data.dev, data.classes, [0.03], "fgsm")
    assert robust_macro_accuracy(model, data.dev, data.classes, "fgsm", 0.03) == row.macro_accuracy


def test_sweep_row_carries_per_class_accuracy_and_success_rate(trained):
    model, data = trained
    (row,) = attack_sweep(model, data.dev, data.classes, [0.03], "fgsm", split_name="dev")
    fields = row.row()
    assert fields["split"] == "dev" and fields["attack"] == "fgsm" and fields["epsilon"] == 0.03
    assert {f"accuracy_{c}" for c in data.classes} <= set(fields)
    assert fields["attack_success_rate"] == fields["flipped"] / fields["clean_correct"]


@pytest.mark.parametrize("epsilon", [-0.01, 1.5])
def test_epsilon_outside_the_pixel_scale_is_rejected(epsilon):
    with pytest.raises(ValueError, match="pixel scale"):
        fgsm(SeedCNN(3), torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), epsilon)


def test_unknown_attack_is_rejected_by_name():
    with pytest.raises(ValueError, match="'cw' is not one of fgsm, pgd"):
        perturb(SeedCNN(3), torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), "cw", 0.1)
