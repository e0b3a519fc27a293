"""The model adapter contract.

An adapter exposes one thing to the rest of the auditor: a batched function
from [0,1] images (N,C,H,W float32) to logits (N,K float32), with the
normalisation (``--mean/--std``) folded in. That function runs on the *real*
runtime (the onnxruntime session for ONNX files), and it is what verification
uses. White-box attacks additionally need a differentiable torch module with
the same logits; an adapter that cannot provide one says why.
"""

from __future__ import annotations

import abc
import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..access import Access
from ..errors import AuditError, short_reason

MIN_CLASSES = 2


@dataclass(frozen=True)
class ModelInfo:
    path: str
    format: str
    """One of ``onnx``, ``torchscript``, ``torch-export``, ``state-dict``,
    ``safetensors``, ``pickle``."""
    sha256: str
    input_shape: tuple[int | None, int | None, int | None] | None
    """(C,H,W) as the artifact declares it (``None`` for a symbolic dimension);
    ``None`` when only the data can tell."""
    num_classes: int | None
    """K when the artifact declares it; ``None`` when only a forward pass can tell."""
    channels_last: bool = False
    """The artifact takes (N,H,W,C) input (a Keras model exported with
    tf2onnx, say); the adapter still takes (N,C,H,W) images and transposes
    them, and ``input_shape`` is (C,H,W)."""
    output: str | None = None
    """The name of the graph output audited, when the artifact has several (an
    ONNX classifier exported by sklearn-onnx or tf2onnx puts a label output
    before its scores): recorded so a reader knows which one the figures are
    of. ``None`` for an artifact with one output."""


def plural(count: int, noun: str) -> str:
    """``"1 class"``, ``"3 classes"``: ``count`` and ``noun``, plural unless ``count`` is 1."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("s", "x", "sh", "ch")) else f"{count} {noun}s"


def last_line(exc: BaseException) -> str:
    """The cause of an error in one short line: the last line of a long
    message (a TorchScript traceback ends with the error it wraps)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return short_reason(exc) if len(lines) <= 1 else short_reason(Exception(lines[-1]))


class ModelFailed(AuditError):
    """A model that raised an error on a batch of images; ``reason`` is the
    cause in one line."""

    def __init__(self, path: str, rows: int, exc: BaseException):
        self.reason = last_line(exc)
        super().__init__(f"model {path} failed on a batch of {rows}: {self.reason}")


class GradientFailed(ModelFailed):
    """A model whose forward or backward pass raised while giving input
    gradients (an in-place operation on a tensor its backward needs, an
    operation without a derivative): it runs, but cannot be attacked or
    trained with gradients."""

    def __init__(self, path: str, rows: int, exc: BaseException):
        super().__init__(path, rows, exc)
        self.args = (
            f"model {path} failed computing input gradients on a batch of {rows}: {self.reason} "
            "(white-box attacks and hardening need them; --access soft-label audits it without)",
        )


def require_classes(num_classes: int | None, path: str) -> None:
    """Refuse a model with fewer than two outputs per image: it is not a
    classifier, and its "predictions" can never be wrong. ``None`` (not known
    yet) passes."""
    if num_classes is not None and num_classes < MIN_CLASSES:
        raise AuditError(
            f"model {path} has {plural(num_classes, 'output')}; "
            f"a classifier needs at least {MIN_CLASSES} classes"
        )


class Model(abc.ABC):
    """A loaded classifier. Subclasses live in ``auditor.models``."""

    info: ModelInfo

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where input tensors should live for the fastest forward pass."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits on the real runtime, without gradients.

        ``x`` is (N,C,H,W) float in [0,1] on any device; the result is (N,K)
        float32 on the same device as ``x``. Large batches are chunked.
        """

    @abc.abstractmethod
    def torch_module(self) -> nn.Module | None:
        """A differentiable module (normalisation included) with the same
        logits, in eval mode on ``self.device``, or ``None``."""

    @property
    @abc.abstractmethod
    def access_ceiling(self) -> tuple[Access, str]:
        """The highest access this artifact allows, and why (one sentence)."""


class ChannelsLast(nn.Module):
    """Runs ``module``, which takes (N,H,W,C) input, on (N,C,H,W) images."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.permute(0, 2, 3, 1))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, folded in front of a model."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


RANDOMNESS_PASSES = 16
"""Passes over the same images that must all agree for a model to count as
deterministic: one that picks one of two networks at each call agrees with
itself on two passes half the time, on sixteen once in 32,768."""


@contextlib.contextmanager
def seeded_rng(seed: int, purpose: str) -> Iterator[None]:
    """Run with torch's global generators (CPU and CUDA) seeded from ``seed``
    and ``purpose``, their states restored after.

    The attacks and the surrogate zoo draw from generators of their own, but
    a model or surrogate file may draw from the global ones (dropout left on
    in a module exported in train mode): seeded, it draws the same numbers in
    every run with the same seed.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32(f"{seed}:{purpose}".encode()))  # seeds every CUDA device too
        yield
