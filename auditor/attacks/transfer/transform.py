"""The transform contract: how each transfer method hooks into the one iterative core.

Each transfer method of the literature changes one thing in I-FGSM
(:mod:`.ifgsm`), and the methods compose because they change different
things (Wang & He, CVPR 2021, §3.3; Wang et al., ICCV 2021, §3.3):

* **where** the gradient is taken: a look-ahead point instead of the iterate
  x_t (NI's Nesterov point, RAP's reverse perturbation), hook
  :meth:`Transform.lookahead`;
* **over which images** it is averaged: an input transform maps the batch
  to a batch of transformed copies, and the gradient with respect to x_t is
  the mean over the copies, taken through the transform by the chain rule
  (DI, SI, Admix), hook :meth:`Transform.expand`;
* **how** the gradient becomes the step direction: a gradient transform
  g → g' (VT's variance, TI's smoothing, MI's momentum), hook
  :meth:`Transform.gradient`.

A transform is a frozen dataclass (its ``repr`` is its parameters) that
overrides the hooks it needs; the others are the identity. What a method
carries from one iteration to the next (momentum, variance) is an explicit
state that the core keeps per call and passes in and out, so a transform is
never mutated. The core runs every hook in ``stage`` order, which is the
pipeline order of the papers' combined attacks: Admix mixes first, SI
scales the mixed images, DI resizes the scaled copies (Wang et al. 2021,
Eq. 8 with DI); then the variance is added to the raw gradient, the sum is
smoothed by TI and accumulated into the momentum (Wang & He 2021, Alg. 1
with TI); RAP's reverse perturbation, found around the iterate x_t, is
added to NI's look-ahead point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

GradAt = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Step:
    """What one iteration of the core tells the hooks."""

    index: int
    """t = 0, …, T−1."""
    x: torch.Tensor
    """The iterate x_t (before any look-ahead)."""
    eps: float
    alpha: float
    """The core's step size α."""
    norm: str
    gen: torch.Generator
    grad_at: GradAt
    """Gradient of the attack objective at a point (N,C,H,W), averaged over
    the input transforms' copies, on the surrogate ensemble."""


@dataclass(frozen=True)
class Transform:
    """Base class of the transforms; each hook defaults to the identity."""

    tag: ClassVar[str]
    """Short name used in attack labels (``mi``, ``di``, …)."""
    stage: ClassVar[int]
    """Position in the pipeline; two transforms of one attack never share a stage."""
    paper: ClassVar[str]

    def check(self, steps: int) -> None:
        """Refuse a core of ``steps`` iterations this transform cannot work with."""

    def start(self, x: torch.Tensor) -> torch.Tensor | None:
        """The state before the first iteration."""
        return None

    def lookahead(self, x: torch.Tensor, state: torch.Tensor | None, step: Step) -> torch.Tensor:
        """The point at which the gradient is taken, given the point so far."""
        return x

    def expand(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Copies of the batch ``x`` (M rows, true labels ``y``), stacked copy after copy
        (row r of the result is a copy of row r mod M); the gradient is averaged over them."""
        return x

    def gradient(
        self, grad: torch.Tensor, state: torch.Tensor | None, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The transformed gradient and the new state."""
        return grad, state
