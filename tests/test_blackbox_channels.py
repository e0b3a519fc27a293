"""Every black-box attack on colour images: a 3-channel model of other size.

The other black-box tests use 1-channel MNIST digits, where a norm taken per
channel and one taken over all channels agree. Here the images are 3 × 20 ×
20 colour digits and the model a small CNN trained on them, so any step that
mixes up channels breaks the invariants or loses its success.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Counting, fit, label_oracle, predict, score_oracle
from torch import nn

from auditor.attacks.hardlabel.hop_skip_jump import HopSkipJump
from auditor.attacks.hardlabel.opt import OPT
from auditor.attacks.hardlabel.sign_opt import SignOPT
from auditor.attacks.softlabel.gen_attack import GenAttack
from auditor.attacks.softlabel.nes import NES
from auditor.attacks.softlabel.square import SquareAttack


def colour_digits(data, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits cropped to 20 × 20, drawn in a random colour on a random background."""
    gen = torch.Generator().manual_seed(seed)
    x = data.x[:, :, 4:24, 4:24]
    ink = torch.rand(len(x), 3, 1, 1, generator=gen)
    paper = torch.rand(len(x), 3, 1, 1, generator=gen)
    paper = torch.where((ink - paper).abs() < 0.4, 1 - ink, paper)
    return paper + (ink - paper) * x, data.y


@pytest.fixture(scope="module")
def colour_cnn(mnist_train) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )
    return fit(model, *colour_digits(mnist_train, 1), epochs=3)


@pytest.fixture(scope="module")
def colour_batch(colour_cnn, mnist_test):
    x, y = colour_digits(mnist_test, 2)
    correct = predict(colour_cnn, x) == y
    # measured: about 90 % of the colour test digits are classified correctly
    assert correct.float().mean() > 0.7
    return x[correct][:12], y[correct][:12]


def size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


SCORE_ATTACKS = [
    (SquareAttack(norm="linf"), 0.1),
    (SquareAttack(norm="l2"), 2.0),
    (NES(norm="linf"), 0.1),
    (NES(norm="l2"), 2.0),
    (GenAttack(norm="linf"), 0.1),
]


@pytest.mark.parametrize(("attack", "eps"), SCORE_ATTACKS, ids=repr)
def test_soft_label_attacks_on_colour_images(colour_cnn, colour_batch, attack, eps):
    x, y = colour_batch
    counter = Counting(lambda z: colour_cnn(z).softmax(1))
    result = attack(score_oracle(colour_cnn, len(y), 400, counter), x, y, eps=eps, seed=0)
    assert (result.queries <= 400).all() and counter.rows == int(result.queries.sum())
    # the ε-ball is one ball over all channels, and the box holds per pixel
    assert (size(result.x_adv - x, attack.norm) <= eps + 1e-5).all()
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    assert (predict(colour_cnn, result.x_adv[result.success]) != y[result.success]).all()
    # measured (seed 0, 12 digits): Square 12 (L∞) / 10 (L2), NES 11 / 10, GenAttack 10
    assert result.success.sum() >= 8


@pytest.mark.parametrize(
    "attack", [SignOPT(norm="l2"), SignOPT(norm="linf"), OPT(norm="l2"), HopSkipJump(norm="l2"),
               HopSkipJump(norm="linf")], ids=repr
)
def test_hard_label_attacks_on_colour_images(colour_cnn, colour_batch, attack):
    x, y = colour_batch
    # in float64, so a point on the boundary gets the label the attack saw
    model64 = copy.deepcopy(colour_cnn).double()
    counter = Counting(lambda z: model64(z.double()).argmax(1))
    result = attack(label_oracle(model64, len(y), 600, counter), x, y, seed=0)
    assert (result.queries <= 600).all() and counter.rows == int(result.queries.sum())
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    found = result.success
    assert found.sum() >= 11
    assert (predict(model64, result.x_adv[found]) != y[found]).all()
    # measured medians at 600 queries: L2 1.16 (Sign-OPT), 1.86 (OPT), 0.64
    # (HopSkipJump); L∞ 0.23 (Sign-OPT), 0.033 (HopSkipJump)
    distance = size(result.x_adv[found] - x[found], attack.norm)
    assert distance.median() < (0.3 if attack.norm == "linf" else 2.5)
