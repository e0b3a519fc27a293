"""Files shipped inside the wheel: report templates, policies, the docs the
report quotes and the example model of ``auditor demo``."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def templates_dir() -> Path:
    return Path(str(importlib.resources.files("auditor.templates")))


def policies_dir() -> Path:
    return Path(str(importlib.resources.files("auditor.policies")))


def docs_dir() -> Path:
    """``docs/``: the report quotes the explanation of each check from ``checks.md``."""
    return Path(str(importlib.resources.files("auditor.docs")))


def example_model() -> Path:
    """``examples/mnist_cnn.onnx`` (``python -m examples.train_mnist`` writes it), shipped as
    ``auditor/examples/mnist_cnn.onnx`` so that ``auditor demo`` runs from any directory."""
    return Path(str(importlib.resources.files("auditor.examples") / "mnist_cnn.onnx"))
