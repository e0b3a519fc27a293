"""DI: random resizing and padding of the input at each iteration.

Xie, Zhang, Zhou, Bai, Wang, Ren and Yuille, "Improving Transferability of
Adversarial Examples with Input Diversity", CVPR 2019, §3: with
probability p the image (side H) is resized to a random side
rnd ∈ [H, H·r) and zero-padded at a random offset to the side H·r; the
gradient is taken through this transform T(x; p). The paper's sizes are 299 → rnd ∈ [299, 330) → 330, so
r = 330/299 ≈ 1.10 and p = 0.5 (§4); for networks of a fixed input size
the padded image is resized back to H, as implementations for non-Inception
networks do. On 28×28 inputs r keeps its meaning (rnd ∈ [28, 30.9)).

Both resizes and the padding are one affine map of the image plane, so each
image is resampled once (bilinear, zeros outside) with its own random
scale, offset and coin, all images at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .transform import Transform


@dataclass(frozen=True)
class DiverseInputs(Transform):
    tag = "di"
    stage = 2
    paper = "Xie et al., Improving Transferability of Adversarial Examples with Input Diversity, CVPR 2019"

    p: float = 0.5
    """Probability that an image is transformed."""
    resize: float = 330 / 299
    """r: the padded side over the image side."""

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError("diverse inputs p must be in [0, 1]")
        if not self.resize > 1.0:
            raise ValueError("diverse inputs resize must be > 1")

    def expand(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """T(x; p): per image, with probability p, resize to rnd ∈ [H, H·r), pad to H·r, resize to H.

        In normalised coordinates an output point u of the padded canvas
        (side S = H·r) lies at u·S/rnd + (S − 2·offset)/rnd − 1 in the image,
        with the offset uniform in [0, S − rnd] on each axis.
        """
        m = len(x)
        side = 1.0 / self.resize + torch.rand(m, generator=gen, device=x.device) * (1.0 - 1.0 / self.resize)
        shrink = 1.0 / side  # S/rnd, with rnd/S uniform in [1/r, 1)
        offsets = torch.rand(m, 2, generator=gen, device=x.device) * (1.0 - side).unsqueeze(1)  # offset/S
        theta = torch.zeros(m, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = shrink
        theta[:, :, 2] = shrink.unsqueeze(1) * (1.0 - 2.0 * offsets) - 1.0
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        resized = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        coin = torch.rand(m, generator=gen, device=x.device) < self.p
        return torch.where(coin.view(-1, 1, 1, 1), resized, x)
