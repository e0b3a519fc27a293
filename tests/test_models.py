"""Model loading: every format agrees with the torch module, and bad input is a one-line AuditError."""

from __future__ import annotations

import hashlib
import importlib
import os
import pathlib
import pickle
import re
import sys

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from auditor.access import Access
from auditor.data.base import Dataset
from auditor.errors import AuditError
from auditor.models import ModelInfo, TorchModel, check_model_on_data, load_model
from auditor.models.base import ModelFailed, plural
from helpers import baked_batch_onnx

ARCH_SOURCE = '''
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


def not_a_module():
    return 42
'''


class PickledNet(nn.Module):
    """A whole module saved with ``torch.save(model)`` (importable, so it can be unpickled)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)

    def forward(self, x):
        return self.linear(x.flatten(1))


class NanNet(nn.Module):
    """Returns NaN logits of the right shape."""

    def forward(self, x):
        return x.flatten(1)[:, :10] * float("nan")


class Pair(nn.Module):
    """Returns (logits, features), as some networks do."""

    def forward(self, x):
        return x.flatten(1)[:, :10], x


class Payload:
    """Creates ``marker`` when unpickled: stands in for malicious code in a pickle."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _wrap(module: nn.Module) -> TorchModel:
    info = ModelInfo(path="test", format="pickle", sha256="", input_shape=None, num_classes=None)
    return TorchModel(module, info, device="cpu")


@pytest.fixture
def images(mnist_test) -> torch.Tensor:
    return mnist_test.x[:50]


@pytest.fixture
def expected(tiny_cnn, images) -> torch.Tensor:
    with torch.no_grad():
        return tiny_cnn(images)


@pytest.fixture
def arch_file(tmp_path, monkeypatch) -> pathlib.Path:
    """``tiny_arch.py`` (a ``build()`` for the tiny CNN), importable as ``tiny_arch``."""
    path = tmp_path / "tiny_arch.py"
    path.write_text(ARCH_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


@pytest.mark.parametrize(
    "export_kwargs",
    [
        pytest.param({"dynamo": False}, id="torchscript-exporter-fixed-batch"),
        pytest.param({}, id="dynamo-exporter-fixed-batch"),
        pytest.param({"dynamic_shapes": ({0: "batch"},)}, id="dynamo-exporter-dynamic-batch"),
    ],
)
def test_onnx_matches_torch(tiny_cnn, images, expected, tmp_path, export_kwargs):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_cnn, (torch.rand(3, 1, 28, 28),), str(path), **export_kwargs)
    model = load_model(path)
    assert model.info.format == "onnx"
    assert model.info.input_shape == (1, 28, 28)
    assert model.info.num_classes == 10
    assert model.access_ceiling[0] == Access.WHITE_BOX
    logits = model.forward(images)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        gradient_logits = model.torch_module()(images.to(model.device)).cpu()
    torch.testing.assert_close(gradient_logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_onnx_input_dtype(images, tmp_path, dtype):
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).to(dtype)
    path = tmp_path / "linear.onnx"
    example = torch.rand(2, 1, 28, 28, dtype=dtype)
    torch.onnx.export(net, (example,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    logits = load_model(path).forward(images)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        expected = net(images.to(dtype)).float()
    # float16 accumulation order differs between torch and onnxruntime
    tolerance = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {}
    torch.testing.assert_close(logits, expected, **tolerance)


def test_onnx_hash_covers_external_data(tiny_cnn, tmp_path):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_cnn, (torch.rand(2, 1, 28, 28),), str(path), external_data=True)
    side = tmp_path / "tiny.onnx.data"
    before = load_model(path).info.sha256
    side.write_bytes(side.read_bytes()[:-4] + b"\0\0\0\0")
    assert load_model(path).info.sha256 != before
    side.unlink()
    with pytest.raises(AuditError, match="external data file"):
        load_model(path)


def _external_data_onnx(folder: pathlib.Path) -> pathlib.Path:
    """``folder/linear.onnx``, a (N,1,4,4) -> 3 logits graph whose weights are in ``folder/w.bin``."""
    weights = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3), np.float32), "W")
    shape = onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [-1, 16])
    nodes = [
        onnx.helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        onnx.helper.make_node("MatMul", ["flat", "W"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes, "linear",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        [weights, shape],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    path = folder / "linear.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    return path


def _relocate(path: pathlib.Path, location: str) -> None:
    """Point the external weights of the graph at ``path`` to ``location``, unchecked."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def test_onnx_external_data_inside_the_folder_loads(tmp_path):
    path = _external_data_onnx(tmp_path)
    model = load_model(path)
    assert model.info.input_shape == (1, 4, 4)
    assert model.info.num_classes == 3


def _side_tensor_onnx(folder: pathlib.Path, where: str, location: str) -> pathlib.Path:
    """``folder/m.onnx``, a (N,1,4,4) -> 3 logits graph whose weights, kept in
    the side file ``location``, are not a graph initializer but ``where``: a
    Constant node's value, a sparse initializer or an If branch's initializer."""
    rng = np.random.default_rng(0)
    if (folder / location).parent == folder:
        (folder / location).write_bytes(rng.standard_normal(48, np.float32).tobytes())

    def weights(name: str, dims: tuple[int, ...] = (16, 3)) -> onnx.TensorProto:
        return onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=dims,
                                data_location=onnx.TensorProto.EXTERNAL,
                                external_data=[onnx.StringStringEntryProto(key="location", value=location)])

    def branch(name: str) -> onnx.GraphProto:
        out = onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [16, 3])
        return onnx.helper.make_graph([onnx.helper.make_node("Identity", [name], ["W"])], name, [], [out],
                                      [weights(name)])

    nodes, initializers, sparse = [], [], []
    if where == "constant":
        nodes.append(onnx.helper.make_node("Constant", [], ["W"], value=weights("W")))
    elif where == "sparse":
        indices = onnx.numpy_helper.from_array(np.arange(48, dtype=np.int64))
        sparse.append(onnx.helper.make_sparse_tensor(weights("W", (48,)), indices, [16, 3]))
    else:
        initializers.append(onnx.helper.make_tensor("cond", onnx.TensorProto.BOOL, [], [True]))
        nodes.append(onnx.helper.make_node("If", ["cond"], ["W"], then_branch=branch("W1"),
                                           else_branch=branch("W2")))
    initializers.append(onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [-1, 16]))
    nodes += [onnx.helper.make_node("Reshape", ["x", "shape"], ["flat"]),
              onnx.helper.make_node("MatMul", ["flat", "W"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes, where,
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        initializers, sparse_initializer=sparse,
    )
    path = folder / "m.onnx"
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("where", ["constant", "sparse", "subgraph"])
def test_onnx_hash_covers_external_data_outside_the_initializers(tmp_path, where):
    """Weights in a side file identify the model wherever the graph keeps
    them, and their location is held to the same rules."""
    path = _side_tensor_onnx(tmp_path, where, "w.bin")
    before = load_model(path).info.sha256
    side = tmp_path / "w.bin"
    side.write_bytes(side.read_bytes()[:-4] + b"\0\0\0\0")
    assert load_model(path).info.sha256 != before
    path = _side_tensor_onnx(tmp_path, where, "../outside.bin")
    with pytest.raises(AuditError, match="external data location '../outside.bin' must be a relative path"):
        load_model(path)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("parent", "without '..'"),
        ("absolute", "without '..'"),
        ("symlink", "not a regular file"),
        ("symlinked-folder", "out of the model's folder"),
        ("fifo", "not a regular file"),
        ("device", "not a regular file"),
        ("short", "is 4 bytes, but a tensor reads up to byte"),
    ],
)
def test_onnx_external_data_is_checked_before_it_is_read(tmp_path, target, match):
    """Locations onnxruntime would refuse are refused before the hash reads
    them: reading a FIFO, a device or /proc/self/pagemap would hang."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = _external_data_onnx(folder)
    outside = tmp_path / "outside.bin"
    outside.write_bytes((folder / "w.bin").read_bytes())
    if target == "parent":
        location = "../outside.bin"
    elif target == "absolute":
        location = str(outside)
    elif target == "symlink":
        location = "link.bin"
        (folder / location).symlink_to(outside)
    elif target == "symlinked-folder":
        location = "linked/outside.bin"
        (folder / "linked").symlink_to(tmp_path, target_is_directory=True)
    elif target == "fifo":
        location = "pipe.bin"
        os.mkfifo(folder / location)
    elif target == "device":
        location = "zero"
        os.symlink("/dev/zero", folder / location)
    else:
        location = "w.bin"
        (folder / location).write_bytes(b"\0" * 4)
    _relocate(path, location)
    with pytest.raises(AuditError, match=re.escape(f"model {path}: external data location {location!r}")) as excinfo:
        load_model(path)
    assert match in _message(excinfo)


def test_onnx_normalisation_is_folded_in(tiny_cnn, images, tmp_path):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_cnn, (torch.rand(1, 1, 28, 28),), str(path), dynamo=False)
    model = load_model(path, mean=(0.1307,), std=(0.3081,))
    with torch.no_grad():
        manual = tiny_cnn((images - 0.1307) / 0.3081)
    torch.testing.assert_close(model.forward(images), manual, atol=1e-4, rtol=1e-4)
    with pytest.raises(AuditError, match="--mean has 3 values but model .* takes 1 channel"):
        load_model(path, mean=(0.5, 0.5, 0.5), std=(0.2,))


def test_torchscript(tiny_cnn, images, expected, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(tiny_cnn, images[:2]), str(path))
    model = load_model(path, device="cpu")
    assert model.info.format == "torchscript"
    assert model.access_ceiling[0] == Access.WHITE_BOX
    torch.testing.assert_close(model.forward(images), expected, atol=1e-5, rtol=1e-5)
    x = images[:4].clone().requires_grad_(True)
    model.torch_module()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_float64_torchscript_gets_its_input_in_float64(tiny_cnn, images, expected, tmp_path):
    """A float64 module is fed float64 and gives float32 logits, for the
    forward pass and for gradients (it was fed float32 and failed)."""
    import copy

    path = tmp_path / "tiny64.pt"
    wide = copy.deepcopy(tiny_cnn).double()
    torch.jit.save(torch.jit.trace(wide, images[:2].double()), str(path))
    model = load_model(path, device="cpu")
    logits = model.forward(images)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    x = images[:4].clone().requires_grad_(True)
    model.torch_module()(x).sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "fixed-batch"])
def test_torch_export(tiny_cnn, images, expected, tmp_path, dynamic):
    path = tmp_path / "tiny.pt2"
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(tiny_cnn, (images[:3],), dynamic_shapes=shapes), str(path))
    model = load_model(path, mean=(0.0,), std=(1.0,), device="cpu")
    assert model.info.format == "torch-export"
    assert model.info.input_shape == (1, 28, 28)
    assert model.info.num_classes == 10
    torch.testing.assert_close(model.forward(images), expected, atol=1e-5, rtol=1e-5)
    model.torch_module().eval()


@pytest.mark.parametrize("batch", [1, 2], ids=["batch-1", "batch-2-padded"])
def test_torch_export_fixed_batch_runs_in_chunks(tiny_cnn, images, tmp_path, batch):
    """A program exported for exactly ``batch`` rows takes any number of rows,
    for logits and for gradients (it used to fail a guard on the batch size)."""
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(tiny_cnn, (images[:batch],)), str(path))
    model = load_model(path, device="cpu")
    x = images[:5]
    with torch.no_grad():
        expected = tiny_cnn(x)
    torch.testing.assert_close(model.forward(x), expected, atol=1e-5, rtol=1e-5)
    _assert_logits_and_gradients_match(model.torch_module(), tiny_cnn, x)


def _assert_logits_and_gradients_match(module: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """``module`` gives ``reference``'s logits on ``x`` and the same input gradients of the cross-entropy."""
    ours = x.clone().requires_grad_(True)
    logits = module(ours)
    assert logits.shape == (len(x), 10)
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), reference(x), atol=1e-5, rtol=1e-5)
    labels = torch.arange(len(x)) % 10
    nn.functional.cross_entropy(logits, labels).backward()
    eager = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(reference(eager), labels).backward()
    torch.testing.assert_close(ours.grad, eager.grad, atol=1e-6, rtol=1e-4)


BATCH_DIMS = {
    # name: (the batch dimension exported, the fewest and most rows the program takes)
    "min1-max4096": (lambda: torch.export.Dim("b", min=1, max=4096), (1, 4096)),
    "max16": (lambda: torch.export.Dim("b", max=16), (0, 16)),
    "min2-max16": (lambda: torch.export.Dim("b", min=2, max=16), (2, 16)),
    "min2": (lambda: torch.export.Dim("b", min=2), (2, None)),
    "dim-dynamic": (lambda: torch.export.Dim.DYNAMIC, (2, None)),  # export's 0/1 specialisation: 2 up
    "default": (lambda: torch.export.Dim("b"), (0, None)),
}


def _bounded_pt2(net: nn.Module, name: str, path: pathlib.Path) -> pathlib.Path:
    """``net`` exported with the batch dimension ``BATCH_DIMS[name]`` and saved to ``path``."""
    dim, _ = BATCH_DIMS[name]
    program = torch.export.export(net, (torch.rand(3, 1, 28, 28),), dynamic_shapes=({0: dim()},))
    torch.export.save(program, str(path))
    return path


class _Rows(nn.Module):
    """Records the rows of each call to ``module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(len(x))
        return self.module(x)


@pytest.mark.parametrize("name", list(BATCH_DIMS))
def test_torch_export_dynamic_batch_runs_within_its_range(tiny_cnn, images, tmp_path, name):
    """A program exported with a bounded dynamic batch takes any number of rows, for logits and
    gradients: each call holds the rows its range allows, at most its upper bound (a batch of 40
    failed "Guard failed: x.size()[0] <= 16") and at least its lower bound (a single row is
    padded with zeros, the padding dropped from the output)."""
    from auditor.models.pytorch import _ExportedModule, batch_range

    path = _bounded_pt2(tiny_cnn, name, tmp_path / "bounded.pt2")
    low, high = BATCH_DIMS[name][1]
    assert batch_range(torch.export.load(str(path))) == (low, high)
    model = load_model(path, device="cpu")
    (exported,) = [module for module in model.torch_module().modules() if isinstance(module, _ExportedModule)]
    exported.program = recorder = _Rows(exported.program)
    x = images[:40]
    with torch.no_grad():
        expected = tiny_cnn(x)
    torch.testing.assert_close(model.forward(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.forward(x[:1]), expected[:1], atol=1e-5, rtol=1e-5)
    _assert_logits_and_gradients_match(model.torch_module(), tiny_cnn, x)
    assert recorder.rows and all(max(low, 1) <= rows <= min(high or 40, 40) for rows in recorder.rows)
    assert max(recorder.rows) == min(high or 40, 40)


def test_a_white_box_scan_of_a_pt2_bounded_at_16_rows_runs(tiny_cnn, tmp_path):
    """The scan's batches (20 samples here) are larger than the program's bound of 16 rows: it
    failed on the first batch; now every call is chunked at the bound."""
    import auditor

    path = _bounded_pt2(tiny_cnn, "max16", tmp_path / "max16.pt2")
    audit = auditor.scan(path, "mnist", access="white-box", attacks=["fgsm"], samples=20, eps=[0.1],
                         budget=10, device="cpu")
    assert audit.results["data"]["n"] == 20 and len(audit.results["samples"]) == 20


def _save_as(fmt: str, net: nn.Module, example: torch.Tensor, folder: pathlib.Path) -> pathlib.Path:
    """``net`` written to ``folder`` as ``fmt``: onnx, torchscript, pt2 (torch.export) or pickle."""
    if fmt == "onnx":
        path = folder / "model.onnx"
        torch.onnx.export(net, (example,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    elif fmt == "pt2":
        path = folder / "model.pt2"
        torch.export.save(torch.export.export(net, (example,)), str(path))
    elif fmt == "torchscript":
        path = folder / "model.pt"
        torch.jit.save(torch.jit.trace(net, example), str(path))
    else:
        path = folder / "model.pt"
        torch.save(net, path)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_single_output_model_is_refused(mnist_test, tmp_path, fmt):
    """A (N, 1) output is not a classifier: refused at load where the file
    declares it (ONNX, torch.export), else at the check on data."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1)).eval()
    path = _save_as(fmt, net, mnist_test.x[:2], tmp_path)
    expected = f"model {path} has 1 output; a classifier needs at least 2 classes"
    with pytest.raises(AuditError) as excinfo:
        check_model_on_data(load_model(path, device="cpu"), mnist_test)
    assert _message(excinfo) == expected
    if fmt == "torchscript":
        return
    with pytest.raises(AuditError) as excinfo:
        load_model(path, device="cpu")
    assert _message(excinfo) == expected


def test_class_counts_read_as_english(mnist_test):
    assert plural(1, "class") == "1 class"
    assert plural(2, "class") == "2 classes"
    assert plural(1, "output") == "1 output"
    assert plural(0, "output") == "0 outputs"
    two = _wrap(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 2)))
    with pytest.raises(AuditError, match="^model test has 2 classes but the labels of data mnist go up to 9$"):
        check_model_on_data(two, mnist_test)


@pytest.mark.parametrize(
    "fmt, what",
    [
        ("onnx", "an ONNX graph"),
        ("torchscript", "a TorchScript program"),
        ("pt2", "a torch.export program"),
        ("pickle", "a pickled module"),
    ],
)
def test_arch_is_refused_for_formats_with_their_own(tmp_path, arch_file, fmt, what):
    """--arch builds weights files only; given for any other format it is an
    error, not silently ignored."""
    example = torch.rand(2, 1, 28, 28)
    path = _save_as(fmt, PickledNet().eval(), example, tmp_path)
    with pytest.raises(AuditError) as excinfo:
        load_model(path, arch="tiny_arch:build", trust_pickle=True, device="cpu")
    assert _message(excinfo) == f"--arch applies only to state_dict/safetensors weights; model {path} is {what}"
    assert load_model(path, trust_pickle=True, device="cpu").forward(example).shape == (2, 10)


def test_state_dict_with_arch(tiny_cnn, images, expected, tmp_path, arch_file):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_cnn.state_dict(), path)
    model = load_model(path, arch="tiny_arch:build", device="cpu")
    assert model.info.format == "state-dict"
    assert model.info.input_shape is None
    torch.testing.assert_close(model.forward(images), expected)
    with pytest.raises(AuditError, match="is a weights file: pass --arch module:factory"):
        load_model(path)


@pytest.mark.parametrize("name", ["tiny.pth", "tiny.safetensors"])
def test_weights_without_arch_have_their_own_error(tiny_cnn, tmp_path, name):
    """Its own class, so that a surrogate (which --arch does not build) is
    told what it must be rather than to pass --arch."""
    from auditor.models.pytorch import WeightsWithoutArch

    path = tmp_path / name
    if path.suffix == ".pth":
        torch.save(tiny_cnn.state_dict(), path)
    else:
        save_file(tiny_cnn.state_dict(), str(path))
    with pytest.raises(WeightsWithoutArch, match=f"^model {re.escape(str(path))} is a weights file"):
        load_model(path)


def test_safetensors_with_arch_file(tiny_cnn, images, expected, tmp_path, arch_file):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_cnn.state_dict(), str(path))
    model = load_model(path, arch=f"{arch_file}:build", device="cpu")
    assert model.info.format == "safetensors"
    torch.testing.assert_close(model.forward(images), expected)


def test_dotted_arch_leaves_the_working_directory_off_sys_path(tiny_cnn, tmp_path, monkeypatch):
    """--arch pkg.module:factory imports from the working directory, and its
    factory may import a module beside it when called, but only while the
    network is built: a planted ``weasyprint.py`` there must not win a later
    lazy import."""
    package = tmp_path / "cwd_arch_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (tmp_path / "cwd_arch_layers.py").write_text(ARCH_SOURCE)
    (package / "net.py").write_text("def build():\n    import cwd_arch_layers\n\n    return cwd_arch_layers.build()\n")
    monkeypatch.delitem(sys.modules, "cwd_arch_layers", raising=False)
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_cnn.state_dict(), str(path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_arch_pkg", raising=False)
    monkeypatch.delitem(sys.modules, "cwd_arch_pkg.net", raising=False)
    assert load_model(path, arch="cwd_arch_pkg.net:build", device="cpu").info.format == "safetensors"
    assert str(tmp_path) not in sys.path


REWRITABLE_ARCH = "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.{head}())\n"
"""An --arch module whose network ends in ``head`` (ReLU or Tanh: files of one size)."""


def _write_arch(path: pathlib.Path, head: str) -> str:
    """``path`` written with a ``head`` network, at the same size and time
    whatever the head (as when rewritten within a second: a cached .pyc would
    pass for it); the SHA-256 of its bytes."""
    path.write_text(REWRITABLE_ARCH.format(head=head))
    os.utime(path, (1_700_000_000, 1_700_000_000))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _head(arch: str) -> type[nn.Module]:
    """The class of the last layer of the network ``build_arch(arch)`` builds."""
    from auditor.models.pytorch import build_arch

    return type(list(build_arch(arch).modules())[-1])


def test_an_arch_file_is_run_as_it_is_at_each_load(tmp_path, monkeypatch):
    """``path/to/file.py:factory`` runs the file's bytes at each load, and
    ``arch_sha256`` names them, even when rewritten at the same size within a
    second (a cached .pyc ran the old code); nothing is left in sys.modules."""
    from auditor.models.pytorch import arch_sha256

    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as by default: PYTHONDONTWRITEBYTECODE hid it
    path = tmp_path / "rewritable_arch_file.py"
    arch = f"{path}:build"
    linear = nn.Linear(784, 10)
    weights = tmp_path / "w.safetensors"
    save_file({f"1.{key}": value for key, value in linear.state_dict().items()}, str(weights))
    x = torch.rand(5, 1, 28, 28)
    for head, expected in (("ReLU", torch.relu), ("Tanh", torch.tanh)):
        sha256 = _write_arch(path, head)
        model = load_model(weights, arch=arch, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(model.forward(x), expected(linear(x.flatten(1))))
        assert arch_sha256(arch) == sha256
    assert not [name for name in sys.modules if "rewritable_arch_file" in name]


def test_an_arch_file_is_in_sys_modules_while_it_runs(tmp_path):
    """As during an import: a dataclass with postponed annotations looks its
    module up there."""
    path = tmp_path / "dataclass_arch.py"
    path.write_text("from __future__ import annotations\n\nimport dataclasses\n\nfrom torch import nn\n\n\n"
                    "@dataclasses.dataclass\nclass Size:\n    pixels: int = 784\n\n\n"
                    "def build():\n    return nn.Linear(Size().pixels, 10)\n")
    assert _head(f"{path}:build") is nn.Linear
    assert "auditor_arch_dataclass_arch" not in sys.modules


def test_a_dotted_arch_is_imported_once_so_its_registries_run_once(tmp_path, monkeypatch):
    """``pkg.module:factory`` is imported as ``import`` does, once per process:
    run afresh at each load, a module whose decorator refuses a name twice
    built once and failed the second time (harden builds the model several
    times). ``arch_sha256`` is that of its file."""
    from auditor.models.pytorch import arch_sha256

    package = tmp_path / "registry_arch_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "registry.py").write_text(
        "MODELS = {}\n\n\ndef register(fn):\n    if fn.__name__ in MODELS:\n"
        "        raise ValueError(f'model {fn.__name__!r} registered twice')\n    MODELS[fn.__name__] = fn\n"
        "    return fn\n")
    (package / "net.py").write_text(
        "from torch import nn\n\nfrom .registry import register\n\n\n@register\ndef build():\n"
        "    return nn.Linear(784, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("registry_arch_pkg", "registry_arch_pkg.net", "registry_arch_pkg.registry"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    arch = "registry_arch_pkg.net:build"
    assert _head(arch) is nn.Linear and _head(arch) is nn.Linear
    assert arch_sha256(arch) == hashlib.sha256((package / "net.py").read_bytes()).hexdigest()
    assert list(sys.modules["registry_arch_pkg.registry"].MODELS) == ["build"]


def test_a_torchvision_arch_builds_twice_in_one_process():
    """torchvision's model registry refuses a second ``resnet18``: its
    module must not be run again (``--arch torchvision.models.resnet:resnet18``
    was exit 2 from its first load)."""
    from auditor.models.pytorch import arch_sha256, build_arch

    resnet = importlib.import_module("torchvision.models.resnet")
    for _ in range(2):
        assert type(build_arch("torchvision.models.resnet:resnet18")).__name__ == "ResNet"
    assert sys.modules["torchvision.models.resnet"] is resnet
    assert arch_sha256("torchvision.models.resnet:resnet18") == hashlib.sha256(
        pathlib.Path(resnet.__file__).read_bytes()).hexdigest()


@pytest.mark.parametrize("imported_by", ["auditor", "user"])
def test_a_dotted_arch_edited_since_its_import_is_refused(tmp_path, monkeypatch, imported_by):
    """A second load in one process runs the module ``sys.modules`` holds, so
    the file as it was when imported: edited since (at the same size, within
    a second), its hash would name code that did not run, and the load is
    refused in one line. A module the user imported stays theirs."""
    from auditor.models.pytorch import arch_sha256

    name = f"edited_arch_{imported_by}"
    path = tmp_path / f"{name}.py"
    sha256 = _write_arch(path, "ReLU")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    users = importlib.import_module(name) if imported_by == "user" else None
    arch = f"{name}:build"
    assert _head(arch) is nn.ReLU and _head(arch) is nn.ReLU
    assert arch_sha256(arch) == sha256
    _write_arch(path, "Tanh")
    with pytest.raises(AuditError) as excinfo:
        _head(arch)
    assert _message(excinfo) == (f"--arch {arch}: {path} has changed on disk since this process imported {name}, "
                                 "so the code that would run is not the file's: restart the process to audit "
                                 "the new code")
    assert arch_sha256(arch) == sha256
    if users is not None:
        assert sys.modules[name] is users


@pytest.mark.parametrize(
    ("arch", "match"),
    [
        ("tiny_arch", "expected module:factory"),
        ("no_such_module_xyz:build", "cannot import no_such_module_xyz"),
        ("tiny_arch:missing", "has no function missing"),
        ("tiny_arch:not_a_module", "returned int, not an nn.Module"),
    ],
)
def test_bad_arch(tiny_cnn, tmp_path, arch_file, arch, match):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_cnn.state_dict(), str(path))
    with pytest.raises(AuditError, match=match) as excinfo:
        load_model(path, arch=arch)
    _message(excinfo)


def test_weights_that_do_not_fit_the_arch(tmp_path, arch_file):
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(AuditError, match="does not fit --arch tiny_arch:build") as excinfo:
        load_model(path, arch="tiny_arch:build")
    _message(excinfo)


def test_normalisation_is_folded_in(tiny_cnn, images, tmp_path, arch_file):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_cnn.state_dict(), path)
    model = load_model(path, arch="tiny_arch:build", mean=[0.5], std=[0.25], device="cpu")
    with torch.no_grad():
        manual = tiny_cnn((images - 0.5) / 0.25)
    torch.testing.assert_close(model.forward(images), manual)
    torch.testing.assert_close(model.torch_module()(images), manual)


@pytest.mark.parametrize(("mean", "std"), [((0.5, 0.5), (0.1, 0.2, 0.3)), ((0.5,), (0.0,)), ((), (1.0,))])
def test_bad_normalisation(tmp_path, mean, std):
    path = tmp_path / "any.pt"
    path.write_bytes(b"anything")
    with pytest.raises(AuditError, match="--mean|--std"):
        load_model(path, mean=mean, std=std)


def test_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    zipped, legacy = tmp_path / "evil.pt", tmp_path / "evil_legacy.pt"
    torch.save({"weight": Payload(marker)}, zipped)
    legacy.write_bytes(pickle.dumps({"weight": Payload(marker)}))
    for path in (zipped, legacy):
        with pytest.raises(AuditError, match="pickled code/objects and was refused.*--trust-pickle") as excinfo:
            load_model(path, arch="anything:build")
        _message(excinfo)
    assert not marker.exists()


@pytest.mark.parametrize("value", ["false", 1, None])
def test_trust_pickle_must_be_a_bool(tmp_path, value):
    """Any truthy value unpickled the file (``trust_pickle="false"`` ran its code)."""
    marker = tmp_path / "payload-ran"
    net = PickledNet()
    net.payload = Payload(marker)
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(AuditError, match=f"^trust_pickle must be True or False, got {type(value).__name__}$"):
        load_model(path, trust_pickle=value, device="cpu")
    assert not marker.exists()


def test_pickled_module_needs_trust(images, tmp_path):
    torch.manual_seed(0)
    net = PickledNet().eval()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(AuditError, match="refused"):
        load_model(path)
    model = load_model(path, trust_pickle=True, device="cpu")
    assert model.info.format == "pickle"
    with torch.no_grad():
        torch.testing.assert_close(model.forward(images), net(images))


@pytest.mark.parametrize("name", ["bad.onnx", "bad.pt", "bad.pt2", "bad.safetensors", "bad.bin"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a model at all" * 10)
    # --arch only where the format takes one: for the others it is refused before the file is read
    arch = None if path.suffix in (".onnx", ".pt2") else "tiny_arch:build"
    with pytest.raises(AuditError, match=f"model {path}") as excinfo:
        load_model(path, arch=arch)
    assert "--arch" not in _message(excinfo)


def test_empty_and_missing_file(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(AuditError, match="is empty"):
        load_model(empty)
    with pytest.raises(AuditError, match="file not found"):
        load_model(tmp_path / "missing.onnx")


def test_check_model_on_data(tiny_cnn, mnist_test):
    assert check_model_on_data(_wrap(tiny_cnn), mnist_test) == 10


def test_check_shape_mismatch(tiny_cnn, tmp_path):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(tiny_cnn, (torch.rand(1, 1, 28, 28),), str(path), dynamo=False)
    rgb = Dataset(name="rgb", x=torch.rand(4, 3, 32, 32), y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(AuditError, match=rf"model {path} expects input \(1, 28, 28\) but data rgb has \(3, 32, 32\)"):
        check_model_on_data(load_model(path), rgb)


def test_check_too_few_classes(mnist_test):
    five = _wrap(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 5)))
    with pytest.raises(AuditError, match="model test has 5 classes but the labels of data mnist go up to 9"):
        check_model_on_data(five, mnist_test)


def test_check_nan_outputs(mnist_test):
    with pytest.raises(AuditError, match="model test returned NaN outputs on data mnist"):
        check_model_on_data(_wrap(NanNet()), mnist_test)


def test_check_model_failure_and_bad_output(mnist_test):
    failed = r"model test failed on a batch of 16 images of shape \(1, 28, 28\) from data mnist: "
    with pytest.raises(AuditError, match=failed) as excinfo:
        check_model_on_data(_wrap(nn.Linear(3, 2)), mnist_test)
    _message(excinfo)
    # a TorchScript error is a long traceback; the message keeps the error it ends with
    colour = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    with pytest.raises(AuditError, match=r"to have 3 channels, but got 1 channels instead$") as excinfo:
        check_model_on_data(_wrap(colour), mnist_test)
    _message(excinfo)
    with pytest.raises(AuditError, match="the model returns a tuple, not a tensor of logits"):
        check_model_on_data(_wrap(Pair()), mnist_test)
    with pytest.raises(AuditError, match=r"its output has shape \(16,\) for 16 images; expected \(16, classes\)"):
        check_model_on_data(_wrap(nn.Flatten(0)), Dataset("flat", torch.rand(16, 1, 1, 1), torch.zeros(16).long()))


SPY_ARCH = """
import spy_seen
import torch
from torch import nn


class Spy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))

    def forward(self, x):
        spy_seen.SEEN.append((torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark))
        return self.net(x)


def build():
    return Spy()
"""


def test_a_scan_runs_the_model_with_deterministic_kernels_and_puts_the_settings_back(tmp_path, monkeypatch):
    """On a GPU cuDNN's fastest kernels may add in any order, so a seed
    would not fix the gradients: the scan asks for deterministic ones, and
    leaves torch's settings as it found them."""
    import importlib

    import auditor

    (tmp_path / "spy_arch.py").write_text(SPY_ARCH)
    (tmp_path / "spy_seen.py").write_text("SEEN = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = importlib.import_module("spy_seen").SEEN
    save_file(importlib.import_module("spy_arch").build().state_dict(), str(tmp_path / "spy.safetensors"))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    auditor.scan(tmp_path / "spy.safetensors", "mnist", arch="spy_arch:build", access="white-box",
                 attacks=["fgsm"], samples=4, eps=[0.1])
    assert seen and set(seen) == {(True, False)}
    assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False


@pytest.mark.parametrize("device, message", [("tpu", "--device tpu: Expected one of"),
                                             ("meta", "--device meta: ONNX models run on cpu or cuda")])
def test_onnx_devices_are_checked(example_onnx, device, message):
    with pytest.raises(AuditError, match=message):
        load_model(example_onnx, device=device)


def test_a_single_mean_and_std_apply_to_every_channel(example_onnx, mnist_test):
    scaled = load_model(example_onnx, mean=0.5, std=2.0, device="cpu").forward(mnist_test.x[:4])
    assert torch.equal(scaled, load_model(example_onnx, mean=(0.5,), std=(2.0,), device="cpu").forward(mnist_test.x[:4]))


# --------------------------------------------------------------------------- #
# An untrusted torch.export archive runs no code from the file
# --------------------------------------------------------------------------- #

PAYLOAD_MODULE = "import pathlib\npathlib.Path({marker!r}).touch()\n\n\nclass Fn:\n    apply = staticmethod(abs)\n"


def _rewritten(source: pathlib.Path, target: pathlib.Path, edits: dict) -> pathlib.Path:
    """A copy of the archive ``source`` in which each member whose name ends
    with a key of ``edits`` is replaced by that key's function of its bytes."""
    import zipfile

    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for info in original.infolist():
            data = original.read(info.filename)
            for ending, edit in edits.items():
                if info.filename.endswith(ending):
                    data = edit(data)
            copy.writestr(info, data)
    return target


def _torch_saved(value) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _pickled_weight(marker: pathlib.Path) -> dict:
    """Edits that mark the first weight as pickled and make it a payload."""
    import json

    def config(data: bytes) -> bytes:
        document = json.loads(data)
        first = next(iter(document["config"].values()))
        first["use_pickle"] = True
        return json.dumps(document).encode()

    return {"model_weights_config.json": config, "data/weights/weight_0": lambda data: _torch_saved(Payload(marker))}


def _python_shape(marker: pathlib.Path) -> dict:
    """Edits that make the batch dimension's expression Python code (sympify evaluates it)."""
    def expression(data: bytes) -> bytes:
        symbol = data.split(b'"expr_str": "')[1].split(b'"')[0]
        code = f"(__import__('pathlib').Path({str(marker)!r}).touch(), ".encode() + symbol + b")[1]"
        return data.replace(symbol, code)

    return {"models/model.json": expression}


def _huge_power(marker: pathlib.Path) -> dict:
    """Edits that make the batch dimension's expression a power sympy would compute for ever."""
    def expression(data: bytes) -> bytes:
        symbol = data.split(b'"expr_str": "')[1].split(b'"')[0]
        return data.replace(symbol, b"Pow(Integer(10), Integer(1000000000000000000))")

    return {"models/model.json": expression}


def _importing_node(marker: pathlib.Path) -> dict:
    """Edits that make the first node call a function that imports the module ``pt2_payload``."""
    import json

    def node(data: bytes) -> bytes:
        document = json.loads(data)
        first = document["graph_module"]["graph"]["nodes"][0]
        first["target"] = "torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch"
        first["inputs"] = [{"name": "function_cls_name", "arg": {"as_string": "pt2_payload.Fn"}, "kind": 1},
                           {"name": "x", "arg": {"as_tensor": {"name": "input"}}, "kind": 1}]
        return json.dumps(document).encode()

    return {"models/model.json": node}


def _importing_treespec(marker: pathlib.Path) -> dict:
    """Edits that make the keyword arguments' tree spec a defaultdict whose factory is in ``pt2_payload``."""
    import json

    def spec(data: bytes) -> bytes:
        document = json.loads(data)
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        protocol, tree = json.loads(signature["in_spec"])
        tree["children_spec"][1] = {"type": "collections.defaultdict", "children_spec": [], "context": {
            "default_factory_module": "pt2_payload", "default_factory_name": "Fn", "dict_context": {"dict_context": []}}}
        signature["in_spec"] = json.dumps([protocol, tree])
        return json.dumps(document).encode()

    return {"models/model.json": spec}


HOSTILE_PT2 = {
    "sample inputs unpickle a payload": (lambda marker: {"data/sample_inputs/model.pt": lambda data: _torch_saved(
        Payload(marker))}, r"pickled code/objects \(.*data/sample_inputs/model.pt\)"),
    "a weight marked use_pickle": (_pickled_weight, r"pickled tensors \(weight_0 in .*model_weights_config.json\)"),
    "a shape expression that is code": (_python_shape, r"a shape expression that is Python code"),
    "a shape expression too large to compute": (_huge_power, r"a shape expression .* too large to compute"),
    "a node that imports a module": (_importing_node, "a graph node that imports Python modules"),
    "a tree spec that imports a module": (_importing_treespec, "an input or output structure that imports Python"),
}


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory) -> pathlib.Path:
    """A tiny torch.export program with a dynamic batch (so its graph has shape expressions)."""
    path = tmp_path_factory.mktemp("pt2") / "dynamic.pt2"
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    program = torch.export.export(net, (torch.rand(3, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize("case", HOSTILE_PT2)
def test_a_hostile_pt2_is_refused_and_runs_nothing(dynamic_pt2, tmp_path, monkeypatch, case):
    """torch.export.load unpickles (sample inputs it fails to read safely,
    weights marked use_pickle), evaluates shape expressions and lets a graph
    import modules; without --trust-pickle none of it may run."""
    marker = tmp_path / "payload-ran"
    (tmp_path / "pt2_payload.py").write_text(PAYLOAD_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    edits, refused = HOSTILE_PT2[case]
    path = _rewritten(dynamic_pt2, tmp_path / "hostile.pt2", edits(marker))
    with pytest.raises(AuditError, match=f"^model {path} contains {refused}") as excinfo:
        load_model(path, device="cpu")
    assert _message(excinfo).endswith("and was refused; pass --trust-pickle only if you trust its source")
    assert not marker.exists()


def test_a_pt2_loads_with_trust_pickle_too(dynamic_pt2, mnist_test):
    x = mnist_test.x[:5]
    trusted = load_model(dynamic_pt2, trust_pickle=True, device="cpu").forward(x)
    torch.testing.assert_close(trusted, load_model(dynamic_pt2, device="cpu").forward(x))


def test_a_graph_given_a_function_that_is_not_an_operator_is_refused(dynamic_pt2):
    """torch.save writes only operators as node arguments; a file can name
    any function reachable from torch (torch.os.system) for an operator to call."""
    import os

    from auditor.models.export_archive import check_program

    program = torch.export.load(str(dynamic_pt2))
    node = next(node for node in program.graph.nodes if node.op == "call_function")
    node.args = (*node.args, os.system)
    with pytest.raises(AuditError, match=f"^model m.pt2 contains a graph node that calls system \\({node.name}\\)"):
        check_program(program, "m.pt2")


def test_pt2_members_that_torch_would_read_differently_are_refused(dynamic_pt2, tmp_path):
    """Torch's zip reader finds members without regard to case: two members
    whose names differ only in case would let it read one and us the other."""
    import zipfile

    path = tmp_path / "twice.pt2"
    with zipfile.ZipFile(dynamic_pt2) as original, zipfile.ZipFile(path, "w") as copy:
        sample = next(name for name in original.namelist() if name.endswith("model.pt"))
        copy.writestr(sample.upper(), original.read(sample))
        for info in original.infolist():
            copy.writestr(info, original.read(info.filename))
    with pytest.raises(AuditError, match="not a readable torch.export program \\(two members named"):
        load_model(path)


def test_a_pt2_member_that_would_inflate_past_the_cap_is_refused(dynamic_pt2, tmp_path):
    """A few kB of deflated JSON can inflate to gigabytes: a compressed member
    that declares more than the cap is refused before it is read, while a
    compressed archive of normal members loads. (The central directory is
    edited to declare 2 GiB: deflating a real 256 MiB member is slow.)"""
    import struct
    import zipfile

    path = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(dynamic_pt2) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as copy:
        for name in original.namelist():
            copy.writestr(name, original.read(name))
        bomb = f"{name.partition('/')[0]}/extra/bomb.json"
        copy.writestr(bomb, "{}")
    assert load_model(path, device="cpu").info.format == "torch-export"
    data = bytearray(path.read_bytes())
    # the name's last occurrence is in the central directory; its size field is 22 bytes before it
    struct.pack_into("<I", data, data.rindex(bomb.encode()) - 22, 2**31)
    path.write_bytes(data)
    with pytest.raises(AuditError) as excinfo:
        load_model(path, device="cpu")
    assert _message(excinfo) == (
        f"model {path}: not a readable torch.export program "
        f"({bomb} inflates to {2**31} bytes, more than the 256 MiB allowed)"
    )


# --------------------------------------------------------------------------- #
# Failures at run time, batch sizes and non-finite outputs
# --------------------------------------------------------------------------- #


def test_a_batch_size_fixed_inside_the_graph_is_caught_by_the_check(mnist_test, tmp_path):
    """A graph that only runs on 16 rows passed the check on 16 images and
    failed in the middle of the scan."""
    path = baked_batch_onnx(tmp_path / "baked.onnx")
    model = load_model(path, device="cpu")
    with pytest.raises(AuditError) as excinfo:
        check_model_on_data(model, mnist_test)
    assert _message(excinfo).startswith(
        f"model {path} runs on a batch of 16 images of data mnist but fails on a batch of 3 "
        "(a batch size fixed inside the graph?): [ONNXRuntimeError]"
    )


def test_outputs_that_depend_on_the_batch_are_refused(mnist_test):
    class BatchMean(nn.Module):
        """Subtracts the batch's mean image, as batch statistics do."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(28 * 28, 10)

        def forward(self, x):
            return self.linear((x - x.mean(0)).flatten(1))

    with pytest.raises(AuditError, match="^model test gives other outputs for 3 images of data mnist alone than in a "
                                         "batch of 16: its outputs depend on the batch") as excinfo:
        check_model_on_data(_wrap(BatchMean()), mnist_test)
    _message(excinfo)


def test_a_randomised_model_is_not_taken_for_one_that_depends_on_the_batch(mnist_test):
    """Two passes of a randomised model differ anyway: the preflight checks report it."""
    class Noisy(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10] + torch.randn(len(x), 10)

    assert check_model_on_data(_wrap(Noisy()), mnist_test) == 10


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_failure_at_run_time_is_one_line_naming_model_and_batch(tmp_path, fmt):
    """Each adapter's forward turns a failure of the model into an AuditError."""
    if fmt == "onnx":
        path = baked_batch_onnx(tmp_path / "baked.onnx")
    else:
        path = tmp_path / "linear.pt"
        torch.jit.save(torch.jit.script(nn.Linear(5, 10)), str(path))
    with pytest.raises(AuditError, match=f"^model {path} failed on a batch of 3: ") as excinfo:
        load_model(path, device="cpu").forward(torch.rand(3, 1, 28, 28))
    _message(excinfo)


def test_preflight_does_not_call_a_model_with_nan_outputs_randomised(mnist_test):
    """NaN differs from itself: two identical passes with NaN in them read as a randomised model."""
    from auditor.checks import preflight

    assert not preflight(_wrap(NanNet()), mnist_test.x[:8], 0).randomised


def test_non_finite_outputs_on_any_audited_image_are_refused(mnist_test):
    from auditor.models import clean_logits

    class NanOnBright(nn.Module):
        def forward(self, x):
            logits = x.flatten(1)[:, :10]
            return torch.where(x.flatten(1).mean(1, keepdim=True) > 0.5, torch.nan, logits)

    x = torch.cat([torch.zeros(20, 1, 28, 28), torch.ones(3, 1, 28, 28)])
    assert torch.equal(clean_logits(_wrap(NanOnBright()), x[:20], mnist_test), x[:20].flatten(1)[:, :10])
    with pytest.raises(AuditError, match="^model test returned NaN or infinite outputs on 3 of the 23 audited "
                                         "images of data mnist$"):
        clean_logits(_wrap(NanOnBright()), x, mnist_test)


def test_mean_and_std_must_fit_the_data_as_well_as_the_model():
    from auditor.models import check_channels

    check_channels((0.5,), (0.2, 0.3, 0.4), 3, "data d has")
    check_channels(None, None, 1, "data d has")
    with pytest.raises(AuditError, match=r"^--std has 2 values but data d has 3 channel\(s\)$"):
        check_channels((0.5,), (0.2, 0.3), 3, "data d has")


def test_onnxruntime_logs_nothing_when_a_run_fails(tmp_path, capfd):
    """onnxruntime's own error log (several coloured lines on the process's
    stderr) came before the one-line error."""
    model = load_model(baked_batch_onnx(tmp_path / "baked.onnx"), device="cpu")
    capfd.readouterr()
    with pytest.raises(AuditError):
        model.forward(torch.rand(3, 1, 28, 28))
    assert capfd.readouterr().err == ""


def test_forward_calls_hold_fewer_rows_of_larger_images():
    """The model's activations grow with rows × pixels: a forward call takes
    1,024 MNIST digits but only 341 images of 3 × 64 × 64 (NES sent 1,000
    such images at once, 4 GB for a small ResNet)."""
    from auditor.models.pytorch import chunk_rows

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = []

        def forward(self, x):
            self.rows.append(len(x))
            return x.flatten(1)[:, :10]

    assert (chunk_rows((1, 28, 28)), chunk_rows((3, 64, 64)), chunk_rows((3, 224, 224))) == (1024, 341, 27)
    recorder = Recorder()
    logits = _wrap(recorder).forward(torch.rand(700, 3, 64, 64))
    assert recorder.rows == [341, 341, 18] and logits.shape == (700, 10)


# Output shapes and the audited output of ONNX graphs -------------------------------------------------


def _linear_onnx(path: pathlib.Path, tail: list, outputs: list, *, domains: tuple = ()) -> pathlib.Path:
    """x (N,1,28,28) -> Flatten -> MatMul -> ``logits`` (N,10), then the ``tail`` nodes."""
    weights = np.random.RandomState(0).randn(784, 10).astype(np.float32) / 10
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["x"], ["flat"]), onnx.helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         *tail],
        "linear",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 28, 28])],
        outputs,
        initializer=[onnx.numpy_helper.from_array(weights, "w"),
                     onnx.numpy_helper.from_array(np.array([-1, 10, 1, 1], np.int64), "column")],
    )
    opsets = [onnx.helper.make_opsetid("", 17), *(onnx.helper.make_opsetid(domain, 1) for domain in domains)]
    onnx.save(onnx.helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return path


def _tensor(name: str, elem=onnx.TensorProto.FLOAT, shape=("N", 10)):
    return onnx.helper.make_tensor_value_info(name, elem, list(shape))


def _squeezed_onnx(path: pathlib.Path) -> pathlib.Path:
    """Ends in a Squeeze without axes, as PyTorch exports ``x.squeeze()``:
    (N,10,1,1) -> (N,10), but (10,) for one image."""
    tail = [onnx.helper.make_node("Reshape", ["logits", "column"], ["column_logits"]),
            onnx.helper.make_node("Squeeze", ["column_logits"], ["scores"])]
    return _linear_onnx(path, tail, [_tensor("scores")])


class Squeezed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)

    def forward(self, x):
        return self.linear(x.flatten(1)).squeeze()


def test_a_model_that_drops_the_batch_dimension_of_one_image_is_refused_by_the_check(mnist_test, tmp_path):
    """It passed the check on 16 and 3 images, then crashed the scan with an
    IndexError on the first single-image query (an "internal error")."""
    path = _squeezed_onnx(tmp_path / "squeezed.onnx")
    with pytest.raises(AuditError) as excinfo:
        check_model_on_data(load_model(path, device="cpu"), mnist_test)
    assert _message(excinfo) == (
        f"model {path} runs on a batch of 16 images of data mnist but fails on a single image (a squeeze() that "
        "drops the batch dimension?): its output 'scores' has shape (10,) for 1 image; expected (1, classes)"
    )
    with pytest.raises(AuditError) as excinfo:
        check_model_on_data(_wrap(Squeezed()), mnist_test)
    assert _message(excinfo) == (
        "model test runs on a batch of 16 images of data mnist but fails on a single image (a squeeze() that "
        "drops the batch dimension?): its output has shape (10,) for 1 image; expected (1, classes)"
    )


def test_the_torch_adapter_refuses_an_output_that_is_not_one_row_per_image():
    model = _wrap(Squeezed())
    assert model.forward(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ModelFailed, match=r"its output has shape \(10,\) for 1 image; expected \(1, classes\)"):
        model.forward(torch.rand(1, 1, 28, 28))


def test_the_onnx_adapter_refuses_an_output_that_is_not_one_row_per_image(tmp_path):
    """So no later caller gets a shape to fail on."""
    path = _squeezed_onnx(tmp_path / "squeezed.onnx")
    model = load_model(path, device="cpu")
    assert model.forward(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ModelFailed) as excinfo:
        model.forward(torch.rand(1, 1, 28, 28))
    assert _message(excinfo) == (
        f"model {path} failed on a batch of 1: its output 'scores' has shape (10,) for 1 image; "
        "expected (1, classes)"
    )


def test_a_model_whose_single_image_outputs_differ_is_refused(mnist_test):
    class Alone(nn.Module):
        """Other logits for a batch of one (a batch size special-cased inside the model)."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(28 * 28, 10)

        def forward(self, x):
            logits = self.linear(x.flatten(1))
            return logits + 1 if len(x) == 1 else logits

    with pytest.raises(AuditError, match="^model test gives other outputs for 1 image of data mnist alone than in "
                                         "a batch of 16: its outputs depend on the batch") as excinfo:
        check_model_on_data(_wrap(Alone()), mnist_test)
    _message(excinfo)


SOFTMAX = onnx.helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)
LABEL = onnx.helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)
LABEL_COLUMN = onnx.helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=1)
ZIPMAP = onnx.helper.make_node("ZipMap", ["probabilities"], ["zipped"], domain="ai.onnx.ml",
                               classlabels_int64s=list(range(10)))
ZIPPED = onnx.helper.make_value_info("zipped", onnx.helper.make_sequence_type_proto(
    onnx.helper.make_map_type_proto(onnx.TensorProto.INT64,
                                    onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, []))))
INT_LABEL = _tensor("label", onnx.TensorProto.INT64, ["N"])

OUTPUT_LAYOUTS = {
    "label first (sklearn-onnx, tf2onnx)": ([SOFTMAX, LABEL], [INT_LABEL, _tensor("probabilities")], "probabilities"),
    "label column first": ([SOFTMAX, LABEL_COLUMN],
                           [_tensor("label", onnx.TensorProto.INT64, ["N", 1]), _tensor("probabilities")],
                           "probabilities"),
    "probabilities first": ([SOFTMAX, LABEL], [_tensor("probabilities"), INT_LABEL], "probabilities"),
    "logits and probabilities": ([SOFTMAX], [_tensor("logits"), _tensor("probabilities")], "logits"),
}


@pytest.mark.parametrize("layout", OUTPUT_LAYOUTS)
def test_the_first_float_output_of_an_onnx_graph_is_audited(mnist_test, tmp_path, layout, caplog):
    """A label output first was audited as the scores: "has 1 output" or "outputs of shape (16,)"."""
    tail, outputs, audited = OUTPUT_LAYOUTS[layout]
    path = _linear_onnx(tmp_path / "classifier.onnx", tail, outputs)
    with caplog.at_level("INFO", logger="auditor.models.onnxrt"):
        model = load_model(path, device="cpu")
    assert model.info.output == audited and model.info.num_classes == 10
    assert f"auditing {audited!r}" in caplog.text
    assert check_model_on_data(model, mnist_test) == 10
    x = mnist_test.x[:5]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = torch.from_numpy(session.run([audited], {"x": x.numpy()})[0])
    torch.testing.assert_close(model.forward(x), expected)
    assert model.access_ceiling[0] == Access.WHITE_BOX
    with torch.no_grad():
        torch.testing.assert_close(model.torch_module()(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("tail", "outputs", "hint"), [
    ([SOFTMAX, ZIPMAP, LABEL], [ZIPPED, INT_LABEL], True),
    ([SOFTMAX, ZIPMAP, LABEL], [INT_LABEL, ZIPPED], True),
    ([SOFTMAX, LABEL], [INT_LABEL], False),
], ids=["zipmap-first", "sklearn-label-then-zipmap", "label-only"])
def test_a_graph_without_a_float_tensor_output_is_refused_naming_its_outputs(tmp_path, tail, outputs, hint):
    path = _linear_onnx(tmp_path / "classifier.onnx", tail, outputs, domains=("ai.onnx.ml",))
    with pytest.raises(AuditError) as excinfo:
        load_model(path, device="cpu")
    message = _message(excinfo)
    assert message.startswith(f"model {path} has no float tensor output to audit (outputs: ")
    assert "'label' (tensor(int64))" in message
    assert ("'zipped' (seq(map(int64,tensor(float))))" in message) == hint
    assert ("ZipMap" in message and "options {'zipmap': False}" in message) == hint


def test_results_name_the_audited_output_of_a_graph_with_several(tmp_path):
    import auditor

    settings = dict(samples=4, eps=[0.1], access="soft-label", attacks=["random-noise"], budget=10)
    several = _linear_onnx(tmp_path / "label_first.onnx", [SOFTMAX, LABEL], [INT_LABEL, _tensor("probabilities")])
    assert auditor.scan(several, **settings).results["model"]["output"] == "probabilities"
    single = _linear_onnx(tmp_path / "single.onnx", [SOFTMAX], [_tensor("probabilities")])
    assert "output" not in auditor.scan(single, **settings).results["model"]
