"""VT: the gradient corrected by its variance over a neighbourhood of the previous iterate.

Wang and He, "Enhancing the Transferability of Adversarial Attacks through
Variance Tuning", CVPR 2021, Definition 1 and Algorithm 1 (VMI-FGSM):

* the gradient variance at x is V(x) = (1/N)·Σ_{i=1}^{N} ∇J(x + r_i) − ∇J(x),
  with r_i uniform in [−β·ε, β·ε]^d;
* at step t the gradient used is ∇J(x_t) + v_t, where v_t = V(x_{t−1}) is
  the variance of the previous iterate (v_0 = 0); the momentum, when
  present, accumulates this sum (VMI-FGSM; with NI, VNI-FGSM);
* defaults N = 20, β = 1.5 (§4).

The neighbours' gradients go through the same input transforms as the
gradient itself, as in the authors' combined attack (VMI-CT), and the
variance is stored before TI smooths the sum. For an L2 attack the r_i are
uniform in the L2 ball of radius β·ε.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import uniform_in_ball
from .transform import Step, Transform


@dataclass(frozen=True)
class VarianceTuning(Transform):
    tag = "vt"
    stage = 3
    paper = (
        "Wang and He, Enhancing the Transferability of Adversarial Attacks through Variance Tuning, CVPR 2021"
    )

    samples: int = 20
    """N, the neighbours sampled per iteration."""
    beta: float = 1.5
    """β, the neighbourhood's radius in units of ε."""

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError("variance tuning needs samples >= 1")
        if not self.beta > 0:
            raise ValueError("variance tuning beta must be > 0")

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """v_0 = 0."""
        return torch.zeros_like(x)

    def gradient(
        self, grad: torch.Tensor, state: torch.Tensor, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ∇J(x_t) + v_t and v_{t+1} = V(x_t) (Algorithm 1, variance tuning and update)."""
        radius = self.beta * step.eps
        neighbours = sum(
            step.grad_at(step.x + uniform_in_ball(step.x.shape, radius, step.norm, step.gen, step.x.device))
            for _ in range(self.samples)
        )
        return grad + state, neighbours / self.samples - grad
