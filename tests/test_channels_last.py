"""ONNX graphs that take (N,H,W,C) input (Keras models exported by tf2onnx)."""

from __future__ import annotations

import pytest
import torch
from helpers import digit_files, nhwc_onnx

import auditor
from auditor.models import load_model


@pytest.fixture(scope="module")
def nhwc(example_onnx, tmp_path_factory):
    return nhwc_onnx(example_onnx, tmp_path_factory.mktemp("nhwc") / "nhwc.onnx")


def test_a_channels_last_graph_takes_nchw_images(nhwc, example_onnx, mnist_test):
    x = mnist_test.x[:8]
    model, reference = load_model(nhwc), load_model(example_onnx)
    assert model.info.channels_last and model.info.input_shape == (1, 28, 28)
    torch.testing.assert_close(model.forward(x), reference.forward(x))
    torch.testing.assert_close(model.torch_module()(x), reference.torch_module()(x))


def test_a_scan_of_a_channels_last_graph_is_the_scan_of_the_same_network(nhwc, example_onnx):
    settings = dict(samples=10, eps=[0.1], attacks=["apgd-ce", "square"], budget=100)
    last, first = auditor.scan(nhwc, **settings).results, auditor.scan(example_onnx, **settings).results
    assert last["model"]["input_layout"] == "NHWC" and "input_layout" not in first["model"]
    assert last["access"]["level"] == "white-box"
    assert last["samples"] == first["samples"]


def test_harden_writes_a_channels_last_graph_back(one_thread, nhwc, mnist_train, mnist_test, tmp_path):
    train, test = digit_files(tmp_path, mnist_train, mnist_test, 300, 20)
    result = auditor.harden(nhwc, str(train), eps=0.1, out=tmp_path / "out", epochs=1, eval_data=str(test),
                            samples=10, budget=20, guard_size=64, device="cpu")
    written = load_model(result.model_path)
    assert written.info.channels_last and result.record["output"]["check"]["max_abs_diff"] < 1e-4
