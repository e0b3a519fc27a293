"""NI: Nesterov's look-ahead on top of the momentum.

Lin, Song, He, Wang and Hopcroft, "Nesterov Accelerated Gradient and Scale
Invariance for Adversarial Attacks", ICLR 2020, §3.2 and Algorithm 1
(NI-FGSM): the gradient is taken at the point the accumulated momentum is
about to reach,

    x^nes_t = x_t + α·μ·g_t,

and accumulated as in MI, g_{t+1} = μ·g_t + ∇J(x^nes_t)/‖∇J(x^nes_t)‖₁,
μ = 1. The look-ahead point is not clipped, as in the paper.

The paper is L∞, where g has the per-pixel scale of a sign vector (MI
normalises each gradient by its mean absolute value), so α·g looks as
many steps ahead as g has accumulated. The L2 core steps α·g/‖g‖₂ instead,
and a sign vector has L2 norm √d; the L2 look-ahead is α·μ·g/√d, which
keeps that meaning (α·μ·g would land √d times as far: 28 steps ahead per
accumulated gradient on MNIST, with pixels far outside [0,1]).
"""

from __future__ import annotations

import math
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
        """x^nes_t = x_t + α·μ·g_t (Algorithm 1, look-ahead); in L2, α·μ·g_t/√d."""
        scale = step.alpha * self.mu
        if step.norm == "l2":
            scale /= math.sqrt(x[0].numel())
        return x + scale * state
