"""NES (soft-label, fixed-ε): PGD on an antithetic zeroth-order gradient estimate.

All runs use the real tiny CNN; on MNIST (d = 784) the defaults are q = 14
pairs, so one iteration costs 2q + 1 = 29 queries per sample: the check of
the iterate (1), then, if it is not adversarial, its 2q = 28 probes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from auditor.attacks.base import FIXED_EPS, distortion
from auditor.attacks.hardlabel.random_noise import RandomNoise
from auditor.attacks.softlabel.nes import NES, default_q_beta
from auditor.oracles import LabelOracle, ScoreOracle

from helpers import Counting, predict, score_oracle

pytestmark = pytest.mark.usefixtures("one_thread")

N = 32
COST = 29  # 2q + 1 with the MNIST default q = 14
PROBES = COST - 1


class PerSample:
    """A probability function that keeps, per call, how many rows it saw of
    each sample (each row is the nearest clean image's, in L∞: the samples
    are far further apart than the ε-balls and probes)."""

    def __init__(self, fn, x: torch.Tensor):
        self.fn, self.x = fn, x.flatten(1)
        self.per_call: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        owner = torch.cdist(z.flatten(1), self.x, p=float("inf")).argmin(dim=1)
        self.per_call.append(torch.bincount(owner, minlength=len(self.x)))
        return self.fn(z)


@pytest.fixture(scope="module")
def linf_run(tiny_cnn, correct_batch):
    """NES L∞ at ε = 0.3 with 2000 queries, through a counting model."""
    x, y = correct_batch
    counter = Counting(lambda z: tiny_cnn(z).softmax(1))
    result = NES()(score_oracle(tiny_cnn, N, 2000, counter), x, y, eps=0.3, seed=0)
    return result, counter


# -- configuration -------------------------------------------------------------


def test_declares_soft_label_fixed_eps():
    assert NES.oracle is ScoreOracle
    assert NES.kind == FIXED_EPS and NES.targeted
    assert NES().label == "nes-linf" and NES(norm="l2").label == "nes-l2"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "l1"},
        {"q": 0},
        {"q": 2.5},
        {"beta": 0.0},
        {"beta": -0.01},
        {"alpha": 0.0},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"patience": 0},
        {"max_iters": 0},
        {"max_values": 0},
    ],
)
def test_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        NES(**kwargs)


def test_requires_a_valid_eps(tiny_cnn, correct_batch):
    x, y = correct_batch
    oracle = score_oracle(tiny_cnn, N, 100)
    with pytest.raises(ValueError):
        NES()(oracle, x, y)
    with pytest.raises(ValueError):
        NES()(oracle, x, y, eps=-0.1)
    assert (oracle.queries() == 0).all()


def test_default_q_beta_rule():
    assert default_q_beta(784) == (14, 0.01)  # MNIST
    q, beta = default_q_beta(3 * 32 * 32)  # CIFAR-10
    assert q == 25 and beta == pytest.approx(0.5 / 3072**0.5)
    assert default_q_beta(3 * 299 * 299) == (25, 0.001)  # the paper's σ, n = 50
    assert default_q_beta(1) == (10, 0.01)
    pairs = [default_q_beta(d) for d in (1, 100, 784, 3072, 50_000, 10**6)]
    assert [q for q, _ in pairs] == sorted(q for q, _ in pairs)
    assert [b for _, b in pairs] == sorted((b for _, b in pairs), reverse=True)
    with pytest.raises(ValueError):
        default_q_beta(0)


# -- budgets and query accounting ----------------------------------------------


@pytest.mark.parametrize("budget", [0, 1, COST - 1, COST, 2 * COST, 150])
def test_never_exceeds_budget(tiny_cnn, correct_batch, budget):
    x, y = correct_batch
    oracle = score_oracle(tiny_cnn, N, budget)
    result = NES()(oracle, x, y, eps=0.1, seed=0)
    assert (result.queries <= budget).all()
    assert torch.equal(result.queries, oracle.queries())
    assert not result.success[result.queries == 0].any()
    # the documented cost: whole iterations of 2q+1, then one evaluation
    whole = budget // COST * COST
    expected = whole + (1 if budget > whole else 0)
    assert (result.queries[~result.success] == expected).all()
    if budget < COST:  # no iteration affordable: the clean image, unmoved
        assert torch.equal(result.x_adv, x)


def test_explicit_q_sets_the_iteration_cost(tiny_cnn, correct_batch):
    x, y = correct_batch[0][:6], correct_batch[1][:6]
    # q = 3: 7 queries an iteration; budget 20 = 2 iterations + 1 evaluation
    result = NES(q=3)(score_oracle(tiny_cnn, 6, 20), x, y, eps=0.01, seed=0)
    assert not result.success.any()
    assert (result.queries == 15).all()


def test_without_budget_stops_at_max_iters(tiny_cnn, correct_batch):
    x, y = correct_batch[0][:4], correct_batch[1][:4]
    oracle = score_oracle(tiny_cnn, 4, None)
    result = NES(max_iters=3)(oracle, x, y, eps=0.01, seed=0)
    assert not result.success.any()
    assert (result.queries == 3 * COST + 1).all()


def test_eps_zero_costs_one_query(tiny_cnn, correct_batch):
    x, y = correct_batch[0][:4], correct_batch[1][:4]
    result = NES()(score_oracle(tiny_cnn, 4, 500), x, y, eps=0.0, seed=0)
    assert torch.equal(result.x_adv, x) and not result.success.any()
    assert (result.queries == 1).all()


@settings(max_examples=6, deadline=None)
@given(
    budget=st.integers(0, 300),
    seed=st.integers(0, 2**16),
    n=st.integers(1, 8),
    norm=st.sampled_from(["linf", "l2"]),
    q=st.sampled_from([None, 1, 4]),
    momentum=st.sampled_from([0.0, 0.9]),
)
def test_budgets_hold_for_random_budgets(tiny_cnn, correct_batch, budget, seed, n, norm, q, momentum):
    x, y = correct_batch[0][:n], correct_batch[1][:n]
    eps = 0.2 if norm == "linf" else 1.5
    oracle = score_oracle(tiny_cnn, n, budget)
    # an over-budget call would raise BudgetExceeded inside the attack
    result = NES(norm=norm, q=q, momentum=momentum)(oracle, x, y, eps=eps, seed=seed)
    assert (result.queries <= budget).all()
    assert torch.equal(result.queries, oracle.queries())
    assert (distortion(result.x_adv - x, norm) <= eps + 1e-5).all()
    assert (predict(tiny_cnn, result.x_adv[result.success]) != y[result.success]).all()


# -- the attack ----------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("linf", 0.3), ("l2", 0.5), ("l2", 2.0)])
def test_stays_in_eps_ball_and_box(tiny_cnn, correct_batch, norm, eps):
    x, y = correct_batch
    result = NES(norm=norm)(score_oracle(tiny_cnn, N, 300), x, y, eps=eps, seed=1)
    assert result.x_adv.shape == x.shape
    assert not torch.equal(result.x_adv, x)  # it moved
    assert (distortion(result.x_adv - x, norm) <= eps + 1e-5).all()
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0


def test_effective_at_eps_03_and_beats_noise(tiny_cnn, correct_batch, linf_run):
    x, y = correct_batch
    result, _ = linf_run
    # Measured: 32/32, about 170 queries a sample; uniform noise: 8/32.
    noise = RandomNoise(norm="linf", draws=100)(
        LabelOracle(lambda z: tiny_cnn(z).argmax(1), N, None), x, y, eps=0.3, seed=0
    )
    assert result.success.float().mean() > 0.9
    assert result.success.float().mean() > noise.success.float().mean() + 0.4
    assert (predict(tiny_cnn, result.x_adv[result.success]) == y[result.success]).sum() == 0
    assert (distortion(result.x_adv - x, "linf") <= 0.3 + 1e-6).all()
    # successful samples stop at once: far below the budget
    assert result.queries[result.success].float().median() < 400


def test_effective_l2(tiny_cnn, correct_batch):
    x, y = correct_batch
    result = NES(norm="l2")(score_oracle(tiny_cnn, N, 2000), x, y, eps=2.0, seed=0)
    # Measured: 21/32 at ε = 2 (white-box PGD: 30/32); uniform noise 1/32.
    assert result.success.float().mean() > 0.5
    assert (predict(tiny_cnn, result.x_adv[result.success]) != y[result.success]).all()
    assert (distortion(result.x_adv - x, "l2") <= 2.0 + 1e-5).all()


def test_batches_all_samples_into_two_calls_per_iteration(linf_run):
    result, counter = linf_run
    assert counter.rows == int(result.queries.sum())
    # two calls per iteration (the check, the probes) and the last check,
    # however many samples are active: no more than one sample's iterations
    assert counter.calls <= 2 * (int(result.queries.max()) // COST) + 1
    assert counter.rows > 10 * counter.calls


def test_calls_hold_at_most_max_values_input_values(tiny_cnn, correct_batch):
    """Probes of three samples' worth of values a call: the probes go in
    groups of three, each sample's queries still counted exactly."""
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    counter = Counting(lambda z: tiny_cnn(z).softmax(1))
    attack = NES(max_values=3 * PROBES * 28 * 28)
    result = attack(score_oracle(tiny_cnn, 8, 5 * COST, counter), x, y, eps=0.05, seed=0)
    assert max(counter.sizes) == 3 * PROBES and counter.rows == int(result.queries.sum())
    assert (result.queries <= 5 * COST).all()


def test_successful_samples_stop_querying(tiny_cnn, correct_batch):
    x, y = correct_batch
    result = NES()(score_oracle(tiny_cnn, N, 300), x, y, eps=0.15, seed=0)
    # 300 = 10 iterations of 29 + 10: a failure spends 290 + 1 final evaluation
    assert result.success.any() and (~result.success).any()
    assert (result.queries[~result.success] == 291).all()
    found_early = result.success & (result.queries < 291)
    assert found_early.any()
    # k steps, then the check that found the (k+1)-th iterate adversarial
    assert (result.queries[found_early] % COST == 1).all()


def test_the_iterate_is_checked_before_it_is_probed(tiny_cnn, correct_batch):
    """Each iteration is a check (one row a sample) then the 2q probes of
    the samples whose iterate is not adversarial: a sample whose k-th
    checked iterate is adversarial (the clean image the first) has spent
    (k-1)·(2q+1) + 1 queries, exactly the rows the model saw of it, and
    pays no probes for it."""
    x, y = correct_batch
    budget = 300
    seen = PerSample(lambda z: tiny_cnn(z).softmax(1), x)
    result = NES()(ScoreOracle(seen, N, budget), x, y, eps=0.2, seed=0)
    rows = torch.stack(seen.per_call)  # (calls, samples)
    assert torch.equal(rows.sum(dim=0), result.queries)
    checks, probes = rows[0::2], rows[1::2]  # the calls alternate
    assert ((checks == 0) | (checks == 1)).all() and ((probes == 0) | (probes == PROBES)).all()
    checked = checks.sum(dim=0)
    probed = (probes > 0).sum(dim=0)
    assert torch.equal(result.queries, checked + PROBES * probed)
    # a success ends on its check: k checks, k - 1 probe rounds
    assert result.success.any() and (result.queries[result.success] > COST).any()
    assert torch.equal(probed[result.success], checked[result.success] - 1)
    assert torch.equal(result.queries[result.success], (checked[result.success] - 1) * COST + 1)
    # a failure checks each step while it has a query left: 10 rounds, 1 check
    assert (~result.success).any()
    assert (result.queries[~result.success] == 10 * COST + 1).all()
    assert (predict(tiny_cnn, result.x_adv[result.success]) != y[result.success]).all()


def test_targeted(tiny_cnn, correct_batch):
    x, y = correct_batch
    target = (y + 1) % 10
    oracle = score_oracle(tiny_cnn, N, 2000)
    result = NES()(oracle, x, y, eps=0.3, seed=0, target=target)
    # Measured: 17/32 reach the next class (untargeted: 32/32).
    assert result.success.float().mean() > 0.4
    assert (predict(tiny_cnn, result.x_adv[result.success]) == target[result.success]).all()
    with pytest.raises(ValueError):
        NES()(score_oracle(tiny_cnn, N, 100), x, y, eps=0.3, target=y.clone())


def test_is_deterministic(tiny_cnn, correct_batch):
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    runs = [NES()(score_oracle(tiny_cnn, 8, 120), x, y, eps=0.1, seed=s) for s in (3, 3, 4)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].queries, runs[1].queries)
    assert torch.equal(runs[0].success, runs[1].success)
    assert not torch.equal(runs[0].x_adv, runs[2].x_adv)
