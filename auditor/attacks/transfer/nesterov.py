"""NI: Nesterov's look-ahead on top of the momentum.

Lin, Song, He, Wang and Hopcroft, "Nesterov Accelerated Gradient and Scale
Invariance for Adversarial Attacks", ICLR 2020, §3.2 and Algorithm 1
(NI-FGSM): the gradient is taken at the point the accumulated momentum is
about to reach,

    x^nes_t = x_t + α·μ·g_t,

and accumulated as in MI, g_{t+1} = μ·g_t + ∇J(x^nes_t)/‖∇J(x^nes_t)‖₁,
μ = 1. The look-ahead point is not clipped, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mi_fgsm import MomentumIterative
from .transform import Step


@dataclass(frozen=True)
class Nesterov(MomentumIterative):
    tag = "ni"
    paper = (
        "Lin et al., Nesterov Accelerated Gradient and Scale Invariance for Adversarial Attacks, ICLR 2020"
    )

    def lookahead(self, x: torch.Tensor, state: torch.Tensor, step: Step) -> torch.Tensor:
        """x^nes_t = x_t + α·μ·g_t (Algorithm 1, look-ahead)."""
        return x + step.alpha * self.mu * state
