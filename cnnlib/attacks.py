"""FGSM and PGD: how far a small, worst-case pixel change moves the seed CNN.

Epsilon is on the [0, 1] pixel scale. The model normalizes its input inside
`forward` (see model.py), so every attack here perturbs and clamps images in
[0, 1] and an epsilon means the same thing whatever normalization the network
uses. The user's report attacked [-1, 1] inputs (Normalize(0.5, 0.5)), where
one pixel step is twice as large: their eps 0.1 is eps 0.05 here, and eps e
here is 2e there. Clamping to [0, 1] here is clamping to [-1, 1] there.

FGSM, exactly:  x' = clamp(x + eps * sign(grad_x CE(f(x), y)), 0, 1).
PGD iterates that step with step size 2.5 * eps / steps, projecting back onto
the L-inf ball of radius eps around x (and onto [0, 1]) after every step.

Attacks run with the model in eval mode (dropout off: the gradient is the one
of the function being evaluated) and with its parameters frozen, so no
parameter gradient is ever computed or kept; both are restored afterwards.
Everything is batched on the model's device. For FGSM the gradient sign does
not depend on epsilon, so a sweep computes it once per batch and only
re-evaluates the model per epsilon: 9 epsilons cost 1 backward + 10 forwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import Evaluation

ATTACKS = ("fgsm", "pgd")
# The user's sweep plus 0.01/0.02/0.03: robust-accuracy papers quote 8/255 ~ 0.03.
DEFAULT_EPSILONS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3)
PGD_STEPS = 10
PGD_STEP_FACTOR = 2.5  # Madry et al.: step 2.5 * eps / steps lets a path reach the ball's edge and move along it
ATTACK_BATCH = 1024  # one backward over 1024 32x32 images holds ~100 MB of activations


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the duration; the caller's settings come back afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon {epsilon} is outside [0, 1] (it is on the [0, 1] pixel scale)")
    return epsilon


def _loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at x, d CE / d x). Summed loss: each image's gradient is its own, whatever the batch."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return logits.detach(), grad


def _project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.minimum(torch.maximum(x_adv, x - epsilon), x + epsilon).clamp_(0.0, 1.0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """One signed-gradient step of size epsilon, clamped to [0, 1]; x in [0, 1], NCHW."""
    epsilon = check_epsilon(epsilon)
    with attack_mode(model):
        _, grad = _loss_gradient(model, x, y)
    return (x + epsilon * grad.sign()).clamp_(0.0, 1.0)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int = PGD_STEPS,
        step_size: float | None = None, random_start: bool = True, seed: int = 0) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball; per image, the strongest point it visits.

    Each image keeps the first point (the FGSM point, then each PGD iterate)
    that the model misclassifies, else the last iterate. The FGSM point is a
    candidate, so PGD is never weaker than FGSM at the same epsilon; that is
    the worst case over points all inside the ball, which is what robust
    accuracy means. The random start is seeded: a rerun gives the same images.
    """
    epsilon = check_epsilon(epsilon)
    if epsilon == 0.0 or steps < 1:
        return fgsm(model, x, y, epsilon)
    step_size = PGD_STEP_FACTOR * epsilon / steps if step_size is None else float(step_size)
    with attack_mode(model):
        _, grad = _loss_gradient(model, x, y)
        best = (x + epsilon * grad.sign()).clamp_(0.0, 1.0)
        with torch.no_grad():
            fooled = model(best).argmax(1) != y
        x_adv = x.clone()
        if random_start:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(seed)
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_adv = _project(x + epsilon * (2.0 * noise - 1.0), x, epsilon)
        # Only images not fooled yet take further steps: at large epsilon that is almost none.
        for step in range(steps + 1):
            active = torch.nonzero(~fooled).flatten()
            if active.numel() == 0:
                break
            x_active, y_active = x_adv[active], y[active]
            if step == steps:  # the last iterate still needs its check
                with torch.no_grad():
                    wrong = model(x_active).argmax(1) != y_active
            else:
                logits, grad = _loss_gradient(model, x_active, y_active)
                wrong = logits.argmax(1) != y_active
                x_adv[active] = _project(x_active + step_size * grad.sign(), x[active], epsilon)
            best[active[wrong]] = x_active[wrong]
            fooled[active[wrong]] = True
        return torch.where(fooled.view(-1, 1, 1, 1), best, x_adv)


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, epsilon: float, **options) -> torch.Tensor:
    """Adversarial images for one attack name ('fgsm' or 'pgd'), batched on x's device."""
    attack = check_attack(attack)
    run = fgsm if attack == "fgsm" else pgd
    parts = [run(model, x[i:i + ATTACK_BATCH], y[i:i + ATTACK_BATCH], epsilon, **options)
             for i in range(0, x.shape[0], ATTACK_BATCH)]
    return torch.cat(parts) if parts else x.clone()


def check_attack(attack: str) -> str:
    attack = str(attack).lower()
    if attack not in ATTACKS:
        raise ValueError(f"attack {attack!r} is not one of {', '.join(ATTACKS)}")
    return attack


# --- sweeps ---------------------------------------------------------------

@dataclass
class AttackResult:
    """One attack at one epsilon on one split: the attacked evaluation and how many correct answers flipped."""

    split: str
    attack: str
    epsilon: float
    evaluation: Evaluation  # predictions on the attacked images
    clean_correct: int  # images the model gets right without attack
    flipped: int  # of those, how many the attack makes wrong

    @property
    def macro_accuracy(self) -> float:
        return self.evaluation.macro_accuracy

    @property
    def success_rate(self) -> float:
        """Share of correctly classified inputs that the attack flips (NaN when none is correct)."""
        return self.flipped / self.clean_correct if self.clean_correct else float("nan")

    def row(self) -> dict:
        """One CSV row: split, attack, epsilon, macro/plain accuracy, per-class accuracy, success rate."""
        out = {"split": self.split, "attack": self.attack, "epsilon": self.epsilon,
               "macro_accuracy": self.macro_accuracy, "accuracy": self.evaluation.accuracy}
        out.update({f"accuracy_{c}": a for c, a in self.evaluation.per_class.items()})
        out.update({"attack_success_rate": self.success_rate, "clean_correct": self.clean_correct,
                    "flipped": self.flipped, "n": int(self.evaluation.confusion.sum())})
        return out


def attack_sweep(model: nn.Module, split, classes: Sequence[str], epsilons: Sequence[float] = DEFAULT_EPSILONS,
                 attack: str = "fgsm", split_name: str = "dev", **options) -> list[AttackResult]:
    """One AttackResult per epsilon for a DeviceSplit (x in [0, 1], y); options go to pgd (steps, seed...)."""
    attack = check_attack(attack)
    epsilons = [check_epsilon(e) for e in epsilons]
    n = len(classes)
    device = split.x.device
    confusion = torch.zeros(len(epsilons), n * n, dtype=torch.long, device=device)
    flipped = torch.zeros(len(epsilons), dtype=torch.long, device=device)
    clean_correct = torch.zeros((), dtype=torch.long, device=device)
    with attack_mode(model):
        for start in range(0, split.x.shape[0], ATTACK_BATCH):
            x, y = split.x[start:start + ATTACK_BATCH], split.y[start:start + ATTACK_BATCH]
            logits, grad = _loss_gradient(model, x, y)
            correct = logits.argmax(1) == y
            clean_correct += correct.sum()
            step = grad.sign()
            for k, epsilon in enumerate(epsilons):
                if attack == "fgsm":
                    x_adv = (x + epsilon * step).clamp_(0.0, 1.0)
                else:
                    x_adv = pgd(model, x, y, epsilon, **options)
                with torch.no_grad():
                    predicted = model(x_adv).argmax(1)
                confusion[k] += torch.bincount(y * n + predicted, minlength=n * n)
                flipped[k] += (correct & (predicted != y)).sum()
    confusion, flipped, clean_correct = confusion.cpu().numpy(), flipped.cpu().tolist(), int(clean_correct)
    return [AttackResult(split_name, attack, epsilon, Evaluation(tuple(classes), confusion[k].reshape(n, n)),
                         clean_correct, flipped[k]) for k, epsilon in enumerate(epsilons)]


def robust_macro_accuracy(model: nn.Module, split, classes: Sequence[str], attack: str = "fgsm",
                          epsilon: float = 0.03) -> float:
    """Macro accuracy on a split attacked at one epsilon: the second objective of a robust study."""
    (result,) = attack_sweep(model, split, classes, [epsilon], attack)
    return result.macro_accuracy
