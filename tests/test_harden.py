"""``auditor harden``: fast adversarial training, its guard, and export in the input's format."""

from __future__ import annotations

import importlib
import json
import re
import signal
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import tiny_cnn_arch
from helpers import digit_files, softmax_onnx
from onnx import numpy_helper
from pypdf import PdfReader
from safetensors.torch import save_file

import auditor
from auditor.cli import main
from auditor.data import load_data
from auditor.errors import AuditError
from auditor.checks import are_probabilities
from auditor.harden.api import ACCESS_REASON, _audited_training_images
from auditor.harden.config import HardenConfig
from auditor.harden.export import export
from auditor.harden.guard import Check, Guard
from auditor.harden.methods import METHODS
from auditor.harden.train import cyclic_lr, minibatches, ramped_eps, train
from auditor.harden.trainable import make_trainable
from auditor.models import load_model
from auditor.models.pytorch import InputDtype, batch_range
from auditor.report.build import build_view

WALL_TIMES = ("started", "seconds", "training_seconds")


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code


def without_wall_times(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in WALL_TIMES}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, mnist_train, mnist_test) -> tuple[Path, Path]:
    """600 training digits and 40 test digits as .npz files."""
    return digit_files(tmp_path_factory.mktemp("data"), mnist_train, mnist_test, 600, 40)


# The schedules and the guard's rule ---------------------------------------------------------------


def test_cyclic_learning_rate_is_triangular():
    assert cyclic_lr(0.0, 1.0, 0.4) == 0.0
    assert cyclic_lr(0.2, 1.0, 0.4) == pytest.approx(0.5)
    assert cyclic_lr(0.4, 1.0, 0.4) == pytest.approx(1.0)
    assert cyclic_lr(0.7, 1.0, 0.4) == pytest.approx(0.5)
    assert cyclic_lr(1.0, 1.0, 0.4) == 0.0
    assert ramped_eps(0.2, 0.3, 0.4) == pytest.approx(0.15)
    assert ramped_eps(0.9, 0.3, 0.4) == 0.3
    assert ramped_eps(0.0, 0.3, 0.0) == 0.3


def test_guard_rolls_back_to_the_best_weights_on_a_drop_of_more_than_its_threshold():
    module = torch.nn.Linear(2, 2)
    guard = Guard(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), eps=0.1, norm="linf", steps=1,
                  drop=0.2, enabled=True)
    history = [0.1, 0.5, 0.35, 0.31]
    for step, pgd in enumerate(history):
        with torch.no_grad():
            module.weight.fill_(step)
        assert not guard.observe(module, Check(1, step, 0.9, 0.5, pgd))
    assert guard.best.pgd == 0.5 and guard.events == []
    with torch.no_grad():
        module.weight.fill_(9)
    assert guard.observe(module, Check(2, 9, 0.9, 0.9, 0.29))
    assert torch.all(module.weight == 1)  # the weights of the best check (step 1)
    (event,) = guard.events
    assert event["action"] == "rollback" and event["best_pgd"] == 0.5 and event["pgd"] == 0.29


def test_disabled_guard_records_the_collapse_once_and_never_acts():
    module = torch.nn.Linear(2, 2)
    guard = Guard(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), eps=0.1, norm="linf", steps=1,
                  drop=0.2, enabled=False)
    for step, pgd in enumerate([0.6, 0.1, 0.0]):
        with torch.no_grad():
            module.weight.fill_(step)
        assert not guard.observe(module, Check(1, step, 0.9, 0.9, pgd))
    assert torch.all(module.weight == 2)
    assert [event["action"] for event in guard.events] == ["none (guard disabled)"]


def test_config_refuses_bad_values_in_one_line():
    for kwargs, message in (({"eps": 0}, "--eps must be > 0"), ({"eps": 0.3, "epochs": 0}, "--epochs"),
                            ({"eps": 2.0}, "exceeds"), ({"eps": 0.3, "lr_peak": 1.0}, "--lr-peak"),
                            ({"eps": 0.3, "guard": False, "guard_size": 0}, "--guard-size must be >= 1")):
        with pytest.raises(AuditError, match=message):
            HardenConfig(**kwargs)


@pytest.mark.parametrize("field, flag", [
    ("lr_max", "--lr-max"), ("alpha", "--alpha"), ("eps_scale", "--eps-scale"), ("lr_peak", "--lr-peak"),
    ("eps_warmup", "--eps-warmup"), ("guard_drop", "--guard-drop"),
])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_config_refuses_infinite_and_nan_settings(field, flag, value):
    """``--lr-max inf`` used to train and fail at the end, writing the record ("Out of range float
    values are not JSON compliant")."""
    with pytest.raises(AuditError, match=f"^{flag} must "):
        HardenConfig(eps=0.3, **{field: value})


# The methods -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, options, updates", [
    ("fast", {}, 4), ("pgd", {"steps": 3}, 4), ("free", {"replays": 2, "epochs": 4}, 8),
    ("fast", {"norm": "l2", "eps": 1.0}, 4), ("pgd", {"norm": "l2", "eps": 1.0, "steps": 3}, 4),
])
def test_each_method_trains_and_records_a_curve(one_thread, tiny_cnn, mnist_train, method, options, updates):
    network = tiny_cnn_arch()
    network.load_state_dict(tiny_cnn.state_dict())
    config = HardenConfig(**{"eps": 0.1, "method": method, "epochs": 2, "batch_size": 100, **options})
    guard = Guard(mnist_train.x[-64:], mnist_train.y[-64:], eps=config.eps, norm=config.norm, steps=3,
                  drop=0.2, enabled=True)
    before = [parameter.detach().clone() for parameter in network.parameters()]
    outcome = train(network, list(network.parameters()), mnist_train.x[:200], mnist_train.y[:200],
                    METHODS[method](config), config, guard, torch.device("cpu"))
    assert outcome.updates == updates
    assert outcome.epochs_run == outcome.epochs_planned == METHODS[method](config).data_passes(config.epochs)
    assert [row["epoch"] for row in outcome.curve] == list(range(outcome.epochs_run + 1))
    assert outcome.curve[-1]["eps"] == pytest.approx(config.eps) and outcome.curve[-1]["loss"] > 0
    assert all(0 <= row[key] <= 1 for row in outcome.curve for key in ("clean", "fgsm", "pgd"))
    assert any(not torch.equal(old, new) for old, new in zip(before, network.parameters()))


def _dropout_bn_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(28 * 28, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        torch.nn.Dropout(0.5), torch.nn.Linear(32, 10),
    )


def test_training_with_dropout_and_batchnorm_is_seeded_and_takes_a_last_batch_of_one(one_thread, mnist_train):
    """Dropout draws from a stream seeded with the config's seed (two runs
    give the same weights, and the caller's generator is left as it was);
    201 images in batches of 100 train as 100 + 101, since BatchNorm
    cannot train on a last batch of one image."""
    assert [len(batch) for batch in minibatches(torch.arange(201), 100)] == [100, 101]
    assert [len(batch) for batch in minibatches(torch.arange(1), 100)] == [1]
    config = HardenConfig(eps=0.1, epochs=1, batch_size=100, seed=5)
    weights = []
    for _ in range(2):
        network = _dropout_bn_network()
        guard = Guard(mnist_train.x[-32:], mnist_train.y[-32:], eps=config.eps, norm=config.norm, steps=2,
                      drop=0.2, enabled=True)
        torch.manual_seed(len(weights))  # the caller's generator: a different state each run
        state = torch.get_rng_state()
        outcome = train(network, list(network.parameters()), mnist_train.x[:201], mnist_train.y[:201],
                        METHODS["fast"](config), config, guard, torch.device("cpu"))
        assert torch.equal(torch.get_rng_state(), state)
        assert outcome.updates == 2
        weights.append([parameter.detach().clone() for parameter in network.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_free_training_carries_its_perturbation_through_a_last_batch_of_one_image_more(one_thread, tiny_cnn,
                                                                                     mnist_train):
    """201 images in batches of 100 train as 100 + 101: free's δ, carried from batch to batch,
    must have a row for the 101st image (it had 100, and the second batch crashed)."""
    network = tiny_cnn_arch()
    network.load_state_dict(tiny_cnn.state_dict())
    config = HardenConfig(eps=0.1, method="free", epochs=2, replays=2, batch_size=100)
    guard = Guard(mnist_train.x[-32:], mnist_train.y[-32:], eps=config.eps, norm=config.norm, steps=2,
                  drop=0.2, enabled=True)
    outcome = train(network, list(network.parameters()), mnist_train.x[:201], mnist_train.y[:201],
                    METHODS["free"](config), config, guard, torch.device("cpu"))
    assert outcome.updates == 4 and outcome.epochs_run == outcome.epochs_planned == 1


class _InGraphNormalisation(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.linspace(0.1, 0.2, 28).view(1, 1, 28, 1))
        self.register_buffer("std", torch.linspace(0.3, 0.4, 28).view(1, 1, 28, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def test_an_onnx_graphs_own_normalisation_is_not_trained(tmp_path):
    """The constants of ``(x − mean) / std`` at the graph's input stay
    constants; the convolution's and the linear layer's weights train
    (every multi-element initializer used to, std drifting 12 % in 3 epochs)."""
    path = tmp_path / "normalised.onnx"
    network = torch.nn.Sequential(_InGraphNormalisation(), torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 26 * 26, 10))
    torch.onnx.export(network, torch.zeros(1, 1, 28, 28), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    graph = onnx.load(str(path)).graph
    assert [node.op_type for node in graph.node][:2] == ["Sub", "Div"]
    trainable = make_trainable(load_model(path, device="cpu"), path, None, None, torch.device("cpu"))
    assert sorted(trainable.initializers) == ["1.bias", "1.weight", "3.bias", "3.weight"]


class _FixedBatchNetwork(torch.nn.Module):
    """Flattens with ``view(batch, -1)``: exported without a dynamic axis, the graph's reshape
    holds the example's batch size, so the graph only takes batches of that size."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=2)
        self.linear = torch.nn.Linear(4 * 13 * 13, 10)

    def forward(self, x):
        return self.linear(torch.relu(self.conv(x)).view(x.size(0), -1))


def test_an_onnx_graph_with_a_fixed_batch_size_trains_on_any_batch_and_keeps_its_graph(one_thread, tmp_path,
                                                                                      mnist_train):
    """The adapter runs such a graph in padded chunks of its batch size; training goes through
    them (batches of 6 and 7 on a graph of batch 4), and the written graph is the original one,
    fixed batch size included, with the trained weights (it used to be refused)."""
    path, dest = tmp_path / "fixed.onnx", tmp_path / "fixed-hardened.onnx"
    torch.manual_seed(0)
    torch.onnx.export(_FixedBatchNetwork().eval(), torch.zeros(4, 1, 28, 28), str(path), input_names=["x"],
                      output_names=["y"], dynamo=False)
    model = load_model(path, device="cpu")
    trainable = make_trainable(model, path, None, None, torch.device("cpu"))
    assert sorted(trainable.initializers) == ["conv.bias", "conv.weight", "linear.bias", "linear.weight"]
    config = HardenConfig(eps=0.1, epochs=1, batch_size=6)
    guard = Guard(mnist_train.x[-8:], mnist_train.y[-8:], eps=config.eps, norm=config.norm, steps=2, drop=0.2,
                  enabled=True)
    outcome = train(trainable.module, list(trainable.parameters), mnist_train.x[:13], mnist_train.y[:13],
                    METHODS["fast"](config), config, guard, torch.device("cpu"))
    assert outcome.updates == 2
    diff = export(trainable, "onnx", path, dest, mnist_train.x[:9], arch=None, trust_pickle=False)
    assert diff < 1e-4
    original, trained = onnx.load(str(path)), onnx.load(str(dest))
    assert trained.graph.input == original.graph.input and trained.graph.node == original.graph.node
    weights = [[numpy_helper.to_array(t) for t in proto.graph.initializer] for proto in (original, trained)]
    assert any(not np.array_equal(old, new) for old, new in zip(*weights))


# Export in the input's format -------------------------------------------------------------------------

TINY_ARCH = """
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )
"""


def _write(fmt: str, network: torch.nn.Module, folder: Path) -> Path:
    example = torch.rand(2, 1, 28, 28, dtype=next(network.parameters()).dtype)
    writers = {
        "safetensors": lambda path: save_file({k: v.contiguous() for k, v in network.state_dict().items()},
                                              path),
        "state-dict": lambda path: torch.save(network.state_dict(), path),
        "torchscript": lambda path: torch.jit.save(torch.jit.trace(network, example), path),
        "torch-export": lambda path: torch.export.save(torch.export.export(
            network, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path),
        "pickle": lambda path: torch.save(network, path),
    }
    suffixes = {"safetensors": ".safetensors", "torch-export": ".pt2", "torchscript": ".ts"}
    path = folder / f"tiny{suffixes.get(fmt, '.pt')}"
    writers[fmt](str(path))
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "state-dict", "torchscript", "torch-export", "pickle"])
def test_pytorch_formats_are_written_back_in_their_own_format(tmp_path, tiny_cnn, mnist_test, fmt):
    (tmp_path / "tiny_arch.py").write_text(TINY_ARCH)
    arch = f"{tmp_path / 'tiny_arch.py'}:build"
    network = tiny_cnn_arch()
    network.load_state_dict(tiny_cnn.state_dict())
    source = _write(fmt, network.eval(), tmp_path)
    options = {"arch": arch if fmt in ("safetensors", "state-dict") else None, "trust_pickle": fmt == "pickle"}
    model = load_model(source, device="cpu", **options)
    trainable = make_trainable(model, source, (0.1,), (0.5,), torch.device("cpu"))
    assert isinstance(trainable.module[0], auditor.models.Normalize)
    with torch.no_grad():  # stands in for training: the written file must carry the new weights
        for parameter in trainable.parameters:
            parameter.mul_(1.5)
    dest = tmp_path / f"out{source.suffix}"
    diff = export(trainable, model.info.format, source, dest, mnist_test.x[:16], **options)
    written = load_model(dest, device="cpu", **options)
    assert written.info.format == model.info.format and diff < 1e-4
    with torch.no_grad():
        changed = written.forward(mnist_test.x[:16]) - network(mnist_test.x[:16])
    assert changed.abs().max() > 1e-2


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export", "pickle"])
def test_float64_networks_are_written_back_without_the_adapters_wrapper(tmp_path, tiny_cnn, mnist_test, fmt):
    """The adapter runs a float64 network inside an ``InputDtype`` wrapper; the file gets the
    network itself. TorchScript could not be written, pickle held the wrapper, and torch.export
    wrote a program taking float32, which refused the float64 images it is fed once loaded."""
    network = tiny_cnn_arch()
    network.load_state_dict(tiny_cnn.state_dict())
    source = _write(fmt, network.double().eval(), tmp_path)
    options = {"arch": None, "trust_pickle": fmt == "pickle"}
    trainable = make_trainable(load_model(source, device="cpu", **options), source, None, None,
                               torch.device("cpu"))
    with torch.no_grad():
        for parameter in trainable.parameters:
            parameter.mul_(1.5)
    dest = tmp_path / f"out{source.suffix}"
    assert export(trainable, fmt, source, dest, mnist_test.x[:16], **options) < 1e-4
    loaded = load_model(dest, device="cpu", **options).torch_module()
    assert isinstance(loaded, InputDtype) and not isinstance(loaded.module, InputDtype)
    assert all(parameter.dtype == torch.float64 for parameter in loaded.parameters())
    if fmt == "pickle":
        assert type(loaded.module) is torch.nn.Sequential


PT2_BATCHES = {
    # name: the batch dimension exported (the program then takes the range of rows it gives)
    "min1-max4096": lambda: torch.export.Dim("b", min=1, max=4096),
    "max16": lambda: torch.export.Dim("b", max=16),
    "min2-max16": lambda: torch.export.Dim("b", min=2, max=16),
    "min3": lambda: torch.export.Dim("b", min=3),
    "dim-dynamic": lambda: torch.export.Dim.DYNAMIC,
    "default": lambda: torch.export.Dim("b"),
}


def _pt2(network: torch.nn.Module, batch: str, path: Path) -> Path:
    """``network`` exported with the batch dimension ``PT2_BATCHES[batch]``, saved to ``path``."""
    dynamic = ({0: PT2_BATCHES[batch]()},)
    program = torch.export.export(network, (torch.rand(3, 1, 28, 28),), dynamic_shapes=dynamic)
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize("batch", list(PT2_BATCHES))
def test_a_torch_export_program_is_written_back_taking_the_batch_sizes_it_took(tmp_path, tiny_cnn, mnist_test,
                                                                                 batch):
    """The program is exported again with the original's batch range: a fresh ``Dim("batch")``
    (0 rows up, unbounded) conflicted with the bound the loaded program checks ("Constraints
    violated (batch)! ... 2 <= batch <= 4096"), and Dim.DYNAMIC would take 2 rows up, not 1."""
    network = tiny_cnn_arch()
    network.load_state_dict(tiny_cnn.state_dict())
    source = _pt2(network.eval(), batch, tmp_path / "bounded.pt2")
    model = load_model(source, device="cpu")
    trainable = make_trainable(model, source, None, None, torch.device("cpu"))
    with torch.no_grad():
        for parameter in trainable.parameters:
            parameter.mul_(1.5)
    dest = tmp_path / "out.pt2"
    x = mnist_test.x[:40]
    taken = batch_range(torch.export.load(str(source)))
    # the writer uses what the checked load kept, never the file again (it could have changed since)
    source.write_bytes(b"not the program that was checked")
    assert export(trainable, "torch-export", source, dest, x, arch=None, trust_pickle=False) < 1e-4
    assert batch_range(torch.export.load(str(dest))) == taken
    with torch.no_grad():
        expected = trainable.network(x)
    written = load_model(dest, device="cpu")
    torch.testing.assert_close(written.forward(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(written.forward(x[:1]), expected[:1], atol=1e-5, rtol=1e-5)


def test_harden_of_a_pt2_bounded_at_16_rows_writes_one_taking_1_to_16(one_thread, small_data, tmp_path,
                                                                       tiny_cnn):
    """End to end: the scans and the training run a program exported for 1 to 16 rows in chunks
    of at most 16 rows, and the hardened program takes 1 to 16 rows too."""
    network = tiny_cnn_arch()
    network.load_state_dict(tiny_cnn.state_dict())
    source = tmp_path / "max16.pt2"
    program = torch.export.export(network.eval(), (torch.rand(3, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("b", min=1, max=16)},))
    torch.export.save(program, str(source))
    train, test = small_data
    result = auditor.harden(source, str(train), eps=0.3, out=tmp_path / "out", epochs=1, eval_data=str(test),
                            samples=10, budget=20, guard_size=64, device="cpu", seed=3)
    assert result.model_path.name == "max16-hardened.pt2"
    assert batch_range(torch.export.load(str(result.model_path))) == (1, 16)
    written = load_model(result.model_path, device="cpu")
    assert written.forward(torch.rand(40, 1, 28, 28)).shape == (40, 10)


# ONNX in, ONNX out, end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, example_onnx) -> Path:
    """The example ONNX model hardened by the CLI (fast method, 8 epochs on the MNIST train split)."""
    out = tmp_path_factory.mktemp("harden")
    code = run_cli("harden", example_onnx, "--data", "mnist", "--eps", "0.3", "--epochs", "8",
                   "--lr-max", "1e-2", "-n", "10", "--budget", "50", "--out", out)
    assert code == 0
    return out


def test_onnx_in_onnx_out_keeps_the_graph_and_writes_the_record(hardened, example_onnx, mnist_test):
    written = hardened / "mnist_cnn-hardened.onnx"
    original, trained = onnx.load(str(example_onnx)), onnx.load(str(written))
    assert [node.op_type for node in trained.graph.node] == [node.op_type for node in original.graph.node]
    assert [t.name for t in trained.graph.initializer] == [t.name for t in original.graph.initializer]
    session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: mnist_test.x[:200].numpy()})
    assert (logits.argmax(1) == mnist_test.y[:200].numpy()).mean() >= 0.9
    record = json.loads((hardened / "hardening.json").read_text())
    assert record["schema"] == "auditor.hardening/1" and record["method"]["name"] == "fast"
    assert record["model"]["format"] == record["output"]["format"] == "onnx"
    assert record["output"]["check"]["max_abs_diff"] < 1e-4
    assert [row["epoch"] for row in record["curve"]] == list(range(9))
    assert record["curve"][-1]["pgd"] > record["curve"][0]["pgd"] + 0.3  # it did become robust
    assert record["after"]["robust_accuracy"]["0.3"] > record["before"]["robust_accuracy"]["0.3"]
    for side in ("before", "after"):
        results = json.loads((hardened / side / "results.json").read_text())
        assert results["access"] == {"level": "white-box", "reason": ACCESS_REASON}
        assert results["threat"]["eps"] == [0.3]
        assert results["clean_accuracy"] == record[side]["clean_accuracy"]
    assert json.loads((hardened / "results.json").read_text())["hardening"] == record
    assert not list(hardened.glob(".partial-*"))


def test_report_has_the_hardening_section(hardened):
    html = (hardened / "report.html").read_text()
    assert "<h2>Hardening</h2>" in html and "Training curve" in html and "<svg" in html
    text = "".join(page.extract_text() for page in PdfReader(hardened / "report.pdf").pages)
    assert "Hardening" in text and "Guard" in text and "FGSM-RS" in text


def test_the_hardened_onnx_file_scans_like_the_after_scan(hardened, tmp_path):
    code = run_cli("scan", hardened / "mnist_cnn-hardened.onnx", "--access", "white-box", "--eps", "0.3",
                   "-n", "10", "--budget", "50", "--out", tmp_path)
    assert code == 0
    again = json.loads((tmp_path / "results.json").read_text())
    after = json.loads((hardened / "after" / "results.json").read_text())
    assert again["model"]["sha256"] == after["model"]["sha256"]
    assert again["robust_accuracy"] == after["robust_accuracy"]
    assert again["clean_accuracy"] == after["clean_accuracy"]


# Catastrophic overfitting and the guard -------------------------------------------------------------------

OVERFITTING = dict(eps=0.3, epochs=3, random_init=False, eps_scale=1.0, clip_to_box=True, eps_warmup=0.0,
                   lr_max=2e-2, lr_peak=0.9, guard_every=5)
"""FGSM from zero (Goodfellow et al.'s initialisation, Wong et al. Table 1: 0 % PGD accuracy), clipped,
at a high learning rate without warm-up: robustness collapses within a few dozen updates."""


def _continue_training(hardened, mnist_train, guard_on: bool):
    model = load_model(hardened / "mnist_cnn-hardened.onnx", device="cpu")
    trainable = make_trainable(model, hardened / "mnist_cnn-hardened.onnx", None, None, torch.device("cpu"))
    config = HardenConfig(guard=guard_on, **OVERFITTING)
    guard = Guard(mnist_train.x[-128:], mnist_train.y[-128:], eps=0.3, norm="linf", steps=10, drop=0.2,
                  enabled=guard_on)
    outcome = train(trainable.module, list(trainable.parameters), mnist_train.x[:1000], mnist_train.y[:1000],
                    METHODS["fast"](config), config, guard, torch.device("cpu"))
    return outcome, guard


def test_zero_init_fgsm_overfits_catastrophically_without_the_guard(one_thread, hardened, mnist_train):
    outcome, guard = _continue_training(hardened, mnist_train, guard_on=False)
    assert guard.best.pgd > 0.5
    assert outcome.final["pgd"] < guard.best.pgd - 0.2  # ends collapsed ...
    assert outcome.final["fgsm"] > outcome.final["pgd"] + 0.2  # ... while FGSM accuracy stays high
    assert not outcome.stopped_early and outcome.epochs_run == 3
    (event,) = guard.events
    assert event["kind"] == "collapse" and event["action"] == "none (guard disabled)"


def test_the_guard_catches_it_and_rolls_back(one_thread, hardened, mnist_train):
    outcome, guard = _continue_training(hardened, mnist_train, guard_on=True)
    (event,) = guard.events
    assert event["action"] == "rollback" and event["pgd"] < event["best_pgd"] - 0.2
    assert outcome.stopped_early and outcome.epochs_run < 3
    assert outcome.final["pgd"] == pytest.approx(guard.best.pgd, abs=0.02)
    assert outcome.curve[-1]["pgd"] == event["pgd"]  # the curve shows the collapse that was undone


# The Python API: reproducible, all or nothing, one-line errors ----------------------------------------


def _harden_small(small_data, out: Path, **overrides):
    train, test = small_data
    options = dict(eps=0.3, out=out, epochs=1, eval_data=str(test), samples=10, budget=50, guard_size=64,
                   arch="examples.mnist_cnn:build", mean=(0.1,), std=(0.9,), device="cpu", seed=3)
    options.update(overrides)
    return auditor.harden(Path("examples/mnist_cnn.safetensors"), str(train), **options)


def test_a_seed_makes_the_record_reproducible(one_thread, small_data, tmp_path):
    first = _harden_small(small_data, tmp_path / "a")
    _harden_small(small_data, tmp_path / "b")
    assert first.model_path.name == "mnist_cnn-hardened.safetensors"
    one, two = (json.loads((tmp_path / side / "hardening.json").read_text()) for side in "ab")
    for record in (one, two):  # the paths differ only by the output folder
        record["output"]["path"] = Path(record["output"]["path"]).name
    assert without_wall_times(one) == without_wall_times(two)
    assert one["data"]["eval_is_training_data"] is False and one["data"]["train"] == 600 - 64
    assert "training-data-audited" not in {check["id"] for check in first.after.results["checks"]}
    assert one["model"]["normalisation"] == {"mean": [0.1], "std": [0.9]}
    assert one["model"]["arch"] == "examples.mnist_cnn:build"
    view = build_view(first.after.results | {"hardening": one})
    settings = {field.label: field.value for field in view.hardening.settings}
    assert settings["Method settings"].endswith("; step alpha × training radius = 1.5 × 0.36 = 0.54")
    assert settings["Training data"].endswith("train.npz: 536 images, 64 held out for the guard")
    reloaded = load_model(first.model_path, arch="examples.mnist_cnn:build", device="cpu")
    assert reloaded.info.format == "safetensors" and one["output"]["sha256"] == reloaded.info.sha256


def test_free_runs_count_passes_and_scans_of_the_training_data_are_flagged(one_thread, small_data, tmp_path,
                                                                           capsys):
    """Free AT with --epochs 2 and 2 replays makes one pass over the data: the record, the summary
    and the report count passes against the passes planned (the report read "1 of 2 epochs").
    Scanning "..././train.npz" is scanning the training data, and the report says so."""
    train, _ = small_data
    out = tmp_path / "out"
    code = run_cli("harden", "examples/mnist_cnn.safetensors", "--arch", "examples.mnist_cnn:build", "--mean",
                   "0.1", "--std", "0.9", "--data", train, "--eval-data", f"{train.parent}/./{train.name}",
                   "--eps", "0.3", "--method", "free", "--replays", "2", "--epochs", "2", "--guard-size", "64",
                   "-n", "10", "--budget", "50", "--device", "cpu", "--out", out)
    assert code == 0
    printed = capsys.readouterr().out
    assert "free adversarial training: 1 of 1 passes over the data in " in printed
    assert "check [warning] training-data-audited: 10 of the 10 audited images are also in" in printed
    results = json.loads((out / "results.json").read_text())
    record = results["hardening"]
    assert (record["epochs_run"], record["epochs_planned"], record["stopped_early"]) == (1, 1, False)
    assert record["data"]["eval_is_training_data"] is True
    (check,) = [check for check in results["checks"] if check["id"] == "training-data-audited"]
    assert check["level"] == "warning"
    assert check["message"].startswith("10 of the 10 audited images are also in the hardening run's training data")
    assert check in json.loads((out / "before" / "results.json").read_text())["checks"]
    html = (out / "report.html").read_text()
    assert "free adversarial training for 1 of 1 passes over the data, each minibatch replayed 2 times at" in html
    assert "(the training data: before/after overstate robustness)" in html
    record.update(epochs_planned=3, stopped_early=True)
    (epochs,) = [field.value for field in build_view(results).hardening.settings if field.label == "Epochs"]
    assert epochs.startswith("1 of 3 passes over the data, each minibatch replayed 2 times (stopped early), ")


def test_audited_training_images_are_found_image_by_image(small_data, tmp_path):
    """An --eval-data that shares some images with --data is another file
    (another hash): the images are compared, and the guard's counted."""
    train, test = small_data
    training = load_data(str(train))
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, x=np.concatenate([np.load(test)["x"][:12], training.x[[3, 5, 7, 9]].numpy()]),
             y=np.concatenate([np.load(test)["y"][:12], training.y[[3, 5, 7, 9]].numpy()]))
    scanned = SimpleNamespace(results={"samples": [{"index": i} for i in range(16)]})
    (check,) = _audited_training_images(scanned, load_data(mixed), training, torch.tensor([5, 9, 100]))
    assert check.id == "training-data-audited"
    assert check.message.startswith("4 of the 16 audited images are also in the hardening run's training data "
                                    "(2 of them in the guard batch that chose the weights)")
    assert _audited_training_images(scanned, load_data(test), training, torch.tensor([5])) == []


def _digit_folder(root: Path, digits: auditor.data.Dataset, classes: list[int], per_class: int) -> Path:
    """``per_class`` images of each digit in ``classes`` as PNGs in ``root/<digit>/``."""
    from PIL import Image

    for digit in classes:
        (root / str(digit)).mkdir(parents=True)
        for index in (digits.y == digit).nonzero().flatten()[:per_class].tolist():
            pixels = (digits.x[index, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels, "L").save(root / str(digit) / f"{index}.png")
    return root


def test_eval_data_with_other_classes_than_the_training_data_is_refused(example_onnx, mnist_test, tmp_path,
                                                                        capsys):
    """Folders of digits 0-9 and of 3 and 7 (labelled 0 and 1) trained and
    evaluated, each image of the one scored against a label of the other."""
    train = _digit_folder(tmp_path / "train", mnist_test, list(range(10)), 2)
    evaluation = _digit_folder(tmp_path / "eval", mnist_test, [3, 7], 2)
    assert run_cli("harden", example_onnx, "--data", train, "--eval-data", evaluation, "--eps", "0.1",
                   "--out", tmp_path / "out") == 2
    assert capsys.readouterr().err == (
        f"error: --eval-data {evaluation} and the training data {train} name their classes differently "
        "(2 and 10 classes; label 0 is '3' and '0'): the labels must mean the same classes in both\n"
    )
    assert not (tmp_path / "out").exists()


def test_the_record_names_the_classes_of_a_training_folder(one_thread, example_onnx, mnist_train, tmp_path,
                                                           capsys):
    train = _digit_folder(tmp_path / "train", mnist_train, list(range(10)), 6)
    result = auditor.harden(example_onnx, str(train), eps=0.1, out=tmp_path / "out", epochs=1, guard_size=20,
                            samples=10, budget=10, device="cpu", progress=True)
    assert result.record["data"]["classes"] == [str(digit) for digit in range(10)]
    shown = capsys.readouterr().err  # progress: the before and after scans' attacks, and the training
    assert shown.count("apgd-ce-linf") == 2 and "harden fast" in shown


def test_a_model_returning_probabilities_trains_on_its_logits(one_thread, small_data, example_onnx, mnist_test,
                                                             tmp_path):
    """It trains exactly as the network without its softmax does. Before,
    cross-entropy on the probabilities (softmax applied twice) left the guard's
    clean accuracy at 59 % after the epoch, against 89 %."""
    train, test = small_data
    options = dict(eps=0.1, epochs=1, eval_data=str(test), samples=10, budget=20, guard_size=64, device="cpu",
                   seed=3)
    source = softmax_onnx(example_onnx, tmp_path / "softmax.onnx", scale=1.0)
    result = auditor.harden(source, str(train), out=tmp_path / "out", **options)
    plain = auditor.harden(example_onnx, str(train), out=tmp_path / "plain", **options)
    assert result.curve == plain.curve
    assert are_probabilities(load_model(result.model_path).forward(mnist_test.x[:8]))  # the softmax stays


def test_a_softmax_that_cannot_be_removed_is_refused_before_training(tiny_cnn, small_data, tmp_path):
    source = tmp_path / "softmax.pt"
    torch.jit.script(torch.nn.Sequential(tiny_cnn, torch.nn.Softmax(dim=1)).eval()).save(str(source))
    train, test = small_data
    with pytest.raises(AuditError, match="returns probabilities, and its final softmax cannot be removed"):
        auditor.harden(source, str(train), eps=0.1, out=tmp_path / "out", epochs=1, device="cpu")
    assert not (tmp_path / "out").exists()


def test_a_failure_leaves_no_output(small_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise AuditError("disk full")

    monkeypatch.setattr(importlib.import_module("auditor.harden.api"), "export", broken)
    with pytest.raises(AuditError, match="disk full"):
        _harden_small(small_data, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--eps", "0"], "--eps must be > 0"),
    (["--eps", "0.3", "--method", "bogus"], "Invalid value for '--method'"),
    (["--eps", "0.3", "--guard-size", "100000"], "leaves no training data"),
    (["--eps", "0.3", "--epochs", "0"], "--epochs must be >= 1"),
    (["--eps", "0.3", "--lr-max", "inf"], "--lr-max must be a finite number > 0, got inf"),
])
def test_bad_flags_exit_2_with_one_line(example_onnx, tmp_path, capsys, args, message):
    assert run_cli("harden", example_onnx, "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unknown_api_options_are_refused(example_onnx, tmp_path):
    with pytest.raises(AuditError, match="unknown hardening option"):
        auditor.harden(example_onnx, eps=0.3, out=tmp_path, learning_rate=1.0)


@pytest.mark.parametrize(("options", "message"), [
    ({"lr_max": "fast"}, "--lr-max must be a number, got 'fast'"),
    ({"batch_size": 12.5}, "--batch-size must be an integer, got 12.5"),
    ({"guard_every": True}, "--guard-every must be an integer, got True"),
    ({"clip_to_box": 1}, "--clip-to-box must be true or false, got 1"),
])
def test_options_of_the_wrong_type_are_refused_before_any_work(example_onnx, tmp_path, options, message):
    with pytest.raises(AuditError, match=f"^{re.escape(message)}$"):
        auditor.harden(example_onnx, eps=0.3, out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_harden_refuses_an_l2_radius_beyond_the_pixel_cube_before_training(example_onnx, tmp_path):
    import auditor

    out = tmp_path / "hardened.onnx"
    with pytest.raises(AuditError, match="exceeds the L2 diameter 28 of \\[0,1\\] images of shape 1x28x28"):
        auditor.harden(example_onnx, "mnist", eps=40.0, norm="l2", out=out)
    assert not out.exists()


def _interrupt_the_before_scan(monkeypatch, interrupt):
    def interrupted(*args, **kwargs):
        interrupt()
        raise AssertionError("the interruption did not stop the scan")

    monkeypatch.setattr(importlib.import_module("auditor.harden.api"), "scan", interrupted)


def test_ctrl_c_is_one_line_exit_2_and_leaves_no_out_folder(example_onnx, tmp_path, capsys, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    _interrupt_the_before_scan(monkeypatch, ctrl_c)
    out = tmp_path / "made" / "out"
    assert run_cli("harden", example_onnx, "--eps", "0.3", "--out", out) == 2
    assert capsys.readouterr().err == "error: interrupted\n"
    assert not out.exists()


def test_sigterm_runs_the_cleanup_like_ctrl_c(example_onnx, tmp_path, capsys, monkeypatch):
    """SIGTERM (timeout, CI cancellation) would skip every finally block and
    leave a staged before/results.json; the CLI turns it into an interruption."""
    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the test's handler")

    _interrupt_the_before_scan(monkeypatch, lambda: signal.raise_signal(signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        out = tmp_path / "out"
        assert run_cli("harden", example_onnx, "--eps", "0.3", "--out", out) == 2
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "error: terminated\n"
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "5"], "--steps applies to --method pgd only, not fast"),
    (["--method", "pgd", "--replays", "2"], "--replays applies to --method free only, not pgd"),
    (["--method", "free", "--zero-init"], "--zero-init applies to --method fast only, not free"),
])
def test_options_of_another_method_are_refused(example_onnx, tmp_path, capsys, args, message):
    assert run_cli("harden", example_onnx, "--eps", "0.3", "--out", tmp_path / "out", *args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_the_config_records_only_the_chosen_methods_own_settings():
    record = HardenConfig(eps=0.3, method="pgd").to_dict()
    assert (record["steps"], record["replays"], record["random_init"]) == (40, None, None)
    record = HardenConfig(eps=0.3, method="fast", random_init=False).to_dict()
    assert (record["steps"], record["replays"], record["random_init"]) == (None, None, False)
    with pytest.raises(AuditError, match="--steps applies to --method pgd only"):
        HardenConfig(eps=0.3, method="free", steps=3)


@pytest.mark.parametrize("overrides, message", [
    ({"eps": "8/255", "epochs": 0}, "--epochs must be >= 1"),
    ({"eps": "abc"}, "--eps: 'abc' is not a number"),
    ({"eps": 0.3, "data": (np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, int))}, "data must be mnist"),
    ({"eps": 0.3, "eval_data": np.zeros((2, 1, 28, 28), np.float32)}, "eval_data must be mnist"),
])
def test_api_takes_eps_as_text_and_refuses_bad_values_with_audit_errors(example_onnx, tmp_path, overrides,
                                                                       message):
    overrides = {"data": "mnist", **overrides}
    with pytest.raises(AuditError, match=message):
        auditor.harden(example_onnx, overrides.pop("data"), out=tmp_path / "out", **overrides)
    assert not (tmp_path / "out").exists()
