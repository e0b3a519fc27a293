"""Oracles enforce the threat model: what an attack can see, and how often."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import auditor
from auditor.access import Access
from auditor.battery import build_battery, runnable
from auditor.errors import AuditError
from auditor.oracles import BudgetExceeded, GradientOracle, LabelOracle, ScoreOracle

PUBLIC_COUNTING = {"n", "budget", "device", "queries", "remaining", "passes", "model_queries"}


def public(obj) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


@pytest.fixture()
def batch(mnist_test):
    return mnist_test.x[:8], mnist_test.y[:8]


def test_label_oracle_exposes_only_labels(tiny_cnn, batch):
    x, _ = batch
    oracle = LabelOracle(lambda z: tiny_cnn(z).argmax(1), len(x))
    assert public(oracle) == PUBLIC_COUNTING | {"labels"}
    labels = oracle.labels(x)
    assert labels.dtype == torch.long and labels.shape == (8,)
    for name in public(oracle):
        value = getattr(oracle, name)
        assert not isinstance(value, torch.nn.Module)
        if isinstance(value, torch.Tensor):
            assert value.dtype == torch.long  # query counts only, never scores
    assert not hasattr(oracle, "probs") and not hasattr(oracle, "loss_grad")
    assert not isinstance(oracle, (ScoreOracle, GradientOracle))


def test_score_oracle_exposes_probabilities_not_gradients(tiny_cnn, batch):
    x, _ = batch
    oracle = ScoreOracle(lambda z: tiny_cnn(z).softmax(1), len(x))
    assert public(oracle) == PUBLIC_COUNTING | {"probs", "log_probs"}
    probs = oracle.probs(x.requires_grad_(True))
    assert not probs.requires_grad  # no autograd path back to the model
    assert torch.allclose(probs.sum(1), torch.ones(8), atol=1e-5)
    logp = oracle.log_probs(x)
    assert not logp.requires_grad and torch.allclose(logp.exp(), probs, atol=1e-6)
    assert oracle.queries().tolist() == [2] * 8  # one query a row, as probs
    assert not isinstance(oracle, GradientOracle)


def test_score_oracle_log_probabilities_are_exact_where_logits_are_given():
    """Logits × 1000 round the softmax to exactly 0 and 1: the log of the
    probabilities is flat (the smallest normal float's log), while an
    attacker with the logits (white-box access) reads the exact ones."""
    logits = torch.tensor([[3000.0, 1000.0, 0.0]])
    probs = ScoreOracle(lambda z: logits.softmax(1), 1).log_probs(torch.zeros(1, 1, 2, 2))
    exact = ScoreOracle(lambda z: logits.softmax(1), 1, log_probabilities=lambda z: logits.log_softmax(1))
    assert torch.equal(probs[0, 1:], torch.full((2,), torch.finfo(torch.float32).tiny).log())
    assert torch.allclose(exact.log_probs(torch.zeros(1, 1, 2, 2)), torch.tensor([[0.0, -2000.0, -3000.0]]))


def test_gradient_oracle_counts_forward_backward(tiny_cnn, batch):
    x, y = batch
    oracle = GradientOracle(tiny_cnn, len(x))
    logits, grad = oracle.loss_grad(x, lambda z: torch.nn.functional.cross_entropy(z, y, reduction="none"))
    assert grad.shape == x.shape and grad.abs().sum() > 0
    oracle.logits(x[:3], idx=torch.tensor([0, 0, 5]))
    assert oracle.queries().tolist() == [3, 1, 1, 1, 1, 2, 1, 1]


def test_gradient_oracle_passes_are_bounded_and_change_nothing(tiny_cnn, batch):
    """A batch larger than max_values input values goes through the model a
    few images at a time (its autograd graph too), with the same logits,
    gradients and query counts as in one pass."""
    x, y = batch
    seen = []

    def module(z):
        seen.append(len(z))
        return tiny_cnn(z)

    def loss(logits):  # closes over the whole batch's labels, as attacks' losses do
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")

    whole = GradientOracle(tiny_cnn, len(x))
    narrow = GradientOracle(module, len(x), max_values=3 * 28 * 28)
    (logits, grad), (logits3, grad3) = whole.loss_grad(x, loss), narrow.loss_grad(x, loss)
    assert max(seen) == 3 and grad.abs().sum() > 0
    assert torch.allclose(logits, logits3, atol=1e-6) and torch.allclose(grad, grad3, atol=1e-7)
    assert narrow.queries().tolist() == whole.queries().tolist() == [1] * 8
    assert torch.allclose(narrow.logits(x), logits, atol=1e-6) and max(seen) == 3


def test_budget_is_never_exceeded(tiny_cnn, batch):
    x, _ = batch
    oracle = LabelOracle(lambda z: tiny_cnn(z).argmax(1), len(x), budget=2)
    oracle.labels(x)
    oracle.labels(x[:2], idx=torch.tensor([3, 4]))
    with pytest.raises(BudgetExceeded):
        oracle.labels(x[:2], idx=torch.tensor([3, 5]))  # sample 3 is spent
    assert oracle.queries().tolist() == [1, 1, 1, 2, 2, 1, 1, 1]  # refused call charged nothing
    assert oracle.remaining().tolist() == [1, 1, 1, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("bad", [[-1, 0], [0, 8]])
def test_a_query_for_a_sample_the_oracle_does_not_serve_is_refused(tiny_cnn, batch, bad):
    x, _ = batch
    oracle = LabelOracle(lambda z: tiny_cnn(z).argmax(1), len(x), budget=2)
    with pytest.raises(ValueError, match="idx out of range"):
        oracle.labels(x[:2], idx=torch.tensor(bad))
    assert oracle.queries().sum() == 0


def test_mismatched_oracle_is_an_error_when_the_battery_is_built():
    with pytest.raises(AuditError, match="pgd-linf needs white-box access"):
        build_battery(Access.SOFT_LABEL, "linf", ["pgd-linf"])
    with pytest.raises(AuditError, match="pgd-linf works in linf, but the threat model is l2"):
        build_battery(Access.WHITE_BOX, "l2", ["pgd-linf"])
    with pytest.raises(AuditError, match="unknown attack 'nope'"):
        build_battery(Access.WHITE_BOX, "linf", ["nope"])
    with pytest.raises(AuditError, match=r"unknown attack 'signopt' \(did you mean sign-opt\?\)"):
        build_battery(Access.WHITE_BOX, "linf", ["signopt"])
    with pytest.raises(AuditError, match="unknown attack 'transfer'"):
        build_battery(Access.WHITE_BOX, "linf", ["transfer"])  # a prefix of many attacks, not a name


def test_attack_names_without_the_norm_take_the_threat_norms_variant():
    def labels(norm, names):
        return [attack.label for attack in build_battery(Access.WHITE_BOX, norm, names).attacks]

    assert labels("l2", ["fgsm", "sign-opt", "square"]) == ["fgsm-l2", "square-l2", "sign-opt-l2"]
    assert labels("linf", ["fgsm", "fgsm-linf", "cw"]) == ["fgsm-linf", "cw-l2"]  # cw's only variant; one fgsm


def test_a_battery_chosen_by_name_lists_the_default_attacks_it_leaves_out():
    from auditor.checks import custom_battery

    battery = build_battery(Access.WHITE_BOX, "linf", ["fgsm", "square"])
    assert battery.left_out == ("apgd-ce-linf", "apgd-t-linf", "random-noise-linf")
    (check,) = custom_battery(battery.left_out)
    assert check.id == "custom-battery" and check.level == "warning" and "apgd-ce-linf" in check.message
    default = [attack.label for attack in build_battery(Access.HARD_LABEL, "l2").attacks]
    assert build_battery(Access.HARD_LABEL, "l2", default).left_out == ()
    assert build_battery(Access.HARD_LABEL, "l2").left_out == ()
    assert custom_battery(()) == []
    for nothing in ([], [""]):
        with pytest.raises(AuditError, match="--attacks names no attack"):
            build_battery(Access.WHITE_BOX, "linf", nothing)


def test_a_default_attack_that_could_not_run_is_not_left_out():
    """With --budget 20 NES cannot take one step (29 queries), so the default
    soft-label battery skips it: naming the attacks that do run is the
    default battery, with no custom-battery check to fail a policy."""
    default = runnable(build_battery(Access.SOFT_LABEL, "linf"), 20, (1, 28, 28), 10)
    assert [label for label, _ in default.skipped] == ["nes-linf"]
    named = build_battery(Access.SOFT_LABEL, "linf", [attack.label for attack in default.attacks])
    assert named.left_out == ("nes-linf",)
    assert runnable(named, 20, (1, 28, 28), 10).left_out == ()
    assert runnable(named, 1000, (1, 28, 28), 10).left_out == ("nes-linf",)


def test_battery_of_a_level_includes_weaker_levels():
    labels = [attack.label for attack in build_battery(Access.WHITE_BOX, "linf").attacks]
    assert labels == ["apgd-ce-linf", "apgd-t-linf", "square-linf", "random-noise-linf"]
    labels = [attack.label for attack in build_battery(Access.HARD_LABEL, "linf").attacks]
    assert labels == ["sign-opt-linf", "hop-skip-jump-linf", "random-noise-linf"]  # the threat norm's variants only
    labels = [attack.label for attack in build_battery(Access.HARD_LABEL, "l2").attacks]
    assert labels == ["sign-opt-l2", "hop-skip-jump-l2", "random-noise-l2"]
    battery = build_battery(Access.WHITE_BOX, "l2")
    assert [attack.label for attack in battery.attacks] == [
        "apgd-ce-l2", "apgd-t-l2", "square-l2", "random-noise-l2"
    ]
    assert battery.skipped == ()


def test_soft_label_searches_run_only_at_their_own_level_and_hop_skip_jump_reads_the_labels():
    """A soft-label attacker reads the labels too: without HopSkipJump, soft-label L2 audits came
    out above hard-label ones (Square L2 is the weaker attack there)."""
    labels = [attack.label for attack in build_battery(Access.SOFT_LABEL, "linf").attacks]
    assert labels == ["square-linf", "nes-linf", "genattack-linf", "hop-skip-jump-linf", "random-noise-linf"]
    battery = build_battery(Access.SOFT_LABEL, "l2")
    assert [attack.label for attack in battery.attacks] == [
        "square-l2", "nes-l2", "hop-skip-jump-l2", "random-noise-l2"
    ]
    assert battery.skipped == (("genattack-linf", "no l2 version yet"),)
    with pytest.raises(AuditError, match="--access none runs only transfer attacks: give --surrogate"):
        build_battery(Access.NONE, "linf")  # an empty battery would claim 100 % robustness


class Spied:
    """Delegates to an attack and records the oracle the battery hands it."""

    def __init__(self, attack, handed: list):
        self.attack, self.handed = attack, handed

    def __getattr__(self, name):
        return getattr(self.attack, name)

    def __call__(self, oracle, x, y, **kwargs):
        self.handed.append((self.attack.label, type(oracle), public(oracle)))
        return self.attack(oracle, x, y, **kwargs)


def test_every_soft_label_attack_is_handed_only_a_score_oracle(tiny_cnn, batch):
    """The battery builds each attack's declared oracle; a soft-label attack gets
    probabilities and nothing with logits or gradients."""
    from auditor.attacks import CATALOGUE
    from auditor.battery import Battery, run_battery
    from auditor.models.base import ModelInfo
    from auditor.models.pytorch import TorchModel

    soft = [attack for attack in CATALOGUE if attack.access == Access.SOFT_LABEL and attack.norm == "linf"]
    assert {attack.name for attack in soft} == {"square", "nes", "genattack"}
    assert all(attack.oracle is ScoreOracle for attack in soft)
    handed = []
    x, y = batch
    model = TorchModel(tiny_cnn, ModelInfo("tiny", "state-dict", "0", (1, 28, 28), 10), device="cpu")
    battery = Battery(Access.SOFT_LABEL, "linf", tuple(Spied(attack, handed) for attack in soft))
    run_battery(battery, model, x, y, eps_list=[0.1], budget=30, seed=0)
    assert [label for label, _, _ in handed] == [attack.label for attack in soft]
    assert all(kind is ScoreOracle and names == PUBLIC_COUNTING | {"probs", "log_probs"} for _, kind, names in handed)


INTROSPECTION = {"vars", "getattr", "setattr", "globals", "locals", "gc", "inspect", "ctypes", "sys"}


def introspection(source: str) -> list[str]:
    """What in ``source`` could reach past an oracle's public methods: a
    private attribute of anything but ``self``/``cls``/``super()``, a dunder
    other than a method of ``super()``, or an introspection tool (``vars``,
    ``getattr`` … on anything but ``self``; ``gc``, ``inspect``, ``sys``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            own = isinstance(base, ast.Name) and base.id in ("self", "cls")
            via_super = isinstance(base, ast.Call) and getattr(base.func, "id", None) == "super"
            if not (own or via_super):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in INTROSPECTION:
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Name) and first.id == "self"):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Name) and node.id in INTROSPECTION - {"vars", "getattr", "setattr"}:
            found.append(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            found += [name for name in names if name.split(".")[0] in INTROSPECTION]
    return found


def test_introspection_finds_ways_around_an_oracle():
    assert introspection("oracle._probabilities(x)") == ["oracle._probabilities"]
    assert introspection("f = vars(oracle)['_labels']") == ["vars(oracle)"]
    assert introspection("oracle.probs.__self__") == ["oracle.probs.__self__"]
    assert introspection("import gc") == ["gc"]
    assert introspection("self._cache = super().__post_init__()") == []


@pytest.mark.parametrize(
    "path", sorted((Path(auditor.__file__).parent / "attacks").rglob("*.py")), ids=lambda path: path.name
)
def test_attacks_use_only_the_public_oracle_interface(path):
    """Python cannot hide the model inside an oracle from code in the same
    process; what keeps an attack to its access level is that no attack
    module looks past the public methods of the objects it is given."""
    assert introspection(path.read_text()) == []
