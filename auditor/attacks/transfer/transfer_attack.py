"""Transfer attacks: a composition of transforms over the I-FGSM core, run on surrogates.

The attack sees only a :class:`~auditor.oracles.SurrogateOracle` (the
attacker's own models, one or an averaged-logits ensemble) and never the
target. It returns the final iterate x_T of every sample; the harness
submits each to the target once, when it verifies, so the target cost is
one query per sample (``queries`` is all ones), and ``success`` is all
True because only the target can tell.

The objective (:mod:`.losses`): untargeted, the attack ascends the loss of
the true label; targeted (``target=``), it descends the loss of the target,
as in the targeted MI-FGSM of Dong et al. (2018), moving toward the
target class. The step size is α = ``rel_step``·ε, by default ε/T.

Transforms are given in pipeline (``stage``) order; two transforms with
the same stage (MI and NI) cannot be combined. The label lists them in the literature's order, e.g.
``transfer-mi-di-ti-linf``; with no transform it is ``transfer-ifgsm-linf``.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...oracles import SurrogateOracle
from ..base import FIXED_EPS, NORMS, Attack, AttackResult, check_call, generator
from .ifgsm import ifgsm
from .losses import LOSSES
from .transform import Transform

LABEL_ORDER = ("mi", "ni", "vt", "di", "ti", "si", "admix", "rap")
"""The order of the tags in a label: momentum first, as in "VMI-DI-TI-SI"."""


@dataclass(frozen=True)
class TransferAttack(Attack):
    name = "transfer"
    oracle = SurrogateOracle
    kind = FIXED_EPS
    norms = NORMS
    core_paper: ClassVar[str] = (
        "Kurakin et al., Adversarial Examples in the Physical World, ICLR Workshop 2017 (I-FGSM core); "
        "Dong et al., Boosting Adversarial Attacks with Momentum, CVPR 2018 (ensembles, step size)"
    )
    targeted = True

    transforms: tuple[Transform, ...] = ()
    norm: str = "linf"
    steps: int = 10
    """T, the iterations of the core."""
    loss: str = "ce"
    """``"ce"`` or ``"logit"``."""
    rel_step: float | None = None
    """α as a fraction of ε; ``None`` means 1/T."""

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"transfer attack norm must be one of {NORMS}")
        if self.steps < 1:
            raise ValueError("transfer attack needs steps >= 1")
        if self.loss not in LOSSES:
            raise ValueError(f"transfer attack loss must be one of {tuple(LOSSES)}")
        if self.rel_step is not None and not self.rel_step > 0:
            raise ValueError("transfer attack rel_step must be > 0")
        for first, second in itertools.pairwise(self.transforms):
            if first.stage == second.stage:
                raise ValueError(f"transforms {first.tag} and {second.tag} cannot be combined")
            if first.stage > second.stage:
                order = ", ".join(t.tag for t in sorted(self.transforms, key=lambda t: t.stage))
                raise ValueError(f"give the transforms in pipeline order: {order}")
        for transform in self.transforms:
            transform.check(self.steps)

    @property
    def paper(self) -> str:
        """The core's papers and each transform's, each paper once (MI's is
        among the core's; NI and SI share one)."""
        cited = [paper for paper in dict.fromkeys(t.paper for t in self.transforms) if paper not in self.core_paper]
        return "; ".join([self.core_paper, *cited])

    @property
    def label(self) -> str:
        tags = sorted((transform.tag for transform in self.transforms), key=LABEL_ORDER.index)
        loss = "" if self.loss == "ce" else f"-{self.loss}"
        return f"{self.name}-{'-'.join(tags) or 'ifgsm'}{loss}-{self.norm}"

    def params(self) -> dict:
        """The core's parameters, and each transform's with its tag."""
        return {
            "transforms": [
                {"name": transform.tag, **dataclasses.asdict(transform)} for transform in self.transforms
            ],
            "norm": self.norm,
            "steps": self.steps,
            "loss": self.loss,
            "rel_step": self.rel_step,
        }

    def __call__(self, oracle: SurrogateOracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        loss = LOSSES[self.loss]
        if target is None:
            labels, objective = y, loss
        else:
            labels, objective = target.to(y.device), lambda logits, wanted: -loss(logits, wanted)
        x_adv = ifgsm(
            oracle,
            x,
            y,
            labels,
            objective,
            self.transforms,
            eps=eps,
            alpha=eps * (self.rel_step if self.rel_step is not None else 1.0 / self.steps),
            steps=self.steps,
            norm=self.norm,
            gen=generator(seed, x.device),
        )
        n = len(x)
        return AttackResult(
            x_adv=x_adv.detach(),
            success=torch.ones(n, dtype=torch.bool, device=x.device),
            queries=torch.ones(n, dtype=torch.long),
        )
