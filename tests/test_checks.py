"""Validity checks fire on the models they are meant for, and stay quiet otherwise."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import ball_battery
from torch import nn

import auditor
from auditor.access import Access
from auditor.battery import COARSE_GAMMA, coarse_gamma
from auditor.checks import (
    access_limited,
    gradient_checks,
    no_adversarial_found,
    preflight,
    steps_check,
    unbounded_attack,
    surrogate_checks,
)
from auditor.models.base import ModelInfo
from auditor.models.pytorch import TorchModel
from auditor.surrogates import Surrogate, examine


class Quantised(nn.Module):
    """Input quantisation to 8 bits: zero gradients almost everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 255) / 255)


class OneHot(nn.Module):
    """Outputs the one-hot argmax of its inner model, scaled: no gradient path at all."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.nn.functional.one_hot(self.inner(x).argmax(1), 10).float() * 10


class Noisy(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


def _ids(checks):
    return {check.id for check in checks}


def _model(module):
    return TorchModel(module, ModelInfo("m", "torchscript", "0", (1, 28, 28), 10), device="cpu")


def test_preflight_flags_randomness_and_probabilities(tiny_cnn, mnist_test):
    x = mnist_test.x[:16]
    plain = preflight(_model(tiny_cnn), x, 0)
    assert (plain.randomised, plain.probabilities, plain.steps) == (False, False, None)
    assert preflight(_model(Noisy(tiny_cnn).eval()), x, 0).randomised
    first = preflight(_model(nn.Sequential(tiny_cnn, nn.Softmax(dim=1))), x, 0)
    assert first.probabilities and first.steps is None  # softmax-outputs: white-box scans only, see test_logits


class Levels(nn.Module):
    """Input quantisation to ``levels`` grey levels."""

    def __init__(self, inner: nn.Module, levels: int):
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x):
        return self.inner(torch.round(x * (self.levels - 1)) / (self.levels - 1))


class Transformed(nn.Module):
    """``inner`` behind an input transform (not scriptable: for the preflight alone)."""

    def __init__(self, inner: nn.Module, transform):
        super().__init__()
        self.inner, self.transform = inner, transform

    def forward(self, x):
        return self.inner(self.transform(x))


def _steps(module, x):
    first = preflight(_model(module), x, 0)
    return None if first.steps is None else steps_check(first.steps).id


def test_preflight_finds_outputs_that_nudges_leave_unchanged(tiny_cnn, mnist_test):
    """Coarse input steps (4 or 2 grey levels) raise piecewise-constant; 8-bit rounding or truncation,
    and a threshold at 0 (which a pixel at 0 crosses at any nudge up), quantised-input. Truncation and
    the threshold kept no output through a two-sided nudge, and went unseen. The network alone, a
    saturated softmax of logits × 1000 and a half-precision copy raise neither."""
    x = mnist_test.x[:64]
    found = {name: _steps(module, x) for name, module in (
        ("round 256", Quantised(tiny_cnn)), ("floor 256", Transformed(tiny_cnn, lambda x: torch.floor(x * 255) / 255)), ("4 levels", Levels(tiny_cnn, 4)),
        ("2 levels", Levels(tiny_cnn, 2)), ("above 0", Transformed(tiny_cnn, lambda x: (x > 0).float())), ("network", tiny_cnn),
        ("saturated", nn.Sequential(tiny_cnn, ScaleBy(1000.0), nn.Softmax(dim=1))),
        ("float16", HalfPrecision(tiny_cnn)),
    )}
    assert found == {
        "round 256": "quantised-input", "floor 256": "quantised-input", "4 levels": "piecewise-constant",
        "2 levels": "piecewise-constant", "above 0": "quantised-input", "network": None, "saturated": None,
        "float16": None,
    }
    steps = preflight(_model(Levels(tiny_cnn, 4)), x, 0).steps
    assert (steps.images, steps.judged, steps.unchanged) == (64, 64, 64) and steps.coarse > 32
    assert (f"on 64 of 64 images, and nudges of 8 of the 784 input values by 0.01 left them so on "
            f"{steps.coarse}" in steps_check(steps).message)
    fine = preflight(_model(Quantised(tiny_cnn)), x, 0).steps
    assert fine.coarse == 0 and "changed all of them: the model quantises its input in fine steps" in (
        steps_check(fine).message)
    assert "HopSkipJump" not in steps_check(steps).message  # named only where the battery runs it


class ScaleBy(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class HalfPrecision(nn.Module):
    """Computes in float16, as a half-precision export does."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(inner).half()

    def forward(self, x):
        return self.inner(x.half()).float()


def test_a_hard_label_scan_of_a_quantised_model_says_so_and_probes_coarsely(tiny_cnn, tmp_path):
    """Behind 4 grey levels HopSkipJump's probes (1/784 of the distance at γ = 1) move no pixel across a
    rounding threshold: it left 0.4375 of 16 digits robust at L2 ε = 2 where γ = 1000 leaves 0.25."""
    path = tmp_path / "levels.pt"
    torch.jit.save(torch.jit.script(Levels(tiny_cnn, 4).eval()), str(path))
    audit = auditor.scan(str(path), "mnist", access="hard-label", samples=16, eps=[2.0], norm="l2",
                         budget=2000, attacks=["hop-skip-jump-l2"], seed=0, policy="default")
    results = audit.results
    (message,) = [check["message"] for check in results["checks"] if check["id"] == "piecewise-constant"]
    assert "HopSkipJump probes and bisects on a coarser scale" in message
    assert results["attacks"][0]["params"]["gamma"] == COARSE_GAMMA
    assert results["robust_accuracy"]["2"] <= 0.3, results["robust_accuracy"]
    assert audit.passed is False


def test_gradient_checks(tiny_cnn, mnist_test):
    x, y = mnist_test.x[:16], mnist_test.y[:16]
    assert gradient_checks(_model(tiny_cnn), x, y) == []
    assert "zero-gradients" in _ids(gradient_checks(_model(Quantised(tiny_cnn)), x, y))
    assert "zero-gradients" in _ids(gradient_checks(_model(OneHot(tiny_cnn)), x, y))


def test_surrogates_get_the_targets_randomness_and_gradient_checks(tiny_cnn, mnist_test):
    """A surrogate with masked gradients made every transfer attack from it
    a no-op, and a randomised one made a seeded scan irreproducible, and no
    check said so."""
    x, y = mnist_test.x[:80], mnist_test.y[:80]
    dropout = nn.Sequential(tiny_cnn[:4], nn.Dropout(0.5).train(), tiny_cnn[4:])
    examined = {
        name: examine(Surrogate(name, module, name, "0" * 64), x, y)
        for name, module in (("plain", tiny_cnn), ("quantised", Quantised(tiny_cnn)), ("dropout", dropout))
    }
    plain, quantised, randomised = examined.values()
    assert plain.checked == quantised.checked == 64 and quantised.zero_gradients == 64
    assert (plain.zero_gradients, plain.randomised, randomised.randomised) == (0, False, True)
    assert plain.clean_accuracy == pytest.approx(float((tiny_cnn(x).argmax(1) == y).double().mean()))
    assert surrogate_checks([plain]) == []
    assert [(c.id, c.level) for c in surrogate_checks(list(examined.values()))] == [
        ("surrogate-zero-gradients", "warning"), ("randomised-surrogate", "warning")
    ]
    (check,) = surrogate_checks([quantised])
    assert check.message.startswith("surrogate quantised has an all-zero input gradient of its logit margin on 64 of 64")


def test_transfer_only_says_the_model_is_queried_once_per_example():
    """The check said transfer attacks never query the model; the report and
    results count one query per example, its submission."""
    (check,) = access_limited(Access.NONE, "requested with --access none")
    assert "query the model only to submit each finished example" in check.message
    assert "never" not in check.message


def test_a_model_without_a_gradient_path_is_audited_not_crashed(tiny_cnn, tmp_path):
    """A white-box scan of a one-hot argmax defence: autograd has nothing to
    differentiate, the gradient attacks see zero gradients, the check says
    so and the gradient-free attacks give the worst case."""
    path = tmp_path / "one_hot.pt"
    torch.jit.script(OneHot(tiny_cnn).eval()).save(str(path))
    audit = auditor.scan(path, "mnist", access="white-box", samples=20, eps=[0.2], budget=200)
    checks = {check["id"]: check for check in audit.results["checks"]}
    assert checks["zero-gradients"]["message"].startswith("20 of 20 samples")
    breakers = {s["broken_by"] for s in audit.results["samples"] if s["distortion"]}
    assert breakers and not breakers & {"apgd-ce", "apgd-t"}


def test_quantised_model_is_caught_and_its_worst_case_comes_from_gradient_free_attacks(
    tiny_cnn, tmp_path
):
    path = tmp_path / "quantised.pt"
    torch.jit.script(Quantised(tiny_cnn).eval()).save(str(path))
    audit = auditor.scan(path, "mnist", access="white-box", samples=40, eps=[0.15], budget=300)
    checks = {check["id"]: check for check in audit.results["checks"]}
    assert checks["zero-gradients"]["level"] in ("warning", "error")
    assert "weaker-attack-wins" in checks
    breakers = {s["broken_by"] for s in audit.results["samples"] if s["distortion"]}
    assert breakers & {"square-linf", "sign-opt-l2", "random-noise-linf"}


def test_samples_no_minimum_norm_attack_could_start_on_are_flagged():
    _, _, stuck = ball_battery(starts=False)
    (check,) = no_adversarial_found(stuck.records, stuck.attacks)
    assert check.id == "no-adversarial-found" and check.message.startswith("4 of the 4 samples")
    _, _, started = ball_battery(starts=True)
    assert no_adversarial_found(started.records, started.attacks) == []


def test_every_check_id_has_its_paragraph():
    import re
    from pathlib import Path

    root = Path(__file__).parent.parent
    ids = set(re.findall(r'^[A-Z_]+ = "([a-z-]+)"$', (root / "auditor" / "checks.py").read_text(), re.MULTILINE))
    headings = set(re.findall(r"^## (\S+)$", (root / "docs" / "checks.md").read_text(), re.MULTILINE))
    assert len(ids) >= 12 and ids <= headings, ids - headings
    listed = (root / "docs" / "results.md").read_text()
    assert {name for name in ids if f"`{name}`" not in listed} == set()  # the results reference names them all


class NoiseDetector(nn.Module):
    """Adds 200 to class 0's logit on images far brighter than a digit (mean
    pixel above about 0.35, as uniform noise): a saturated softmax there, and
    no cross-entropy gradient for class-0 samples, but ordinary digits keep
    the inner network's logits."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        bright = torch.sigmoid(50 * (x.flatten(1).mean(1) - 0.35))
        return logits + 200 * bright[:, None] * nn.functional.one_hot(torch.zeros_like(bright).long(), 10)


class Scaled(nn.Module):
    """Its inner model's logits times 1,000: the same decisions, a softmax
    saturated to exactly 1 in float32, and nothing masked."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 1000 * self.inner(x)


def test_large_logits_raise_no_masking_check(tiny_cnn, correct_batch):
    """The checks ascend the logit margin: the cross-entropy is exactly 0
    here, and used to raise zero-gradients and unbounded-attack-fails."""
    x, y = correct_batch
    model = _model(Scaled(tiny_cnn).eval())
    saturated = torch.nn.functional.cross_entropy(model.forward(x), y, reduction="none") == 0
    assert saturated.float().mean() > 0.5
    assert gradient_checks(model, x, y) == []
    assert unbounded_attack(model, x, y, "linf", seed=0) == []
    assert unbounded_attack(model, x, y, "l2", seed=0) == []


def test_unbounded_attack_check(tiny_cnn, correct_batch):
    x, y = correct_batch
    assert unbounded_attack(_model(tiny_cnn), x, y, "linf", seed=0) == []
    assert unbounded_attack(_model(tiny_cnn), x, y, "l2", seed=0) == []
    assert 0 in y.tolist()  # the samples a random start over the whole cube would leave stuck
    assert unbounded_attack(_model(NoiseDetector(tiny_cnn).eval()), x, y, "linf", seed=0) == []
    for norm in ("linf", "l2"):
        (check,) = unbounded_attack(_model(Quantised(tiny_cnn).eval()), x, y, norm, seed=0)
        assert check.id == "unbounded-attack-fails"


def test_weaker_attack_wins_is_judged_per_eps():
    """FGSM breaks samples 1 and 2 at 0.2; Square breaks sample 1 at 0.1 and
    sample 3 (which FGSM never broke) at 0.25; sample 0 is a clean error. The
    white-box attacks missed sample 1 at ε = 0.1 and sample 3 at 0.3 only."""
    from types import SimpleNamespace

    from auditor.attacks.softlabel.square import SquareAttack
    from auditor.attacks.whitebox.fgsm import FGSM
    from auditor.battery import Records
    from auditor.checks import weaker_attack_wins
    from auditor.verify import Verified

    x = torch.zeros(4, 1, 2, 2)
    records = Records.start(x, torch.tensor([1, 0, 0, 0]), torch.zeros(4, dtype=torch.long))

    def found(rows, size, white_box):
        rows = torch.tensor(rows)
        checked = Verified(x[rows], torch.ones(len(rows), dtype=torch.bool), torch.full((len(rows),), size).double())
        label = "fgsm-linf" if white_box else "square-linf"
        records.update(rows, checked.fooled, checked, torch.ones(len(rows), dtype=torch.long), label, white_box)

    found([1, 2], 0.2, white_box=True)
    found([1], 0.1, white_box=False)
    found([3], 0.25, white_box=False)
    reports = [SimpleNamespace(attack=FGSM()), SimpleNamespace(attack=SquareAttack())]
    (check,) = weaker_attack_wins(records, reports, [0.3, 0.1, 0.2])
    assert check.id == "weaker-attack-wins"
    assert "1 within ε=0.1, 1 within ε=0.3;" in check.message and "square-linf (2)" in check.message
    assert weaker_attack_wins(records, reports, [0.2]) == []
    assert weaker_attack_wins(records, reports[1:], [0.3]) == []  # no white-box attack ran


def test_noise_beats_attacks_needs_an_attack_before_the_noise():
    from types import SimpleNamespace

    from auditor.attacks.hardlabel.random_noise import RandomNoise
    from auditor.attacks.whitebox.fgsm import FGSM
    from auditor.checks import noise_beats_attacks

    noise = SimpleNamespace(attack=RandomNoise(), broken=3)
    assert noise_beats_attacks([noise]) == []  # nothing ran before it
    (check,) = noise_beats_attacks([SimpleNamespace(attack=FGSM(), broken=0), noise])
    assert check.id == "noise-beats-attacks" and "broke 3 samples" in check.message
    assert check.message.endswith("the attacks are not working on this model")
    # a targeted audit whose data lack target images: the attacks may not have started
    (check,) = noise_beats_attacks([SimpleNamespace(attack=FGSM(), broken=0), noise], could_not_start=True)
    assert check.message.endswith("or could not start on samples whose target class has no image in the data "
                                  "(see no-target-image)")


def test_a_tiny_budget_at_hard_label_access_is_an_error_and_fails_the_default_policy(example_onnx):
    """With --budget 1 no label-only attack can start, and every sample
    looked robust: the default policy passed an undefended model."""
    import auditor

    audit = auditor.scan(example_onnx, "mnist", access="hard-label", samples=8, eps=[0.1], budget=1,
                         policy="default")
    (check,) = [check for check in audit.results["checks"] if check["id"] == "small-budget"]
    assert check["level"] == "error" and check["message"].startswith("--budget 1 is below 100 queries per sample")
    assert audit.results["policy"]["passed"] is False
    fine = auditor.scan(example_onnx, "mnist", access="white-box", samples=8, eps=[0.1], budget=1,
                        attacks=["fgsm"])
    assert "small-budget" not in {check["id"] for check in fine.results["checks"]}


def test_no_gradient_attack_is_said_where_a_white_box_battery_has_none():
    """A white-box audit whose attacks all skip the gradients: none chosen,
    or each skipped (APGD-DLR's loss needs 3 classes). A targeted audit of a
    2-class model runs APGD-T; it once ran only Square and noise."""
    from auditor.access import Access
    from auditor.battery import build_battery, runnable
    from auditor.checks import no_gradient_attack

    def raised(level, names=None, classes=10, targeted=False):
        battery = build_battery(level, "linf", names, targeted=targeted)
        return no_gradient_attack(runnable(battery, 100, (1, 28, 28), classes))

    assert raised(Access.WHITE_BOX) == []
    assert raised(Access.WHITE_BOX, classes=2, targeted=True) == []
    assert raised(Access.SOFT_LABEL, ["square"]) == []  # no gradients to follow
    (check,) = raised(Access.WHITE_BOX, ["square", "random-noise"])
    assert (check.id, check.level) == ("no-gradient-attack", "warning")
    assert check.message.startswith("no gradient-based attack ran at white-box access (--attacks chose none)")
    assert "(square-linf, random-noise-linf) and is likely overstated" in check.message
    (check,) = raised(Access.WHITE_BOX, ["apgd-dlr", "square"], classes=2)
    assert "(apgd-dlr-linf skipped, see attack-skipped)" in check.message


def test_no_gradient_attack_fires_on_a_gradient_free_white_box_scan_only(tiny_cnn, correct_batch, tmp_path):
    torch.jit.script(tiny_cnn).save(str(tmp_path / "tiny.pt"))
    x, y = correct_batch
    np.savez(tmp_path / "digits.npz", x=x[:8].numpy(), y=y[:8].numpy())

    def ids(**options):
        audit = auditor.scan(str(tmp_path / "tiny.pt"), str(tmp_path / "digits.npz"), access="white-box",
                             eps=[0.1], budget=50, **options)
        return {check["id"] for check in audit.results["checks"]}

    assert "no-gradient-attack" in ids(attacks=["square", "random-noise"])
    assert "no-gradient-attack" not in ids()


def test_saturated_scores_counts_samples_whose_other_probabilities_are_exactly_zero():
    """At soft-label access a softmax rounded to exactly 0 and 1 leaves the
    score attacks a flat loss: a model with logits × 1000 scored 78 % against
    Square, NES and GenAttack and 30 % at hard-label, and passed the default
    policy. HopSkipJump, in the default soft-label battery, reads the labels."""
    from auditor.access import Access
    from auditor.attacks.hardlabel.hop_skip_jump import HopSkipJump
    from auditor.attacks.hardlabel.random_noise import RandomNoise
    from auditor.attacks.softlabel.square import SquareAttack
    from auditor.battery import Battery
    from auditor.checks import saturated_scores

    scores_only = Battery(Access.SOFT_LABEL, "linf", (SquareAttack(), RandomNoise()))
    logits = torch.tensor([[10.0, 0.0, 2.0], [1000.0, 0.0, 3.0], [0.0, 500.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    correct = logits.argmax(1) == y
    (check,) = saturated_scores(scores_only, logits, False, y, correct)
    assert check.id == "saturated-scores" and check.level == "warning"
    assert check.message.startswith("2 of the 3 correctly classified samples")
    assert saturated_scores(scores_only, logits / 100, False, y, correct) == []
    assert saturated_scores(scores_only, torch.softmax(logits, 1), True, y, correct)  # outputs probabilities
    with_labels = Battery(Access.SOFT_LABEL, "linf", (SquareAttack(), HopSkipJump(norm="linf"), RandomNoise()))
    assert saturated_scores(with_labels, logits, False, y, correct) == []
    for level in (Access.HARD_LABEL, Access.WHITE_BOX):  # only score attacks are blind; white-box reads logits
        assert saturated_scores(Battery(level, "linf", (SquareAttack(),)), logits, False, y, correct) == []


def test_a_soft_label_scan_of_a_saturated_model_raises_saturated_scores(tiny_cnn, tmp_path):
    import auditor

    class Scaled(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x) * 1000

    path = tmp_path / "scaled.pt"
    torch.jit.save(torch.jit.script(Scaled(tiny_cnn).eval()), str(path))
    options = dict(access="soft-label", samples=8, eps=[0.1], budget=30, attacks=["square-linf"])
    ids = {c["id"] for c in auditor.scan(str(path), **options).results["checks"]}
    assert "saturated-scores" in ids
    default = auditor.scan(str(path), access="soft-label", samples=8, eps=[0.1], budget=200).results
    assert "hop-skip-jump-linf" in [attack["name"] for attack in default["attacks"]]
    assert "saturated-scores" not in {c["id"] for c in default["checks"]}
    torch.jit.save(torch.jit.script(tiny_cnn.eval()), str(path))
    assert "saturated-scores" not in {c["id"] for c in auditor.scan(str(path), **options).results["checks"]}


def test_coarse_probes_scale_with_the_image():
    """γ = 1000 as it was on 8 × 8 images put HopSkipJump's probes 15 distances from the boundary and its
    bisection threshold above 1: on a smooth linear model its median L2 went from 0.44 to 1.86 (0.44 now)."""
    from auditor.attacks.hardlabel.hop_skip_jump import HopSkipJump
    from auditor.oracles import LabelOracle

    assert coarse_gamma(784) == COARSE_GAMMA and coarse_gamma(64) / 64**1.5 == pytest.approx(0.05)
    assert coarse_gamma(4) == 1.0  # never finer than the default
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.rand(16, 1, 8, 8)
    y = linear(x).argmax(1)
    median = {}
    for gamma in (1.0, coarse_gamma(64)):
        with torch.no_grad():
            result = HopSkipJump(gamma=gamma)(LabelOracle(lambda z: linear(z).argmax(1), 16, 1000), x, y, seed=0)
        median[gamma] = float((result.x_adv - x).flatten(1).norm(dim=1).median())
    assert median[coarse_gamma(64)] < 1.5 * median[1.0], median


def test_fine_input_steps_are_information_the_default_policy_allows(tiny_cnn, tmp_path):
    path = tmp_path / "rounded.pt"
    torch.jit.save(torch.jit.script(Quantised(tiny_cnn).eval()), str(path))
    results = auditor.scan(str(path), "mnist", access="hard-label", samples=4, eps=[2.0], norm="l2",
                           budget=1000, attacks=["hop-skip-jump-l2"], seed=0, policy="default").results
    steps = [(c["id"], c["level"]) for c in results["checks"] if c["id"].endswith(("-input", "-constant"))]
    assert steps == [("quantised-input", "info")]
    assert results["attacks"][0]["params"]["gamma"] == COARSE_GAMMA
    (no_checks,) = [r for r in results["policy"]["requirements"] if r["id"] == "no_checks"]
    # the named battery raises custom-battery, which the policy refuses; quantised-input it does not cite
    assert "custom-battery" in no_checks["actual"] and "quantised-input" not in no_checks["actual"]
