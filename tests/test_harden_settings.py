"""``auditor harden``: the weight types it trains, the export check's precision, PGD-AT's default step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_cnn_arch
from helpers import digit_files
from onnx import TensorProto, helper, numpy_helper

from auditor.cli import main
from auditor.harden.config import HardenConfig
from auditor.harden.export import export
from auditor.harden.methods import METHODS
from auditor.harden.train import Trainer
from auditor.harden.trainable import make_trainable
from auditor.models import load_model


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, mnist_train, mnist_test) -> tuple[Path, Path]:
    """200 training digits and 20 test digits as .npz files."""
    return digit_files(tmp_path_factory.mktemp("data"), mnist_train, mnist_test, 200, 20)


def _tiny(tiny_cnn) -> torch.nn.Module:
    network = tiny_cnn_arch()
    network.load_state_dict(tiny_cnn.state_dict())
    return network.eval()


# Half-precision weights -------------------------------------------------------------------------------


def _torchscript(network: torch.nn.Module, dtype: torch.dtype, path: Path) -> Path:
    network = network.to(dtype)
    torch.jit.save(torch.jit.trace(network, torch.rand(2, 1, 28, 28, dtype=dtype)), str(path / "tiny.ts"))
    return path / "tiny.ts"


def _onnx(network: torch.nn.Module, dtype: torch.dtype, path: Path) -> Path:
    network = network.to(dtype)
    torch.onnx.export(network, (torch.rand(2, 1, 28, 28, dtype=dtype),), str(path / "tiny.onnx"),
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                      opset_version=17, dynamo=False)
    return path / "tiny.onnx"


@pytest.mark.parametrize("write, dtype", [
    (_torchscript, torch.float16), (_torchscript, torch.bfloat16), (_onnx, torch.float16),
])
def test_half_precision_weights_are_refused_before_any_work(tiny_cnn, small_data, tmp_path, capsys, write,
                                                            dtype):
    """Adam's ε = 1e-8 is 0 in float16: the first update made weights NaN, the guard restored the
    starting ones, and the run exited 0 having written the original weights as "hardened"."""
    source = write(_tiny(tiny_cnn), dtype, tmp_path)
    capsys.readouterr()  # torch's warnings on writing it
    train, test = small_data
    code = run_cli("harden", source, "--data", train, "--eval-data", test, "--eps", "0.1", "--epochs", "1",
                   "--guard-size", "64", "-n", "10", "--budget", "20", "--device", "cpu",
                   "--out", tmp_path / "out")
    err = capsys.readouterr().err
    name = str(dtype).removeprefix("torch.")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert (f"harden trains float32 or float64 weights; model {source} has {name} parameters: "
            "convert it to float32 first") in err
    assert not (tmp_path / "out").exists()


def _mixed_precision_graph(network: torch.nn.Module, path: Path) -> Path:
    """``network`` (the tiny CNN) as a graph whose first convolution is float32 and trainable
    (initializers) and whose other layers compute in float16 with ``Constant`` weights (not trained)."""
    conv1, conv2, linear = network[0], network[2], network[5]

    def initializer(name: str, tensor: torch.Tensor) -> onnx.TensorProto:
        return numpy_helper.from_array(tensor.detach().numpy(), name)

    def constant(name: str, tensor: torch.Tensor) -> onnx.NodeProto:
        value = numpy_helper.from_array(tensor.detach().numpy().astype(np.float16), f"{name}_value")
        return helper.make_node("Constant", [], [name], value=value)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Cast", ["r1"], ["half"], to=TensorProto.FLOAT16),
        constant("w2", conv2.weight), constant("b2", conv2.bias),
        helper.make_node("Conv", ["half", "w2", "b2"], ["h2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"]),
        constant("w3", linear.weight), constant("b3", linear.bias),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Cast", ["logits"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [initializer("w1", conv1.weight), initializer("b1", conv1.bias)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_export_check_holds_an_onnx_graph_to_its_own_precision(tiny_cnn, mnist_test, tmp_path):
    """float32 weights that feed float16 arithmetic: the graph agrees with onnxruntime to float16's
    tolerance (as it did when loaded), and the export check refused it at float32's."""
    source = _mixed_precision_graph(_tiny(tiny_cnn), tmp_path / "mixed.onnx")
    trainable = make_trainable(load_model(source, device="cpu"), source, None, None, torch.device("cpu"))
    assert trainable.artifact.precision == torch.float16
    assert [parameter.dtype for parameter in trainable.parameters] == [torch.float32] * 2
    with torch.no_grad():  # stands in for training
        for parameter in trainable.parameters:
            parameter.mul_(1.5)
    dest = tmp_path / "out.onnx"
    assert export(trainable, "onnx", source, dest, mnist_test.x[:64], arch=None, trust_pickle=False) < 0.05
    written = {tensor.name: tensor for tensor in onnx.load(str(dest)).graph.initializer}
    assert np.allclose(numpy_helper.to_array(written["w1"]), tiny_cnn[0].weight.detach().numpy() * 1.5)


# PGD-AT's step -----------------------------------------------------------------------------------------


def test_pgd_default_step_keeps_madrys_walk_for_any_number_of_steps():
    """α = 4ε/(3k): k·α is the 40 × ε/30 of Madry et al. for every k; a given --alpha is kept."""
    for steps in (1, 7, 40):
        method = METHODS["pgd"](HardenConfig(eps=0.3, method="pgd", steps=steps))
        assert method.steps * method.alpha == pytest.approx(4 / 3)
    assert METHODS["pgd"](HardenConfig(eps=0.3, method="pgd")).alpha == 1 / 30
    assert METHODS["pgd"](HardenConfig(eps=0.3, method="pgd", steps=7, alpha=0.05)).alpha == 0.05


def test_pgd_7_trains_on_examples_far_stronger_than_its_random_start(one_thread, tiny_cnn, mnist_test):
    """With α fixed at ε/30, PGD-7's training examples cost the tiny CNN barely more than uniform
    noise in the ε-ball (loss 0.69 against 0.41); with α = 4ε/(3·7), 2.9."""
    network = _tiny(tiny_cnn)
    x, y = mnist_test.x[:200], mnist_test.y[:200]
    config = HardenConfig(eps=0.1, method="pgd", steps=7, eps_warmup=0.0)
    uniform = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
    with torch.no_grad():
        noise = torch.nn.functional.cross_entropy(network(x + uniform), y)
    trainer = Trainer(network, list(network.parameters()), config, torch.device("cpu"), 1)
    outcome = METHODS["pgd"](config).train_batch(trainer, x, y)  # its loss: before the weight update
    assert outcome.loss > 3 * float(noise)
