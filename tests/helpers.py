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
