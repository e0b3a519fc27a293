"""White-box attacks: FGSM, PGD (both step-size schedules) and Carlini-Wagner L2."""

from __future__ import annotations

import dataclasses

import math

import pytest
import torch

from auditor.access import Access
from auditor.attacks import CATALOGUE
from auditor.attacks.base import FIXED_EPS, MIN_NORM, distortion
from auditor.attacks.whitebox.carlini_wagner import CarliniWagnerL2
from auditor.attacks.whitebox.fgsm import FGSM
from auditor.attacks.whitebox.pgd import PGD
from auditor.oracles import GradientOracle

EPS = {"linf": 0.1, "l2": 1.5}


@pytest.fixture(scope="module")
def batch(tiny_cnn, mnist_test):
    """64 test digits that tiny_cnn classifies correctly."""
    x, y = mnist_test.x[:100], mnist_test.y[:100]
    with torch.no_grad():
        correct = tiny_cnn(x).argmax(1) == y
    x, y = x[correct][:64], y[correct][:64]
    assert len(y) == 64
    return x, y


@pytest.fixture(scope="module")
def cw_result(tiny_cnn, batch):
    x, y = batch
    return CarliniWagnerL2()(GradientOracle(tiny_cnn, len(y)), x, y, seed=0)


def fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


class Recorder:
    """An oracle proxy that records every query batch and its sample ids."""

    def __init__(self, oracle):
        self._oracle = oracle
        self.calls = []

    def loss_grad(self, x, loss_fn, idx=None):
        self.calls.append(("loss_grad", x.clone(), torch.as_tensor(idx).clone()))
        return self._oracle.loss_grad(x, loss_fn, idx=idx)

    def logits(self, x, idx=None):
        self.calls.append(("logits", x.clone(), torch.as_tensor(idx).clone()))
        return self._oracle.logits(x, idx=idx)

    def queries(self):
        return self._oracle.queries()

    def remaining(self):
        return self._oracle.remaining()


def check_fixed_eps(attack, model, x, y, eps, seed=0):
    result = attack(GradientOracle(model, len(y)), x, y, eps=eps, seed=seed)
    assert torch.equal(result.success, fooled(model, result.x_adv, y))
    assert distortion(result.x_adv - x, attack.norm).max() <= eps + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    again = attack(GradientOracle(model, len(y)), x, y, eps=eps, seed=seed)
    assert torch.equal(result.x_adv, again.x_adv) and torch.equal(result.success, again.success)
    return result


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_is_one_verified_step_of_radius_eps(tiny_cnn, batch, norm):
    x, y = batch
    attack = FGSM(norm=norm)
    result = check_fixed_eps(attack, tiny_cnn, x, y, EPS[norm])
    assert torch.equal(result.queries, torch.full((len(y),), 2))
    assert 0.2 < result.success.float().mean() < 1.0
    # the step is the paper's, computed here directly
    xg = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(tiny_cnn(xg), y, reduction="sum").backward()
    grad = xg.grad.flatten(1)
    if norm == "linf":
        step = grad.sign()
    else:
        step = grad / grad.norm(dim=1, keepdim=True)
    expected = (x + EPS[norm] * step.view_as(x)).clamp(0, 1)
    assert torch.allclose(result.x_adv, expected, atol=1e-6)


def test_fgsm_skips_samples_that_cannot_pay(tiny_cnn, batch):
    x, y = batch
    oracle = GradientOracle(tiny_cnn, len(y), budget=1)
    result = FGSM()(oracle, x, y, eps=0.1)
    assert result.queries.sum() == 0 and not result.success.any()
    assert torch.equal(result.x_adv, x)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_schedules_are_verified_and_in_the_ball(tiny_cnn, batch, norm, schedule):
    x, y = batch
    attack = PGD(norm=norm, steps=10, schedule=schedule)
    result = check_fixed_eps(attack, tiny_cnn, x, y, EPS[norm])
    assert result.success.float().mean() > 0.5
    assert result.queries.max() <= 11
    fgsm = FGSM(norm=norm)(GradientOracle(tiny_cnn, len(y)), x, y, eps=EPS[norm])
    assert result.success.sum() >= fgsm.success.sum()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_pgd_step_sizes_follow_the_schedule(tiny_cnn, batch, schedule):
    x, y = batch
    steps, alpha = 4, 0.05
    attack = PGD(
        norm="linf", steps=steps, rel_step=alpha / 0.3, random_start=False, schedule=schedule
    )
    oracle = Recorder(GradientOracle(tiny_cnn, len(y)))
    attack(oracle, x, y, eps=0.3)
    kinds = [kind for kind, _, _ in oracle.calls]
    assert kinds == ["loss_grad"] * steps + ["logits"]
    for t in range(steps):
        _, before, idx_before = oracle.calls[t]
        _, after, idx_after = oracle.calls[t + 1]
        kept = torch.isin(idx_before, idx_after)
        moved = (after - before[kept]).flatten(1).abs().amax(1)
        expected = alpha
        if schedule == "cosine":
            expected = alpha * (1 + math.cos(math.pi * t / steps)) / 2
        assert torch.allclose(moved, torch.full_like(moved, expected), atol=1e-6)


@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 1.2)])
def test_pgd_more_restarts_only_add_successes(tiny_cnn, batch, norm, eps):
    x, y = batch
    runs = [
        PGD(norm=norm, steps=5, restarts=restarts)(
            GradientOracle(tiny_cnn, len(y)), x, y, eps=eps, seed=7
        )
        for restarts in (1, 3)
    ]
    one, three = runs
    assert 0 < one.success.sum() < len(y)
    assert torch.all(three.success >= one.success)
    # the first restart of the longer run is the single run
    assert torch.equal(three.x_adv[one.success], one.x_adv[one.success])
    assert torch.equal(three.queries[one.success], one.queries[one.success])


def test_cw_finds_small_verified_adversarials(tiny_cnn, batch, cw_result):
    x, y = batch
    result = cw_result
    assert torch.equal(result.success, fooled(tiny_cnn, result.x_adv, y))
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert result.success.float().mean() > 0.9
    size = distortion(result.x_adv - x, "l2")
    # measured: 100 % success at median L2 1.10 (PGD-L2 needs ε = 2.0 for 90 %)
    assert size[result.success].median() < 1.5
    assert torch.equal(x[~result.success], result.x_adv[~result.success])


def test_cw_rate_is_the_official_one_on_mid_range_pixels(tiny_cnn, batch):
    # The digits drawn in grey on grey: no pixel starts near 0 or 1, so every
    # coordinate gets the official rate 0.01, where one rate of 0.1 (the
    # saturated pixels' rate) overshoots.
    x, y = batch
    grey = 0.3 + 0.4 * x
    keep = fooled(tiny_cnn, grey, y).logical_not()
    grey, y = grey[keep][:32], y[keep][:32]
    sizes = {}
    for rate in (0.01, 0.1):
        attack = CarliniWagnerL2(learning_rate=rate, max_learning_rate=0.1)
        result = attack(GradientOracle(tiny_cnn, len(y)), grey, y, seed=0)
        assert result.success.all()
        sizes[rate] = distortion(result.x_adv - grey, "l2").median()
    # measured: median L2 0.91 against 1.05
    assert sizes[0.01] < 0.95 * sizes[0.1]


def test_cw_trace_queries_and_determinism(tiny_cnn, batch, cw_result):
    x, y = batch
    attack = CarliniWagnerL2()
    result = cw_result
    assert len(result.trace) == attack.binary_search_steps
    spent = torch.stack([q for q, _ in result.trace])  # per sample, after each round
    assert (spent[1:] >= spent[:-1]).all() and torch.equal(spent[-1], result.queries)
    assert result.queries.max() <= attack.binary_search_steps * attack.steps
    sizes = torch.stack([s for _, s in result.trace])
    assert torch.all(sizes[1:] <= sizes[:-1])
    final = distortion(result.x_adv - x, "l2")
    assert torch.allclose(sizes[-1][result.success], final[result.success], atol=1e-5)
    assert torch.all(torch.isinf(sizes[-1][~result.success]))
    again = attack(GradientOracle(tiny_cnn, len(y)), x, y, eps=0.01, seed=5)
    assert torch.equal(again.x_adv, result.x_adv) and torch.equal(again.queries, result.queries)


def test_cw_respects_a_budget_and_freezes_inactive_samples(tiny_cnn, batch):
    x, y = batch
    attack = CarliniWagnerL2(binary_search_steps=2, steps=30)
    oracle = Recorder(GradientOracle(tiny_cnn, len(y), budget=37))
    result = attack(oracle, x, y)
    assert result.queries.max() <= 37
    assert torch.equal(result.success, fooled(tiny_cnn, result.x_adv, y))
    # success is read from the gradient queries' logits: no other query
    assert {kind for kind, _, _ in oracle.calls} == {"loss_grad"}
    # each round starts from the clean image
    first = oracle.calls[0][1]
    assert torch.allclose(first, x, atol=1e-5)


def test_configs_are_validated_immutable_and_labelled():
    assert FGSM().label == "fgsm-linf" and FGSM(norm="l2").label == "fgsm-l2"
    assert CarliniWagnerL2().label == "cw-l2"
    assert PGD(norm="l2", schedule="cosine").label == "pgd-l2"
    assert FGSM.kind == FIXED_EPS and CarliniWagnerL2.kind == MIN_NORM
    assert repr(CarliniWagnerL2()) == (
        "CarliniWagnerL2(norm='l2', binary_search_steps=5, steps=100, initial_const=0.01, "
        "learning_rate=0.01, max_learning_rate=0.1, kappa=0.0, abort_early=True)"
    )
    for bad in (
        lambda: FGSM(norm="l1"),
        lambda: PGD(schedule="linear"),
        lambda: PGD(rel_step=0.0),
        lambda: CarliniWagnerL2(norm="linf"),
        lambda: CarliniWagnerL2(steps=0),
        lambda: CarliniWagnerL2(binary_search_steps=0),
        lambda: CarliniWagnerL2(initial_const=0.0),
        lambda: CarliniWagnerL2(learning_rate=-1.0),
        lambda: CarliniWagnerL2(kappa=-1.0),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(dataclasses.FrozenInstanceError):
        CarliniWagnerL2().steps = 10
    with pytest.raises(ValueError):
        FGSM()(None, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize(
    "attack", [a for a in CATALOGUE if a.access == Access.WHITE_BOX], ids=lambda a: a.label
)
def test_float64_batches_on_a_float64_model(attack):
    """Every white-box attack takes a float64 model and batch (C&W's
    per-sample records were float32 and refused the float64 distances)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).double().eval()
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    y = model(x).argmax(1)
    fields = {field.name for field in dataclasses.fields(attack)}
    short = {"steps": 5, "binary_search_steps": 2}
    small = dataclasses.replace(attack, **{name: value for name, value in short.items() if name in fields})
    result = small(GradientOracle(model, 4), x, y, eps=None if attack.kind == MIN_NORM else EPS[attack.norm])
    assert result.x_adv.dtype == torch.float64 and result.x_adv.shape == x.shape
