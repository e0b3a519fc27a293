"""Fast Gradient Sign Method, L∞, and the fast gradient method, L2.

Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial
Examples", ICLR 2015 [GSS15]. One gradient of the cross-entropy ℓ at the
clean image, one step of the full radius:

* L∞: x_adv = Π(x + ε·sign(∇ₓℓ(x, y))), the FGSM of [GSS15] §4, Eq. (1)
  (η = ε·sign(∇ₓJ(θ, x, y)));
* L2: x_adv = Π(x + ε·∇ₓℓ/‖∇ₓℓ‖₂), the L2 "fast gradient method" that
  normalises the same gradient instead of taking its sign (Kurakin,
  Goodfellow, Bengio, "Adversarial Machine Learning at Scale", ICLR 2017,
  §2.1; the ``FastGradientMethod`` of CleverHans with ``ord=2``);

with Π the projection onto the ε-ball intersected with [0,1] (clipping to
[0,1] can only shrink the step, so the ε-ball is respected).

Queries: one forward+backward pass at ``x`` and one forward pass at
``x_adv`` to read its label, i.e. exactly 2 per sample. A sample whose budget
cannot pay both is left at ``x`` and not queried.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ...oracles import GradientOracle
from ..base import FIXED_EPS, NORMS, Attack, AttackResult, check_call, project


@dataclass(frozen=True)
class FGSM(Attack):
    name = "fgsm"
    oracle = GradientOracle
    kind = FIXED_EPS
    norms = NORMS
    paper = "Goodfellow et al., Explaining and Harnessing Adversarial Examples, ICLR 2015"
    in_default_battery = False

    norm: str = "linf"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"FGSM norm must be one of {NORMS}")

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return grad.sign()
        size = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        return grad / size

    def __call__(self, oracle: GradientOracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        x_adv = x.clone()
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        rows = (oracle.remaining() >= 2).nonzero().flatten()
        if len(rows):
            x0, y0 = x[rows.to(x.device)], y[rows.to(y.device)]
            _, grad = oracle.loss_grad(
                x0, lambda logits: F.cross_entropy(logits, y0, reduction="none"), idx=rows
            )
            stepped = project(x0 + eps * self._direction(grad), x0, eps, self.norm)
            fooled = oracle.logits(stepped, idx=rows).argmax(1) != y0
            x_adv[rows.to(x.device)] = stepped
            success[rows.to(x.device)] = fooled
        return AttackResult(x_adv=x_adv, success=success, queries=oracle.queries())
