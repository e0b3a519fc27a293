"""The attack contract.

An attack is an immutable configuration (a frozen dataclass, so ``repr`` is
built from its parameters) with a pure call::

    result = attack(oracle, x, y, eps=eps, seed=seed)

* ``oracle`` is an instance of the class named by ``attack.oracle``; the
  battery builds exactly that class, and refuses, when the battery is built,
  an attack whose oracle needs more access than the scan has.
* ``x`` is a batch (N,C,H,W) of clean images in [0,1] on ``oracle.device``;
  ``y`` the (N,) true labels. Row i of ``x`` is sample i of the oracle.
* ``eps`` is the radius for fixed-ε attacks (in ``self.norm``); minimum-norm
  attacks ignore it, except that they may stop a sample early once below it.
* ``seed`` seeds a private ``torch.Generator``: same seed, same result.
* ``target`` (keyword, default ``None``): an (N,) tensor of target classes
  for a targeted attack, which succeeds only where the model outputs the
  target. Only attacks with ``targeted = True`` accept it; the battery never
  passes it to the others (:func:`check_target` refuses it). Targeted
  attacks with ``starts_from_data`` (the hard-label ones) also take
  ``starts``, the data images they may start from.
* The query budget, if any, lives in the oracle (``oracle.budget``,
  ``oracle.remaining()``); an attack must never ask for more.

The result follows Foolbox 3: ``x_adv``, a per-sample ``success`` mask and
per-sample ``queries``. The harness clips and re-verifies every example on the
real runtime; it never trusts ``success``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..access import Access
from ..oracles import GradientOracle, LabelOracle, ScoreOracle, SurrogateOracle

ORACLE_ACCESS: dict[type, Access] = {
    GradientOracle: Access.WHITE_BOX,
    ScoreOracle: Access.SOFT_LABEL,
    LabelOracle: Access.HARD_LABEL,
    SurrogateOracle: Access.NONE,
}

FIXED_EPS = "fixed-eps"
MIN_NORM = "min-norm"
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AttackResult:
    """What an attack claims. ``queries`` counts the attack's own oracle calls."""

    x_adv: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor
    trace: list[tuple[int | torch.Tensor, torch.Tensor]] | None = None
    """Optional checkpoints (queries spent, best distortion per sample); the
    queries are one count for all samples or an (N,) count per sample."""
    start_index: torch.Tensor | None = None
    """Targeted attacks that start from data images: per sample, the data set
    index of the image its best start came from (-1 where none worked)."""


@dataclass(frozen=True)
class Attack(abc.ABC):
    """Base class: subclasses are frozen dataclasses with a ``norm`` field."""

    name: ClassVar[str]
    oracle: ClassVar[type]
    kind: ClassVar[str]
    norms: ClassVar[tuple[str, ...]]
    paper: ClassVar[str]
    in_default_battery: ClassVar[bool] = True
    """False for attacks that run only when named with ``--attacks``."""
    targeted: ClassVar[bool] = False
    """True for attacks that accept ``target=`` (targeted mode)."""
    starts_from_data: ClassVar[bool] = False
    """True for targeted attacks that start from images of the target class:
    the battery passes them ``starts=`` (a ``StartPool`` of the data)."""
    baseline: ClassVar[bool] = False
    """True for the random noise baseline, which does not optimise: its
    successes are chance, which ``noise-beats-attacks`` judges."""
    default_up_to: ClassVar[Access] = Access.WHITE_BOX
    """The strongest access level whose default battery runs it (levels below
    its own never do). Square and the random noise baseline run at every
    level, as AutoAttack's check against gradient masking; HopSkipJump up to
    soft-label, as a soft-label attacker reads the labels too; NES,
    GenAttack and Sign-OPT only at their own level (``--attacks`` names any
    of them anywhere)."""

    @property
    def access(self) -> Access:
        return ORACLE_ACCESS[self.oracle]

    @property
    def label(self) -> str:
        """The name used in results and on the command line, e.g. ``pgd-linf``."""
        return f"{self.name}-{self.norm}"  # type: ignore[attr-defined]

    def params(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def min_classes(self) -> int:
        """The fewest classes the attack's loss is defined for."""
        return 2

    def as_run(self, num_classes: int, targeted: bool) -> "Attack":
        """This attack as it runs on a model of ``num_classes`` classes in a
        targeted or untargeted audit, so that its recorded parameters are the
        ones it ran with (itself, unless a parameter counts classes or
        targets)."""
        return self

    def step_cost(self, shape: tuple[int, ...]) -> int:
        """Queries one sample of ``shape`` needs for the attack to take a
        step; a smaller budget lets it do nothing (1: any budget will do)."""
        return 1

    @abc.abstractmethod
    def __call__(
        self,
        oracle,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float | None = None,
        seed: int = 0,
        target: torch.Tensor | None = None,
    ) -> AttackResult: ...


def check_call(attack: Attack, eps: float | None, target: torch.Tensor | None, y: torch.Tensor) -> None:
    """Refuse bad call arguments: a fixed-ε attack needs ``eps >= 0``; see :func:`check_target`."""
    if attack.kind == FIXED_EPS:
        if eps is None:
            raise ValueError(f"{attack.label} is a fixed-ε attack: eps is required")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
    check_target(attack, target, y)


def check_target(attack: Attack, target: torch.Tensor | None, y: torch.Tensor) -> None:
    """Refuse a target an attack cannot use, or one that is malformed."""
    if target is None:
        return
    if not attack.targeted:
        raise ValueError(f"{attack.label} has no targeted mode")
    if target.shape != y.shape:
        raise ValueError(f"target must have shape {tuple(y.shape)}, got {tuple(target.shape)}")
    if bool((target == y.to(target.device)).any()):
        raise ValueError("a target class equals the true label")


def labels_of(scores: torch.Tensor) -> torch.Tensor:
    """Top-1 labels of a batch of scores; -1 for a row with a NaN, which
    names no class (``argmax`` would return the NaN's index): it is never the
    label, so it counts as misclassified, and never a target."""
    return torch.where(torch.isnan(scores).any(dim=1), -1, scores.argmax(dim=1))


def most_frequent(passes: torch.Tensor) -> torch.Tensor:
    """(N,) per column of (P, N) labels (-1: a NaN row, counted as a label of
    its own), the one strictly more passes give than any other, or -1 where
    labels tie for the most (no answer)."""
    shifted = passes + 1  # column 0 counts the NaN rows
    counts = torch.zeros(passes.shape[1], int(shifted.max()) + 1, dtype=torch.long, device=passes.device)
    counts.scatter_add_(1, shifted.T, torch.ones_like(shifted.T))
    column = plurality(counts)
    return torch.where(column >= 0, column - 1, -1)


def plurality(counts: torch.Tensor) -> torch.Tensor:
    """(N,) per row of (N, K) vote ``counts``, the column with strictly more
    votes than any other; -1 where columns tie for the most."""
    most = counts.max(dim=1)
    unique = (counts == most.values[:, None]).sum(dim=1) == 1
    return torch.where(unique, most.indices, -1)


def distortion(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample size of a perturbation batch in ``norm``."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(dim=1)
    raise ValueError(f"unknown norm {norm!r}")


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ε-ball around ``x`` intersected with [0,1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        size = distortion(delta, "l2").clamp_min(1e-12)
        factor = (eps / size).clamp(max=1.0)
        delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
    else:
        raise ValueError(f"unknown norm {norm!r}")
    return (x + delta).clamp(0.0, 1.0)


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Z_y − max_{i≠y} Z_i per row: negative exactly where the row is
    misclassified, and, unlike the cross-entropy, not flattened to 0 by a
    saturated softmax (Carlini and Wagner's f₆)."""
    own = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), -math.inf).amax(1)
    return own - others


def uniform_in_ball(
    shape: torch.Size, eps: float, norm: str, gen: torch.Generator, device
) -> torch.Tensor:
    """Perturbations drawn uniformly from the ε-ball: per-pixel uniform for
    L∞; for L2 a uniform direction at radius ε·U^(1/d) ([MMS18] §3 random start)."""
    if norm == "linf":
        return in_linf_ball(torch.rand(shape, generator=gen, device=device), eps)
    direction = torch.randn(shape, generator=gen, device=device)
    return in_l2_ball(direction, torch.rand(shape[0], generator=gen, device=device), eps)


def in_linf_ball(uniform: torch.Tensor, eps: float) -> torch.Tensor:
    """Uniform [0,1) draws of the image shape -> uniform points of the L∞ ball."""
    return (uniform * 2 - 1) * eps


def in_l2_ball(normal: torch.Tensor, uniform: torch.Tensor, eps: float) -> torch.Tensor:
    """Standard normal draws (N, C, H, W) and uniform [0,1) draws (N,) ->
    uniform points of the L2 ball: the direction at radius ε·U^(1/d)."""
    direction = normal / normal.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    radius = uniform ** (1.0 / math.prod(normal.shape[1:]))
    return direction * (eps * radius).view(-1, 1, 1, 1)


MAX_SEED = 2**63 - 1
"""The largest seed a run takes (``torch.Generator.manual_seed`` takes no more than 64 bits)."""


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private, seeded generator (attacks never touch the global RNG)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen
