"""MI: momentum over the iterations.

Dong, Liao, Pang, Su, Zhu, Hu and Li, "Boosting Adversarial Attacks with
Momentum", CVPR 2018, Algorithm 1 (MI-FGSM): the direction is the
accumulated gradient

    g_{t+1} = μ·g_t + ∇J(x_t) / ‖∇J(x_t)‖₁,   g_0 = 0, μ = 1 (§4),

and the core steps along sign(g_{t+1}). Each gradient is normalised per
sample by its mean absolute value, ‖∇J‖₁/d, as the authors' code does: the
constant d changes no sign, so MI is exactly the paper's, and it gives the
accumulated g the scale of a sign vector, which Nesterov's look-ahead
(:mod:`.nesterov`) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transform import Step, Transform


def l1_normalised(grad: torch.Tensor) -> torch.Tensor:
    """∇ / (‖∇‖₁/d) per sample (a zero gradient stays zero)."""
    return grad / grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class MomentumIterative(Transform):
    tag = "mi"
    stage = 5
    paper = "Dong et al., Boosting Adversarial Attacks with Momentum, CVPR 2018"

    mu: float = 1.0
    """The decay factor μ."""

    def __post_init__(self):
        if self.mu < 0:
            raise ValueError("momentum mu must be >= 0")

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """g_0 = 0."""
        return torch.zeros_like(x)

    def gradient(
        self, grad: torch.Tensor, state: torch.Tensor, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """g_{t+1} = μ·g_t + ∇/‖∇‖₁ (Algorithm 1, momentum update)."""
        accumulated = self.mu * state + l1_normalised(grad)
        return accumulated, accumulated
