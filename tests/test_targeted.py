"""Targeted audits: only targeted attacks run, and only hitting the target counts."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

import auditor
from auditor.access import Access
from auditor.attacks.whitebox.apgd_t import APGDTargeted
from auditor.battery import build_battery, run_battery, runnable
from auditor.cli import main
from auditor.errors import AuditError
from auditor.models.base import ModelInfo
from auditor.models.pytorch import TorchModel
from auditor.oracles import GradientOracle
from auditor.verify import verify


@pytest.fixture(scope="module")
def targeted_scan(tmp_path_factory, example_onnx):
    out = tmp_path_factory.mktemp("targeted")
    audit = auditor.scan(example_onnx, "mnist", access="soft-label", samples=20, eps=[0.3], budget=300,
                         attacks=["square-linf"], target="random", out=out)
    return audit, out


def test_random_targets_are_never_the_label_and_are_recorded(targeted_scan):
    audit, _ = targeted_scan
    results = audit.results
    assert results["threat"]["target"] == {"mode": "random"}
    targets = [sample["target"] for sample in results["samples"]]
    assert all(t is not None and t != sample["label"] for t, sample in zip(targets, results["samples"]))
    assert len(set(targets)) > 3  # drawn per sample, not one class for all


def test_targeted_examples_hit_their_target_on_a_fresh_session(targeted_scan, example_onnx):
    audit, out = targeted_scan
    adversarials = np.load(out / "adversarials.npz")
    assert len(adversarials["index"]) > 0
    session = onnxruntime.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {session.get_inputs()[0].name: adversarials["x_adv"]})[0].argmax(1)
    target_of = {s["index"]: s["target"] for s in audit.results["samples"]}
    assert predicted.tolist() == [target_of[int(i)] for i in adversarials["index"]]
    assert "targeted" in (out / "report.html").read_text()


def test_misclassified_but_off_target_does_not_count(tiny_cnn, mnist_test):
    model = TorchModel(tiny_cnn, ModelInfo("tiny", "state-dict", "0", (1, 28, 28), 10), device="cpu")
    x, y = mnist_test.x[:50], mnist_test.y[:50]
    noisy = (x + 0.5 * torch.randn_like(x)).clamp(0, 1)
    predicted = model.forward(noisy).argmax(1)
    wrong = predicted != y
    assert wrong.any()
    off_target = torch.where(predicted == (y + 1) % 10, (y + 2) % 10, (y + 1) % 10)
    checked = verify(model, x, noisy, y, "linf", target=off_target)
    assert not checked.fooled.any()
    on_target_where_wrong = torch.where(wrong, predicted, off_target)
    assert torch.equal(verify(model, x, noisy, y, "linf", target=on_target_where_wrong).fooled, wrong)


def test_apgd_t_reaches_a_given_target(tiny_cnn, mnist_test):
    x, y = mnist_test.x[:40], mnist_test.y[:40]
    target = (y + 1) % 10
    result = APGDTargeted(steps=30)(GradientOracle(tiny_cnn, len(y)), x, y, eps=0.3, seed=0, target=target)
    with torch.no_grad():
        predicted = tiny_cnn(result.x_adv).argmax(1)
    assert result.success.float().mean() > 0.5
    assert torch.equal(predicted[result.success], target[result.success])
    # one target only: at most 1 + (steps + 1) queries per sample
    assert int(result.queries.max()) <= 32


def test_targeted_battery_keeps_only_targeted_attacks():
    battery = build_battery(Access.WHITE_BOX, "linf", targeted=True)
    assert all(attack.targeted for attack in battery.attacks)
    assert ("apgd-ce-linf", "no targeted mode") in battery.skipped
    hard_label = build_battery(Access.HARD_LABEL, "linf", targeted=True)
    assert [a.label for a in hard_label.attacks] == ["sign-opt-linf", "hop-skip-jump-linf", "random-noise-linf"]
    assert hard_label.skipped == ()
    with pytest.raises(AuditError, match="pgd-linf has no targeted mode"):
        build_battery(Access.WHITE_BOX, "linf", ["pgd-linf"], targeted=True)


def test_a_fixed_target_class_leaves_out_its_own_samples(example_onnx):
    audit = auditor.scan(example_onnx, "mnist", access="hard-label", samples=30, eps=[0.3], budget=20,
                         attacks=["random-noise-linf"], target=3)
    results = audit.results
    assert results["threat"]["target"] == {"mode": "class", "class": 3, "left_out": 3}
    assert results["data"]["n"] == 27
    assert all(s["label"] != 3 and s["target"] == 3 for s in results["samples"])


@pytest.mark.parametrize("value, message", [
    ("12", "not a class"), ("sideways", "--target must be"),
    (" 3", "--target must be"), ("+3", "--target must be"), ("\u0663", "--target must be"),  # int() takes them
    ("9" * 4301, "is not a class"),  # int() refuses so many digits
])
def test_bad_target_is_a_one_line_error(example_onnx, tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", str(example_onnx), "--target", value, "-n", "10", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "results.json").exists()
    json.dumps(err)


def test_least_likely_targets_are_the_lowest_scored_other_class(example_onnx):
    from auditor.data import load_data
    from auditor.models import load_model
    from auditor.scan import resolve_targets

    model, data = load_model(example_onnx), load_data("mnist")
    x, y = data.x[:200], data.y[:200]
    targets, keep, entry = resolve_targets("least-likely", model.forward(x), y, 10, seed=0, indices=range(200))
    assert entry == {"mode": "least-likely"} and keep.all()
    assert (targets != y).all()  # even where the label itself scores lowest
    scores = model.forward(x).double()
    scores[torch.arange(len(y)), y] = float("inf")
    assert torch.equal(targets, scores.argmin(1))


def test_a_random_target_depends_on_the_sample_not_on_the_subset():
    """A sample keeps its random target whichever other samples are audited
    with it (``-n`` 16 or 32, another order); another seed draws anew."""
    from auditor.scan import resolve_targets

    y = torch.arange(32) % 10
    logits = torch.zeros(32, 10)
    every, _, _ = resolve_targets("random", logits, y, 10, seed=0, indices=range(100, 132))
    half, _, _ = resolve_targets("random", logits[:16], y[:16], 10, seed=0, indices=range(100, 116))
    odd, _, _ = resolve_targets("random", logits[1::2], y[1::2], 10, seed=0, indices=range(101, 132, 2))
    reseeded, _, _ = resolve_targets("random", logits, y, 10, seed=1, indices=range(100, 132))
    assert torch.equal(half, every[:16]) and torch.equal(odd, every[1::2])
    assert (every != y).all() and len(set(every.tolist())) > 3
    assert not torch.equal(reseeded, every)


def test_targeted_apgd_records_the_one_target_it_runs():
    """A targeted audit gives each sample its one target: APGD-T's recorded
    n_target_classes said 9, the untargeted effort."""
    def apgd_t(targeted: bool) -> APGDTargeted:
        battery = build_battery(Access.WHITE_BOX, "linf", ["apgd-t-linf"], targeted=targeted)
        (attack,) = runnable(battery, 100, (1, 28, 28), 10).attacks
        return attack

    assert apgd_t(targeted=True).params()["n_target_classes"] == 1
    assert apgd_t(targeted=False).params()["n_target_classes"] == 9


def test_clean_errors_are_not_robust_in_a_targeted_audit(tiny_cnn, mnist_test):
    """A sample the model gets wrong before any attack counts as broken
    whatever class it outputs, so robust accuracy never exceeds clean."""
    model = TorchModel(tiny_cnn, ModelInfo("tiny", "state-dict", "0", (1, 28, 28), 10), device="cpu")
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    clean = model.forward(x).argmax(1)
    target = torch.where(clean == (y + 1) % 10, (y + 2) % 10, (y + 1) % 10)  # never the clean output
    wrong = clean != y
    assert wrong.any()
    battery = build_battery(Access.HARD_LABEL, "linf", ["random-noise-linf"], targeted=True)
    outcome = run_battery(battery, model, x, y, eps_list=[0.01], budget=2, seed=0, target=target)
    records = outcome.records
    assert torch.equal(records.distortion == 0, wrong)
    assert (records.broken_by[wrong.numpy()] == "clean").all()
    assert records.robust_accuracy([0.01])[0.01] <= 1 - float(wrong.double().mean())


def _few_class_model(directory, classes: int, train, test):
    """A linear classifier of the digits 0 … ``classes``-1, trained for one
    epoch, saved as TorchScript, and 20 test digits of those classes."""
    from helpers import fit

    torch.manual_seed(0)
    keep = train.y < classes
    module = fit(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, classes)),
                 train.x[keep], train.y[keep], epochs=1)
    torch.jit.trace(module, torch.zeros(1, 1, 28, 28)).save(str(directory / "model.pt"))
    keep = test.y < classes
    x, y = test.x[keep][:20], test.y[keep][:20]
    np.savez(directory / "digits.npz", x=x.numpy(), y=y.numpy())
    return module, x, y


def _scan(directory, **options):
    return auditor.scan(str(directory / "model.pt"), str(directory / "digits.npz"), access="white-box", eps=[0.2],
                        budget=30, **options).results


def test_a_targeted_white_box_audit_of_a_two_class_model_runs_apgd_t(tmp_path, mnist_train, mnist_test):
    """With 2 classes the least-likely target is the other class, so the
    targeted audit is the untargeted one. APGD-T (its margin loss below 4
    classes) finds every example there is: on a linear model the best
    point of the L∞ box is one of its corners, known exactly. Square on 30
    queries alone leaves far more samples robust, and was all that ran."""
    module, x, y = _few_class_model(tmp_path, 2, mnist_train, mnist_test)
    targeted = _scan(tmp_path, target="least-likely")
    (apgd_t,) = [attack for attack in targeted["attacks"] if attack["name"] == "apgd-t-linf"]
    assert apgd_t["params"]["n_target_classes"] == 1  # the one other class, not the configured 9
    assert "no-gradient-attack" not in {check["id"] for check in targeted["checks"]}
    with torch.no_grad():
        weight, bias = module[1].weight, module[1].bias
        w, b = weight[1 - y] - weight[y], bias[1 - y] - bias[y]  # z_t - z_y = w·x + b
        lo, hi = (x - 0.2).clamp(min=0).flatten(1), (x + 0.2).clamp(max=1).flatten(1)
        best = (w * torch.where(w > 0, hi, lo)).sum(1) + b
    exact = float((best < 0).double().mean())
    assert 0.1 < exact < 0.9
    assert targeted["robust_accuracy"]["0.2"] == pytest.approx(exact)
    assert _scan(tmp_path)["robust_accuracy"]["0.2"] == pytest.approx(exact)
    square = _scan(tmp_path, target="least-likely", attacks=["square"])
    assert square["robust_accuracy"]["0.2"] >= exact + 0.2


def test_a_targeted_white_box_audit_of_a_three_class_model_runs_apgd_t(tmp_path, mnist_train, mnist_test):
    """APGD-T breaks samples Square on 30 queries, all that ran before, left
    robust, and its examples reach their targets, not only another class."""
    module, _, _ = _few_class_model(tmp_path, 3, mnist_train, mnist_test)
    targeted = _scan(tmp_path, target="random", out=tmp_path / "out")
    assert "apgd-t-linf" in [attack["name"] for attack in targeted["attacks"]]
    assert "apgd-t-linf" in {sample["broken_by"] for sample in targeted["samples"]}
    square = _scan(tmp_path, target="random", attacks=["square"])
    assert targeted["robust_accuracy"]["0.2"] <= square["robust_accuracy"]["0.2"] - 0.3
    adversarials = np.load(tmp_path / "out" / "adversarials.npz")
    target_of = {sample["index"]: sample["target"] for sample in targeted["samples"]}
    with torch.no_grad():
        predicted = module(torch.from_numpy(adversarials["x_adv"])).argmax(1)
    assert predicted.tolist() == [target_of[int(i)] for i in adversarials["index"]]


def test_a_target_class_missing_from_the_data_raises_no_target_image(example_onnx, mnist_test, tmp_path):
    """Sign-OPT starts each sample from a data image of its target: with no
    image of the target class it cannot attack, and the audit says so."""
    keep = mnist_test.y != 7
    np.savez(tmp_path / "no7.npz", x=mnist_test.x[keep][:40].numpy(), y=mnist_test.y[keep][:40].numpy())
    options = dict(access="hard-label", samples=6, norm="l2", eps=[2.0], budget=40, attacks=["sign-opt-l2"])
    missing = auditor.scan(example_onnx, str(tmp_path / "no7.npz"), target=7, **options).results
    (check,) = [c for c in missing["checks"] if c["id"] == "no-target-image"]
    assert check["level"] == "warning"
    assert "6 of the 6 samples" in check["message"] and "(class 7)" in check["message"]
    assert missing["robust_accuracy"]["2"] == 1.0  # what the check warns about
    present = auditor.scan(example_onnx, str(tmp_path / "no7.npz"), target=3, **options).results
    assert "no-target-image" not in {c["id"] for c in present["checks"]}
