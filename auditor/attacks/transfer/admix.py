"""Admix: the gradient averaged over copies with a little of other classes' images mixed in.

Wang, He, Wang and He, "Admix: Enhancing the Transferability of Adversarial
Attacks", ICCV 2021, §3.2: each copy keeps the image's label and adds a
small share of an image x' of another class,

    x̃ = x + η·x',   η = 0.2, m₂ = 3 copies (§4),

and the gradient is the mean over the copies, taken with respect to x only
(x' is a constant). The paper's Admix also scales each admixed copy by
γ_i = 1/2^i, i < m₁ = 5, which is SI (:mod:`.scale_invariance`) applied
after this transform: the paper's attack is Admix with SI, and this one is
the mixing alone, so each can be measured on its own.

The x' are drawn, as in the authors' implementation, from the batch under
attack: for each copy of each image, uniformly among the images of the
batch whose true label differs (among all images of the batch when every
image has the same label).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transform import Transform


def other_class_rows(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each row, a uniformly random row whose label differs (any row where none does).

    Rows are sorted by label; row i draws u uniform among the n − n_{y_i}
    rows outside its own label's block and skips over that block.
    """
    n = len(y)
    order = torch.sort(y, stable=True).indices
    classes, counts = torch.unique(y, return_counts=True)
    class_of = torch.searchsorted(classes, y)
    block_size = counts[class_of]
    block_start = (torch.cumsum(counts, 0) - counts)[class_of]
    others = n - block_size
    uniform = torch.rand(n, generator=gen, device=y.device)
    has_other = others > 0
    pick = torch.where(has_other, (uniform * others).long(), (uniform * n).long())
    pick = torch.where(has_other & (pick >= block_start), pick + block_size, pick)
    return order[pick.clamp(max=n - 1)]


@dataclass(frozen=True)
class Admix(Transform):
    tag = "admix"
    stage = 0
    paper = "Wang et al., Admix: Enhancing the Transferability of Adversarial Attacks, ICCV 2021"

    copies: int = 3
    """m₂, the admixed copies per image."""
    eta: float = 0.2
    """η, the share of the other image."""

    def __post_init__(self):
        if self.copies < 1:
            raise ValueError("admix needs copies >= 1")
        if not self.eta >= 0:
            raise ValueError("admix eta must be >= 0")

    def expand(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The copies x + η·x', x' of another class (§3.2, the admixed image)."""
        pool = x.detach()
        return torch.cat([x + self.eta * pool[other_class_rows(y, gen)] for _ in range(self.copies)])
