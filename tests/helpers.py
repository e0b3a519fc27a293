"""Helpers shared by the tests (import as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from auditor.attacks.hardlabel.shared import StartPool
from auditor.oracles import LabelOracle, ScoreOracle


class Counting:
    """A model function that counts its calls and rows, and keeps each call's size."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.rows = 0
        self.sizes: list[int] = []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += len(z)
        self.sizes.append(len(z))
        return self.fn(z)


def score_oracle(model, n, budget, counter: Counting | None = None):
    """A ScoreOracle on the model's softmax, counted by `counter` (a fresh one by default)."""
    probabilities = counter or Counting(lambda z: model(z).softmax(1))
    return ScoreOracle(probabilities, n, budget)


def label_oracle(model64, n, budget, counter: Counting | None = None):
    """A LabelOracle on a float64 model (inputs cast to double), counted by `counter`."""
    return LabelOracle(counter or Counting(lambda z: model64(z.double()).argmax(1)), n, budget)


def first_found(trace) -> torch.Tensor:
    """Per sample, the distortion of the first adversarial example its trace
    shows (``inf`` where none): the start a minimum-norm attack refines."""
    sizes = torch.stack([size for _, size in trace])
    found = torch.isfinite(sizes)
    first = found.int().argmax(dim=0)
    return torch.where(found.any(dim=0), sizes[first, torch.arange(sizes.shape[1])], torch.inf)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    """Train ``model`` with Adam (lr 3e-3) on batches of 100 in order; returns it in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(y), 100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
            opt.step()
    return model.eval()


def predict(model, x: torch.Tensor) -> torch.Tensor:
    """The model's labels for x, cast to the model's parameter dtype (float32 or float64)."""
    with torch.no_grad():
        return model(x.to(next(model.parameters()).dtype)).argmax(1)


class Ball(torch.nn.Module):
    """Two classes: 1 only within L2 distance ``radius`` of ``centre``, else 0.

    No noise image is ever class 1, so no random direction from a class-0
    image crosses the boundary; the line to an image inside the ball does,
    and the closest adversarial point lies on the line to ``centre``, at
    distance ``‖x - centre‖ - radius``.
    """

    def __init__(self, centre: torch.Tensor, radius: float):
        super().__init__()
        self.register_buffer("centre", centre)
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = self.radius - (x - self.centre).flatten(1).norm(dim=1)
        return torch.stack([torch.zeros_like(inside), inside], dim=1)


def ball_case(samples: int = 4):
    """A :class:`Ball` around a grey 1×8×8 image, dark class-0 samples (x, y),
    and a start pool (data indices 100…107) of other dark images and three
    images inside the ball, 105…107."""
    gen = torch.Generator().manual_seed(0)
    centre = torch.full((1, 8, 8), 0.8)
    x = torch.rand(samples, 1, 8, 8, generator=gen) * 0.2
    inside = (centre + 0.05 * torch.randn(3, 1, 8, 8, generator=gen)).clamp(0, 1)
    pool_x = torch.cat([torch.rand(5, 1, 8, 8, generator=gen) * 0.2, inside])
    pool_y = torch.tensor([0] * 5 + [1] * 3)
    pool = StartPool(pool_x, pool_y, torch.arange(100, 108))
    return Ball(centre, 1.0), x, torch.zeros(samples, dtype=torch.long), pool


def ball_battery(starts: bool):
    """The ball case through ``run_battery``: a hard-label L2 battery of one
    small Sign-OPT, ε 6, budget 200, with or without the start pool.
    Returns (ball, x, outcome)."""
    from auditor.access import Access
    from auditor.attacks.hardlabel.sign_opt import SignOPT
    from auditor.battery import Battery, run_battery
    from auditor.models.base import ModelInfo
    from auditor.models.pytorch import TorchModel

    ball, x, y, pool = ball_case()
    model = TorchModel(ball, ModelInfo("ball", "state-dict", "0", (1, 8, 8), 2), device="cpu")
    battery = Battery(Access.HARD_LABEL, "l2", (SignOPT(k=10, n_init=5),))
    outcome = run_battery(battery, model, x, y, eps_list=[6.0], budget=200, seed=0, starts=pool if starts else None)
    return ball, x, outcome


def baked_batch_onnx(path: Path, batch: int = 16) -> Path:
    """A linear MNIST classifier whose graph reshapes to exactly ``batch`` rows,
    though its input declares a symbolic batch."""
    from onnx import TensorProto, helper, numpy_helper, save

    weights = numpy_helper.from_array(np.random.RandomState(0).randn(784, 10).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([batch, 784], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "baked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[weights, shape],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def digit_files(folder: Path, train, test, n_train: int, n_test: int) -> tuple[Path, Path]:
    """The first ``n_train`` training and ``n_test`` test digits as .npz files
    (x as N,C,H,W float) in ``folder``: data for ``harden`` runs."""
    paths = folder / "train.npz", folder / "test.npz"
    for path, data, n in zip(paths, (train, test), (n_train, n_test)):
        np.savez(path, x=data.x[:n].numpy(), y=data.y[:n].numpy())
    return paths


SCALE = 50.0
"""Logits this large saturate a float32 softmax on most digits."""


def softmax_onnx(source: Path, path: Path, scale: float = SCALE, after: tuple[str, ...] = ()) -> Path:
    """``source`` with its logits multiplied by ``scale`` and put through a Softmax node,
    then through nodes of the ``after`` op types (``Identity``, ``Cast`` to float)."""
    proto = onnx.load(str(source))
    graph = proto.graph
    logits = graph.output[0].name
    graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"))
    names = ["softmax", *(f"after_{index}" for index in range(len(after)))]
    names[-1] = "probabilities"
    graph.node.extend([
        helper.make_node("Mul", [logits, "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], [names[0]], axis=1),
        *(helper.make_node(op, [source_name], [name], **({"to": TensorProto.FLOAT} if op == "Cast" else {}))
          for op, source_name, name in zip(after, names, names[1:])),
    ])
    dims = [dim.dim_param or dim.dim_value for dim in graph.output[0].type.tensor_type.shape.dim]
    graph.output.pop()
    graph.output.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, dims))
    onnx.save(proto, str(path))
    return path


def nhwc_onnx(source: Path, path: Path) -> Path:
    """``source`` taking (N,H,W,C) input, as a Keras model exported by tf2onnx does: a
    ``Transpose`` to (N,C,H,W) in front of its graph."""
    proto = onnx.load(str(source))
    graph = proto.graph
    original = graph.input[0]
    batch, channels, height, width = (dim.dim_param or dim.dim_value for dim in original.type.tensor_type.shape.dim)
    for node in graph.node:
        node.input[:] = ["nchw" if name == original.name else name for name in node.input]
    graph.node.insert(0, helper.make_node("Transpose", ["nhwc"], ["nchw"], perm=[0, 3, 1, 2]))
    graph.input.remove(original)
    graph.input.insert(0, helper.make_tensor_value_info("nhwc", TensorProto.FLOAT, [batch, height, width, channels]))
    onnx.save(proto, str(path))
    return path
