"""What the black-box benchmarks share: the example images, and the model's own time.

The scripts run as ``python bench/NAME.py``, which puts this folder on the path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from auditor.data.builtin import mnist
from auditor.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def example_images(samples: int):
    """The example ONNX model, and the images it classifies correctly among a
    class-balanced subset of ``samples`` MNIST test digits, with their labels."""
    model = load_model(ROOT / "examples" / "mnist_cnn.onnx")
    data = mnist("test")
    index = data.balanced_indices(samples)
    x, y = data.x[index], data.y[index]
    correct = model.forward(x).argmax(1) == y
    return model, x[correct], y[correct]


class Recorded:
    """``output(model logits)`` for the oracle, recording each call's batch size."""

    def __init__(self, model, output: Callable[[torch.Tensor], torch.Tensor]):
        self.model = model
        self.output = output
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return self.output(self.model.forward(x))

    def replay_seconds(self, shape) -> float:
        """Time of the model alone on calls of the same batch sizes (random images)."""
        generator = torch.Generator().manual_seed(0)
        inputs = {size: torch.rand((size, *shape), generator=generator) for size in set(self.batches)}
        start = time.perf_counter()
        for size in self.batches:
            self.output(self.model.forward(inputs[size]))
        return time.perf_counter() - start
