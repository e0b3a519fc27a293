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


@pytest.fixture
def x(mnist_test):
    return mnist_test.x[:16]


@pytest.mark.parametrize("wrap", [
    lambda inner: nn.Sequential(inner, nn.Softmax(dim=1)),
    lambda inner: nn.Sequential(nn.Identity(), nn.Sequential(inner, nn.Softmax(dim=-1))),
    Functional,
    Method,
], ids=["sequential", "nested", "functional", "method"])
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


def test_the_softmax_node_of_an_onnx_graph_is_removed(example_onnx, x, tmp_path):
    model = load_model(softmax_onnx(example_onnx, tmp_path / "softmax.onnx"))
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


def test_a_softmax_kept_at_white_box_still_warns(tiny_cnn, tmp_path):
    path = tmp_path / "softmax.pt"
    torch.jit.script(nn.Sequential(tiny_cnn, nn.Softmax(dim=1)).eval()).save(str(path))
    results = auditor.scan(path, samples=10, eps=[0.1], attacks=["fgsm"], access="white-box").results
    ids = [check["id"] for check in results["checks"]]
    assert "softmax-outputs" in ids and "softmax-removed" not in ids


def test_transfer_attacks_use_the_logits_beneath_a_surrogates_softmax(example_onnx, mnist_test, tmp_path):
    surrogate = softmax_onnx(example_onnx, tmp_path / "softmax.onnx")
    x, y = mnist_test.x[:16], mnist_test.y[:16]
    found, _ = resolve_surrogates([surrogate], 0, mnist_test, x, y, num_classes=10, seed=0)
    with torch.no_grad():
        outputs = found[0].module(x)
    assert outputs.min() < 0  # logits, not probabilities
    torch.testing.assert_close(torch.softmax(outputs, dim=1), load_model(surrogate).forward(x), atol=1e-3, rtol=0)
