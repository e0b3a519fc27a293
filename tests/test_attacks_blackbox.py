"""Black-box attacks: Square Attack (soft-label) and Sign-OPT (hard-label).

Sign-OPT returns points within a hair of the decision boundary, where a
float32 model's label can flip with the batch it is evaluated in; its tests
use a float64 copy of the tiny CNN so that re-checking an example is exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from auditor.access import Access
from auditor.attacks import CATALOGUE
from auditor.attacks.base import distortion
from auditor.attacks.hardlabel.sign_opt import SignOPT
from auditor.attacks.softlabel.square import SquareAttack, p_selection
from auditor.oracles import BudgetExceeded, LabelOracle, ScoreOracle

from helpers import Counting, label_oracle, predict, score_oracle


@pytest.fixture(scope="module")
def model64(tiny_cnn):
    return copy.deepcopy(tiny_cnn).double()


@pytest.fixture(scope="module")
def sign_opt_runs(model64, correct_batch):
    """Sign-OPT at three budgets on the same batch (shared by several tests)."""
    x, y = correct_batch
    runs = {}
    for budget in (500, 2000, 4000):
        counter = Counting(lambda z: model64(z.double()).argmax(1))
        oracle = label_oracle(model64, len(y), budget, counter)
        runs[budget] = (SignOPT()(oracle, x, y, seed=0), counter)
    return runs


# -- configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"norm": "l1"}, {"p_init": 0.0}, {"p_init": 1.5}, {"loss": "hinge"}, {"n_iters": 0}, {"hits_per_step": 0.0},
     {"hits_per_step": 1.5}, {"max_proposals": 0}, {"schedule_queries": 0}],
)
def test_square_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        SquareAttack(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"norm": "l1"}, {"k": 0}, {"n_init": 0}, {"alpha": 0.0}, {"beta": -1.0}, {"tol": 0.0},
     {"k": True}, {"k": 2.5}],
)
def test_sign_opt_rejects_bad_config(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SignOPT(**kwargs)


def test_square_requires_eps(tiny_cnn, correct_batch):
    x, y = correct_batch
    with pytest.raises(ValueError):
        SquareAttack()(score_oracle(tiny_cnn, len(y), 10), x, y)


def test_p_schedule_follows_reference():
    assert p_selection(0.8, 0, 10000) == 0.8
    assert p_selection(0.8, 10, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 9000, 10000) == 0.8 / 512
    # rescaled to the budget: iteration 100 of 1000 is iteration 1000 of 10000
    assert p_selection(0.8, 100, 1000) == 0.8 / 16


def _changes(attack: SquareAttack) -> list[torch.Tensor]:
    """Square on one grey digit, budget 100, under a model whose scores never
    change, so that every proposal is a change of the initial point inside
    its windows: per oracle call after the first, the pixels each of its
    proposals changes, (proposals, 28, 28)."""
    x, y = torch.full((1, 1, 28, 28), 0.5), torch.tensor([3])
    calls = []

    def constant(batch):
        calls.append(batch.clone())
        return torch.full((len(batch), 10), 0.1)

    attack(ScoreOracle(constant, 1, 100), x, y, eps=0.1 if attack.norm == "linf" else 1.0, seed=0)
    # (L2's rescale to ‖δ‖₂ = ε may move every other pixel by a rounding error)
    return [((call - calls[0][0]).abs() > 1e-5)[:, 0] for call in calls[1:]]


def _window_sides(attack: SquareAttack) -> list[int]:
    """Rows each proposal of the last call changes: for L∞ its window's side,
    for L2 those of W1 and W2."""
    return _changes(attack)[-1].any(dim=2).sum(dim=1).tolist()


def test_square_schedule_stretches_to_the_budget_for_linf_only():
    # at queries 50-99 of 100 the 10,000-query schedule is at p_init / 4
    # (side 13 of 28); stretched to the budget it is at p_init / 128 or less
    # (side 2; L2 windows are at least 3 wide, and W2 zeroed adds up to 3 rows)
    assert max(_window_sides(SquareAttack(norm="linf"))) <= 3
    assert min(_window_sides(SquareAttack(norm="linf", schedule_queries=10000))) >= 12
    assert min(_window_sides(SquareAttack(norm="l2"))) >= 12
    assert max(_window_sides(SquareAttack(norm="l2", schedule_queries=1))) <= 6


def test_square_records_the_schedule_it_ran():
    assert SquareAttack(norm="l2").as_run(10, False).schedule_queries == 10000
    assert SquareAttack(norm="linf").as_run(10, False).schedule_queries == 1
    assert SquareAttack(norm="l2", schedule_queries=50).as_run(10, True).schedule_queries == 50


@pytest.mark.parametrize("h,w", [(5, 9), (9, 5), (4, 4)])
def test_square_corners_cover_each_axis_of_non_square_images(h, w):
    from auditor.attacks.softlabel.square import _corners

    gen = torch.Generator().manual_seed(0)
    for s in range(1, min(h, w) + 1):
        rows, columns = _corners((2000,), h, w, s, gen, "cpu").unbind(-1)
        assert set(rows.tolist()) == set(range(max(h - s, 1)))
        assert set(columns.tolist()) == set(range(max(w - s, 1)))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_square_runs_on_non_square_images(norm, eps):
    x = torch.rand((3, 3, 7, 4), generator=torch.Generator().manual_seed(0))
    weights = torch.randn((3 * 7 * 4, 10), generator=torch.Generator().manual_seed(1))

    def model(z):
        return (z.flatten(1) @ weights).softmax(1)

    y = model(x).argmax(1)
    oracle = ScoreOracle(model, 3, 300)
    result = SquareAttack(norm=norm)(oracle, x, y, eps=eps, seed=0)
    assert (result.queries <= 300).all() and (result.queries > 1).any()
    assert (distortion(result.x_adv - x, norm) <= eps + 1e-5).all()
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_windows_leave_the_last_row_and_column_as_the_reference_does(norm):
    changed = torch.cat(_changes(SquareAttack(norm=norm)))
    assert len(changed) == 99 and changed.flatten(1).any(dim=1).all()
    assert not changed[:, -1, :].any() and not changed[:, :, -1].any()
    # the row and column before them are reached
    assert changed[:, -2, :].any() and changed[:, :, -2].any()


# -- budgets -------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 1, 2, 7, 150])
def test_square_never_exceeds_budget(tiny_cnn, correct_batch, budget):
    x, y = correct_batch
    oracle = score_oracle(tiny_cnn, len(y), budget)
    result = SquareAttack()(oracle, x, y, eps=0.05, seed=0)
    assert (result.queries <= budget).all()
    assert torch.equal(result.queries, oracle.queries())
    assert not result.success[result.queries == 0].any()


@pytest.mark.parametrize("budget", [0, 1, 2, 7, 150, 260])
def test_sign_opt_never_exceeds_budget(model64, correct_batch, budget):
    x, y = correct_batch
    oracle = label_oracle(model64, len(y), budget)
    result = SignOPT()(oracle, x, y, seed=0)
    assert (result.queries <= budget).all()
    assert torch.equal(result.queries, oracle.queries())
    assert (predict(model64, result.x_adv[result.success]) != y[result.success]).all()
    assert torch.equal(result.x_adv[~result.success], x[~result.success])


@settings(max_examples=6, deadline=None)
@given(budget=st.integers(0, 400), seed=st.integers(0, 2**16), n=st.integers(1, 8))
def test_budgets_hold_for_random_budgets(tiny_cnn, model64, correct_batch, budget, seed, n):
    x, y = correct_batch[0][:n], correct_batch[1][:n]
    # an over-budget call would raise BudgetExceeded inside the attack
    square = SquareAttack()(score_oracle(tiny_cnn, n, budget), x, y, eps=0.1, seed=seed)
    sign_opt = SignOPT(k=20, n_init=10)(label_oracle(model64, n, budget), x, y, seed=seed)
    assert (square.queries <= budget).all() and (sign_opt.queries <= budget).all()


def test_oracle_budget_is_a_real_guard(tiny_cnn, correct_batch):
    x, y = correct_batch
    oracle = score_oracle(tiny_cnn, len(y), 1)
    oracle.probs(x)
    with pytest.raises(BudgetExceeded):
        oracle.probs(x[:1], idx=torch.tensor([0]))


# -- Square Attack -------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_square_stays_in_eps_ball_and_box(tiny_cnn, correct_batch, eps):
    x, y = correct_batch
    result = SquareAttack()(score_oracle(tiny_cnn, len(y), 200), x, y, eps=eps, seed=1)
    assert result.x_adv.shape == x.shape
    assert (result.x_adv - x).abs().max() <= eps + 1e-6
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0


def test_square_succeeds_at_eps_03(tiny_cnn, correct_batch):
    x, y = correct_batch
    counter = Counting(lambda z: tiny_cnn(z).softmax(1))
    result = SquareAttack()(score_oracle(tiny_cnn, len(y), 1000, counter), x, y, eps=0.3, seed=0)
    assert result.success.float().mean() > 0.8
    assert (predict(tiny_cnn, result.x_adv[result.success]) != y[result.success]).all()
    # successful samples stop at once: far fewer queries than the budget
    assert result.queries[result.success].float().median() < 100
    # batched: one oracle call per iteration for all samples
    assert counter.calls <= 1000
    assert counter.rows == int(result.queries.sum()) > counter.calls


def test_square_successful_samples_stop_querying(tiny_cnn, correct_batch):
    x, y = correct_batch
    oracle = score_oracle(tiny_cnn, len(y), 300)
    result = SquareAttack()(oracle, x, y, eps=0.2, seed=0)
    assert result.success.any() and (result.queries[result.success] < 300).all()
    assert (result.queries[~result.success] == 300).all()


def test_square_is_deterministic(tiny_cnn, correct_batch):
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    runs = [
        SquareAttack()(score_oracle(tiny_cnn, 8, 60), x, y, eps=0.1, seed=seed) for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].queries, runs[1].queries)
    assert not torch.equal(runs[0].x_adv, runs[2].x_adv)


# -- Sign-OPT ------------------------------------------------------------------


def test_sign_opt_examples_are_adversarial(model64, correct_batch, sign_opt_runs):
    x, y = correct_batch
    for result, _ in sign_opt_runs.values():
        ok = result.success
        assert (predict(model64, result.x_adv[ok]) != y[ok]).all()
        assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
        assert torch.equal(result.x_adv[~ok], x[~ok])


def test_sign_opt_quality_at_2000_queries(correct_batch, sign_opt_runs):
    x, _ = correct_batch
    result, _ = sign_opt_runs[2000]
    # Measured: 30/32 found (the misses are 3s, which clipped Gaussian noise
    # never leaves), median L2 about 1.7.
    assert result.success.float().mean() > 0.9
    l2 = distortion(result.x_adv - x, "l2")[result.success]
    assert l2.median() < 2.2


def test_sign_opt_distortion_shrinks_with_budget(correct_batch, sign_opt_runs):
    x, _ = correct_batch
    medians = {}
    for budget, (result, _) in sign_opt_runs.items():
        medians[budget] = distortion(result.x_adv - x, "l2")[result.success].median()
    assert medians[4000] <= medians[2000] < medians[500]
    assert medians[4000] < 0.6 * medians[500]


def test_sign_opt_trace(correct_batch, sign_opt_runs):
    x, _ = correct_batch
    result, _ = sign_opt_runs[2000]
    spent = torch.stack([queries for queries, _ in result.trace])
    assert (spent[1:] >= spent[:-1]).all() and (spent[-1] <= 2000).all()
    assert len(result.trace) > 2
    last = result.trace[-1][1]
    assert torch.isinf(last[~result.success]).all()
    expected = distortion(result.x_adv - x, "l2")[result.success]
    assert torch.allclose(last[result.success], expected, atol=1e-5)
    # no sample's best distortion ever goes up from one entry to the next
    sizes = torch.stack([d for _, d in result.trace])
    assert (sizes[1:] <= sizes[:-1]).all()


def test_sign_opt_batches_rows_across_samples(sign_opt_runs):
    result, counter = sign_opt_runs[2000]
    assert counter.rows == int(result.queries.sum())
    # a loop over samples would make at least one call per sample per query
    # round; gathering rows across samples makes each call carry many
    assert counter.calls * 10 < counter.rows
    assert counter.calls < 2500  # a loop over the 32 samples would make 64,000


def test_sign_opt_misclassified_input_costs_one_query(model64, correct_batch):
    x, y = correct_batch[0][:4], correct_batch[1][:4]
    wrong = (y + 1) % 10
    oracle = label_oracle(model64, 4, 50)
    result = SignOPT()(oracle, x, wrong, seed=0)
    assert result.success.all()
    assert torch.equal(result.x_adv, x)
    assert (result.queries == 1).all()


def test_sign_opt_is_deterministic(model64, correct_batch):
    x, y = correct_batch[0][:8], correct_batch[1][:8]
    runs = [
        SignOPT(k=50)(label_oracle(model64, 8, 400), x, y, seed=seed) for seed in (5, 5, 6)
    ]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert torch.equal(runs[0].queries, runs[1].queries)
    assert not torch.equal(runs[0].x_adv, runs[2].x_adv)


def test_sign_opt_ignores_eps(model64, correct_batch):
    x, y = correct_batch[0][:4], correct_batch[1][:4]
    a = SignOPT(k=20)(label_oracle(model64, 4, 300), x, y, seed=0)
    b = SignOPT(k=20)(label_oracle(model64, 4, 300), x, y, eps=100.0, seed=0)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)


# -- every query is an image -------------------------------------------------


class _Range:
    """A model function that keeps the smallest and largest value it was sent."""

    def __init__(self, fn):
        self.fn, self.low, self.high = fn, float("inf"), float("-inf")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.low, self.high = min(self.low, float(z.min())), max(self.high, float(z.max()))
        return self.fn(z)


@pytest.mark.parametrize(
    "attack", [a for a in CATALOGUE if a.access in (Access.SOFT_LABEL, Access.HARD_LABEL)], ids=lambda a: a.label
)
def test_black_box_queries_are_images_in_the_unit_box(tiny_cnn, correct_batch, attack):
    """An attacker can send only images: every probe, line search and
    initialisation query lies in [0,1] (NES's probes once did not)."""
    x, y = correct_batch[0][:6], correct_batch[1][:6]
    soft = attack.access == Access.SOFT_LABEL
    seen = _Range(lambda z: tiny_cnn(z).softmax(1) if soft else tiny_cnn(z).argmax(1))
    oracle = (ScoreOracle if soft else LabelOracle)(seen, 6, 300)
    attack(oracle, x, y, eps=0.3 if attack.norm == "linf" else 2.0, seed=0)
    assert 0.0 <= seen.low and seen.high <= 1.0
