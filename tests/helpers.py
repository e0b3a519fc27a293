"""Helpers shared by the black-box attack tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import torch

from auditor.oracles import LabelOracle, ScoreOracle


class Counting:
    """A model function that counts its calls and rows."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.rows = 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += len(z)
        return self.fn(z)


def score_oracle(model, n, budget, counter: Counting | None = None):
    """A ScoreOracle on the model's softmax, counted by `counter` (a fresh one by default)."""
    probabilities = counter or Counting(lambda z: model(z).softmax(1))
    return ScoreOracle(probabilities, n, budget)


def label_oracle(model64, n, budget, counter: Counting | None = None):
    """A LabelOracle on a float64 model (inputs cast to double), counted by `counter`."""
    return LabelOracle(counter or Counting(lambda z: model64(z.double()).argmax(1)), n, budget)


def predict(model, x: torch.Tensor) -> torch.Tensor:
    """The model's labels for x, cast to the model's parameter dtype (float32 or float64)."""
    with torch.no_grad():
        return model(x.to(next(model.parameters()).dtype)).argmax(1)
