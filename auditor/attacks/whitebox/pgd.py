"""Projected Gradient Descent, L∞ and L2, with random start and restarts.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models
Resistant to Adversarial Attacks", ICLR 2018 [MMS18]; the iteration is the
one of Kurakin et al. 2017 [KGB17]:

* random start: x⁰ uniform in the ε-ball (L∞), or a uniformly random
  direction at a uniform radius in the ball (L2) ([MMS18] §3);
* step: x^{t+1} = Π_{x+S}(x^t + α·sign(∇ℓ)) for L∞, and
  Π_{x+S}(x^t + α·∇ℓ/‖∇ℓ‖₂) for L2, with ℓ the cross-entropy ([MMS18] Eq. 2)
  or (``loss="margin"``) the logit margin max_{i≠y} Z_i − Z_y, the loss of
  Carlini and Wagner that [MMS18] also attack with, which a saturated
  softmax does not flatten;
* the projection Π is onto the ε-ball intersected with [0,1];
* step size α = ``rel_step``·ε (2.5·ε/steps by default, the heuristic of
  Madry et al.'s robustness library, so that the walk can cross the ball);
* step-size schedule (``schedule``): ``"constant"`` uses α at every step,
  as [MMS18] do; ``"cosine"`` uses α_t = α·(1 + cos(π t/T))/2 at step
  t = 0, …, T−1 (T = ``steps``), the cosine annealing of Loshchilov and
  Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
  Eq. (5) with η_min = 0, a common decay for attack step sizes too: large
  steps first to explore, small ones last to settle near the boundary. It
  is not part of [MMS18], and it halves the total path length Σα_t;
* restarts keep, per sample, the first iterate that is misclassified. Every
  restart draws its random start from the same generator, first restart
  first, for the samples still unbroken; so the first restart of a run with
  ``restarts=R`` is exactly the run with ``restarts=1`` (same seed), and
  more restarts can only add successes.

A sample leaves the active batch as soon as it is misclassified, so each
sample costs at most ``restarts × (steps + 1)`` forward+backward passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ...oracles import GradientOracle
from ..base import (
    FIXED_EPS, NORMS, Attack, AttackResult, check_call, generator, logit_margin, project, uniform_in_ball,
)

SCHEDULES = ("constant", "cosine")


def _cross_entropy(y: torch.Tensor):
    return lambda logits: F.cross_entropy(logits, y, reduction="none")


def _margin(y: torch.Tensor):
    return lambda logits: -logit_margin(logits, y)


LOSSES = {"ce": _cross_entropy, "margin": _margin}
"""``loss`` -> the per-sample loss ℓ that PGD ascends, given the labels."""


@dataclass(frozen=True)
class PGD(Attack):
    name = "pgd"
    oracle = GradientOracle
    kind = FIXED_EPS
    norms = NORMS
    paper = "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018"
    in_default_battery = False

    norm: str = "linf"
    steps: int = 40
    restarts: int = 1
    rel_step: float | None = None
    """Step size as a fraction of ε; ``None`` means 2.5 / steps."""
    random_start: bool = True
    schedule: str = "constant"
    """Step-size schedule: ``"constant"`` or ``"cosine"``."""
    loss: str = "ce"
    """``"ce"`` (cross-entropy) or ``"margin"`` (logit margin)."""

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"PGD norm must be one of {NORMS}")
        if self.steps < 1 or self.restarts < 1:
            raise ValueError("PGD needs steps >= 1 and restarts >= 1")
        if self.rel_step is not None and not self.rel_step > 0:
            raise ValueError("PGD rel_step must be > 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PGD schedule must be one of {SCHEDULES}")
        if self.loss not in LOSSES:
            raise ValueError(f"PGD loss must be one of {tuple(LOSSES)}")

    def _alpha(self, alpha: float, step: int) -> float:
        if self.schedule == "cosine":
            return alpha * (1 + math.cos(math.pi * step / self.steps)) / 2
        return alpha

    def _start(self, x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        return project(x + uniform_in_ball(x.shape, eps, self.norm, gen, x.device), x, eps, self.norm)

    def _step(self, x_adv, grad, alpha: float, x0, eps: float, box) -> torch.Tensor:
        """One ascent step and the projection Π onto the ε-ball ∩ [0,1].

        For L∞ the projection is a clamp to the per-pixel ``box`` (lower,
        upper) computed once per active set, which is the same set as
        ``project`` but costs one operation instead of four.
        """
        if self.norm == "linf":
            return torch.clamp(x_adv + alpha * grad.sign(), *box)
        size = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return project(x_adv + alpha * grad / size, x0, eps, self.norm)

    def __call__(self, oracle: GradientOracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        gen = generator(seed, x.device)
        loss = LOSSES[self.loss]
        alpha = eps * (self.rel_step if self.rel_step is not None else 2.5 / self.steps)
        x_best = x.clone()
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            can_pay = oracle.remaining().to(x.device) >= self.steps + 1
            active = (~success & can_pay).nonzero().flatten()
            if len(active) == 0:
                break
            x0, y0 = x[active], y[active]
            box = ((x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1))
            x_adv = self._start(x0, eps, gen)
            for step in range(self.steps + 1):
                if step == self.steps:
                    logits = oracle.logits(x_adv, idx=active.cpu())
                else:
                    logits, grad = oracle.loss_grad(x_adv, loss(y0), idx=active.cpu())
                fooled = logits.argmax(1) != y0
                if fooled.any():
                    x_best[active[fooled]] = x_adv[fooled]
                    success[active[fooled]] = True
                    keep = ~fooled
                    if not keep.any():
                        break
                    active, x0, y0, x_adv = active[keep], x0[keep], y0[keep], x_adv[keep]
                    box = (box[0][keep], box[1][keep])
                    if step < self.steps:
                        grad = grad[keep]
                if step < self.steps:
                    x_adv = self._step(x_adv, grad, self._alpha(alpha, step), x0, eps, box)
        return AttackResult(x_adv=x_best, success=success, queries=oracle.queries())
