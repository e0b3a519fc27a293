"""Randomised models: detected whatever the seed, never refused as batch
dependent, and labelled by a vote over passes, so that one lucky draw never
counts as an adversarial example or a clean mistake."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import auditor
from auditor.checks import RANDOMISED_MODEL, preflight, randomised_model
from auditor.models import check_model_on_data
from auditor.models.base import ModelInfo, seeded_rng
from auditor.models.pytorch import TorchModel
from auditor.battery import COARSE_GAMMA
from auditor.oracles import BudgetExceeded, LabelOracle
from auditor.verify import (
    BLACK_BOX_PASSES, VOTES, mean_probabilities, predict, pushed_out, verify, voted_labels,
)


class Choice(nn.Module):
    """Answers with one of two networks, picked at random at each call."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.first(x) if bool(torch.rand(()) < 0.5) else self.second(x)


class Sometimes(nn.Module):
    """Deterministic: the ``wrong`` label on every ``period``-th call, ``right`` otherwise."""

    def __init__(self, right: int, wrong: int, period: int):
        super().__init__()
        self.right, self.wrong, self.period, self.calls = right, wrong, period, 0

    def forward(self, x):
        self.calls += 1
        label = self.wrong if self.calls % self.period == 0 else self.right
        return nn.functional.one_hot(torch.full((len(x),), label), 10).float()


class Rarely(nn.Module):
    """Adds strong noise to its input on a tenth of calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.3 * torch.randn_like(x)) if bool(torch.rand(()) < 0.1) else self.inner(x)


class Flaky(nn.Module):
    """Shifts each image's label by one class on a ``share`` of calls (a fifth), at random."""

    def __init__(self, inner: nn.Module, share: float = 0.2):
        super().__init__()
        self.inner, self.share = inner, share

    def forward(self, x):
        logits = self.inner(x)
        return torch.where((torch.rand(len(x)) < self.share).view(-1, 1), logits.roll(1, dims=1), logits)


class NumpyNoise(nn.Module):
    """Draws its noise from numpy, which --seed does not seed."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + torch.from_numpy(np.random.normal(0, 0.05, x.shape).astype(np.float32)))


class TorchNoise(nn.Module):
    def __init__(self, inner: nn.Module, sigma: float = 0.05):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        return self.inner(x + self.sigma * torch.randn_like(x))


def _model(module: nn.Module) -> TorchModel:
    return TorchModel(module.eval(), ModelInfo("m", "torchscript", "0", (1, 28, 28), 10), device="cpu")


@pytest.fixture(scope="module")
def choice(tiny_cnn) -> Choice:
    """The tiny CNN or a copy with perturbed weights: 10 to 25 % of labels differ between two calls."""
    other = copy.deepcopy(tiny_cnn)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    return Choice(tiny_cnn, other).eval()


def test_a_model_random_between_two_networks_is_flagged_whatever_the_seed(choice, mnist_test):
    """Two passes agree half the time (the check used to fire on 9 of 20 seeds)."""
    for seed in range(10):
        with seeded_rng(seed, "model"):
            first = preflight(_model(choice), mnist_test.x[:64], seed)
        assert first.randomised, seed


def test_a_surrogate_random_between_two_networks_is_flagged_whatever_the_seed(choice, mnist_test):
    """The surrogates' examination asks the preflight's question (it compared two passes, which a
    random choice of networks passes half the time)."""
    from auditor.surrogates import Surrogate, examine

    x, y = mnist_test.x[:64], mnist_test.y[:64]
    for seed in range(10):
        with seeded_rng(seed, "surrogates"):
            assert examine(Surrogate("choice", choice, "choice.pt", "0" * 64), x, y).randomised, seed


def test_a_model_random_between_two_networks_is_not_refused_as_batch_dependent(choice, mnist_test):
    """A single image differing from its row in a batch is randomness here, not batch statistics
    (the load check used to refuse it on some runs, with a message about the batch)."""
    for seed in range(10):
        with seeded_rng(seed, "check"):
            assert check_model_on_data(_model(choice), mnist_test) == 10


def test_a_model_random_on_a_tenth_of_calls_is_not_refused_as_batch_dependent(tiny_cnn, mnist_test):
    """A single image drawn noisy while 15 repeats of the batch were not read as batch dependence
    ("16 passes over the batch agreed, so it is not randomness"): the repeats cover the image too."""
    for seed in range(40):
        with seeded_rng(seed, "check"):
            assert check_model_on_data(_model(Rarely(tiny_cnn)), mnist_test) == 10


def test_the_check_says_whether_the_seed_fixes_the_models_draws(tiny_cnn, mnist_test):
    x = mnist_test.x[:16]
    seeded = randomised_model(_model(TorchNoise(tiny_cnn)), x, 0).message
    unseeded = randomised_model(_model(NumpyNoise(tiny_cnn)), x, 0).message
    assert f"most of {VOTES} passes" in seeded and "--seed" not in seeded
    assert "do not come from torch's generator, which --seed seeds" in unseeded


def test_a_label_given_on_a_minority_of_passes_does_not_count():
    x, y = torch.rand(4, 1, 28, 28), torch.full((4,), 3)
    rarely_wrong = _model(Sometimes(right=3, wrong=5, period=3))
    assert predict(rarely_wrong, x, VOTES).tolist() == [3] * 4
    assert not verify(rarely_wrong, x, x, y, "linf", votes=VOTES).fooled.any()
    mostly_wrong = _model(Sometimes(right=5, wrong=3, period=3))
    assert verify(mostly_wrong, x, x, y, "linf", votes=VOTES).fooled.all()
    assert verify(mostly_wrong, x, x, y, "linf", target=torch.full((4,), 5), votes=VOTES).fooled.all()
    one_pass = _model(Sometimes(right=3, wrong=5, period=1))
    assert predict(one_pass, x).tolist() == [5] * 4


class Cycling(nn.Module):
    """Deterministic: answers ``labels[i % len(labels)]`` at its i-th call."""

    def __init__(self, labels: list[int]):
        super().__init__()
        self.labels, self.calls = labels, 0

    def forward(self, x):
        self.calls += 1
        return nn.functional.one_hot(torch.full((len(x),), self.labels[self.calls % len(self.labels)]), 10).float()


def test_labels_that_tie_for_the_most_passes_are_no_answer():
    """21 passes split 7/7/7 name no class: the sample is not classified as its label (so not
    robust) nor as a target (so not a targeted success); a tie used to go to the lowest class."""
    x, y = torch.rand(2, 1, 28, 28), torch.full((2,), 2)
    tied = _model(Cycling([2, 4, 9]))
    assert predict(tied, x, VOTES).tolist() == [-1, -1]
    assert verify(tied, x, x, y, "linf", votes=VOTES).fooled.all()
    assert not verify(tied, x, x, torch.full((2,), 4), "linf", target=torch.full((2,), 2), votes=VOTES).fooled.any()


def test_a_scan_counts_no_misclassification_the_model_makes_on_a_minority_of_calls(tiny_cnn, tmp_path):
    """At a radius far too small to matter, random noise used to "break" each sample whose one
    verification pass fell on a flaky call (a fifth of them), and the clean pass likewise."""
    path = tmp_path / "flaky.pt"
    torch.jit.save(torch.jit.script(Flaky(tiny_cnn).eval()), str(path))
    audit = auditor.scan(str(path), "mnist", access="hard-label", samples=32, eps=[0.001], budget=50,
                         attacks=["random-noise"], seed=0)
    results = audit.results
    assert RANDOMISED_MODEL in {check["id"] for check in results["checks"]}
    assert results["clean_accuracy"] > 0.8  # one pass per image: about 0.72
    assert results["robust_accuracy"]["0.001"] == results["clean_accuracy"]


def test_apgd_with_expectation_over_the_noise_breaks_more_than_single_passes(tiny_cnn, mnist_test):
    """Counted by vote, as the scan counts them: 29 of 64 robust with single passes, 24 with EOT."""
    from auditor.attacks.whitebox.apgd import APGD
    from auditor.oracles import GradientOracle

    noisy = TorchNoise(tiny_cnn, sigma=0.3).eval()
    x, y = mnist_test.x[:64], mnist_test.y[:64]
    robust = {}
    for eot in (1, 20):
        with seeded_rng(0, "model"):
            result = APGD(steps=50, eot=eot)(GradientOracle(noisy, len(y)), x, y, eps=0.1, seed=0)
            fooled = verify(_model(noisy), x, result.x_adv, y, "linf", votes=VOTES).fooled
        robust[eot] = int((~fooled).sum())
    assert robust[20] < robust[1] - 4, robust


def test_a_white_box_scan_of_a_randomised_model_runs_apgd_with_eot(tiny_cnn, tmp_path):
    path = tmp_path / "noisy.pt"
    torch.jit.save(torch.jit.script(TorchNoise(tiny_cnn).eval()), str(path))
    results = auditor.scan(str(path), "mnist", access="white-box", samples=8, eps=[0.1], seed=0,
                           attacks=["apgd-ce"]).results
    (apgd,) = results["attacks"]
    assert (apgd["params"]["eot"], apgd["params"]["restarts"]) == (20, 1)
    queries = [q for run in apgd["runs"] for q in run["per_sample"]["queries"]]
    assert all(q % 20 == 0 for q in queries) and max(queries) > 101  # 20 passes a step, each a query
    (check,) = [check for check in results["checks"] if check["id"] == RANDOMISED_MODEL]
    assert "APGD averages each step over 20 passes (EOT)" in check["message"]


def test_a_voted_answer_costs_its_passes_and_the_budget_counts_them():
    """Each answer about a randomised model is the vote of several passes; the attack sees answers, the
    results see the passes, and the budget (in passes) is never exceeded."""
    model = Sometimes(right=3, wrong=5, period=5)  # one pass in five is wrong: the vote of 5 never is
    charged = []
    oracle = LabelOracle(lambda z: voted_labels(lambda b: model(b).argmax(1), z, 5), 2, budget=12,
                         on_charge=charged.append, passes=5)
    x = torch.rand(2, 1, 28, 28)
    assert oracle.budget == 2  # 12 queries pay two answers of 5 passes
    assert oracle.labels(x).tolist() == [3, 3]
    assert (oracle.queries().tolist(), oracle.model_queries().tolist(), oracle.remaining().tolist()) == (
        [1, 1], [5, 5], [1, 1])
    assert charged == [10] and model.calls == 5
    oracle.labels(x[:1], idx=torch.tensor([0]))
    with pytest.raises(BudgetExceeded):
        oracle.labels(x[:1], idx=torch.tensor([0]))
    assert oracle.model_queries().tolist() == [10, 5]


def test_mean_probabilities_average_the_passes():
    outputs = iter([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])])
    mean = mean_probabilities(lambda z: next(outputs), torch.zeros(1, 1, 2, 2), 3)
    assert torch.allclose(mean, torch.tensor([[1 / 3, 2 / 3]]))


class Brightness(nn.Module):
    """Class 1 where the mean pixel is above 0.5, else class 0."""

    def forward(self, x):
        return torch.stack([0.5 - x.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)) - 0.5], dim=1)


def test_a_candidate_that_fails_is_pushed_out_along_its_direction_to_the_smallest_radius_that_fools():
    model = _model(Brightness())
    x = torch.zeros(3, 1, 28, 28)
    x_adv = torch.stack([torch.full((1, 28, 28), 0.4), torch.full((1, 28, 28), 0.7), torch.zeros(1, 28, 28)])
    y = torch.zeros(3, dtype=torch.long)
    checked = verify(model, x, x_adv, y, "linf")
    assert checked.fooled.tolist() == [False, True, False]
    pushed = pushed_out(model, x, checked, y, "linf", (0.9, 0.3, 0.45, 0.6), votes=1)
    assert pushed.fooled.tolist() == [True, True, False]  # 0.4 → 0.45 still fails; 0.6 fools
    assert pushed.distortion.tolist() == pytest.approx([0.6, 0.7, 0.0])
    assert torch.equal(pushed.x_adv[1:], checked.x_adv[1:])


def test_a_hard_label_scan_of_a_randomised_model_asks_by_vote_and_breaks_what_single_passes_could_not(
        tiny_cnn, tmp_path):
    """With single passes and γ = 1 HopSkipJump broke none of the 15 digits classified correctly
    (robust accuracy 0.9375 at L2 ε = 2); by 5-pass votes, with γ = 1000, it leaves 0.3125."""
    path = tmp_path / "noisy.pt"
    torch.jit.save(torch.jit.script(TorchNoise(tiny_cnn, sigma=0.05).eval()), str(path))
    results = auditor.scan(str(path), "mnist", access="hard-label", samples=16, eps=[2.0], norm="l2",
                           budget=2000, attacks=["hop-skip-jump-l2"], seed=0).results
    (hsj,) = results["attacks"]
    assert hsj["params"]["gamma"] == COARSE_GAMMA
    queries = [q for run in hsj["runs"] for q in run["per_sample"]["queries"]]
    assert all(q % BLACK_BOX_PASSES == 0 for q in queries) and max(queries) <= 2000
    # the attack's trace counts answers; what results.json reports from it counts queries
    (run,) = hsj["runs"]
    reached = run["per_sample"]["reached"]
    assert all(r % BLACK_BOX_PASSES == 0 for r in reached) and max(reached) > 2000 // BLACK_BOX_PASSES
    assert run["distortion_at_queries"]["queries"][-1] == 2000
    assert results["robust_accuracy"]["2"] <= results["clean_accuracy"] - 0.25, results["robust_accuracy"]


@pytest.mark.parametrize("access", ["soft-label", "white-box"])  # white-box: Square reads exact log-probabilities
def test_a_score_attack_on_a_randomised_model_pays_each_mean_of_probabilities_its_passes(tiny_cnn, tmp_path, access):
    path = tmp_path / "noisy.pt"
    torch.jit.save(torch.jit.script(TorchNoise(tiny_cnn, sigma=0.05).eval()), str(path))
    results = auditor.scan(str(path), "mnist", access=access, samples=8, eps=[0.1], budget=200,
                           attacks=["square-linf"], seed=0).results
    queries = [q for attack in results["attacks"] for run in attack["runs"] for q in run["per_sample"]["queries"]]
    assert queries and all(q % BLACK_BOX_PASSES == 0 for q in queries) and max(queries) <= 200
    assert any(q > BLACK_BOX_PASSES for q in queries)


@pytest.mark.parametrize(("access", "attacks", "says", "never"), [
    ("none", None, ["transfer examples are crafted on the surrogates"], ["score or label query", "averages"]),
    ("white-box", ["fgsm-l2", "cw-l2"], ["fgsm-l2, cw-l2 query single passes"], ["score or label query", "averages"]),
    ("hard-label", None, [f"mean probabilities of {BLACK_BOX_PASSES} passes"], ["averages", "single passes"]),
])
def test_the_check_describes_the_battery_that_ran(tiny_cnn, tmp_path, access, attacks, says, never):
    """It described APGD and black-box answers on a transfer-only scan, and stopped saying that
    FGSM and C&W query single passes."""
    path = tmp_path / "noisy.pt"
    torch.jit.save(torch.jit.script(TorchNoise(tiny_cnn).eval()), str(path))
    surrogate = tmp_path / "surrogate.pt"
    torch.jit.save(torch.jit.script(tiny_cnn), str(surrogate))
    results = auditor.scan(str(path), "mnist", access=access, samples=4, eps=[1.0], norm="l2", budget=100,
                           attacks=attacks, surrogates=[str(surrogate)] if access == "none" else (),
                           seed=0).results
    (message,) = [check["message"] for check in results["checks"] if check["id"] == RANDOMISED_MODEL]
    assert all(text in message for text in says) and not any(text in message for text in never), message


def test_an_attack_that_cannot_pay_a_step_in_voted_answers_is_skipped_with_why(tiny_cnn, tmp_path):
    """At 5 passes an answer, a budget of 100 pays 20 answers, less than one NES step; NES ran anyway,
    one answer per sample, and the report listed it as attacking them. At a budget of 20, too small for
    NES anyway, the reason gave the step's cost in single passes, and small-budget counted queries."""
    path = tmp_path / "noisy.pt"
    torch.jit.save(torch.jit.script(TorchNoise(tiny_cnn).eval()), str(path))
    for budget in (100, 20):
        results = auditor.scan(str(path), "mnist", access="soft-label", samples=4, eps=[0.1], budget=budget,
                               attacks=["nes-linf", "square-linf"], seed=0).results
        assert [attack["name"] for attack in results["attacks"]] == ["square-linf"]
        messages = {check["id"]: check["message"] for check in results["checks"]}
        assert "nes-linf" in messages["attack-skipped"]
        assert "5 passes an answer on this randomised model" in messages["attack-skipped"], budget
        assert f"--budget {budget} pays {budget // 5} answers of 5 passes, below 100" in messages["small-budget"]


def test_a_vote_on_no_images_is_no_labels():
    assert voted_labels(lambda batch: torch.zeros(len(batch), dtype=torch.long), torch.zeros(0, 1, 2, 2), 5).shape == (0,)


def test_an_attack_that_changed_nothing_breaks_no_sample(tiny_cnn, tmp_path):
    """A fresh vote on the unchanged clean image of a sample the clean vote found correct can go the
    other way; it was counted as breaking the sample at distortion 0 (not saved in adversarials.npz)."""
    path = tmp_path / "coin.pt"
    torch.jit.save(torch.jit.script(Flaky(tiny_cnn, share=0.45).eval()), str(path))
    audit = auditor.scan(str(path), "mnist", access="hard-label", samples=16, eps=[0.5], norm="l2",
                         budget=100, attacks=["hop-skip-jump-l2"], seed=0)
    broken = [s for s in audit.results["samples"] if s["broken_by"] not in (None, "clean")]
    assert all(s["distortion"] > 0 for s in broken), broken
