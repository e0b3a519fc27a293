"""ONNX -> torch conversion: agreement with onnxruntime, input gradients, and clear refusals."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import auditor
from auditor.access import Access
from auditor.data.base import Dataset
from auditor.errors import AuditError
from auditor.models import check_model_on_data, load_model
from auditor.models.base import Normalize
from auditor.models.convert import ConversionError, check_agreement, convert_onnx
from auditor.models.logits import attacked_module, logits_before_softmax

BATCH = torch.export.Dim("batch")
EXPORT_BATCH = 3
CHECK_BATCH = 5
"""The agreement checks use a batch size the graphs were not exported with."""


def _dynamo(opset: int) -> dict:
    return {"opset_version": opset, "dynamic_shapes": ({0: BATCH},)}


LEGACY = {"dynamo": False, "opset_version": 17, "input_names": ["x"], "dynamic_axes": {"x": {0: "n"}}}
LEGACY_UNFOLDED = {**LEGACY, "do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE}
"""Keeps BatchNormalization nodes as they are instead of folding them into Conv."""


class Quantised(nn.Module):
    """Rounds the input to 8 bits before a small CNN: a non-differentiable defence."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)


class ViewNet(nn.Module):
    """``x.view(x.size(0), -1)``: a Shape -> Gather -> Concat -> Reshape chain in the legacy export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return F.softmax(self.fc(h.view(h.size(0), -1)), dim=1)


class KitchenSink(nn.Module):
    """Padding, pooling, upsampling, splitting, slicing and reductions in one classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(16, 10)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1))

    def forward(self, x):
        x = F.pad(torch.clamp(x, 0.05, 0.95), (1, 0, 1, 0), mode="replicate")
        h = F.hardswish(self.conv(x)) * self.scale
        h = F.max_pool2d(h, 3, 2, padding=1, ceil_mode=True)
        h = F.avg_pool2d(h, 3, 1, padding=1, count_include_pad=False)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        a, b = torch.split(h, [2, 4], dim=1)
        h = torch.cat([b, a.flip(1)], 1)[:, :, 1:-1, ::2]
        tokens = h.permute(0, 2, 3, 1).reshape(h.size(0), -1, 6)
        pooled = torch.cat([tokens.mean(1), tokens.amax(1)], 1)
        extra = torch.stack(
            [
                pooled.pow(2).sum(1).sqrt(),
                torch.exp(-pooled.abs()).sum(1),
                torch.log1p(pooled.abs()).mean(1),
                torch.where(pooled > 0, pooled, 0.1 * pooled).min(1).values,
            ],
            1,
        )
        z = torch.cat([pooled, extra], 1)
        logits = self.fc(torch.maximum(z, z.new_full((1,), -3.0)).unsqueeze(1)).squeeze(1)
        return F.log_softmax(logits, -1)


class Upsampler(nn.Module):
    """Nearest upsampling between a conv and the classifier: ``Upsample`` at
    opset 9 and ``Resize`` (inputs X, scales) at opset 10 in the legacy export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2)
        self.fc = nn.Linear(2 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(F.interpolate(torch.relu(self.conv(x)), scale_factor=2, mode="nearest").flatten(1))


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 64),
        nn.BatchNorm1d(64),
        nn.LeakyReLU(0.1),
        nn.Dropout(0.3),
        nn.Linear(64, 32),
        nn.GELU(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        net[2].running_mean.uniform_(-0.5, 0.5)
        net[2].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _resnet() -> nn.Module:
    torch.manual_seed(2)
    resnet = torchvision.models.resnet18(weights=None, num_classes=10)
    return nn.Sequential(Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)), resnet).eval()


def _seeded(module_factory) -> nn.Module:
    torch.manual_seed(3)
    return module_factory().eval()


def _session_forward(path):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return forward


def _input_gradient(module: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (module(x) * weights).sum().backward()
    return x.grad


def _export_and_compare(original: nn.Module, shape: tuple[int, ...], path, export_kwargs) -> dict:
    """Export ``original``, convert it, and check logits and input gradients
    on a batch of a size it was not exported with."""
    torch.onnx.export(original, (torch.rand(EXPORT_BATCH, *shape),), str(path), **export_kwargs)
    started = time.perf_counter()
    module = convert_onnx(onnx.load(str(path)))
    seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(CHECK_BATCH, *shape, generator=generator)
    diff = check_agreement(module, _session_forward(path), x, atol=1e-4, rtol=0)
    with torch.no_grad():
        weights = torch.randn(original(x).shape, generator=generator)
    got = _input_gradient(module, x, weights)
    want = _input_gradient(original, x, weights)
    scale = want.abs().max().clamp_min(1e-12)
    gradient_error = float((got - want).abs().max() / scale)
    assert gradient_error <= 1e-4
    return {"diff": diff, "gradient_error": gradient_error, "seconds": seconds}


@pytest.mark.parametrize("opset", [18, 19, 20])
def test_dynamo_export_of_tiny_cnn(tiny_cnn, tmp_path, opset):
    _export_and_compare(tiny_cnn, (1, 28, 28), tmp_path / "tiny.onnx", _dynamo(opset))


@pytest.mark.parametrize(
    ("factory", "shape", "export_kwargs"),
    [
        pytest.param(ViewNet, (1, 28, 28), LEGACY, id="legacy-view-shape-chain"),
        pytest.param(ViewNet, (1, 28, 28), LEGACY_UNFOLDED, id="legacy-unfolded-batchnorm"),
        pytest.param(ViewNet, (1, 28, 28), {**LEGACY, "opset_version": 13}, id="legacy-opset13"),
        pytest.param(KitchenSink, (3, 16, 16), {**LEGACY, "opset_version": 13}, id="kitchen-sink-legacy-opset13"),
        pytest.param(KitchenSink, (3, 16, 16), LEGACY, id="kitchen-sink-legacy-opset17"),
        pytest.param(KitchenSink, (3, 16, 16), _dynamo(18), id="kitchen-sink-dynamo-opset18"),
        pytest.param(Quantised, (1, 28, 28), LEGACY, id="quantised-legacy"),
    ],
)
def test_converted_models_agree(tmp_path, factory, shape, export_kwargs):
    _export_and_compare(_seeded(factory), shape, tmp_path / "model.onnx", export_kwargs)


def test_legacy_export_of_tiny_cnn(tiny_cnn, tmp_path):
    _export_and_compare(tiny_cnn, (1, 28, 28), tmp_path / "tiny.onnx", LEGACY)


@pytest.mark.parametrize("opset", [9, 10])
def test_nearest_upsampling_exported_before_opset_11(tmp_path, opset):
    export_kwargs = {**LEGACY, "opset_version": opset}
    _export_and_compare(_seeded(Upsampler), (1, 28, 28), tmp_path / "up.onnx", export_kwargs)


@pytest.mark.parametrize("export_kwargs", [LEGACY, _dynamo(18), _dynamo(20)], ids=["legacy", "dynamo18", "dynamo20"])
def test_mlp_with_batchnorm_dropout_leaky_relu_gelu(tmp_path, export_kwargs):
    _export_and_compare(_mlp(), (1, 28, 28), tmp_path / "mlp.onnx", export_kwargs)


@pytest.mark.parametrize("export_kwargs", [LEGACY, _dynamo(18)], ids=["legacy", "dynamo18"])
def test_normalised_resnet18(tmp_path, export_kwargs):
    result = _export_and_compare(_resnet(), (3, 32, 32), tmp_path / "resnet.onnx", export_kwargs)
    assert result["seconds"] < 5


def test_quantised_input_converts_with_zero_gradients(tmp_path):
    path = tmp_path / "quantised.onnx"
    torch.onnx.export(_seeded(Quantised), (torch.rand(2, 1, 28, 28),), str(path), **_dynamo(18))
    proto = onnx.load(str(path))
    assert "Round" in {node.op_type for node in proto.graph.node}
    module = convert_onnx(proto)
    x = torch.rand(CHECK_BATCH, 1, 28, 28)
    check_agreement(module, _session_forward(path), x)
    gradient = _input_gradient(module, x, torch.ones(CHECK_BATCH, 10))
    assert torch.count_nonzero(gradient) == 0


def test_example_model_is_white_box(example_onnx, mnist_test):
    model = load_model(example_onnx)
    level, reason = model.access_ceiling
    assert level == Access.WHITE_BOX
    assert "verification stays on onnxruntime" in reason
    module = model.torch_module()
    assert module is not None and not module.training
    images = mnist_test.x[:7].to(model.device)
    with torch.no_grad():
        torch.testing.assert_close(module(images), model.forward(images), atol=1e-4, rtol=1e-4)
    x = images.clone().requires_grad_(True)
    module(x).logsumexp(1).sum().backward()
    assert x.grad.abs().sum() > 0


def test_normalisation_is_folded_into_the_module(tiny_cnn, mnist_test, tmp_path):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_cnn, (torch.rand(2, 1, 28, 28),), str(path), **_dynamo(18))
    model = load_model(path, mean=(0.1307,), std=(0.3081,), device="cpu")
    images = mnist_test.x[:6]
    with torch.no_grad():
        torch.testing.assert_close(model.torch_module()(images), model.forward(images), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            model.torch_module()(images), tiny_cnn((images - 0.1307) / 0.3081), atol=1e-4, rtol=1e-4
        )


def _hand_made(path, op_type: str, domain: str = "") -> None:
    """x (N,1,4,4) -> Flatten -> ``op_type`` -> logits (N,16)."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node(op_type, ["flat"], ["logits"], domain=domain),
    ]
    graph = helper.make_graph(
        nodes,
        "hand-made",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 16])],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))


@pytest.mark.parametrize(
    ("op_type", "domain", "named"),
    [("Hardmax", "", "Hardmax"), ("Gelu", "com.microsoft", "com.microsoft.Gelu")],
    ids=["hardmax", "custom-domain"],
)
def test_unsupported_op_caps_access_at_soft_label(tmp_path, op_type, domain, named):
    path = tmp_path / "odd.onnx"
    _hand_made(path, op_type, domain)
    with pytest.raises(ConversionError, match=f"unsupported ONNX op\\(s\\): {named}$"):
        convert_onnx(onnx.load(str(path)))
    model = load_model(path)
    level, reason = model.access_ceiling
    assert level == Access.SOFT_LABEL
    assert named in reason and "\n" not in reason
    assert model.torch_module() is None
    assert model.forward(torch.rand(3, 1, 4, 4)).shape == (3, 16)


def test_an_unexpected_converter_error_caps_access_with_a_warning(tmp_path, monkeypatch, caplog):
    """A refused op is logged as information; any other error may be a converter bug that costs
    the audit its white-box access, so it is a warning naming the error's type."""
    import logging

    from auditor.models.onnxrt import OnnxModel

    path = tmp_path / "odd.onnx"
    _hand_made(path, "Hardmax", "")
    with caplog.at_level(logging.INFO, logger="auditor"):
        load_model(path)
    assert [record.levelno for record in caplog.records if "no gradients" in record.message] == [logging.INFO]
    caplog.clear()

    def broken(self, file, image_shape):
        raise KeyError("axis")

    monkeypatch.setattr(OnnxModel, "_converted", broken)
    with caplog.at_level(logging.INFO, logger="auditor"):
        level, reason = load_model(path).access_ceiling
    assert level == Access.SOFT_LABEL and "KeyError" in reason
    assert [record.levelno for record in caplog.records if "no gradients" in record.message] == [logging.WARNING]


def test_symbolic_image_size_caps_access_at_soft_label(tmp_path):
    net = _seeded(lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)))
    path = tmp_path / "any_size.onnx"
    axes = {"x": {0: "n", 2: "h", 3: "w"}}
    torch.onnx.export(net, (torch.rand(2, 1, 28, 28),), str(path), **{**LEGACY, "dynamic_axes": axes})
    level, reason = load_model(path).access_ceiling
    assert level == Access.SOFT_LABEL
    assert "symbolic input shape" in reason


def test_disagreement_is_reported():
    x = torch.zeros(2, 1, 2, 2)
    assert check_agreement(nn.Flatten(), lambda images: images.flatten(1), x) == 0.0
    with pytest.raises(ConversionError, match="converted graph disagrees with onnxruntime: max abs diff 0.5"):
        check_agreement(nn.Flatten(), lambda images: images.flatten(1) + 0.5, x)


def test_float16_cnn_is_white_box_and_a_wrong_conversion_still_refused(tmp_path):
    """float32's tolerances are below float16 rounding: logits near 1 differ
    by an ulp (~1e-3) between torch and onnxruntime, both as far from float64."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "Wf"], ["logits"]),
    ]
    weights = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float16), "W"),
        numpy_helper.from_array((rng.standard_normal((64, 10)) * 0.3).astype(np.float16), "Wf"),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["n", 10])],
        weights,
    )
    path = tmp_path / "fp16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    model = load_model(path, device="cpu")
    assert model.access_ceiling[0] == Access.WHITE_BOX
    x = torch.rand(CHECK_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    module = convert_onnx(onnx.load(str(path)))
    assert module.precision == torch.float16
    with pytest.raises(ConversionError, match="converted graph disagrees with onnxruntime"):
        check_agreement(module, lambda images: model.forward(images) + 0.05, x, precision=module.precision)


def test_input_without_a_shape_is_refused_clearly(tmp_path):
    path = tmp_path / "no_shape.onnx"
    _hand_made(path, "Relu")
    proto = onnx.load(str(path))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    onnx.save(proto, str(path))
    message = r"input 'x' has no declared shape .*; re-export it with an \(N, C, H, W\) input shape$"
    with pytest.raises(AuditError, match=message):
        load_model(path)


# Single ops at the opsets where their inputs and attributes changed -------------------------


def _single_node(op_type, x_shape, constants, attrs, opset, outputs=1):
    """A one-node graph on input x; ``constants`` are the node's other inputs
    (``None`` leaves an optional input out). The graph returns the last output."""
    names, initializers = ["x"], []
    for index, value in enumerate(constants):
        if value is None:
            names.append("")
            continue
        names.append(f"c{index}")
        initializers.append(numpy_helper.from_array(np.asarray(value), f"c{index}"))
    output_names = [f"y{index}" for index in range(outputs)]
    graph = helper.make_graph(
        [helper.make_node(op_type, names, output_names, **attrs)],
        op_type,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(output_names[-1], TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


I64 = np.int64
OP_CASES = {
    "reshape-zero-copies": ("Reshape", [2, 3, 4], [np.array([0, -1], I64)], {}, 14),
    "reshape-allowzero": ("Reshape", [2, 3, 4], [np.array([4, 6], I64)], {"allowzero": 1}, 14),
    "squeeze-attr": ("Squeeze", [2, 1, 3, 1], [], {"axes": [1, -1]}, 11),
    "squeeze-input": ("Squeeze", [2, 1, 3, 1], [np.array([-1], I64)], {}, 13),
    "unsqueeze-attr": ("Unsqueeze", [2, 3], [], {"axes": [0, -1]}, 11),
    "unsqueeze-input": ("Unsqueeze", [2, 3], [np.array([3, 1], I64)], {}, 13),
    "reduce-mean-attr": ("ReduceMean", [2, 3, 4], [], {"axes": [1], "keepdims": 0}, 17),
    "reduce-mean-input": ("ReduceMean", [2, 3, 4], [np.array([-1, 1], I64)], {}, 18),
    "reduce-max-all": ("ReduceMax", [2, 3, 4], [], {"keepdims": 0}, 18),
    "reduce-sum-noop": ("ReduceSum", [2, 3], [np.array([], I64)], {"noop_with_empty_axes": 1}, 13),
    "reduce-l2": ("ReduceL2", [2, 3, 4], [np.array([2], I64)], {}, 18),
    "slice-negative-step": (
        "Slice", [4, 6], [np.array([-1, 5], I64), np.array([-100, 0], I64), np.array([0, 1], I64),
                          np.array([-2, -3], I64)], {}, 13,
    ),
    "slice-attrs": ("Slice", [4, 6], [], {"starts": [1], "ends": [1000], "axes": [1]}, 9),
    "split-input-sizes": ("Split", [2, 7], [np.array([3, 4], I64)], {"axis": 1}, 13, 2),
    "split-num-outputs-uneven": ("Split", [2, 7], [], {"axis": 1, "num_outputs": 3}, 18, 3),
    "split-attr": ("Split", [6, 2], [], {"split": [2, 4]}, 11, 2),
    "pad-input-reflect": ("Pad", [1, 2, 4, 4], [np.array([0, 0, 1, 2, 0, 0, 2, 1], I64)], {"mode": "reflect"}, 13),
    "pad-axes-edge": ("Pad", [1, 2, 4, 4], [np.array([1, 0, 2, 3], I64), None, np.array([2, -1], I64)],
                      {"mode": "edge"}, 18),
    "pad-constant-value": ("Pad", [2, 3], [np.array([1, 0, 0, 2], I64), np.array(0.5, np.float32)], {}, 13),
    "pad-attr": ("Pad", [2, 3], [], {"pads": [0, 1, 1, 0], "value": -1.0}, 10),
    "pad-edge-batch-and-channel": (
        "Pad", [2, 3, 4, 4], [np.array([1, 0, 0, 1, 0, 2, 1, 0], I64)], {"mode": "edge"}, 13,
    ),
    "pad-reflect-2d": ("Pad", [4, 6], [np.array([2, 1, 1, 3], I64)], {"mode": "reflect"}, 13),
    "pad-wrap-after-crop": ("Pad", [4, 6], [np.array([-1, 2, 2, -1], I64)], {"mode": "wrap"}, 19),
    "clip-max-only": ("Clip", [3, 4], [None, np.array(0.5, np.float32)], {}, 13),
    "clip-attr": ("Clip", [3, 4], [], {"min": 0.2, "max": 0.6}, 6),
    "gather-negative-scalar": ("Gather", [3, 4], [np.array(-1, I64)], {"axis": 1}, 13),
    "gather-matrix": ("Gather", [5, 2], [np.array([[0, 4], [-2, 1]], I64)], {}, 13),
    "expand-two-way": ("Expand", [3, 1], [np.array([2, 1, 4], I64)], {}, 13),
    "softmax-flattening": ("Softmax", [2, 3, 4], [], {"axis": 1}, 11),
    "softmax-axis": ("Softmax", [2, 3, 4], [], {"axis": 1}, 13),
    "log-softmax-default": ("LogSoftmax", [2, 3, 4], [], {}, 13),
    "flatten-axis0": ("Flatten", [2, 3, 4], [], {"axis": 0}, 13),
    "transpose-default": ("Transpose", [2, 3, 4], [], {}, 13),
    "gemm-transposed": (
        "Gemm", [4, 3], [np.ones((4, 5), np.float32) * 0.3, np.arange(5, dtype=np.float32)],
        {"transA": 1, "alpha": 0.5, "beta": 2.0}, 13,
    ),
    "conv-same-upper": ("Conv", [1, 2, 7, 7], [np.linspace(-1, 1, 2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)],
                        {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 13),
    "conv-asymmetric-pads": ("Conv", [1, 2, 6, 6], [np.linspace(-1, 1, 36, dtype=np.float32).reshape(2, 2, 3, 3)],
                             {"pads": [0, 1, 2, 0], "dilations": [1, 2]}, 13),
    "maxpool-asymmetric-pads": ("MaxPool", [1, 2, 6, 6], [], {"kernel_shape": [3, 3], "pads": [0, 1, 1, 0]}, 13),
    "maxpool-ceil-end-pads": (
        "MaxPool", [1, 2, 6, 6], [],
        {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}, 19,
    ),
    "avgpool-ceil-end-pads": (
        "AveragePool", [1, 2, 7, 6], [],
        {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 2, 1], "ceil_mode": 1}, 19,
    ),
    "avgpool-ceil-end-pads-counted": (
        "AveragePool", [1, 2, 5, 5], [],
        {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [0, 0, 2, 2], "ceil_mode": 1, "count_include_pad": 1},
        19,
    ),
    "avgpool-asymmetric-pads": (
        "AveragePool", [1, 2, 6, 6], [], {"kernel_shape": [3, 2], "pads": [1, 0, 0, 1], "strides": [2, 1]}, 19,
    ),
    "global-max-pool": ("GlobalMaxPool", [2, 3, 4, 4], [], {}, 13),
    "resize-nearest": (
        "Resize", [1, 2, 3, 3], [None, np.array([1, 1, 2, 3], np.float32)],
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, 13,
    ),
    "resize-bilinear-sizes": (
        "Resize", [1, 2, 3, 3], [None, None, np.array([1, 2, 5, 4], I64)], {"mode": "linear"}, 13,
    ),
    "resize-axes": (
        "Resize", [1, 2, 3, 3], [None, np.array([3, 2], np.float32)],
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor",
         "axes": [-1, 2]}, 18,
    ),
    "resize-pytorch-half-pixel-to-length-1": (
        "Resize", [1, 2, 5, 6], [None, None, np.array([1, 2, 1, 4], I64)],
        {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 13,
    ),
    "resize-opset10-nearest": (
        "Resize", [1, 2, 3, 3], [np.array([1, 1, 2, 1.5], np.float32)], {"mode": "nearest"}, 10,
    ),
    "upsample-scales-attr": ("Upsample", [1, 2, 3, 3], [], {"scales": [1.0, 1.0, 3.0, 2.0]}, 7),
    "upsample-scales-input": ("Upsample", [1, 2, 3, 3], [np.array([1, 1, 2, 2.5], np.float32)], {}, 9),
    "prelu": ("PRelu", [2, 3], [np.array([0.1, 0.2, 0.3], np.float32)], {}, 13),
    "hard-sigmoid": ("HardSigmoid", [2, 3], [], {"alpha": 0.3}, 13),
    "gelu-tanh": ("Gelu", [2, 3], [], {"approximate": "tanh"}, 20),
    "instance-norm": (
        "InstanceNormalization", [2, 3, 4], [np.ones(3, np.float32) * 2, np.zeros(3, np.float32)], {}, 13,
    ),
    "layer-norm": ("LayerNormalization", [2, 3, 4], [np.full((3, 4), 1.5, np.float32)], {"axis": 1}, 17),
    "max-variadic": ("Max", [2, 3], [np.array([0.5], np.float32), np.array(0.25, np.float32)], {}, 13),
    "mean-variadic": ("Mean", [2, 3], [np.full((2, 3), 0.5, np.float32)], {}, 13),
}


@pytest.mark.parametrize("case", list(OP_CASES.values()), ids=list(OP_CASES))
def test_single_op_matches_onnxruntime(tmp_path, case):
    op_type, x_shape, constants, attrs, opset, *outputs = case
    path = tmp_path / "op.onnx"
    onnx.save(_single_node(op_type, x_shape, constants, attrs, opset, *outputs), str(path))
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(0))
    module = convert_onnx(onnx.load(str(path)))
    check_agreement(module, _session_forward(path), x, atol=1e-5, rtol=1e-5)


REFUSED_CASES = {
    "resize-opset10-linear": (
        "Resize", [np.array([1, 1, 2, 2], np.float32)], {"mode": "linear"}, 10,
        "Resize mode 'linear' at opset 10 is not supported",
    ),
    "upsample-linear": (
        "Upsample", [np.array([1, 1, 2, 2], np.float32)], {"mode": "linear"}, 9,
        "Upsample mode 'linear' at opset 9 is not supported",
    ),
    "resize-opset10-nearest-downsampling": (
        "Resize", [np.array([1, 1, 0.6, 1], np.float32)], {"mode": "nearest"}, 10,
        "Resize nearest with a scale below 1 at opset 10 is not supported",
    ),
    "resize-keep-aspect-ratio": (
        "Resize", [None, None, np.array([1, 2, 8, 8], I64)],
        {"mode": "linear", "keep_aspect_ratio_policy": "not_larger"}, 18,
        "Resize keep_aspect_ratio_policy 'not_larger' is not supported",
    ),
}
"""(op, constants, attrs, opset, message): nodes onnxruntime runs that the converter refuses."""


@pytest.mark.parametrize("case", list(REFUSED_CASES.values()), ids=list(REFUSED_CASES))
def test_single_op_without_an_exact_conversion_is_refused(case):
    op_type, constants, attrs, opset, message = case
    module = convert_onnx(_single_node(op_type, [1, 2, 5, 6], constants, attrs, opset))
    with pytest.raises(ConversionError, match=message):
        module(torch.rand(1, 2, 5, 6))


@pytest.mark.parametrize(
    ("attrs", "flags"),
    [({"detect_negative": 0}, [True, False, False]), ({"detect_positive": 0}, [False, True, False])],
    ids=["positive-only", "negative-only"],
)
def test_is_inf_honours_its_detect_attributes(attrs, flags):
    graph = helper.make_graph(
        [helper.make_node("IsInf", ["x"], ["y"], **attrs)],
        "is-inf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, [1, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = np.array([[np.inf, -np.inf, 1.0]], np.float32)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x})[0].tolist() == [flags]
    assert convert_onnx(proto)(torch.from_numpy(x)).bool().tolist() == [flags]


# Graphs built node by node: softmax removal, the audited output, symbolic image sizes ----------------

SCALE = 50.0
"""Logits this large saturate a float32 softmax on most digits."""


def _initializer(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _tiny_cnn_graph(net: nn.Module, tail: list, outputs: list, *, opset: int = 17,
                    initializers: tuple = (), domains: tuple = ()) -> onnx.ModelProto:
    """The tiny CNN (conftest's ``tiny_cnn_arch``) as ONNX nodes making
    ``logits``, then the ``tail`` nodes; ``scale`` holds :data:`SCALE`."""
    conv1, conv2, linear = net[0], net[2], net[5]
    weights = {
        "w1": conv1.weight, "b1": conv1.bias, "w2": conv2.weight, "b2": conv2.bias,
        "w3": linear.weight, "b3": linear.bias,
    }
    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    body = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], **conv),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        body + tail,
        "tiny-cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        outputs,
        initializer=[
            *(_initializer(name, value.detach().numpy()) for name, value in weights.items()),
            _initializer("scale", np.float32(SCALE)),
            *initializers,
        ],
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(domain, 1) for domain in domains)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _probabilities(shape=("N", 10)) -> list:
    return [helper.make_tensor_value_info("probs", TensorProto.FLOAT, list(shape))]


SOFTMAX_TAILS = {
    "flatten": (17, [
        helper.make_node("Mul", ["logits", "scale"], ["z"]),
        helper.make_node("Softmax", ["z"], ["p"], axis=1),
        helper.make_node("Flatten", ["p"], ["probs"], axis=1),
    ]),
    "reshape": (17, [
        helper.make_node("Mul", ["logits", "scale"], ["z"]),
        helper.make_node("Softmax", ["z"], ["p"], axis=1),
        helper.make_node("Reshape", ["p", "rows"], ["probs"]),
    ]),
    "reshape-n-k": (17, [
        helper.make_node("Mul", ["logits", "scale"], ["z"]),
        helper.make_node("Softmax", ["z"], ["p"], axis=-1),
        helper.make_node("Reshape", ["p", "same_rows"], ["probs"]),
    ]),
    "unsqueeze-softmax-squeeze": (17, [
        helper.make_node("Mul", ["logits", "scale"], ["z"]),
        helper.make_node("Unsqueeze", ["z", "axis_1"], ["u"]),
        helper.make_node("Softmax", ["u"], ["p"], axis=-1),
        helper.make_node("Squeeze", ["p", "axis_1"], ["probs"]),
    ]),
    "opset-11-4d-flatten": (11, [
        helper.make_node("Mul", ["logits", "scale"], ["z"]),
        helper.make_node("Reshape", ["z", "column"], ["c"]),
        helper.make_node("Softmax", ["c"], ["p"], axis=1),  # before opset 13: over (10, 1, 1) flattened
        helper.make_node("Flatten", ["p"], ["probs"], axis=1),
    ]),
}
SHAPES = (
    _initializer("rows", np.array([-1, 10], np.int64)),
    _initializer("same_rows", np.array([0, 10], np.int64)),
    _initializer("axis_1", np.array([1], np.int64)),
    _initializer("column", np.array([-1, 10, 1, 1], np.int64)),
)


def _softmax_graph(net: nn.Module, tail: str) -> onnx.ModelProto:
    opset, nodes = SOFTMAX_TAILS[tail]
    used = {name for node in nodes for name in node.input}
    return _tiny_cnn_graph(net, nodes, _probabilities(), opset=opset,
                           initializers=tuple(shape for shape in SHAPES if shape.name in used))


def _save(proto: onnx.ModelProto, path):
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("tail", SOFTMAX_TAILS)
def test_a_final_softmax_before_a_shape_op_is_removed_exactly(tiny_cnn, mnist_test, tmp_path, tail):
    """A Flatten or Reshape after the final softmax hid it: white-box attacks
    ran on saturated probabilities and overstated robust accuracy."""
    model = load_model(_save(_softmax_graph(tiny_cnn, tail), tmp_path / "softmax.onnx"), device="cpu")
    module = model.torch_module()
    x = mnist_test.x[:16]
    attacked, masked = attacked_module(module, x)
    assert attacked is not module and not masked
    with torch.no_grad():
        assert (module(x) == 0).any()  # what the attacks saw before: underflowed probabilities
        torch.testing.assert_close(attacked(x), tiny_cnn(x) * SCALE, rtol=1e-4, atol=1e-3)
    weights = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    got = _input_gradient(attacked, x, weights)
    want = _input_gradient(lambda images: tiny_cnn(images) * SCALE, x, weights)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


def _permuting_softmax(axis: int) -> onnx.ModelProto:
    """x (N,1,4,4) -> its first 10 pixels x 1000 -> Softmax over ``axis`` -> Flatten."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("Slice", ["flat", "start", "end", "axis_1"], ["first"]),
            helper.make_node("Mul", ["first", "scale"], ["z"]),
            helper.make_node("Softmax", ["z"], ["p"], axis=axis),
            helper.make_node("Flatten", ["p"], ["probs"]),
        ],
        "permuting",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        _probabilities(),
        initializer=[_initializer("start", np.array([0], np.int64)), _initializer("end", np.array([10], np.int64)),
                     _initializer("axis_1", np.array([1], np.int64)), _initializer("scale", np.float32(1000))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_softmax_whose_groups_are_not_the_output_rows_stays():
    """A softmax over the batch, before a Flatten: on these ten images (one
    pixel lit each) its saturated output is the identity matrix, as a softmax
    over the rows would give, so the agreement check alone would take the
    logits for the graph's; the removed graph refuses to run instead."""
    module = convert_onnx(_permuting_softmax(axis=0))
    x = torch.eye(16)[:10, :].reshape(10, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(module(x), torch.eye(10))
    stripped = module.without_final_softmax()
    assert stripped is not None
    with pytest.raises(ConversionError, match="cannot be removed exactly"):
        stripped(x)
    assert logits_before_softmax(module, x) is None
    assert logits_before_softmax(convert_onnx(_permuting_softmax(axis=1)), x) is not None


@pytest.mark.parametrize("tail", ["flatten", "reshape"])
def test_a_white_box_scan_attacks_the_logits_beneath_a_softmax_and_a_shape_op(tiny_cnn, tmp_path, tail):
    settings = dict(samples=16, eps=[0.1], attacks=["fgsm"], access="white-box")
    logits_graph = _tiny_cnn_graph(tiny_cnn, [helper.make_node("Mul", ["logits", "scale"], ["probs"])],
                                   _probabilities())
    logits = auditor.scan(_save(logits_graph, tmp_path / "logits.onnx"), **settings).results
    softmax = auditor.scan(_save(_softmax_graph(tiny_cnn, tail), tmp_path / "softmax.onnx"), **settings).results
    ids = [check["id"] for check in softmax["checks"]]
    assert "softmax-removed" in ids and "softmax-outputs" not in ids
    assert softmax["robust_accuracy"] == logits["robust_accuracy"]


def _classifier_outputs(net: nn.Module) -> onnx.ModelProto:
    """sklearn-onnx's layout with one more output: an int64 label, the
    probabilities as a tensor, and a ZipMap of them (a sequence of maps, an
    ``ai.onnx.ml`` op the converter lacks)."""
    sequence = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    tail = [
        helper.make_node("Mul", ["logits", "scale"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        helper.make_node("ZipMap", ["probabilities"], ["zipped"], domain="ai.onnx.ml",
                         classlabels_int64s=list(range(10))),
    ]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]),
        helper.make_value_info("zipped", sequence),
    ]
    return _tiny_cnn_graph(net, tail, outputs, domains=("ai.onnx.ml",))


def test_only_the_nodes_of_the_audited_output_are_converted(tiny_cnn, mnist_test, tmp_path):
    """The ZipMap of another output refused the conversion of the whole graph."""
    proto = _classifier_outputs(tiny_cnn)
    x = mnist_test.x[:8]
    with torch.no_grad():
        torch.testing.assert_close(convert_onnx(proto, output="probabilities")(x),
                                   torch.softmax(tiny_cnn(x) * SCALE, dim=1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConversionError, match="unsupported ONNX op"):
        convert_onnx(proto, output="zipped")
    with pytest.raises(ConversionError, match="no output 'scores'"):
        convert_onnx(proto, output="scores")
    model = load_model(_save(proto, tmp_path / "classifier.onnx"), device="cpu")
    assert model.info.output == "probabilities"
    assert model.access_ceiling[0] == Access.WHITE_BOX
    attacked, masked = attacked_module(model.torch_module(), x)  # the softmax of the audited output goes
    assert not masked
    with torch.no_grad():
        torch.testing.assert_close(attacked(x), tiny_cnn(x) * SCALE, rtol=1e-4, atol=1e-3)


def _any_size_graph(path, *, channels_last: bool = False, shape=("N", 1, "H", "W")):
    """Conv -> ReLU -> global average pool -> Gemm: runs on images of any
    size; the input's image dimensions are symbolic (``dynamic_axes`` on H
    and W, or Keras's ``Input(shape=(None, None, 1))`` through tf2onnx)."""
    generator = np.random.RandomState(0)
    nodes = [
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1),
    ]
    if channels_last:
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]))
    else:
        nodes[0].input[0] = "x"
    graph = helper.make_graph(
        nodes,
        "any-size",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            _initializer("w1", generator.randn(8, 1, 3, 3).astype(np.float32)),
            _initializer("b1", generator.randn(8).astype(np.float32)),
            _initializer("w2", generator.randn(10, 8).astype(np.float32)),
            _initializer("b2", generator.randn(10).astype(np.float32)),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_symbolic_image_size_is_checked_on_the_datas(tmp_path, layout):
    """Such a graph converts with its shapes dynamic, but had no size to be
    checked at: it was capped at soft-label, silently under --access auto."""
    last = layout == "NHWC"
    path = _any_size_graph(tmp_path / "any_size.onnx", channels_last=last,
                           shape=("N", "H", "W", 1) if last else ("N", 1, "H", "W"))
    assert load_model(path).access_ceiling[0] == Access.SOFT_LABEL  # no data, no size
    model = load_model(path, image_shape=(1, 28, 28))
    level, reason = model.access_ceiling
    assert level == Access.WHITE_BOX, reason
    assert model.info.input_shape == (1, None, None) and model.info.channels_last == last
    for size in ((28, 28), (20, 24)):  # the conversion keeps the sizes dynamic
        images = torch.rand(5, 1, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(model.torch_module()(images), model.forward(images), atol=1e-4, rtol=1e-4)


def test_the_image_shape_never_overrides_a_static_dimension(tiny_cnn, tmp_path):
    path = _any_size_graph(tmp_path / "any_size.onnx")
    model = load_model(path, image_shape=(3, 28, 28))  # the channel is static: checked on 1 x 28 x 28
    assert model.access_ceiling[0] == Access.WHITE_BOX
    assert model.info.input_shape == (1, None, None)
    rgb = Dataset(name="rgb", x=torch.rand(4, 3, 28, 28), y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(AuditError, match=r"expects input \(1, None, None\) but data rgb has \(3, 28, 28\)"):
        check_model_on_data(model, rgb)
    static = tmp_path / "static.onnx"
    torch.onnx.export(tiny_cnn, (torch.rand(2, 1, 28, 28),), str(static), **LEGACY)
    model = load_model(static, image_shape=(3, 32, 32))
    assert model.info.input_shape == (1, 28, 28) and model.access_ceiling[0] == Access.WHITE_BOX


@pytest.mark.parametrize("shape", [(1, 28), (0, 28, 28), (1.5, 28, 28), "1x28x28", (True, 28, 28)])
def test_an_image_shape_that_is_not_three_positive_ints_is_refused(example_onnx, shape):
    with pytest.raises(AuditError, match=r"^image_shape must be \(C, H, W\), three positive integers, got "):
        load_model(example_onnx, image_shape=shape)


def test_a_white_box_scan_of_a_graph_with_a_symbolic_image_size_runs(tmp_path):
    path = _any_size_graph(tmp_path / "any_size.onnx")
    results = auditor.scan(path, samples=4, eps=[0.1], attacks=["fgsm"], access="white-box").results
    assert results["access"]["level"] == "white-box"
    assert results["model"]["input_shape"] == [1, 28, 28]
    auto = auditor.scan(path, samples=4, eps=[0.1], attacks=["fgsm"]).results
    assert auto["access"]["level"] == "white-box"
