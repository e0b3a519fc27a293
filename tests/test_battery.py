"""The battery never trusts an attack: it clips, re-verifies and keeps the minimum."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from helpers import ball_battery

from auditor.access import Access
from auditor.attacks.base import FIXED_EPS, MIN_NORM, Attack, AttackResult
from auditor.battery import Battery, run_battery
from auditor.models.pytorch import TorchModel
from auditor.models.base import ModelInfo
from auditor.oracles import LabelOracle


@dataclass(frozen=True)
class Liar(Attack):
    """Claims success everywhere, returning noise the harness must reject."""

    name = "liar"
    oracle = LabelOracle
    kind = FIXED_EPS
    norms = ("linf",)
    paper = "none"
    norm: str = "linf"
    overshoot: float = 0.0

    def __call__(self, oracle, x, y, *, eps=None, seed=0, target=None):
        x_adv = x + (eps + self.overshoot)  # unclipped, possibly outside the ball
        return AttackResult(x_adv=x_adv, success=torch.ones(len(x), dtype=torch.bool), queries=oracle.queries())


@dataclass(frozen=True)
class Recorder(Attack):
    """Records which samples it is shown; finds nothing."""

    name = "recorder"
    oracle = LabelOracle
    kind = MIN_NORM
    norms = ("l2",)
    paper = "none"
    norm: str = "l2"
    seen: list = None

    def __call__(self, oracle, x, y, *, eps=None, seed=0, target=None):
        self.seen.append(oracle.n)
        oracle.labels(x)
        return AttackResult(x_adv=x, success=torch.zeros(len(x), dtype=torch.bool), queries=oracle.queries())


def _model(module):
    return TorchModel(module, ModelInfo("tiny", "state-dict", "0", (1, 28, 28), 10), device="cpu")


def test_claims_that_fail_verification_do_not_count(tiny_cnn, mnist_test):
    x, y = mnist_test.x[:40], mnist_test.y[:40]
    model = _model(tiny_cnn)
    battery = Battery(Access.HARD_LABEL, "linf", (Liar(),))
    outcome = run_battery(battery, model, x, y, eps_list=[0.05], budget=10, seed=0)
    clean_wrong = outcome.clean_pred != y
    broken = torch.isfinite(outcome.records.distortion)
    # a uniform shift by eps fools the model on a few samples at most; those are
    # real (verified) adversarial examples, all the other claims were rejected
    fooled = tiny_cnn((x + 0.05).clamp(0, 1)).argmax(1) != y
    assert torch.equal(broken, clean_wrong | fooled)


def test_examples_outside_the_ball_do_not_count(tiny_cnn, mnist_test):
    x, y = mnist_test.x[:40], mnist_test.y[:40]
    battery = Battery(Access.HARD_LABEL, "linf", (Liar(overshoot=0.5),))
    outcome = run_battery(battery, _model(tiny_cnn), x, y, eps_list=[0.05], budget=10, seed=0)
    assert torch.equal(torch.isfinite(outcome.records.distortion), outcome.clean_pred != y)


def test_cascade_shows_each_attack_only_the_still_robust(tiny_cnn, mnist_test):
    from auditor.attacks.whitebox.pgd import PGD

    x, y = mnist_test.x[:40], mnist_test.y[:40]
    seen = []
    battery = Battery(Access.WHITE_BOX, "linf", (PGD(steps=10), Recorder(seen=seen)))
    outcome = run_battery(battery, _model(tiny_cnn), x, y, eps_list=[0.03, 0.06], budget=5, seed=0)
    # a minimum-norm attack sees the samples still robust at the smallest ε
    still_robust = int(outcome.records.robust_at(0.03).sum())
    assert 0 < int(outcome.records.robust_at(0.06).sum()) < still_robust
    assert seen == [still_robust]
    pgd = outcome.attacks[0]
    assert [run.eps for run in pgd.runs] == [0.06, 0.03]  # largest first
    # samples misclassified when clean are never attacked
    assert pgd.runs[0].samples == int((outcome.clean_pred == y).sum())
    assert pgd.robust_accuracy[0.03] >= pgd.robust_accuracy[0.06]
    # the per-attack counts agree with the per-sample records
    by_pgd = int((outcome.records.broken_by == "pgd-linf").sum())
    assert pgd.broken == by_pgd == pgd.runs[0].broken + pgd.non_monotone
    assert len(pgd.queries_to_success) == pgd.broken and max(pgd.queries_to_success) <= 11
    distortion = outcome.records.distortion
    assert ((distortion == 0) == (outcome.clean_pred != y)).all()
    assert (distortion[torch.isfinite(distortion)] <= 0.06 + 1e-6).all()


def test_runs_record_per_sample_queries_and_success_curves(tiny_cnn, mnist_test):
    from auditor.attacks.softlabel.square import SquareAttack
    from auditor.results import attack_entry

    x, y = mnist_test.x[:30], mnist_test.y[:30]
    battery = Battery(Access.SOFT_LABEL, "linf", (SquareAttack(),))
    outcome = run_battery(battery, _model(tiny_cnn), x, y, eps_list=[0.1, 0.2], budget=300, seed=0)
    (square,) = outcome.attacks
    first = square.runs[0]
    assert first.eps == 0.2 and len(first.positions) == len(first.queries) == len(first.success) == first.samples
    assert sum(first.queries) == first.queries_total and max(first.queries) <= 300
    assert sum(first.success) == first.broken
    # broken samples stopped at their success; the others spent the whole budget
    assert all(q == 300 for q, ok in zip(first.queries, first.success) if not ok)

    indices = list(range(1000, 1030))
    entry = attack_entry(square, indices)
    run = entry["runs"][0]
    assert run["per_sample"]["index"] == [1000 + p for p in first.positions]
    curve = run["success_curve"]
    assert curve["queries"][-1] == 300 and curve["queries"] == sorted(curve["queries"])
    assert curve["success_rate"] == sorted(curve["success_rate"])  # a CDF never falls
    assert curve["success_rate"][-1] == round(first.broken / first.samples, 6)
    broken_queries = [q for q, ok in zip(first.queries, first.success) if ok]
    assert run["queries_to_success"]["median"] == float(np.median(broken_queries))
    # summary figures are rounded to 3 decimals, not printed as 442.20000000000005
    assert run["queries_to_success"]["p90"] == round(float(np.percentile(broken_queries, 90)), 3)


def test_query_summaries_are_rounded():
    from auditor.results import _stats

    summary = _stats([1, 2, 3, 4, 5, 6, 7, 8, 9, 12], budget=20, total=57, measure="to-success")
    assert summary["p90"] == 9.3  # numpy gives 9.299999999999999
    assert (summary["mean"], summary["median"], summary["max"]) == (5.7, 5.5, 12)


def test_success_curve_counts_samples_broken_within_each_checkpoint():
    from auditor.results import success_curve

    curve = success_curve([1, 5, 5, 40, 100], [True, True, False, True, False], budget=100)
    assert curve["queries"] == [1, 2, 5, 10, 20, 50, 100]
    assert curve["success_rate"] == [0.2, 0.2, 0.4, 0.4, 0.4, 0.6, 0.6]


def test_distortion_checkpoints_read_the_trace_at_each_query_count():
    from auditor.battery import distortion_at
    from auditor.results import distortion_checkpoints

    inf = float("inf")
    trace = [(150, torch.tensor([inf, 4.0, 6.0])), (450, torch.tensor([3.0, 2.0, 5.0])),
             (1200, torch.tensor([1.0, 2.0, 4.0]))]
    points = distortion_at(trace, torch.tensor([1300, 1250, 1300]))
    # 100 precedes the first entry; 1300 (the most spent) closes the list
    assert [q for q, _ in points] == [200, 500, 1000, 1300]
    assert points[0][1] == (inf, 4.0, 6.0) and points[2][1] == (3.0, 2.0, 5.0)
    summary = distortion_checkpoints(points)
    assert summary == {"queries": [200, 500, 1000, 1300], "median": [6.0, 3.0, 3.0, 2.0],
                       "mean_found": [5.0, 3.333333, 3.333333, 2.333333], "found": [2, 3, 3, 3],
                       "per_sample": [[None, 3.0, 3.0, 1.0], [4.0, 2.0, 2.0, 2.0], [6.0, 5.0, 5.0, 4.0]]}
    assert distortion_checkpoints(distortion_at(trace[:1], torch.tensor([150, 150, 150])))["median"] == [6.0]
    # with a budget the list closes at it: no sample spent more, so those are the final distortions
    budgeted = distortion_at(trace, torch.tensor([1300, 1250, 1300]), budget=1500)
    assert [q for q, _ in budgeted] == [200, 500, 1000, 1500] and budgeted[-1][1] == points[-1][1]
    assert distortion_checkpoints([(500, (inf, inf, 2.0))])["median"] == [None]  # most not found yet
    # per-sample query counts: each sample reads its own last entry
    per_sample = [(torch.tensor([100, 300, 150]), torch.tensor([5.0, 4.0, 6.0])),
                  (torch.tensor([600, 400, 900]), torch.tensor([1.0, 3.0, 2.0]))]
    points = distortion_at(per_sample, torch.tensor([600, 400, 900]))
    assert points[0] == (100, (5.0, inf, inf)) and points[1] == (200, (5.0, inf, 6.0))
    assert points[2] == (500, (5.0, 3.0, 6.0)) and points[3] == (900, (1.0, 3.0, 2.0))


def test_untargeted_hard_label_runs_take_starts_from_the_data():
    _, _, without = ball_battery(starts=False)
    assert not torch.isfinite(without.records.distortion).any()

    ball, x, outcome = ball_battery(starts=True)
    closest = (x - ball.centre).flatten(1).norm(dim=1) - ball.radius
    assert (outcome.records.distortion <= closest + 0.1).all()
    (run,) = outcome.attacks[0].runs
    assert set(run.start_index) <= {105, 106, 107}


def test_l2_examples_on_the_sphere_count_on_large_inputs():
    """A float32 projection onto an L2 sphere of radius 3 in 3 × 224 × 224
    lands a few 1e-6 outside it (its norm is summed in float32); those
    examples are inside the ball and must count."""
    from auditor.attacks.whitebox.fgsm import FGSM
    from auditor.verify import eps_bound

    shape, eps, n = (3, 224, 224), 3.0, 16
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    w /= w.norm()
    # two classes split by the hyperplane w·(x - 0.5) = 0; every clean image
    # sits at distance ε/2 on the class-0 side, so the L2 step of size ε
    # along -w crosses it
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(w.numel(), 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.stack([w.flatten(), -w.flatten()]))
        net[1].bias.copy_(torch.stack([-(w * 0.5).sum(), (w * 0.5).sum()]))
    x = 0.5 + 0.05 * (torch.rand(n, *shape, generator=gen) * 2 - 1)
    x = x - ((x - 0.5).flatten(1) @ w.flatten()).view(-1, 1, 1, 1) * w + eps / 2 * w
    y = torch.zeros(n, dtype=torch.long)
    model = TorchModel(net.eval(), ModelInfo("linear", "state-dict", "0", shape, 2), device="cpu")
    outcome = run_battery(
        Battery(Access.WHITE_BOX, "l2", (FGSM(norm="l2"),)), model, x, y, eps_list=[eps], budget=None, seed=0
    )
    size = (outcome.records.x_adv - x).double().flatten(1).norm(dim=1)
    assert float(size.max()) > eps + 1e-6  # the round-off this test is about
    assert (size <= eps_bound(eps)).all() and eps_bound(eps) - eps < 1e-4
    assert outcome.records.robust_accuracy([eps]) == {eps: 0.0}


def test_an_output_with_nan_names_no_class():
    """argmax would read a NaN row as its NaN's index; verification reads it
    as no class: misclassified, and never on a target."""
    from auditor.verify import verify

    class NanAbove(torch.nn.Module):
        def forward(self, x):
            logits = torch.stack([x.flatten(1).mean(1), -x.flatten(1).mean(1)], dim=1)  # always class 0
            return torch.where(x.flatten(1).mean(1, keepdim=True) > 0.5, torch.nan, logits)

    model = TorchModel(NanAbove(), ModelInfo("nan", "state-dict", "0", (1, 2, 2), 2), device="cpu")
    x = torch.full((2, 1, 2, 2), 0.4)
    x_adv = torch.stack([torch.full((1, 2, 2), 0.45), torch.full((1, 2, 2), 0.6)])  # the second gives NaN
    y = torch.zeros(2, dtype=torch.long)
    assert verify(model, x, x_adv, y, "linf").fooled.tolist() == [False, True]
    assert verify(model, x, x_adv, y, "linf", target=torch.ones(2, dtype=torch.long)).fooled.tolist() == [False, False]
    assert verify(model, x, x_adv, torch.ones(2, dtype=torch.long), "linf", target=y).fooled.tolist() == [True, False]


def test_clean_predictions_read_nan_rows_as_no_class_too():
    """The clean check and the label oracle use the same reading as
    verification: a sample whose clean output has a NaN is misclassified."""
    from auditor.verify import labels_of

    assert labels_of(torch.tensor([[float("nan"), 1.0, 0.0], [0.0, 2.0, 1.0]])).tolist() == [-1, 1]

    class NanOnBright(torch.nn.Module):
        def forward(self, x):
            mean = x.flatten(1).mean(1, keepdim=True)
            return torch.where(mean > 0.5, torch.nan, torch.cat([mean, -mean], dim=1))

    model = TorchModel(NanOnBright(), ModelInfo("nan", "state-dict", "0", (1, 2, 2), 2), device="cpu")
    x = torch.stack([torch.full((1, 2, 2), 0.2), torch.full((1, 2, 2), 0.8)])
    outcome = run_battery(Battery(Access.HARD_LABEL, "linf", (Liar(),)), model, x, torch.zeros(2, dtype=torch.long),
                          eps_list=[0.01], budget=1, seed=0)
    assert outcome.clean_pred.tolist() == [0, -1]
    assert outcome.records.broken_by.tolist()[1] == "clean" and float(outcome.records.distortion[1]) == 0.0


def test_a_minimum_norm_attack_that_attacked_nothing_reports_queries_spent():
    from auditor.attacks.hardlabel.sign_opt import SignOPT
    from auditor.battery import AttackReport
    from auditor.results import attack_entry

    report = AttackReport(attack=SignOPT(), runs=(), samples=0, queries_to_success=(), robust_accuracy={},
                          budget=100)
    assert attack_entry(report, [])["queries"]["measure"] == "spent"  # no trace read, nothing timed


class _MeanAbove(torch.nn.Module):
    """Two classes: 1 when the image's mean is above 0.5."""

    def forward(self, x):
        shift = x.flatten(1).mean(1) - 0.5
        return torch.stack([-shift, shift], 1) * 100


@dataclass(frozen=True)
class GivesUpAtLargest(Attack):
    """Shifts every pixel by ε, except at ε = 0.3, where it does nothing."""

    name = "gives-up"
    oracle = LabelOracle
    kind = FIXED_EPS
    norms = ("linf",)
    paper = "none"
    norm: str = "linf"

    def __call__(self, oracle, x, y, *, eps=None, seed=0, target=None):
        oracle.labels(x)
        shift = 0.0 if eps == 0.3 else eps
        return AttackResult(x_adv=x + shift, success=torch.ones(len(x), dtype=torch.bool), queries=oracle.queries())


def test_non_monotone_counts_samples_not_runs():
    """Two samples fail at ε = 0.3 and then break at 0.2 and again at 0.1
    (a record of 0.2 is still robust at 0.1): two samples, not four events;
    random noise, which does not optimise, raises no non-monotone check."""
    from auditor import checks
    from auditor.attacks.hardlabel.random_noise import RandomNoise

    model = TorchModel(_MeanAbove(), ModelInfo("mean", "state-dict", "0", (1, 4, 4), 2), device="cpu")
    x, y = torch.full((2, 1, 4, 4), 0.45), torch.zeros(2, dtype=torch.long)
    battery = Battery(Access.HARD_LABEL, "linf", (GivesUpAtLargest(),))
    (report,) = run_battery(battery, model, x, y, eps_list=[0.1, 0.2, 0.3], budget=10, seed=0).attacks
    assert [run.broken for run in report.runs] == [0, 2, 2]
    assert report.non_monotone == 2
    (check,) = checks.non_monotone([report])
    assert check.message.startswith("gives-up-linf broke 2 samples at a smaller ε")
    assert checks.non_monotone([replace(report, attack=RandomNoise(norm="linf"))]) == []


def test_clean_logits_from_the_caller_spare_the_clean_pass(tiny_cnn, mnist_test):
    """scan hands over the logits of its one clean pass; the battery then
    runs the model only for the attacks and their verification."""
    x, y = mnist_test.x[:40], mnist_test.y[:40]
    battery = Battery(Access.HARD_LABEL, "l2", (Recorder(seen=[]),))
    calls = {}
    for given in (False, True):
        model, rows = _model(tiny_cnn), []
        forward = model.forward
        model.forward = lambda batch, forward=forward, rows=rows: rows.append(len(batch)) or forward(batch)
        clean = forward(x) if given else None
        outcome = run_battery(battery, model, x, y, eps_list=[0.1], budget=5, seed=0, clean_logits=clean)
        assert torch.equal(outcome.clean_pred, tiny_cnn(x).argmax(1))
        calls[given] = rows
    assert calls[False] == [40] + calls[True]
