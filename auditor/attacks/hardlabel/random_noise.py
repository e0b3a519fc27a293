"""Random noise inside the ε-ball: the sanity baseline every battery must beat.

Carlini, Athalye, Papernot, Brendel, Rauber, Tsipras, Goodfellow, Madry and
Kurakin, "On Evaluating Adversarial Robustness", 2019, §5.2 ("verify that
random noise is less effective than the attacks"). Each draw is one query
per still-robust sample: uniform noise in the L∞ cube, or a uniformly random
direction at a uniformly random radius in the L2 ball, clipped to [0,1]. A
sample stops at its first misclassified draw or when its budget runs out.
Each sample draws from its own stream (:class:`~.shared.SampleRandom`), so
its noise, and whether it is broken, does not depend on the batch.

The battery runs it last, so anything it breaks was missed by every attack
before it; the check ``noise-beats-attacks`` then fires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...oracles import LabelOracle
from ..base import FIXED_EPS, NORMS, Attack, AttackResult, check_call, in_l2_ball, in_linf_ball, project
from .shared import SampleRandom


@dataclass(frozen=True)
class RandomNoise(Attack):
    name = "random-noise"
    oracle = LabelOracle
    kind = FIXED_EPS
    norms = NORMS
    paper = "Carlini et al., On Evaluating Adversarial Robustness, 2019 (§5.2)"
    targeted = True
    baseline = True

    norm: str = "linf"
    draws: int = 16

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"random noise norm must be one of {NORMS}")
        if self.draws < 1:
            raise ValueError("draws must be >= 1")

    def __call__(self, oracle: LabelOracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        rng = SampleRandom(seed, x)
        shape = tuple(x.shape[1:])
        x_adv = x.clone()
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.draws):
            active = (~success & (oracle.remaining().to(x.device) >= 1)).nonzero().flatten()
            if len(active) == 0:
                break
            if self.norm == "linf":
                noise = in_linf_ball(rng.rand(active, 1, shape), eps)
            else:
                noise = in_l2_ball(rng.randn(active, 1, shape), rng.rand(active, 1, ()), eps)
            candidate = project(x[active] + noise, x[active], eps, self.norm)
            labels = oracle.labels(candidate, idx=active.cpu()).to(x.device)
            fooled = labels != y[active] if target is None else labels == target[active]
            x_adv[active[fooled]] = candidate[fooled]
            success[active[fooled]] = True
        return AttackResult(x_adv=x_adv, success=success, queries=oracle.queries())
