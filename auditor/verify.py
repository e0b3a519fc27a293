"""Verification of adversarial examples on the real runtime.

The harness never trusts an attack's ``success`` mask. Every candidate is
clipped to [0,1], sent through the model adapter's ``forward`` (for an ONNX
file that is the onnxruntime session, not a converted torch copy) and counts
only if it is finite and misclassified (in a targeted audit: classified as
its target). An output row with a NaN score names no class (``argmax`` would
return the NaN's index): it is misclassified, and never on target. Its distortion is measured in the
threat norm, whatever norm the attack itself optimised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attacks.base import distortion
from .models.base import Model

EPS_ATOL = 1e-6
EPS_RTOL = 1e-5
"""Slack allowed at the ε boundary for float32 round-off: ``1e-6 + 1e-5·ε``.
A float32 projection onto an L2 sphere lands up to about 1e-6·ε outside it
on large inputs (its norm is summed in float32 over C·H·W entries: 4e-6 at
ε = 3 on 3 × 224 × 224), so an absolute slack alone would reject in-ball
examples there."""


def eps_bound(eps: float) -> float:
    """The largest distortion that counts as within ε."""
    return eps + EPS_ATOL + EPS_RTOL * eps


@dataclass(frozen=True)
class Verified:
    x_adv: torch.Tensor
    """The clipped candidates (CPU)."""
    fooled: torch.Tensor
    """(N,) bool: finite and misclassified (or on target) on the real runtime."""
    distortion: torch.Tensor
    """(N,) float64 distortion in the threat norm."""


def labels_of(scores: torch.Tensor) -> torch.Tensor:
    """Top-1 labels of a batch of scores; -1 for a row with a NaN, which
    names no class (``argmax`` would return the NaN's index): it is never the
    label, so it counts as misclassified, and never a target."""
    return torch.where(torch.isnan(scores).any(dim=1), -1, scores.argmax(dim=1))


def verify(
    model: Model,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    target: torch.Tensor | None = None,
) -> Verified:
    """Re-check candidate adversarial examples ``x_adv`` for clean images ``x``."""
    x, y = x.detach().cpu(), y.detach().cpu()
    x_adv = x_adv.detach().cpu().float()
    finite = torch.isfinite(x_adv.flatten(1)).all(dim=1)
    x_adv = torch.where(finite.view(-1, 1, 1, 1), x_adv, x).clamp(0.0, 1.0)
    predicted = labels_of(model.forward(x_adv.to(model.device))).cpu()
    fooled = finite & (predicted != y if target is None else predicted == target.cpu())
    size = distortion((x_adv - x).double(), norm)
    return Verified(x_adv=x_adv, fooled=fooled, distortion=size)
