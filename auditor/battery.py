"""The battery: a cascade of attacks over the samples that are still robust.

For each sample the battery keeps one record: the smallest *verified*
adversarial distortion found so far in the threat norm (0 if the clean image
is already misclassified, ``inf`` if none was found). Robust accuracy at ε
is the fraction of samples whose record exceeds ε (+ the float32 slack of
:func:`~auditor.verify.eps_bound`), so
it is the per-sample worst case over the whole battery, and curves over ε
come for free.

* Fixed-ε attacks run once per ε, largest first; each run sees only the
  samples whose record still exceeds that ε.
* Minimum-norm attacks run once, on the samples still robust at the
  smallest ε: a sample an earlier attack broke at 0.25 is still robust at
  0.1, and a smaller distortion found for it lowers robust accuracy there.
* Each run gets a fresh oracle of the class the attack declares, holding the
  per-sample query budget (black-box attacks only).
* Transfer attacks run once per ε and surrogate set (each surrogate alone,
  then their ensemble), all on the samples robust at that ε when the first
  transfer attack starts, so their success rates form a comparable matrix.
  Each costs the target one query per sample: the verification of its
  final example.

Every run has a seed of its own, derived from the scan's, and runs with
torch's global generator seeded from it, so that a randomised model or
surrogate (dropout left on) gives the same examples in every run with the
scan's seed.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from .access import Access
from .attacks import BY_LABEL, CATALOGUE
from .attacks.base import FIXED_EPS, MIN_NORM, Attack, AttackResult
from .attacks.hardlabel.hop_skip_jump import HopSkipJump
from .attacks.hardlabel.shared import StartPool
from .attacks.whitebox.apgd import APGDConfig
from .errors import AuditError
from .models.base import Model, seeded_rng
from .models.logits import BeforeSoftmax
from .oracles import GradientOracle, LabelOracle, ScoreOracle, SurrogateOracle, logits_in_passes
from .progress import ScanProgress
from .verify import (
    BLACK_BOX_PASSES, Verified, eps_bound, labels_of, mean_probabilities, predict, pushed_out, verify,
    voted_labels,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SurrogateSet:
    """Surrogate models a transfer attack runs on: one, or an ensemble."""

    name: str
    modules: tuple[torch.nn.Module, ...]


@dataclass(frozen=True)
class Battery:
    level: Access
    norm: str
    attacks: tuple[Attack, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    """(attack label, reason) for catalogue attacks left out of this battery."""
    targeted: bool = False
    left_out: tuple[str, ...] = ()
    """A battery chosen by name: the default battery's attacks it leaves out."""


EOT_PASSES = 20
"""Passes the APGD attacks average each step over on a randomised model
(AutoAttack's ``eot_iter`` for randomised defenses)."""

COARSE_GAMMA = 1000.0
"""HopSkipJump's γ on a randomised model or one with input steps, for
MNIST's d = 784 input values (:func:`coarse_gamma` scales it with d). At γ = 1
its probes sit 1/d of the distance from the boundary (1/784 on MNIST): on
a randomised model, far inside the band where the model's vote goes either
way, so their signs are noise; behind input quantisation, too close to move
any pixel across a rounding threshold, so they all agree and tell nothing.
Its binary searches refine below that scale for nothing. On the example CNN
(32 digits, L2 ε = 1 / 1.5 / 2, budget 5,000) γ = 1000 took hard-label
robust accuracy from 94 / 94 / 72 % to 69 / 41 / 19 % behind Gaussian input
noise (σ = 0.05; APGD with EOT finds 50 / 25 / 3 %), from 97 / 91 / 81 % to
72 / 38 / 25 % at σ = 0.2 (EOT: 53 / 22 / 6 %), and HopSkipJump's own from
88 / 78 / 69 % to 78 / 63 / 25 % behind 4-level input quantisation (the
network without it: 81 / 66 / 25 %); γ = 3000 did worse at σ = 0.2. On the
network alone γ barely matters (median L2 1.62 at γ = 1, 1.65 at 1000)."""

COARSE_THETA = 0.05
"""The coarsest L2 binary-search threshold :func:`coarse_gamma` allows
(θ = γ d^{-3/2}, a share of the distance): 0.046 on MNIST."""


def coarse_gamma(d: int) -> float:
    """HopSkipJump's coarse γ for inputs of ``d`` values: the probes' distance
    from the boundary (γ/d of the distance from the clean image) as at
    :data:`COARSE_GAMMA` on MNIST, the L2 binary search no coarser than
    :data:`COARSE_THETA`, and γ never below the default 1. Taken as it is,
    γ = 1000 on 8 × 8 images put the probes 15 distances away and θ above 1
    (no binary search), and left 56 % of 8-bit-rounded digits robust at
    L2 0.25, against 12.5 % at γ = 1."""
    return max(1.0, min(COARSE_GAMMA * d / 784, COARSE_THETA * d**1.5))


def with_coarse_probes(battery: Battery, d: int) -> Battery:
    """``battery`` for a model whose outputs a small change does not move
    (``piecewise-constant``, ``quantised-input``), on inputs of ``d``
    values: HopSkipJump probes and bisects on a coarser scale (:func:`coarse_gamma`)."""
    gamma = coarse_gamma(d)
    attacks = tuple(replace(attack, gamma=gamma) if isinstance(attack, HopSkipJump) else attack
                    for attack in battery.attacks)
    return replace(battery, attacks=attacks)


def for_randomised(battery: Battery, d: int) -> Battery:
    """``battery`` for a randomised model: its APGD attacks take the
    expectation over the model's randomness (EOT, :data:`EOT_PASSES` passes a
    step) from one random start, as AutoAttack's version for randomised
    defenses runs APGD-CE (it has APGD-DLR where this battery has APGD-T);
    the passes make each start :data:`EOT_PASSES` times the cost. HopSkipJump probes and
    bisects on a coarser scale (:func:`coarse_gamma` for inputs of ``d``
    values); the black-box attacks' answers are votes
    (:data:`~auditor.verify.BLACK_BOX_PASSES` passes, applied when the
    battery runs)."""
    attacks = tuple(replace(attack, eot=EOT_PASSES, restarts=1) if isinstance(attack, APGDConfig) else attack
                    for attack in battery.attacks)
    return with_coarse_probes(replace(battery, attacks=attacks), d)


NO_SURROGATES = "needs surrogate models (--surrogate PATH or --train-surrogates K)"


def attack_budget(attack: Attack, budget: int | None) -> int | None:
    """The per-sample query budget of ``attack``: ``budget`` for the
    black-box attacks, none for white-box and transfer attacks."""
    return None if attack.access in (Access.WHITE_BOX, Access.NONE) else budget


def answer_passes(attack: Attack, randomised: bool) -> int:
    """Model passes, so queries, one answer of ``attack``'s oracle costs: on
    a randomised model :data:`~auditor.verify.BLACK_BOX_PASSES` for a score
    or label oracle (gradient attacks average passes themselves, EOT), else 1."""
    return BLACK_BOX_PASSES if randomised and attack.oracle in (ScoreOracle, LabelOracle) else 1


def _cannot_run(
    attack: Attack, budget: int | None, shape: tuple[int, ...], num_classes: int, randomised: bool
) -> str | None:
    """Why ``attack`` cannot run on this model and data, or None: its loss
    needs more classes than the model has, or one step on images of
    ``shape`` costs more queries than the budget (on a randomised model,
    :func:`answer_passes` per answer)."""
    passes = answer_passes(attack, randomised)
    cost = attack.step_cost(shape) * passes
    if attack.min_classes > num_classes:
        return f"its loss needs at least {attack.min_classes} classes; the model has {num_classes}"
    if attack_budget(attack, budget) is not None and cost > budget:
        each = f" ({passes} passes an answer on this randomised model)" if passes > 1 else ""
        return f"one step needs {cost:,} queries per sample{each}; the budget is {budget:,}"
    return None


def runnable(
    battery: Battery, budget: int | None, shape: tuple[int, ...], num_classes: int, randomised: bool = False
) -> Battery:
    """``battery`` without the attacks that cannot run on this model and
    data (:func:`_cannot_run`), each listed as skipped with why, and the
    others as they run on its classes and targets (:meth:`~.Attack.as_run`). A default
    attack that could not have run either is not one a chosen battery left out."""
    reasons = {
        attack.label: reason
        for attack in battery.attacks
        if (reason := _cannot_run(attack, budget, shape, num_classes, randomised)) is not None
    }
    left_out = tuple(
        label for label in battery.left_out
        if _cannot_run(BY_LABEL[label], budget, shape, num_classes, randomised) is None
    )
    kept = tuple(attack.as_run(num_classes, battery.targeted) for attack in battery.attacks if attack.label not in reasons)
    if not kept:
        why = "; ".join(f"{label}: {reason}" for label, reason in reasons.items())
        raise AuditError(f"no attack chosen can run ({why})")
    return replace(battery, attacks=kept, skipped=battery.skipped + tuple(reasons.items()), left_out=left_out)


@dataclass(frozen=True)
class _Ineligible:
    """Why an attack cannot run in a battery, in the words of each way of choosing it."""

    refusal: str
    """The error for an attack named with ``--attacks``."""
    skip: str | None
    """The reason the default battery lists it as skipped with; None: it leaves it out unlisted."""


def _ineligible(
    attack: Attack, level: Access, norm: str, targeted: bool, transfer: bool
) -> _Ineligible | None:
    """Why ``attack`` cannot run in this battery, or None: a transfer attack
    without surrogate models, an attack that needs more access than the
    scan has, a fixed-ε attack in another norm, or, in targeted mode, an
    attack without one. The first rule it breaks, in that order, gives the
    reason."""
    if attack.oracle is SurrogateOracle and not transfer:
        return _Ineligible(NO_SURROGATES, NO_SURROGATES if level == Access.NONE else None)
    if attack.access > level:
        return _Ineligible(f"needs {attack.access.cli_name} access, but the scan has {level.cli_name}", None)
    if attack.kind == FIXED_EPS and attack.norm != norm:
        # the default battery runs its variant in the threat norm instead, where there is one
        return _Ineligible(
            f"works in {attack.norm}, but the threat model is {norm}",
            None if norm in attack.norms else f"no {norm} version yet",
        )
    if targeted and not attack.targeted:
        return _Ineligible("has no targeted mode", "no targeted mode")
    return None


def _lookup(name: str, norm: str) -> Attack:
    """The catalogue attack called ``name``: its full label (``fgsm-l2``), or
    the name without the norm suffix (``fgsm``), meaning the variant in the
    threat norm, else the attack's only variant (``cw`` is ``cw-l2``)."""
    if name in BY_LABEL:
        return BY_LABEL[name]
    base = {label: label.rsplit("-", 1)[0] for label in BY_LABEL}  # the label without its norm
    variants = [label for label in BY_LABEL if base[label] == name]
    if f"{name}-{norm}" in variants:
        return BY_LABEL[f"{name}-{norm}"]
    if len(variants) == 1:
        return BY_LABEL[variants[0]]
    close = difflib.get_close_matches(name, [*BY_LABEL, *sorted(set(base.values()))], n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise AuditError(f"unknown attack {name!r}{hint}: `auditor attacks` lists them")


def build_battery(
    level: Access,
    norm: str,
    names: Sequence[str] | None = None,
    *,
    targeted: bool = False,
    transfer: bool = False,
) -> Battery:
    """Choose the attacks for an access level, a norm and untargeted/targeted mode.

    Without ``names``: every default catalogue attack of the level, plus the
    attacks of weaker levels whose ``default_up_to`` reaches it (AutoAttack's
    Square and the noise baseline everywhere: checks against gradient
    masking; HopSkipJump at soft-label). Fixed-ε
    attacks run in the threat norm; minimum-norm attacks in any norm,
    measured in the threat norm, but only in the threat norm where they have
    that variant. In targeted mode only attacks with a targeted mode run.
    Transfer attacks run at every level, but only with ``transfer``
    (surrogate models to run them on). With ``names`` (labels, or names
    without the norm suffix: see :func:`_lookup`): exactly those, each checked.
    """
    if names is not None:
        if not [name for name in names if name]:
            raise AuditError("--attacks names no attack; leave it out for the default battery")
        chosen = list({attack.label: attack for attack in (_lookup(name, norm) for name in names)}.values())
        for attack in chosen:
            why = _ineligible(attack, level, norm, targeted, transfer)
            if why is not None:
                raise AuditError(f"attack {attack.label} {why.refusal}")
        try:
            default = build_battery(level, norm, targeted=targeted, transfer=transfer).attacks
        except AuditError:  # no default battery here: nothing is left out
            default = ()
        left_out = tuple(attack.label for attack in default if attack not in chosen)
        return Battery(level, norm, tuple(sorted(chosen, key=CATALOGUE.index)), targeted=targeted, left_out=left_out)
    chosen, skipped = [], []
    for attack in CATALOGUE:
        if not attack.in_default_battery or level > attack.default_up_to:
            continue
        if attack.kind == MIN_NORM and attack.norm != norm and norm in attack.norms:
            continue  # its variant in the threat norm runs instead
        why = _ineligible(attack, level, norm, targeted, transfer)
        if why is None:
            chosen.append(attack)
        elif why.skip is not None:
            skipped.append((attack.label, why.skip))
    if not chosen:
        # an empty battery would report every sample as robust
        mode = "targeted " if targeted else ""
        if level == Access.NONE and not transfer:
            raise AuditError(
                "--access none runs only transfer attacks: give --surrogate PATH or --train-surrogates K"
            )
        raise AuditError(
            f"no {mode}attack can run at {level.cli_name} access with a {norm} threat model yet; "
            "choose --access hard-label or higher" + (" or drop --target" if targeted else "")
        )
    return Battery(level, norm, tuple(chosen), tuple(skipped), targeted)


@dataclass
class Records:
    """Per-sample state of a battery run (mutable, as is an attack's :class:`_Tally`)."""

    distortion: torch.Tensor
    broken_by: np.ndarray
    """(N,) object array: attack label, ``"clean"`` or ``None``."""
    queries: torch.Tensor
    x_adv: torch.Tensor
    white_box: torch.Tensor
    """The record counting the white-box attacks' examples only (and clean
    errors), for the ``weaker-attack-wins`` check."""

    @classmethod
    def start(cls, x: torch.Tensor, clean_pred: torch.Tensor, y: torch.Tensor) -> "Records":
        # targeted audits too: a sample the model already gets wrong is not
        # robust, whatever class it outputs (robust accuracy ≤ clean accuracy)
        wrong = clean_pred != y
        distortion = torch.where(wrong, 0.0, torch.inf).double()
        return cls(
            distortion=distortion,
            broken_by=np.where(wrong.numpy(), "clean", None).astype(object),
            queries=torch.zeros(len(y), dtype=torch.long),
            x_adv=x.clone(),
            white_box=distortion.clone(),
        )

    def update(
        self, active, ok, checked: Verified, spent: torch.Tensor, label: str, white_box: bool = False
    ) -> None:
        """Keep, per sample, the smallest verified distortion and its example
        (and, for a ``white_box`` attack, its own record).

        ``queries`` holds the queries of the run that set the record, or, for
        samples never broken, the most any single run spent on them.
        """
        if white_box:
            found = torch.where(ok, checked.distortion, torch.inf)
            self.white_box[active] = torch.minimum(self.white_box[active], found)
        better = ok & (checked.distortion < self.distortion[active])
        winners = active[better]
        self.distortion[winners] = checked.distortion[better]
        self.x_adv[winners] = checked.x_adv[better]
        self.queries[winners] = spent[better]
        self.broken_by[winners.numpy()] = label
        none_yet = self.distortion[active] == torch.inf
        self.queries[active[none_yet]] = torch.maximum(self.queries[active[none_yet]], spent[none_yet])

    def robust_at(self, eps: float) -> torch.Tensor:
        return self.distortion > eps_bound(eps)

    def robust_accuracy(self, eps_list: Sequence[float]) -> dict[float, float]:
        return {eps: self.robust_at(eps).double().mean().item() for eps in eps_list}


@dataclass(frozen=True)
class RunReport:
    """One call of one attack at one ε (``None`` for minimum-norm runs).

    ``broken`` counts samples broken within the run's ε, or within the largest
    ε for minimum-norm runs (their larger distortions still enter the records).
    """

    eps: float | None
    samples: int
    broken: int
    queries_total: int
    seconds: float
    positions: tuple[int, ...] = ()
    """Per sample attacked: its position in the batch the battery was given."""
    queries: tuple[int, ...] = ()
    """Per sample attacked: the queries the run spent on it, which for a
    broken sample are its queries to success (a fixed-ε attack stops a sample
    at its first success)."""
    success: tuple[bool, ...] = ()
    """Per sample attacked: broken within the run's ε, verified."""
    reached: tuple[int, ...] = ()
    """Minimum-norm runs with a trace in the threat norm: per sample
    attacked, the queries it had spent when the attack's best example first
    came within the largest ε (its queries to success there; the queries
    spent where the trace never shows it)."""
    distortion_at: tuple[tuple[int, tuple[float, ...]], ...] = ()
    """Minimum-norm runs with a trace: at each of ``TRACE_CHECKPOINTS`` up to
    the most queries spent, the attack's best distortion (in its own norm) per
    sample attacked, as it stood when no sample had spent more queries."""
    reached_at: tuple[tuple[float, tuple[int, ...], tuple[bool, ...]], ...] = ()
    """Minimum-norm runs with a trace in the threat norm, for each audited ε
    (descending): ``(ε, queries, broken)`` per sample attacked, the queries
    spent when its best example first came within ε (the queries spent
    where it never did) and whether it is broken within ε, verified. One
    run serves every ε, so its query cost at each ε reads off the trace."""
    start_index: tuple[int, ...] = ()
    """Attacks that start from data images (targeted, or untargeted where no
    random direction crossed the boundary): per sample attacked, the data set
    index of the image behind its best start (-1 where none was used or
    worked)."""
    surrogate: str | None = None
    """Transfer attacks: the surrogate set the run used."""


@dataclass(frozen=True)
class AttackReport:
    attack: Attack
    runs: tuple[RunReport, ...]
    samples: int
    """Samples it attacked in any run."""
    queries_to_success: tuple[int, ...]
    """Per sample it broke (within the run's ε): the queries to success of
    the first run that broke it (runs go from the largest ε down).
    Minimum-norm attacks spend their whole budget refining: for them this is
    ``RunReport.reached`` where the run has it, else the queries spent."""
    robust_accuracy: dict[float, float]
    """Cumulative robust accuracy after this attack, per ε."""
    budget: int | None
    non_monotone: int = 0
    """Samples it broke at a smaller ε after failing on them at a larger one."""

    @property
    def broken(self) -> int:
        return len(self.queries_to_success)

    @property
    def seconds(self) -> float:
        return sum(run.seconds for run in self.runs)


@dataclass(frozen=True)
class BatteryOutcome:
    clean_pred: torch.Tensor
    records: Records
    attacks: tuple[AttackReport, ...] = field(default_factory=tuple)


def _oracle_forward(model: Model, oracle_class: type, probabilities: bool, passes: int) -> Callable:
    """What ``oracle_class`` answers from: the differentiable module, the
    probabilities or the labels; for a randomised model (``passes`` > 1) the
    mean probabilities or the voted label of ``passes`` passes, as the
    harness verifies by a vote (gradient attacks average passes themselves: EOT)."""
    if oracle_class is GradientOracle:
        module = model.torch_module()
        if module is None:
            raise AuditError(f"model {model.info.path} has no differentiable form for white-box attacks")
        return module
    if oracle_class is ScoreOracle:
        forward = model.forward if probabilities else (lambda x: torch.softmax(model.forward(x), dim=1))
        return forward if passes == 1 else (lambda x: mean_probabilities(forward, x, passes))
    one_pass = (lambda x: labels_of(model.forward(x)))
    return one_pass if passes == 1 else (lambda x: voted_labels(one_pass, x, passes))


def _exact_scores(model: Model, attack: Attack, level: Access, probabilities: bool, passes: int) -> dict:
    """For a score attack at white-box access: the oracle's exact
    log-probabilities, ``log_softmax`` of the logits (of the model's
    outputs, or, for a model that outputs probabilities, of the
    differentiable copy with its final softmax removed). A saturated softmax
    rounds probabilities to exactly 0 and 1 and leaves the attack a flat
    loss, which an attacker who has the logits does not face (a model with
    logits × 1000 behind input quantisation, whose gradients are zero,
    scored 75 % robust at white-box against its real 12.5 %). For a
    randomised model, the logarithm of the mean probabilities of ``passes``
    passes."""
    if attack.oracle is not ScoreOracle or level != Access.WHITE_BOX:
        return {}
    if not probabilities:
        one_pass = (lambda x: torch.log_softmax(model.forward(x), dim=1))
    elif isinstance(model, BeforeSoftmax):  # the runtime gives probabilities; the attacker's copy, the logits
        module = model.torch_module()
        one_pass = (lambda x: torch.log_softmax(logits_in_passes(module, x), dim=1))
    else:
        return {}  # a softmax that could not be removed: softmax-outputs says so
    if passes == 1:
        return {"log_probabilities": one_pass}
    return {"log_probabilities": lambda x: torch.stack([one_pass(x) for _ in range(passes)]).logsumexp(dim=0)
            - math.log(passes)}


TRACE_CHECKPOINTS = (100, 200, 500, 1000, 2000, 5000, 10000, 20000)
"""Query counts at which minimum-norm attacks' distortions are reported."""


def distortion_at(
    trace, spent: torch.Tensor, *, budget: int | None = None, checkpoints: Sequence[int] = TRACE_CHECKPOINTS
) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Each sample's best distortion at the query checkpoints of a trace.

    A trace entry (queries, distortion) gives each sample's queries spent so
    far (one count for all samples, or one per sample) and its best
    distortion then; at a checkpoint each sample takes its last entry within
    the checkpoint (``inf`` before its first). Checkpoints start at the first
    entry; those below the most queries spent are kept, and the last is the
    budget (where there is one: no sample spent more, so its distortions
    are the final ones), else the most queries spent."""
    if not trace:
        return ()
    queries, sizes = _trace_tensors(trace)
    n = sizes.shape[1]
    sizes = torch.cat([torch.full((1, n), torch.inf, dtype=torch.float64), sizes])
    most = int(spent.max()) if len(spent) else 0
    points = []
    for checkpoint in [q for q in checkpoints if q < most] + [most if budget is None else budget]:
        last = (queries <= checkpoint).sum(dim=0)
        if not bool(last.any()):
            continue  # before the first entry of every sample
        points.append((checkpoint, tuple(sizes[last, torch.arange(n)].tolist())))
    return tuple(points)


def _trace_tensors(trace) -> tuple[torch.Tensor, torch.Tensor]:
    """A trace as (entries, samples) tensors of queries spent and best distortion."""
    n = len(trace[0][1])
    queries = torch.stack([torch.as_tensor(q).cpu().expand(n) for q, _ in trace])
    return queries, torch.stack([d.double().cpu() for _, d in trace])


def queries_to_reach(trace, bound: float, spent: torch.Tensor) -> torch.Tensor:
    """Per sample: the queries spent at the first trace entry where its best
    distortion is within ``bound``; ``spent`` where no entry is."""
    queries, sizes = _trace_tensors(trace)
    within = sizes <= bound
    first = within.int().argmax(dim=0)  # the first entry within, where there is one
    return torch.where(within.any(dim=0), queries[first, torch.arange(sizes.shape[1])], spent)


def _run_seed(seed: int, label: str, eps: float | None, group: SurrogateSet | None = None) -> int:
    name = "" if group is None else f":{group.name}"
    return zlib.crc32(f"{seed}:{label}:{eps}{name}".encode())


def _plan(attack: Attack, eps_desc: Sequence[float], surrogates: Sequence[SurrogateSet]):
    """The runs of one attack: (ε or None, surrogate set or None), in order."""
    if attack.oracle is SurrogateOracle:
        return [(eps, group) for eps in eps_desc for group in surrogates]
    if attack.kind == FIXED_EPS:
        return [(eps, None) for eps in eps_desc]
    return [(None, None)]


@dataclass
class _Tally:
    """One attack's per-sample counts over its runs, for its :class:`AttackReport`."""

    descending: bool
    """Its runs go once per ε from the largest down (not transfer attacks,
    which run each ε once per surrogate set), so that a failure at one ε
    followed by a success at a smaller one is non-monotone."""
    attacked: torch.Tensor
    """Attacked by some run."""
    broken: torch.Tensor
    """Broken by some run, within its ε."""
    to_success: torch.Tensor
    """Broken samples: the queries to success of the first run that broke them."""
    failed_larger: torch.Tensor
    """Descending runs only: failed on by an earlier run, at a larger ε."""
    non_monotone: torch.Tensor
    """Broken by a run after an earlier run, at a larger ε, failed on them."""
    runs: list[RunReport]

    @classmethod
    def start(cls, n: int, descending: bool) -> _Tally:
        return cls(
            descending, attacked=torch.zeros(n, dtype=torch.bool), broken=torch.zeros(n, dtype=torch.bool),
            to_success=torch.zeros(n, dtype=torch.long), failed_larger=torch.zeros(n, dtype=torch.bool),
            non_monotone=torch.zeros(n, dtype=torch.bool), runs=[],
        )

    def add(self, run: RunReport) -> None:
        """Count the samples ``run`` attacked and broke, and the queries to
        success of those no earlier run broke (``reached`` where the run has
        it, else the queries it spent)."""
        active = torch.tensor(run.positions, dtype=torch.long)
        within = torch.tensor(run.success, dtype=torch.bool)
        queries = torch.tensor(run.reached or run.queries, dtype=torch.long)
        first = within & ~self.broken[active]
        self.to_success[active[first]] = queries[first]
        self.attacked[active], self.broken[active[within]] = True, True
        if self.descending:
            self.non_monotone[active[within & self.failed_larger[active]]] = True
            self.failed_larger[active[~within]] = True
        self.runs.append(run)

    def report(self, attack: Attack, budget: int | None, robust_accuracy: dict[float, float]) -> AttackReport:
        return AttackReport(
            attack=attack, runs=tuple(self.runs), samples=int(self.attacked.sum()),
            queries_to_success=tuple(self.to_success[self.broken].tolist()),
            robust_accuracy=robust_accuracy, budget=budget, non_monotone=int(self.non_monotone.sum()),
        )


@dataclass(frozen=True)
class _Context:
    """What every run of a battery shares (the arguments of :func:`run_battery`)."""

    battery: Battery
    model: Model
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None
    starts: StartPool | None
    eps_desc: tuple[float, ...]
    budget: int | None
    seed: int
    outputs_probabilities: bool
    progress: ScanProgress
    votes: int


def _oracle(
    context: _Context, attack: Attack, group: SurrogateSet | None, samples: int,
    on_charge: Callable[[int], None] | None,
):
    """A fresh oracle for one run of ``attack`` on ``samples`` samples: the
    surrogate set ``group`` for a transfer attack, else the model behind the
    attack's oracle class, holding its budget and reporting each charge to
    ``on_charge``."""
    if attack.oracle is SurrogateOracle:
        return SurrogateOracle(group.modules, device="cpu")
    model, probabilities = context.model, context.outputs_probabilities
    passes = answer_passes(attack, context.votes > 1)
    options = _exact_scores(model, attack, context.battery.level, probabilities, passes)
    if passes > 1:
        options["passes"] = passes
    forward = _oracle_forward(model, attack.oracle, probabilities, passes)
    budget = attack_budget(attack, context.budget)
    return attack.oracle(forward, samples, budget, device=model.device, on_charge=on_charge, **options)


def _attack(
    context: _Context, attack: Attack, eps: float | None, group: SurrogateSet | None, active: torch.Tensor,
    goal: torch.Tensor | None, description: str,
) -> tuple[AttackResult, torch.Tensor]:
    """Run ``attack`` once on the samples at ``active`` (targets ``goal``)
    with a fresh oracle and the run's own seed: its result, and the queries
    it cost each sample on the model."""
    transfer = attack.oracle is SurrogateOracle
    budget = attack_budget(attack, context.budget)
    passes = answer_passes(attack, context.votes > 1)
    # the bar counts queries to the model: a transfer example costs one, its verification
    total = len(active) if transfer else None if budget is None else budget // passes * passes * len(active)
    advance = context.progress.run(description, total)
    oracle = _oracle(context, attack, group, len(active), on_charge=None if transfer else advance)
    device = oracle.device
    extra = {"starts": context.starts} if context.starts is not None and attack.starts_from_data else {}
    run_seed = _run_seed(context.seed, attack.label, eps, group)
    with seeded_rng(run_seed, "global"):  # what a randomised model or surrogate draws
        result = attack(
            oracle, context.x[active].to(device), context.y[active].to(device), eps=eps, seed=run_seed,
            target=None if goal is None else goal.to(device), **extra,
        )
    if transfer:
        advance(len(active))
        return result, result.queries.cpu()
    if oracle.passes > 1 and result.trace:  # the attack counts answers; the harness, the passes they cost
        result = replace(result, trace=[(queries * oracle.passes, sizes) for queries, sizes in result.trace])
    return result, oracle.model_queries()


def _reached_at(
    trace, spent: torch.Tensor, ok: torch.Tensor, checked: Verified, eps_desc: Sequence[float]
) -> tuple:
    """``RunReport.reached_at`` of a minimum-norm run with a trace in the threat norm."""
    return tuple(
        (e, tuple(queries_to_reach(trace, eps_bound(e), spent).tolist()),
         tuple((ok & (checked.distortion <= eps_bound(e))).tolist()))
        for e in eps_desc
    )


def _run_once(
    context: _Context, records: Records, attack: Attack, eps: float | None, group: SurrogateSet | None,
    active: torch.Tensor,
) -> RunReport:
    """One run of ``attack`` at ``eps`` (on surrogate set ``group``) on the
    samples at ``active``: attack, verify the examples on the model, keep the
    verified ones in ``records``, and report the run."""
    description = f"{attack.label}" + (f" ε={eps:g}" if eps is not None else "")
    description += (f" on {group.name}" if group is not None else "") + f" · {len(active)} samples"
    started = time.perf_counter()
    goal = None if context.target is None else context.target[active]
    result, spent = _attack(context, attack, eps, group, active, goal, description)
    x, y = context.x[active], context.y[active]
    # a randomised model's votes draw from the run's own stream: another attack before it changes none
    with seeded_rng(_run_seed(context.seed, attack.label, eps, group), "verify"):
        checked = verify(context.model, x, result.x_adv, y, context.battery.norm, goal, context.votes)
        if context.votes > 1 and attack.kind == MIN_NORM:
            checked = pushed_out(context.model, x, checked, y, context.battery.norm, context.eps_desc, goal,
                                 context.votes)
    # an unchanged image is the clean one, which the clean vote judged robust: a fresh vote on a
    # randomised model breaks no sample at distortion 0 (it counted 8 of 18 for a 45 %-wrong model)
    ok = checked.fooled & (checked.distortion > 0)
    ok &= checked.distortion <= (eps_bound(eps) if eps is not None else torch.inf)
    records.update(active, ok, checked, spent, attack.label, attack.access == Access.WHITE_BOX)
    within = ok & (checked.distortion <= eps_bound(eps if eps is not None else context.eps_desc[0]))
    reached_at = ()
    if attack.kind == MIN_NORM and result.trace and attack.norm == context.battery.norm:
        reached_at = _reached_at(result.trace, spent, ok, checked, context.eps_desc)
    log.info("%s: broke %d of %d samples", description, int(within.sum()), len(active))
    return RunReport(
        eps=eps, samples=len(active), broken=int(within.sum()),
        queries_total=int(spent.sum()), seconds=time.perf_counter() - started,
        positions=tuple(active.tolist()), queries=tuple(spent.tolist()), success=tuple(within.tolist()),
        reached=reached_at[0][1] if reached_at else (),  # at the largest ε, the run's limit
        reached_at=reached_at,
        distortion_at=() if attack.kind == FIXED_EPS else distortion_at(
            result.trace, spent, budget=attack_budget(attack, context.budget)
        ),
        start_index=() if result.start_index is None else tuple(result.start_index.tolist()),
        surrogate=None if group is None else group.name,
    )


def run_battery(
    battery: Battery,
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps_list: Sequence[float],
    budget: int | None,
    seed: int,
    outputs_probabilities: bool = False,
    target: torch.Tensor | None = None,
    starts: StartPool | None = None,
    surrogates: Sequence[SurrogateSet] = (),
    progress: ScanProgress | None = None,
    clean_logits: torch.Tensor | None = None,
    votes: int = 1,
) -> BatteryOutcome:
    """Run the cascade on (x, y) and return the verified per-sample records.

    With ``target`` (one class per sample, never its label) the audit is
    targeted: an attack breaks a sample only where the model outputs its
    target (a sample misclassified before any attack is broken already).
    Attacks that start from data images (``starts_from_data``, the
    hard-label ones) take them from ``starts``: targeted, which they then
    require, images of the target class; untargeted, images of other
    classes for the samples no random direction took across the boundary.
    Transfer attacks run on each of ``surrogates``. ``clean_logits``, the
    model's logits on ``x`` if the caller has them, spare a clean pass. A
    randomised model's labels, clean and adversarial, are the most frequent
    of ``votes`` passes (:func:`~auditor.verify.predict`).
    """
    if (target is not None) != battery.targeted:
        raise ValueError("a targeted battery needs targets, and only it takes them")
    if any(a.oracle is SurrogateOracle for a in battery.attacks) and not surrogates:
        raise ValueError("transfer attacks need surrogate sets")
    eps_desc = tuple(sorted(eps_list, reverse=True))
    context = _Context(
        battery, model, x, y, target, starts, eps_desc, budget, seed, outputs_probabilities,
        progress or ScanProgress(enabled=False), votes,
    )
    if votes > 1 or clean_logits is None:
        clean_pred = predict(model, x, votes)
    else:
        clean_pred = labels_of(clean_logits).cpu()
    records = Records.start(x, clean_pred, y)
    transfer_start: torch.Tensor | None = None  # the records when the first transfer attack starts
    reports = []
    for attack in battery.attacks:
        transfer = attack.oracle is SurrogateOracle
        if transfer and transfer_start is None:
            transfer_start = records.distortion.clone()
        tally = _Tally.start(len(y), descending=not transfer)
        for eps, group in _plan(attack, eps_desc, surrogates):
            if transfer:  # the samples robust at ε when the first transfer attack started
                robust = transfer_start > eps_bound(eps)
            else:  # the samples robust at ε now (a minimum-norm run, ε None: at the smallest)
                robust = records.robust_at(eps if eps is not None else eps_desc[-1])
            active = robust.nonzero().flatten()
            if len(active) > 0:
                tally.add(_run_once(context, records, attack, eps, group, active))
        reports.append(tally.report(attack, attack_budget(attack, budget), records.robust_accuracy(eps_list)))
    return BatteryOutcome(clean_pred=clean_pred, records=records, attacks=tuple(reports))
