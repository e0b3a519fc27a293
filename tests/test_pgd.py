"""PGD: the white-box attack of the spine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from auditor.attacks.base import distortion
from auditor.attacks.whitebox.pgd import PGD
from auditor.oracles import GradientOracle


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 2.0)])
def test_pgd_stays_in_ball_and_breaks_a_standard_model(tiny_cnn, mnist_test, norm, eps):
    x, y = mnist_test.x[:64], mnist_test.y[:64]
    correct = tiny_cnn(x).argmax(1) == y
    x, y = x[correct], y[correct]
    attack = PGD(norm=norm, steps=20)
    result = attack(GradientOracle(tiny_cnn, len(y)), x, y, eps=eps, seed=1)
    assert distortion(result.x_adv - x, norm).max() <= eps + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    fooled = tiny_cnn(result.x_adv).argmax(1) != y
    assert torch.equal(fooled, result.success)
    assert fooled.float().mean() > 0.8
    # early stopping: successful samples cost fewer than steps + 1 passes
    assert result.queries.max() <= 21 and result.queries.float().mean() < 21


def test_pgd_is_deterministic_and_immutable(tiny_cnn, mnist_test):
    x, y = mnist_test.x[:16], mnist_test.y[:16]
    attack = PGD(norm="linf", steps=5, restarts=2)
    first = attack(GradientOracle(tiny_cnn, 16), x, y, eps=0.05, seed=3)
    second = attack(GradientOracle(tiny_cnn, 16), x, y, eps=0.05, seed=3)
    assert torch.equal(first.x_adv, second.x_adv)
    assert repr(attack) == (
        "PGD(norm='linf', steps=5, restarts=2, rel_step=None, random_start=True, "
        "schedule='constant', loss='ce')"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        attack.steps = 10


def test_the_margin_loss_moves_where_the_cross_entropy_is_flat(tiny_cnn, correct_batch):
    """Logits times 1,000 saturate the softmax: the cross-entropy's gradient
    is exactly 0 and PGD cannot move; the logit margin's is not."""

    class Scaled(torch.nn.Module):
        def forward(self, x):
            return 1000 * tiny_cnn(x)

    x, y = correct_batch
    runs = {loss: PGD(norm="linf", steps=10, loss=loss)(GradientOracle(Scaled(), len(y)), x, y, eps=0.3, seed=0)
            for loss in ("ce", "margin")}
    assert runs["margin"].success.float().mean() > runs["ce"].success.float().mean() + 0.3
    with pytest.raises(ValueError, match="PGD loss must be one of"):
        PGD(loss="hinge")


def test_pgd_takes_only_the_samples_that_can_pay_a_whole_run(tiny_cnn, correct_batch):
    """Like APGD: a run costs steps + 1 queries a sample, so a budget below it runs nothing (it
    raised BudgetExceeded mid-run), and a second start goes only to samples that can pay it."""
    x, y = correct_batch
    attack = PGD(steps=10, restarts=2)
    oracle = GradientOracle(tiny_cnn, len(y), budget=5)
    result = attack(oracle, x, y, eps=0.1)
    assert oracle.queries().sum() == 0 and not result.success.any()
    oracle = GradientOracle(tiny_cnn, len(y), budget=15)
    result = attack(oracle, x, y, eps=1e-6)
    assert torch.equal(oracle.queries(), torch.full((len(y),), 11))
