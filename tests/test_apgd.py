"""APGD and APGD-T (Croce and Hein, ICML 2020): contract, budget and strength."""

from __future__ import annotations


import pytest
import torch

from auditor.attacks.base import distortion, labels_of
from auditor.attacks.whitebox.apgd import APGD, checkpoints, dlr
from auditor.attacks.whitebox.apgd_t import APGDTargeted, reach_dlr, targeted_dlr
from auditor.attacks.whitebox.pgd import PGD
from auditor.oracles import GradientOracle


@pytest.fixture(scope="module")
def clean(tiny_cnn, mnist_test):
    """64 test images that the tiny CNN classifies correctly."""
    x, y = mnist_test.x[:100], mnist_test.y[:100]
    correct = tiny_cnn(x).argmax(1) == y
    return x[correct][:64], y[correct][:64]


def run(attack, model, x, y, eps, seed=0, budget=None):
    oracle = GradientOracle(model, len(y), budget=budget)
    return attack(oracle, x, y, eps=eps, seed=seed), oracle


ATTACKS = [
    (APGD(norm="linf", loss="ce", steps=20), 0.1),
    (APGD(norm="l2", loss="dlr", steps=20), 1.5),
    (APGDTargeted(norm="linf", steps=10, n_target_classes=3), 0.1),
    (APGDTargeted(norm="l2", steps=10, n_target_classes=3), 1.5),
]


@pytest.mark.parametrize("attack,eps", ATTACKS, ids=lambda a: getattr(a, "label", None))
def test_success_is_real_and_in_the_ball(tiny_cnn, clean, attack, eps):
    x, y = clean
    result, _ = run(attack, tiny_cnn, x, y, eps)
    fooled = tiny_cnn(result.x_adv).argmax(1) != y
    assert torch.equal(fooled, result.success)
    assert result.success.float().mean() > 0.5
    assert distortion(result.x_adv - x, attack.norm).max() <= eps + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert torch.equal(result.x_adv[~result.success], x[~result.success])


@pytest.mark.parametrize("attack,eps", ATTACKS, ids=lambda a: getattr(a, "label", None))
def test_deterministic_under_the_seed(tiny_cnn, clean, attack, eps):
    x, y = clean
    first, _ = run(attack, tiny_cnn, x, y, eps, seed=5)
    second, _ = run(attack, tiny_cnn, x, y, eps, seed=5)
    assert torch.equal(first.x_adv, second.x_adv)
    assert torch.equal(first.success, second.success)
    assert torch.equal(first.queries, second.queries)


@pytest.mark.parametrize("norm,eps", [("linf", 0.06), ("l2", 1.0)])
def test_restarts_extend_the_single_run(tiny_cnn, clean, norm, eps):
    x, y = clean
    once, _ = run(APGD(norm=norm, steps=10), tiny_cnn, x, y, eps, seed=2)
    twice, _ = run(APGD(norm=norm, steps=10, restarts=2), tiny_cnn, x, y, eps, seed=2)
    assert not once.success.all()
    assert torch.equal(twice.success & once.success, once.success)
    assert torch.equal(twice.x_adv[once.success], once.x_adv[once.success])


@pytest.mark.parametrize("seed", [0, 1])
def test_apgd_ce_breaks_at_least_as_much_as_pgd(tiny_cnn, clean, seed):
    x, y = clean
    apgd, _ = run(APGD(norm="linf", loss="ce", steps=20), tiny_cnn, x, y, 0.1, seed=seed)
    pgd, _ = run(PGD(norm="linf", steps=20), tiny_cnn, x, y, 0.1, seed=seed)
    assert apgd.success.sum() >= pgd.success.sum()


def test_query_accounting_is_exact(tiny_cnn, clean):
    x, y = clean
    eps = 1e-6  # nothing breaks: every sample pays its full bound
    steps, restarts = 7, 2
    result, oracle = run(APGD(steps=steps, restarts=restarts), tiny_cnn, x, y, eps)
    assert not result.success.any()
    assert torch.equal(oracle.queries(), torch.full((len(y),), restarts * (steps + 1)))
    targets = 3
    attack = APGDTargeted(steps=steps, restarts=restarts, n_target_classes=targets)
    result, oracle = run(attack, tiny_cnn, x, y, eps)
    assert not result.success.any()
    bound = 1 + targets * restarts * (steps + 1)
    assert torch.equal(oracle.queries(), torch.full((len(y),), bound))


def test_eot_on_a_deterministic_model_breaks_the_same_samples_and_runs_every_step(tiny_cnn, clean):
    """The mean of identical passes is the pass, so the same samples break; with EOT no sample
    leaves early (its example is its last fooled iterate, as in AutoAttack), and every step's
    passes are queries: (steps + 1) · eot a sample."""
    x, y = clean
    steps = 7
    plain, _ = run(APGD(steps=steps), tiny_cnn, x, y, 0.1)
    eot, oracle = run(APGD(steps=steps, eot=3), tiny_cnn, x, y, 0.1)
    assert torch.equal(plain.success, eot.success) and plain.success.any() and not plain.success.all()
    assert torch.equal(oracle.queries(), torch.full((len(y),), 3 * (steps + 1)))
    fooled = tiny_cnn(eot.x_adv[eot.success]).argmax(1) != y[eot.success]
    assert fooled.all() and (eot.x_adv - x).abs().amax() <= 0.1 + 1e-6
    targeted, oracle = run(APGDTargeted(steps=steps, n_target_classes=2, eot=3), tiny_cnn, x, y, 0.1)
    assert oracle.queries().max() <= 3 * (1 + 2 * (steps + 1)) and targeted.success.any()


def test_fooled_samples_stop_early(tiny_cnn, clean):
    x, y = clean
    steps = 20
    result, _ = run(APGD(steps=steps, restarts=2), tiny_cnn, x, y, 0.1)
    assert result.queries.max() <= 2 * (steps + 1)
    assert (result.queries[result.success] <= 2 * (steps + 1)).all()
    assert result.queries[result.success].float().mean() < steps + 1
    assert (result.queries[~result.success] == 2 * (steps + 1)).all()


def test_budget_is_never_exceeded(tiny_cnn, clean):
    x, y = clean
    result, oracle = run(APGD(steps=20), tiny_cnn, x, y, 0.1, budget=20)
    assert oracle.queries().sum() == 0 and not result.success.any()
    result, oracle = run(APGDTargeted(steps=10, n_target_classes=2), tiny_cnn, x, y, 0.1, budget=12)
    assert oracle.queries().max() <= 12 and result.success.any()


def test_targeted_counts_clean_mistakes(tiny_cnn, mnist_test):
    x, y = mnist_test.x[:200], mnist_test.y[:200]
    wrong = tiny_cnn(x).argmax(1) != y
    assert wrong.any()
    result, oracle = run(APGDTargeted(steps=5, n_target_classes=2), tiny_cnn, x, y, 1e-6)
    assert torch.equal(result.success, wrong)
    assert torch.equal(result.x_adv[wrong], x[wrong])
    assert (oracle.queries()[wrong] == 1).all()


def test_labels_and_validation():
    assert APGD().label == "apgd-ce-linf"
    assert APGD(norm="l2", loss="dlr").label == "apgd-dlr-l2"
    assert APGDTargeted().label == "apgd-t-linf"
    assert APGDTargeted(norm="l2").label == "apgd-t-l2"
    assert (APGD().steps, APGD().restarts, APGD().rho, APGD().momentum) == (100, 1, 0.75, 0.75)
    assert APGDTargeted().n_target_classes == 9
    for bad in ({"norm": "l1"}, {"loss": "cw"}, {"steps": 0}, {"restarts": 0}, {"rho": 0.0}, {"eot": 0}):
        with pytest.raises(ValueError):
            APGD(**bad)
    with pytest.raises(ValueError):
        APGDTargeted(n_target_classes=0)
    with pytest.raises(ValueError):
        APGD()(GradientOracle(lambda z: z.flatten(1), 1), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))


def test_checkpoints_follow_the_paper():
    assert sorted(checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert sorted(checkpoints(20)) == [5, 9, 12, 14, 16, 18, 19]
    assert checkpoints(1) == frozenset()


def test_dlr_losses():
    logits = torch.tensor([[4.0, 1.0, 2.0, 0.0], [0.0, 3.0, 1.0, 2.0]])
    y = torch.tensor([0, 2])
    # row 0: -(4 - 2) / (4 - 1); row 1: -(1 - 3) / (3 - 1)
    assert torch.allclose(dlr(logits, y), torch.tensor([-2 / 3, 1.0]))
    labels = torch.tensor([[0, 3], [2, 3]])
    # row 0: -(4 - 0) / (4 - (1 + 0) / 2); row 1: -(1 - 2) / (3 - (1 + 0) / 2)
    assert torch.allclose(targeted_dlr(logits, labels), torch.tensor([-4 / 3.5, 1 / 2.5]))


def test_targeted_audit_loss_is_positive_exactly_when_the_target_is_on_top():
    """A targeted audit succeeds when t is the top class: its loss must see
    every class above t. Eq. 5 compares t with y only, so it rewards a
    point where a third class still beats t."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=gen) * 3
    y = torch.randint(0, 10, (2000,), generator=gen)
    t = (y + torch.randint(1, 10, (2000,), generator=gen)) % 10
    labels = torch.stack([y, t], dim=1)
    on_top = logits.argmax(1) == t
    assert torch.equal(reach_dlr(logits, labels) > 0, on_top)
    third_above = (targeted_dlr(logits, labels) > 0) & ~on_top
    assert third_above.any()


def test_below_four_classes_the_targeted_losses_are_the_margin():
    """Eq. 5's scale needs z_π3 and z_π4: with 2 or 3 classes APGD-T
    maximises its numerator alone, and still runs (``min_classes`` 2)."""
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 5.0]])
    labels = torch.tensor([[2, 1], [2, 0]])
    assert torch.equal(targeted_dlr(logits, labels), torch.tensor([-1.0, -5.0]))  # -(z_y - z_t)
    assert torch.equal(reach_dlr(logits, labels), torch.tensor([-2.0, -5.0]))  # z_t - max_{i≠t} z_i
    assert APGDTargeted().min_classes == 2


@pytest.mark.parametrize("classes", [2, 3])
def test_below_four_classes_the_audit_loss_is_positive_exactly_when_the_target_is_on_top(classes):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, classes, generator=gen) * 3
    y = torch.randint(0, classes, (2000,), generator=gen)
    t = (y + torch.randint(1, classes, (2000,), generator=gen)) % classes
    labels = torch.stack([y, t], dim=1)
    assert torch.equal(reach_dlr(logits, labels) > 0, logits.argmax(1) == t)
    if classes == 2:  # the one other class: both modes maximise z_t - z_y
        assert torch.equal(reach_dlr(logits, labels), targeted_dlr(logits, labels))


def test_apgds_vote_names_no_class_for_a_nan_row_as_verification_does():
    """It took a NaN row's argmax (the NaN's index) as its class, where verification gives -1."""
    from auditor.attacks.whitebox.apgd import voted
    from auditor.verify import voted_labels

    passes = [torch.tensor([[0.0, float("nan"), 0.0], [0.0, 1.0, 0.0]])] * 3
    calls = iter(passes)
    assert voted(passes).tolist() == [-1, 1]
    assert voted_labels(lambda x: labels_of(next(calls)), torch.zeros(2, 1, 1, 1), 3).tolist() == [-1, 1]
    assert voted(passes[:1]).tolist() == [-1, 1]
