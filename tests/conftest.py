"""Shared fixtures: the built-in data and tiny models, trained once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import fit
from torch import nn

from auditor.data.builtin import mnist

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_ONNX = ROOT / "examples" / "mnist_cnn.onnx"


def pytest_configure(config):
    """A worker of a parallel run (pytest-xdist, as ``make test`` runs) keeps
    torch to one thread: the workers already use the cores, and more threads
    than cores make the small tensor ops of the attack tests many times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def tiny_cnn_arch() -> nn.Module:
    """A small CNN for MNIST (1x28x28 -> 10)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


@pytest.fixture(scope="session")
def mnist_train():
    return mnist("train")


@pytest.fixture(scope="session")
def mnist_test():
    return mnist("test")


@pytest.fixture(scope="session")
def tiny_cnn(mnist_train) -> nn.Module:
    """A tiny CNN trained for two epochs (about 90 % test accuracy, not robust)."""
    torch.manual_seed(0)
    return fit(tiny_cnn_arch(), mnist_train.x, mnist_train.y, epochs=2)


@pytest.fixture(scope="session")
def correct_batch(tiny_cnn, mnist_test):
    """The first 32 test digits the tiny CNN classifies correctly (x, y)."""
    with torch.no_grad():
        correct = tiny_cnn(mnist_test.x).argmax(1) == mnist_test.y
    return mnist_test.x[correct][:32], mnist_test.y[correct][:32]


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small tensor ops on one thread, restoring the count afterwards.

    The ops in the black-box tests are tiny (a few hundred images a call), where
    intra-op threads on a busy machine cost far more than they bring (about 20x
    slower measured with 2 threads on 2 shared cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def example_onnx() -> Path:
    """The committed example model (examples/train_mnist.py writes it)."""
    assert EXAMPLE_ONNX.exists(), "run examples/train_mnist.py to create the example model"
    return EXAMPLE_ONNX
