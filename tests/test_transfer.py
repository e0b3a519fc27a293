"""Transfer attacks: the transforms' contract, ensembles, targeted mode, and the surrogate zoo."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from auditor import surrogates as zoo
from auditor.access import Access
from auditor.attacks import CATALOGUE
from auditor.attacks.base import ORACLE_ACCESS, distortion
from auditor.attacks.transfer import (
    METHODS,
    Admix,
    DiverseInputs,
    MomentumIterative,
    Nesterov,
    OnRequest,
    ReverseAdversarialPerturbation,
    ScaleInvariance,
    TransferAttack,
    TranslationInvariance,
    VarianceTuning,
)
from auditor.attacks.transfer.admix import other_class_rows
from auditor.data.base import Dataset
from auditor.oracles import SurrogateOracle

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_VT = VarianceTuning(samples=3)
SMALL_RAP = ReverseAdversarialPerturbation(steps=2, late_start=2)
ATTACKS = [
    TransferAttack(),
    TransferAttack((MomentumIterative(),)),
    TransferAttack((Nesterov(),)),
    TransferAttack((DiverseInputs(),)),
    TransferAttack((TranslationInvariance(),)),
    TransferAttack((ScaleInvariance(),)),
    TransferAttack((SMALL_VT,)),
    TransferAttack((Admix(),)),
    TransferAttack((SMALL_RAP,), steps=4),
    TransferAttack(
        (Admix(), ScaleInvariance(), DiverseInputs(), SMALL_VT, TranslationInvariance(), Nesterov())
    ),
    TransferAttack((DiverseInputs(), MomentumIterative(), SMALL_RAP), steps=4, norm="l2"),
]
RANDOM = {"di", "vt", "admix", "rap"}


@pytest.fixture(scope="module")
def batch(tiny_cnn, correct_batch):
    return correct_batch[0][:12], correct_batch[1][:12]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda attack: attack.label)
def test_transform_contract(attack, tiny_cnn, batch):
    """ε-ball and [0,1], a pure call that is deterministic under a seed, one target query per sample."""
    x, y = batch
    eps = 0.3 if attack.norm == "linf" else 2.0
    oracle = SurrogateOracle([tiny_cnn])
    first = attack(oracle, x, y, eps=eps, seed=5)
    assert first.x_adv.shape == x.shape
    assert distortion(first.x_adv - x, attack.norm).max() <= eps + 1e-6
    assert first.x_adv.min() >= 0 and first.x_adv.max() <= 1
    assert torch.equal(first.x_adv, attack(SurrogateOracle([tiny_cnn]), x, y, eps=eps, seed=5).x_adv)
    assert first.success.all() and torch.equal(first.queries, torch.ones(len(y), dtype=torch.long))
    assert oracle.passes > 0
    if RANDOM & {transform.tag for transform in attack.transforms}:
        assert not torch.equal(first.x_adv, attack(SurrogateOracle([tiny_cnn]), x, y, eps=eps, seed=6).x_adv)
    # white-box on the surrogate itself, the examples must fool it
    assert (tiny_cnn(first.x_adv).argmax(1) != y).float().mean() >= 0.75
    with pytest.raises(dataclasses.FrozenInstanceError):
        attack.steps = 3


def test_l2_steps_reach_the_ball_on_saturated_images(tiny_cnn, batch):
    """Most MNIST pixels are 0 or 1: gradient components pointing out of
    [0,1] there were clipped away after each normalised step, and ten steps
    of ε/10 ended around 0.8ε (transfer robust accuracy overstated in L2)."""
    x, y = batch
    x_adv = TransferAttack(norm="l2")(SurrogateOracle([tiny_cnn]), x, y, eps=1.5, seed=0).x_adv
    sizes = (x_adv - x).flatten(1).norm(dim=1)
    assert sizes.max() <= 1.5 + 1e-5 and sizes.median() >= 0.95 * 1.5


def test_ensemble_of_one_is_that_surrogate(tiny_cnn, batch):
    x, y = batch
    oracle = SurrogateOracle([tiny_cnn])
    with torch.no_grad():
        assert torch.equal(oracle.logits(x), tiny_cnn(x))
    _, grad = oracle.loss_grad(x, lambda logits: logits[:, 0])
    z = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(tiny_cnn(z)[:, 0].sum(), z)
    assert torch.equal(grad, expected)
    # averaging two copies of one model is that model, so every attack gives the same examples
    attack = TransferAttack((DiverseInputs(), TranslationInvariance(), MomentumIterative()))
    alone = attack(SurrogateOracle([tiny_cnn]), x, y, eps=0.3, seed=2).x_adv
    assert torch.equal(alone, attack(SurrogateOracle([tiny_cnn, tiny_cnn]), x, y, eps=0.3, seed=2).x_adv)


def test_ensemble_averages_logits(tiny_cnn, batch):
    x, _ = batch
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        expected = (tiny_cnn(x) + other(x)) / 2
    assert torch.allclose(SurrogateOracle([tiny_cnn, other]).logits(x), expected, atol=1e-6)
    with pytest.raises(ValueError):
        SurrogateOracle([])


@pytest.mark.parametrize("loss", ["ce", "logit"])
def test_targeted_mode_moves_toward_the_target(tiny_cnn, batch, loss):
    x, y = batch
    target = (y + 1) % 10
    attack = TransferAttack((MomentumIterative(),), loss=loss)
    x_adv = attack(SurrogateOracle([tiny_cnn]), x, y, eps=0.3, seed=0, target=target).x_adv
    with torch.no_grad():
        before = tiny_cnn(x).softmax(1).gather(1, target[:, None])
        after = tiny_cnn(x_adv).softmax(1).gather(1, target[:, None])
        hit = tiny_cnn(x_adv).argmax(1) == target
    assert (after > before).all()
    assert hit.float().mean() >= 0.75
    with pytest.raises(ValueError, match="equals the true label"):
        attack(SurrogateOracle([tiny_cnn]), x, y, eps=0.3, target=y)


def test_attack_configuration():
    mixed = TransferAttack((Admix(), DiverseInputs(), TranslationInvariance(), MomentumIterative()))
    assert mixed.label == "transfer-mi-di-ti-admix-linf"
    assert "Dong et al." in mixed.paper and "Admix" in mixed.paper
    for attack in CATALOGUE:  # each paper cited once (MI's is also the core's; NI and SI share one)
        citations = attack.paper.split("; ")
        titles = [citation.split(" (")[0] for citation in citations]
        assert len(set(titles)) == len(titles), attack.label
    with pytest.raises(ValueError, match="pipeline order: admix, di, ti, mi"):
        TransferAttack((Admix(), DiverseInputs(), MomentumIterative(), TranslationInvariance()))
    assert TransferAttack().label == "transfer-ifgsm-linf"
    assert TransferAttack(loss="logit", norm="l2").label == "transfer-ifgsm-logit-l2"
    assert TransferAttack.targeted and mixed.access == Access.NONE
    assert ORACLE_ACCESS[SurrogateOracle] == Access.NONE
    params = json.loads(json.dumps(mixed.params()))
    assert params["transforms"][0] == {"name": "admix", "copies": 3, "eta": 0.2}
    with pytest.raises(ValueError, match="cannot be combined"):
        TransferAttack((MomentumIterative(), Nesterov()))
    with pytest.raises(ValueError, match="late_start"):
        TransferAttack((ReverseAdversarialPerturbation(),), steps=10)
    with pytest.raises(ValueError, match="eps is required"):
        TransferAttack()(SurrogateOracle([nn.Flatten()]), torch.zeros(1, 1, 2, 2), torch.zeros(1).long())
    labels = [attack.label for attack in METHODS]
    assert labels[0] == "transfer-ifgsm-linf" and len(set(labels)) == len(labels)
    default = [attack.label for attack in METHODS if attack.in_default_battery]
    assert default[-1] == "transfer-mi-di-ti-rap-linf"


def test_input_and_gradient_transforms():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=gen)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.equal(DiverseInputs(p=0.0).expand(x, y, gen), x)
    diverse = DiverseInputs(p=1.0).expand(x, y, gen)
    assert diverse.shape == x.shape and not torch.equal(diverse, x)
    scaled = ScaleInvariance(copies=3).expand(x, y, gen)
    assert torch.equal(scaled[6:12], x / 2) and torch.equal(scaled[12:], x / 4)
    mixed = Admix(copies=2, eta=0.5).expand(x, y, gen)
    partners = (mixed - x.repeat(2, 1, 1, 1)) / 0.5
    rows = (partners.flatten(1)[:, None, :] - x.flatten(1)[None]).abs().amax(2).argmin(1)
    assert (y.repeat(2) != y[rows]).all()
    for _ in range(20):
        assert (y[other_class_rows(y, gen)] != y).all()
    assert other_class_rows(torch.zeros(4, dtype=torch.long), gen).shape == (4,)
    # TI: a constant gradient away from the border is unchanged; the kernel sums to 1
    grad = torch.ones(1, 1, 16, 16)
    smoothed, _ = TranslationInvariance(kernel=5).gradient(grad, None, None)
    assert torch.allclose(smoothed[..., 2:-2, 2:-2], grad[..., 2:-2, 2:-2])
    # MI accumulates gradients normalised to mean |g| = 1
    momentum = MomentumIterative(mu=1.0)
    state = momentum.start(grad)
    direction, state = momentum.gradient(2 * grad, state, None)
    direction, state = momentum.gradient(3 * grad, state, None)
    assert torch.allclose(direction, 2 * grad)


def _tiny_data(n: int = 160) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 10
    x = (torch.rand(n, 1, 28, 28, generator=gen) * 0.2 + (y.float() / 10).view(-1, 1, 1, 1)).clamp(0, 1)
    return Dataset(name="tiny", x=x, y=y)


def test_zoo_architectures_differ_and_fit_any_shape():
    for name, build in zoo.ZOO.items():
        for shape in ((1, 28, 28), (3, 32, 32)):
            assert build(shape, 7).eval()(torch.rand(2, *shape)).shape == (2, 7), name
    kinds = {name: {type(m) for m in build((1, 28, 28), 10).modules()} for name, build in zoo.ZOO.items()}
    assert (
        nn.Conv2d not in kinds["mlp"] and nn.MaxPool2d in kinds["cnn"] and nn.BatchNorm2d in kinds["resnet"]
    )


def test_surrogates_train_fast_cache_and_load_as_safetensors(tmp_path, monkeypatch):
    data = _tiny_data()
    trained = zoo.train_surrogates(
        data, 4, num_classes=10, seed=1, cache_dir=tmp_path, epochs=1, evaluate=data
    )
    assert [s.name for s in trained] == ["mlp", "cnn", "resnet", "mlp-1"]
    assert all(s.source == "trained" and 0.0 <= s.clean_accuracy <= 1.0 for s in trained)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 4 and not list(tmp_path.glob("*.tmp"))
    for file in files:
        with safe_open(str(file), framework="pt") as weights:  # never a pickle
            assert weights.keys()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(zoo, "_train", no_training)
    cached = zoo.train_surrogates(data, 4, num_classes=10, seed=1, cache_dir=tmp_path, epochs=1)
    for first, second in zip(trained, cached):
        assert second.clean_accuracy is None
        for a, b in zip(first.module.state_dict().values(), second.module.state_dict().values()):
            assert torch.equal(a, b)


def test_surrogate_training_is_deterministic_and_survives_a_broken_cache(tmp_path):
    data = _tiny_data()
    first = zoo.train_surrogates(data, 1, num_classes=10, seed=3, cache_dir=tmp_path / "a", epochs=1)[0]
    again = zoo.train_surrogates(data, 1, num_classes=10, seed=3, cache_dir=tmp_path / "b", epochs=1)[0]
    other = zoo.train_surrogates(data, 1, num_classes=10, seed=4, cache_dir=tmp_path / "c", epochs=1)[0]
    weight = lambda s: next(iter(s.module.state_dict().values()))
    assert torch.equal(weight(first), weight(again)) and not torch.equal(weight(first), weight(other))
    (broken,) = (tmp_path / "a").glob("*.safetensors")
    broken.write_bytes(b"not safetensors")
    rebuilt = zoo.train_surrogates(data, 1, num_classes=10, seed=3, cache_dir=tmp_path / "a", epochs=1)[0]
    assert torch.equal(weight(rebuilt), weight(first))
    assert zoo.accuracy(first.module, data.x, data.y) == pytest.approx(
        (first.module(data.x).argmax(1) == data.y).float().mean().item()
    )


def test_a_cache_that_cannot_be_written_costs_a_retrain_not_the_scan(tmp_path, caplog):
    """A cache path under a regular file (or a read-only cache, common in CI)
    failed the scan after training."""
    (tmp_path / "afile").write_text("")
    data = _tiny_data()
    (surrogate,) = zoo.train_surrogates(data, 1, num_classes=10, seed=3, cache_dir=tmp_path / "afile" / "s", epochs=1)
    assert surrogate.module is not None and "trained, but not cached" in caplog.text


def test_the_cache_key_covers_the_training_recipe(monkeypatch, tmp_path):
    """A new learning rate or architecture code that keeps the parameter
    shapes reused weights trained the old way."""
    key = zoo.cache_key("ab" * 32, (1, 28, 28), "cnn", 10, 0, 3)
    edited = tmp_path / "surrogates.py"
    edited.write_text(pathlib.Path(zoo.__file__).read_text().replace("LEARNING_RATE = 1e-3", "LEARNING_RATE = 5e-1"))
    monkeypatch.setattr(zoo, "__file__", str(edited))
    assert zoo.cache_key("ab" * 32, (1, 28, 28), "cnn", 10, 0, 3) != key


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDITOR_CACHE", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path / "surrogates"
    monkeypatch.delenv("AUDITOR_CACHE")
    assert zoo.default_cache_dir().parts[-3:] == (".cache", "auditor", "surrogates")


@pytest.mark.parametrize("norm, reach", [("linf", 0.3), ("l2", 0.3)])
def test_nesterov_looks_as_many_steps_ahead_as_the_momentum_holds_in_either_norm(norm, reach):
    """Momentum of three sign-scaled gradients looks three steps of α ahead:
    α·μ·g in L∞ (the paper), α·μ·g/√d in L2, where α·μ·g went √d = 28 times
    as far on MNIST."""
    from auditor.attacks.transfer.transform import Step

    x = torch.full((1, 1, 28, 28), 0.5)
    momentum = 3 * torch.ones_like(x)
    step = Step(index=3, x=x, eps=1.0, alpha=0.1, norm=norm, gen=torch.Generator(), grad_at=None)
    ahead = Nesterov().lookahead(x, momentum, step) - x
    size = ahead.abs().max() if norm == "linf" else ahead.norm()
    assert float(size) == pytest.approx(reach)


def test_rap_behind_a_look_ahead_outside_the_range_stays_within_eps_n_of_the_iterate():
    """NI's look-ahead is not clipped and leaves [0,1] by more than ε_n near
    saturated pixels; n_rap is still the inner maximisation around the
    iterate x_t: every inner gradient is taken within ε_n of x_t, inside
    [0,1], and ‖n_rap‖∞ ≤ ε_n. Anchored at the look-ahead, the [0,1] clamp
    made |n_rap| the whole overshoot (0.5 here)."""
    from auditor.attacks.transfer.transform import Step

    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 1, 6, 6, generator=gen) > 0.5).float()
    ahead = x + 0.5 * (2 * x - 1)
    weight = torch.randn(1, 1, 6, 6, generator=gen)
    seen = []

    def grad_at(point: torch.Tensor) -> torch.Tensor:
        seen.append(point)
        return weight.expand_as(point)

    rap = ReverseAdversarialPerturbation(eps_n=0.1, steps=4, late_start=0)
    step = Step(index=0, x=x, eps=0.3, alpha=0.03, norm="linf", gen=gen, grad_at=grad_at)
    n = rap.lookahead(ahead, None, step) - ahead
    assert 0 < n.abs().max() <= 0.1 + 1e-6
    assert ((x + n) >= 0).all() and ((x + n) <= 1).all()
    assert len(seen) == 4
    for point in seen:
        assert (point - x).abs().max() <= 0.1 + 1e-6 and point.min() >= 0 and point.max() <= 1


def _weights(surrogate: zoo.Surrogate) -> list[torch.Tensor]:
    return list(surrogate.module.state_dict().values())


def test_training_gives_the_same_weights_on_any_thread_count(tmp_path):
    """Trained on 2 threads, every zoo model had other weights than on 1 (a
    sum split among threads adds in another order), so results.json depended
    on the machine, and on which run had filled the cache."""
    data, before = _tiny_data(), torch.get_num_threads()
    trained = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            trained[threads] = zoo.train_surrogates(
                data, 3, num_classes=10, seed=1, cache_dir=tmp_path / str(threads), epochs=1
            )
            assert torch.get_num_threads() == threads  # training puts the caller's count back
    finally:
        torch.set_num_threads(before)
    for one, two in zip(trained[1], trained[2]):
        assert all(map(torch.equal, _weights(one), _weights(two))) and one.sha256 == two.sha256, one.name


def test_the_cache_key_covers_the_torch_version(monkeypatch):
    key = zoo.cache_key("ab" * 32, (1, 28, 28), "cnn", 10, 0, 3)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert zoo.cache_key("ab" * 32, (1, 28, 28), "cnn", 10, 0, 3) != key


def _tamper(path: pathlib.Path, change, metadata: dict | None = None) -> None:
    """Rewrite the weights at ``path`` through ``change``, keeping its metadata unless given."""
    with safe_open(str(path), framework="pt") as weights:
        kept = weights.metadata()
    save_file(change(load_file(path)), str(path), metadata=kept if metadata is None else metadata)


def _scaled_last_layer(state: dict) -> dict:
    """The last layer times 1e4: the same predictions, a softmax saturated to exactly 1."""
    last = max(name for name in state if name.endswith(".weight")).rsplit(".", 1)[0]
    return {**state, **{f"{last}.{part}": state[f"{last}.{part}"] * 1e4 for part in ("weight", "bias")}}


def _resealed(change):
    """``change``, with the tensors' sha256 written beside them recomputed (a forger who knows the scheme)."""
    def rewrite(path: pathlib.Path) -> None:
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata()
        state = change(load_file(path))
        save_file(state, str(path), metadata={**metadata, "sha256": zoo.weights_sha256(state)})
    return rewrite


@pytest.mark.parametrize("tamper, reason", [
    (lambda path: _tamper(path, _scaled_last_layer), "do not match the sha256"),
    (lambda path: _tamper(path, lambda state: state, metadata={"auditor_surrogates": "1"}), "another cache key"),
    (_resealed(lambda state: {name: t.double() for name, t in state.items()}), "torch.float64, not torch.float32"),
    (_resealed(lambda state: {name: torch.full_like(t, torch.nan) for name, t in state.items()}), "NaN"),
], ids=["scaled-last-layer", "no-cache-key", "float64", "nan"])
def test_a_tampered_cache_file_is_retrained_over_with_a_warning(tmp_path, caplog, tamper, reason):
    """A cached file with the last layer scaled by 1e4 (same predictions, a
    saturated cross-entropy, zero gradients) was loaded silently, and raised
    transfer robust accuracy from 0 % to 85 %; the weights' sha256 goes into
    results.json, the same from the cache as from training."""
    data = _tiny_data()
    (first,) = zoo.train_surrogates(data, 1, num_classes=10, seed=3, cache_dir=tmp_path, epochs=1)
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as weights:
        assert weights.metadata()["sha256"] == first.sha256 == zoo.weights_sha256(load_file(path))
    (cached,) = zoo.train_surrogates(data, 1, num_classes=10, seed=3, cache_dir=tmp_path, epochs=1)
    assert cached.sha256 == first.sha256 and "rejected" not in caplog.text
    tamper(path)
    (again,) = zoo.train_surrogates(data, 1, num_classes=10, seed=3, cache_dir=tmp_path, epochs=1)
    assert f"cached weights {path} rejected" in caplog.text and reason in caplog.text
    assert again.sha256 == first.sha256 and all(map(torch.equal, _weights(again), _weights(first)))
    assert zoo.weights_sha256(load_file(path)) == first.sha256  # rewritten


def test_the_catalogue_offers_the_logit_loss_and_rap_without_late_start_on_request(tiny_cnn, batch):
    """design.md §4 lists RAP and RAP-LS, and the CE and logit losses; the
    catalogue had only RAP with its late start and CE."""
    by_label = {attack.label: attack for attack in CATALOGUE}
    logit, plain_rap = by_label["transfer-mi-di-ti-logit-linf"], by_label["transfer-mi-di-ti-rap-no-ls-linf"]
    late = by_label["transfer-mi-di-ti-rap-linf"]
    assert logit.loss == "logit" and [t.tag for t in logit.transforms] == ["di", "ti", "mi"]
    assert (plain_rap.steps, plain_rap.rel_step) == (late.steps, late.rel_step)
    assert plain_rap.transforms[-1].late_start == 0 and late.transforms[-1].late_start == 5
    assert "transfer-mi-di-ti-rap-no-ls-l2" in by_label and "transfer-mi-di-ti-logit-l2" in by_label
    # outside the default battery: a default scan is no slower
    assert isinstance(logit, OnRequest) and not logit.in_default_battery and late.in_default_battery
    x, y = batch
    oracle = SurrogateOracle([tiny_cnn])
    assert not torch.equal(plain_rap(oracle, x, y, eps=0.3, seed=0).x_adv, late(oracle, x, y, eps=0.3, seed=0).x_adv)
