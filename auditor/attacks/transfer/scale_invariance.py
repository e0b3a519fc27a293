"""SI: the gradient averaged over scaled copies of the image.

Lin, Song, He, Wang and Hopcroft, "Nesterov Accelerated Gradient and Scale
Invariance for Adversarial Attacks", ICLR 2020, §3.3: a network gives
nearly the same loss on x and on S_i(x) = x/2^i (scale invariance), so the
gradient is averaged over these m copies,

    ḡ = (1/m)·Σ_{i=0}^{m−1} ∇_x J(S_i(x)),   m = 5 (§4),

a model augmentation without training new models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transform import Transform


@dataclass(frozen=True)
class ScaleInvariance(Transform):
    tag = "si"
    stage = 1
    paper = (
        "Lin et al., Nesterov Accelerated Gradient and Scale Invariance for Adversarial Attacks, ICLR 2020"
    )

    copies: int = 5
    """m, the number of scale copies x/2^i, i = 0, …, m−1."""

    def __post_init__(self):
        if self.copies < 1:
            raise ValueError("scale invariance needs copies >= 1")

    def expand(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The copies S_i(x) = x/2^i, i = 0, …, m−1."""
        return torch.cat([x / 2**i for i in range(self.copies)])
