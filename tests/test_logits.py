"""White-box attacks run on the logits beneath a model's final softmax."""

from __future__ import annotations

import pytest
import torch
from helpers import SCALE, softmax_onnx
from torch import nn
from torch.nn import functional as F

import auditor
from auditor.models import load_model
from auditor.models.logits import logits_before_softmax
from auditor.scan import resolve_surrogates


class Functional(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return F.softmax(self.inner(x), dim=1)


class Method(Functional):
    def forward(self, x):
        return self.inner(x).softmax(-1)


class Branching(Functional):
    """Control flow on a tensor: torch.fx cannot trace it."""

    def forward(self, x):
        logits = self.inner(x)
        return F.softmax(logits, dim=1) if logits.sum() > -1e9 else logits


class Cast(Functional):
    def forward(self, x):
        return F.softmax(self.inner(x), dim=1).float()


class TrainingDropout(Functional):
    """Reads ``self.training``, which torch.fx freezes when it traces."""

    def forward(self, x):
        return F.softmax(F.dropout(self.inner(x), 0.5, self.training), dim=1)


@pytest.fixture
def x(mnist_test):
    return mnist_test.x[:16]


@pytest.mark.parametrize("wrap", [
    lambda inner: nn.Sequential(inner, nn.Softmax(dim=1)),
    lambda inner: nn.Sequential(nn.Identity(), nn.Sequential(inner, nn.Softmax(dim=-1))),
    Functional,
    Method,
    lambda inner: nn.Sequential(inner, nn.Softmax(dim=1), nn.Identity(), nn.Dropout(), nn.Flatten()),
    Cast,
], ids=["sequential", "nested", "functional", "method", "then-no-ops", "then-float"])
def test_the_final_softmax_of_a_torch_module_is_removed(tiny_cnn, x, wrap):
    module = wrap(tiny_cnn).eval()
    logits = logits_before_softmax(module, x)
    assert logits is not None
    torch.testing.assert_close(logits(x), tiny_cnn(x))
    torch.testing.assert_close(module(x), torch.softmax(tiny_cnn(x), dim=1))  # the model is untouched


def test_the_final_softmax_of_a_torch_export_program_is_removed(tiny_cnn, x, tmp_path):
    path = tmp_path / "softmax.pt2"
    program = torch.export.export(nn.Sequential(tiny_cnn, nn.Softmax(dim=1)).eval(), (x,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    module = load_model(path).torch_module()
    logits = logits_before_softmax(module, x)
    assert logits is not None
    torch.testing.assert_close(logits(x[:5]), tiny_cnn(x[:5]))


@pytest.mark.parametrize("after", [(), ("Identity", "Cast")])
def test_the_softmax_node_of_an_onnx_graph_is_removed(example_onnx, x, tmp_path, after):
    model = load_model(softmax_onnx(example_onnx, tmp_path / "softmax.onnx", after=after))
    logits = logits_before_softmax(model.torch_module(), x)
    assert logits is not None
    expected = load_model(example_onnx).torch_module()(x) * SCALE
    torch.testing.assert_close(logits(x), expected, rtol=1e-4, atol=1e-3)
    assert (model.torch_module()(x) == 0).any()  # what the attacks saw before: underflowed probabilities


@pytest.mark.parametrize("wrap", [
    lambda inner: inner,
    lambda inner: nn.Sequential(inner, nn.Softmax(dim=0)),
    lambda inner: nn.Sequential(inner, nn.Softmax(dim=1), nn.Hardtanh(0.0, 0.5)),
    lambda inner: torch.jit.script(nn.Sequential(inner, nn.Softmax(dim=1))),
    Branching,
], ids=["no-softmax", "softmax-over-the-batch", "softmax-then-more", "torchscript", "untraceable"])
def test_a_softmax_that_does_not_end_the_model_over_its_classes_stays(tiny_cnn, x, wrap):
    assert logits_before_softmax(wrap(tiny_cnn).eval(), x) is None


def test_for_training_a_forward_that_reads_the_training_mode_keeps_its_softmax(tiny_cnn, x):
    module = TrainingDropout(tiny_cnn).eval()
    assert logits_before_softmax(module, x) is not None  # attacks run in eval mode
    assert logits_before_softmax(module, x, training=True) is None  # the trace froze dropout off
    assert not module.training


def test_a_white_box_scan_of_a_softmax_model_breaks_what_the_logits_model_breaks(example_onnx, tmp_path):
    """Before: APGD-T on the underflowed probabilities of the same network
    left most digits standing; the harness overstated robust accuracy."""
    settings = dict(samples=20, eps=[0.1], attacks=["apgd-t"], access="white-box")
    logits = auditor.scan(example_onnx, **settings).results
    softmax = auditor.scan(softmax_onnx(example_onnx, tmp_path / "softmax.onnx"), **settings).results
    assert softmax["robust_accuracy"] == logits["robust_accuracy"]
    assert logits["robust_accuracy"]["0.1"] < 0.5
    ids = [check["id"] for check in softmax["checks"]]
    assert "softmax-removed" in ids and "softmax-outputs" not in ids


def test_a_softmax_kept_at_white_box_warns_and_fails_the_default_policy(tiny_cnn, tmp_path):
    path = tmp_path / "softmax.pt"
    torch.jit.script(nn.Sequential(tiny_cnn, nn.Softmax(dim=1)).eval()).save(str(path))
    results = auditor.scan(path, samples=10, eps=[0.1], attacks=["fgsm"], access="white-box",
                           policy="default").results
    ids = [check["id"] for check in results["checks"]]
    assert "softmax-outputs" in ids and "softmax-removed" not in ids
    (no_checks,) = [verdict for verdict in results["policy"]["requirements"] if verdict["id"] == "no_checks"]
    assert not no_checks["passed"] and "softmax-outputs" in no_checks["actual"]


def test_other_access_levels_attack_the_probabilities_without_a_check(example_onnx, tmp_path):
    path = softmax_onnx(example_onnx, tmp_path / "softmax.onnx")
    results = auditor.scan(path, samples=4, eps=[0.1], access="hard-label", attacks=["random-noise"],
                           budget=10).results
    assert not {"softmax-outputs", "softmax-removed"} & {check["id"] for check in results["checks"]}


def test_transfer_attacks_use_the_logits_beneath_a_surrogates_softmax(example_onnx, mnist_test, tmp_path):
    surrogate = softmax_onnx(example_onnx, tmp_path / "softmax.onnx")
    x, y = mnist_test.x[:16], mnist_test.y[:16]
    found, _ = resolve_surrogates([surrogate], 0, mnist_test, x, y, num_classes=10, seed=0)
    with torch.no_grad():
        outputs = found[0].module(x)
    assert outputs.min() < 0  # logits, not probabilities
    torch.testing.assert_close(torch.softmax(outputs, dim=1), load_model(surrogate).forward(x), atol=1e-3, rtol=0)
