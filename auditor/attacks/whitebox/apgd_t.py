"""Targeted Auto-PGD (APGD-T), L∞ and L2, with the targeted DLR loss.

Croce and Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020 [CH20],
https://arxiv.org/abs/2003.01690, §4 and §5 (APGD-T in AutoAttack). The
iteration is APGD's ([CH20] Alg. 1, ``apgd.apgd_run``: η⁽⁰⁾ = 2ε, momentum
α = 0.75, checkpoints with conditions 1 and 2 and ρ = 0.75); what changes is
the loss and the loop over targets:

* loss, the targeted DLR of [CH20] Eq. 5, maximised:
  −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 10⁻¹²), with π the logits sorted
  in decreasing order and t the target class;
* fewer than 4 classes (a deviation from [CH20]: Eq. 5's scale needs z_π3
  and z_π4): the loss is Eq. 5's numerator alone, the logit margin
  −(z_y − z_t), or z_t − max_{i≠t} z_i in targeted mode below
  (:func:`_scaled`). APGD's steps (sign(∇f) for L∞, ∇f/‖∇f‖₂ for L2) and
  its step-size rule, which compares a sample's losses with each other, do
  not change when a sample's loss is multiplied by a positive constant, so
  the margin loses only DLR's invariance to the logits' scale changing
  along the path; unlike the cross-entropy, it does not saturate with the
  softmax. On a 2-class model the one target is the other class, and the
  loss is z_t − z_y in both modes;
* targets (official ``APGDAttack_targeted``): the j-th most likely class of
  the clean image, j = 2, …, ``n_target_classes`` + 1 (at most the number of
  classes), read from one forward pass at the clean images; AutoAttack's
  standard version uses 9 targets with 1 restart of 100 iterations each;
* each target gets ``restarts`` runs from random starts, for the samples not
  yet fooled; as in AutoAttack, success is misclassification (any class but
  y), not reaching the target, and a sample leaves the batch at its first
  misclassified iterate, which is its ``x_adv``;
* targeted mode (``target=`` given, a targeted audit): the given class is the
  only target (its recorded ``n_target_classes`` is 1), and success is reaching it, so the loss is Eq. 5 with z_y
  replaced by the largest other logit, max_{i≠t} z_i (:func:`reach_dlr`;
  Eq. 5 itself ignores a third class above the target). On an MNIST CNN
  (200 digits, random targets, L∞ ε = 0.15 and 0.2) it reached the target
  on 1-2.5 points more of the samples, and never on fewer.

Queries: 1 a sample for the clean logits (a sample already misclassified
there succeeds with ``x_adv = x``), then at most ``steps + 1`` a run, so at
most 1 + ``n_target_classes`` × ``restarts`` × (``steps`` + 1) a sample; with
``eot`` > 1 (a randomised model, see :mod:`.apgd`) each of these is ``eot``
passes. With an oracle budget, only samples that can pay a whole run take it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...oracles import GradientOracle
from ..base import AttackResult, check_call, generator
from .apgd import APGDConfig, apgd_run, mean_logits


def _scaled(difference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``-difference`` over the targeted DLR's scale, z_π1 − (z_π3 + z_π4)/2;
    with fewer than 4 classes, where there is no z_π4, ``-difference`` itself."""
    if logits.shape[1] < 4:
        return -difference
    top = logits.topk(4, dim=1).values
    return -difference / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


def targeted_dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The targeted DLR loss, [CH20] Eq. 5 (the margin below 4 classes);
    ``labels`` holds rows (y, t)."""
    own = logits.gather(1, labels[:, :1]).squeeze(1)
    target = logits.gather(1, labels[:, 1:]).squeeze(1)
    return _scaled(own - target, logits)


def reach_dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 5 with z_y replaced by the largest logit but the target's,
    ``max_{i≠t} z_i``: the loss of a targeted audit, where success is the
    target's being the top class, so every class above it is in the way,
    not only y; ``labels`` holds rows (y, t)."""
    target = labels[:, 1:]
    others = logits.scatter(1, target, -torch.inf).amax(1)
    return _scaled(others - logits.gather(1, target).squeeze(1), logits)


@dataclass(frozen=True)
class APGDTargeted(APGDConfig):
    name = "apgd-t"

    n_target_classes: int = 9

    def __post_init__(self):
        super().__post_init__()
        if self.n_target_classes < 1:
            raise ValueError("apgd-t needs n_target_classes >= 1")

    targeted = True

    def as_run(self, num_classes: int, targeted: bool) -> APGDTargeted:
        """At most K − 1 target classes exist: 9 targets on a 3-class model
        are 2. A targeted audit gives each sample its one target."""
        return dataclasses.replace(self, n_target_classes=1 if targeted else min(self.n_target_classes, num_classes - 1))

    def __call__(self, oracle: GradientOracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        gen = generator(seed, x.device)
        x_adv = x.clone()
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        rows = (oracle.remaining() >= self.eot).nonzero().flatten().to(x.device)
        if len(rows) == 0:
            return AttackResult(x_adv=x_adv, success=success, queries=oracle.queries())
        clean, labels = mean_logits(oracle, x[rows], rows.cpu(), self.eot)
        ranked = torch.full((len(x), clean.shape[1]), -1, dtype=torch.long, device=x.device)
        ranked[rows] = clean.argsort(dim=1, descending=True)
        if target is not None:
            # the audit's target is the only one: put it where the loop reads
            ranked[rows, 1] = target[rows]
        success[rows] = labels != y[rows] if target is None else labels == target[rows]
        attacked = torch.zeros_like(success)
        attacked[rows] = True
        targets = 1 if target is not None else min(self.n_target_classes, clean.shape[1] - 1)
        for j in range(1, targets + 1):
            for _ in range(self.restarts):
                can_pay = oracle.remaining().to(x.device) >= (self.steps + 1) * self.eot
                rows = (attacked & ~success & can_pay).nonzero().flatten()
                if len(rows) == 0:
                    break
                labels = torch.stack([y[rows], ranked[rows, j]], dim=1)
                found, fooled = apgd_run(
                    oracle, x[rows], y[rows] if target is None else target[rows], rows, labels,
                    targeted_dlr if target is None else reach_dlr, eps=eps, norm=self.norm, steps=self.steps, rho=self.rho,
                    momentum=self.momentum, gen=gen, reach=target is not None, eot=self.eot,
                )
                x_adv[rows[fooled]] = found[fooled]
                success[rows[fooled]] = True
        return AttackResult(x_adv=x_adv, success=success, queries=oracle.queries())
