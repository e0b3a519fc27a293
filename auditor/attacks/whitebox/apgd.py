"""Auto-PGD (APGD), L∞ and L2, untargeted, with the CE or the DLR loss.

Croce and Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020 [CH20],
https://arxiv.org/abs/2003.01690. APGD is PGD with momentum whose step size
is set, per sample, by the progress of the loss f instead of by hand.
Every step below runs on the whole batch at once; each sample has its own
step size, iterate, previous iterate, best point, best loss and counters, and
leaves the batch as soon as it is misclassified.

* start (official code, ``autopgd_base.py``): x⁽⁰⁾ = Π(x + ε·t/‖t‖), with
  t uniform in [−1,1]ⁿ for L∞ (so ‖x⁽⁰⁾ − x‖∞ = ε before clipping to [0,1])
  and t standard normal for L2 (a random point of the L2 sphere);
* Alg. 1 line 2: η⁽⁰⁾ = 2ε;
* Alg. 1 line 3: x⁽¹⁾ = Π(x⁽⁰⁾ + η⁽⁰⁾·∇f(x⁽⁰⁾)), the plain gradient step;
* Alg. 1 lines 4-5: f_max and x_max are the largest loss seen and its
  point, starting at x⁽⁰⁾;
* Alg. 1 lines 7-8 (Eq. 2 of §3.1): z⁽ᵏ⁺¹⁾ = Π(x⁽ᵏ⁾ + η⁽ᵏ⁾·∇f(x⁽ᵏ⁾)) and
  x⁽ᵏ⁺¹⁾ = Π(x⁽ᵏ⁾ + α(z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)) with
  α = 0.75 (``momentum``); for L∞ the gradient enters as sign(∇f), for L2
  as ∇f/‖∇f‖₂ (the official L2 update);
* Alg. 1 lines 9-10: f_max, x_max (and the gradient at x_max) follow every
  improvement of the loss;
* Alg. 1 lines 11-14, the checkpoints w_j = ⌈p_j·N⌉ of §3.2 with p₀ = 0,
  p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (for N = 100
  the iterations 22, 41, 57, 70, 80, 87, 93, 99 of the official code). At
  w_j a sample halves η and restarts from x_max, x⁽ʷʲ⁾ = x_max, when
  - Condition 1 (§3.2): Σ_{i=w_{j−1}}^{w_j−1} 1[f(x⁽ⁱ⁺¹⁾) > f(x⁽ⁱ⁾)]
    < ρ·(w_j − w_{j−1}), with ρ = 0.75, i.e. too few steps since the last
    checkpoint increased the loss; or
  - Condition 2 (§3.2): η⁽ʷʲ⁻¹⁾ = η⁽ʷʲ⁾ and f_max⁽ʷʲ⁻¹⁾ = f_max⁽ʷʲ⁾, i.e.
    η was not halved at the last checkpoint and f_max did not grow since;
  both as the paper writes them (the official code tests condition 1 with
  ≤ and skips condition 2 at w₁);
* Π is the projection onto the ε-ball intersected with [0,1].

Losses: the cross-entropy ("ce") or the Difference of Logits Ratio, Eq. 4,
DLR(x, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 10⁻¹²) with π the
logits sorted in decreasing order ("dlr"); DLR needs at least 3 classes.

Success and queries: a sample succeeds at the first iterate whose logits
(returned by the gradient query, no extra pass) are misclassified, which is
kept as its ``x_adv``; a sample never fooled returns ``x``. A run costs at
most ``steps + 1`` queries a sample: one forward+backward pass at each of
x⁽⁰⁾ … x⁽ᴺ⁻¹⁾ and a forward pass at x⁽ᴺ⁾, whose gradient is never used.
Restarts draw a new random start for the samples not yet fooled, so a sample
costs at most ``restarts × (steps + 1)`` queries; with an oracle budget, a
run only takes the samples that can pay all of it. The first run of any
``restarts`` is the single run, so restarts never lose a success.

Defaults are those of [CH20] §3 and of AutoAttack: N = 100 iterations,
α = 0.75, ρ = 0.75; AutoAttack's standard APGD-CE uses 1 restart.

Randomised models (``eot`` > 1): the logits and ∇f of every step are the
mean over ``eot`` passes, expectation over transformation (Athalye, Carlini
and Wagner, "Obfuscated gradients give a false sense of security", ICML
2018, §5.3), as AutoAttack's version for randomised defenses does for
APGD-CE and APGD-DLR with ``eot_iter = 20``; each pass is a query, so a run
costs ``(steps + 1) · eot`` queries a sample. A sample is fooled where the
passes' labels vote for another class (:func:`voted`, the rule the harness
verifies by), not where their mean logits do, and it does not leave the
batch: as in AutoAttack's APGD, every sample runs all steps and keeps its
last fooled iterate, which lies deeper than the first crossing, so the
harness's own vote, drawn afresh, is likelier to agree (stopping at the
first crossing left samples whose examples that vote rejected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from ...oracles import GradientOracle
from ..base import (
    FIXED_EPS, NORMS, Attack, AttackResult, check_call, generator, labels_of, most_frequent, project,
)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits (M,K), per-sample loss data (M,...)) -> per-sample loss (M,)."""

LOSSES = ("ce", "dlr")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The DLR loss, [CH20] Eq. 4."""
    if logits.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    own = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), -math.inf).amax(1)
    top = logits.topk(3, dim=1).values
    return -(own - other) / (top[:, 0] - top[:, 2] + 1e-12)


def checkpoints(steps: int) -> frozenset[int]:
    """The checkpoints w_j = ⌈p_j·N⌉ < N of [CH20] §3.2, N = ``steps``.

    p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), kept
    in hundredths so that the ceiling is exact.
    """
    found, before, p = set(), 0, 22
    while -(-p * steps // 100) < steps:
        found.add(-(-p * steps // 100))
        before, p = p, p + max(p - before - 3, 6)
    return frozenset(found)


def random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """x⁽⁰⁾ of the official code: a random point at distance ε, clipped to [0,1]."""
    if norm == "linf":
        t = torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1
        size = t.flatten(1).abs().amax(1)
    else:
        t = torch.randn(x.shape, generator=gen, device=x.device)
        size = t.flatten(1).norm(dim=1)
    t = t * (eps / (size + 1e-12)).view(-1, *([1] * (x.dim() - 1)))
    return project(x + t, x, eps, norm)


@dataclass
class _Active:
    """Per-sample state of the samples still attacked in one run, row for row."""

    eps: float
    norm: str
    pos: torch.Tensor
    """Row of each sample in the run's batch."""
    idx: torch.Tensor
    """Oracle sample of each row (on the CPU, as the oracle wants it)."""
    x0: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    """The box [max(x0 − ε, 0), min(x0 + ε, 1)], the L∞ projection's."""
    y: torch.Tensor
    """The class a row must leave (untargeted) or reach (targeted)."""
    data: torch.Tensor
    x: torch.Tensor
    x_prev: torch.Tensor
    x_best: torch.Tensor
    grad_best: torch.Tensor
    step: torch.Tensor
    f_prev: torch.Tensor
    f_best: torch.Tensor
    f_check: torch.Tensor
    ups: torch.Tensor
    halved: torch.Tensor

    def keep(self, mask: torch.Tensor) -> None:
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[mask.to(value.device)])

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (self.x.dim() - 1)))

    def project_(self, t: torch.Tensor) -> torch.Tensor:
        """``project(t, x0, eps, norm)``, computed in place on ``t``."""
        if self.norm == "linf":
            return t.clamp_(self.lo, self.hi)
        size = t.sub_(self.x0).flatten(1).norm(dim=1).clamp_min(1e-12)
        return t.mul_(self.view((self.eps / size).clamp(max=1.0))).add_(self.x0).clamp_(0.0, 1.0)

    def ascend_(self, grad: torch.Tensor) -> torch.Tensor:
        """z = Π(x + η·sign(∇f)) (L∞) or Π(x + η·∇f/‖∇f‖₂) (L2), in place on ``grad``."""
        if self.norm == "linf":
            scale = self.step
            grad.sign_()
        else:
            scale = self.step / (grad.flatten(1).norm(dim=1) + 1e-12)
        return self.project_(torch.addcmul(self.x, grad, self.view(scale), out=grad))


def _gradient(oracle: GradientOracle, x: torch.Tensor, idx: torch.Tensor, loss: Loss, data: torch.Tensor,
              eot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``eot`` queries a row: the logits and ∇f at ``x``, each the mean over
    ``eot`` passes (a gradient APGD may overwrite), and the predicted labels
    (:func:`voted`)."""
    logits, grad = oracle.loss_grad(x, lambda out: loss(out, data), idx=idx)
    if eot == 1:
        return logits, grad.contiguous(), labels_of(logits)
    passes = [logits]
    # one call a pass, not one call on eot copies: a model that draws once per call (a random choice of
    # networks) would give every copy the same draw
    for _ in range(eot - 1):
        more_logits, more_grad = oracle.loss_grad(x, lambda out: loss(out, data), idx=idx)
        passes.append(more_logits)
        grad = grad + more_grad
    return sum(passes) / eot, grad / eot, voted(passes)


def mean_logits(oracle: GradientOracle, x: torch.Tensor, idx: torch.Tensor,
                eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``eot`` queries a row: the mean logits of ``eot`` passes at ``x`` and
    the predicted labels (:func:`voted`)."""
    passes = [oracle.logits(x, idx=idx) for _ in range(eot)]
    return sum(passes) / eot, voted(passes)


def voted(passes: list[torch.Tensor]) -> torch.Tensor:
    """The label strictly more of the passes' top-1 labels give than any
    other, -1 where labels tie (-1 also for a NaN row): with one pass its
    label. The harness judges a randomised model's examples by this rule
    (``verify.predict``), so a sample counts as fooled where the passes
    agree, not where their mean logits happen to cross the boundary."""
    if len(passes) == 1:
        return labels_of(passes[0])
    return most_frequent(torch.stack([labels_of(logits) for logits in passes]))


def apgd_run(
    oracle: GradientOracle,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    data: torch.Tensor,
    loss: Loss,
    *,
    eps: float,
    norm: str,
    steps: int,
    rho: float,
    momentum: float,
    gen: torch.Generator,
    reach: bool = False,
    eot: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run ([CH20] Alg. 1) on the batch ``x`` (oracle rows ``idx``).

    ``loss(logits, data)`` is maximised; ``data`` holds each sample's loss
    arguments (its label, or its label and target). A row is fooled when its
    prediction leaves ``y``, or, with ``reach``, when it equals ``y`` (then
    the target). Returns ``(x_adv, fooled)``: for fooled rows the first
    fooled iterate (with ``eot`` > 1 the last: no row leaves early),
    elsewhere ``x``. Costs each sample at most ``(steps + 1) · eot`` queries.
    """
    found = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    marks = checkpoints(steps)
    start = random_start(x, eps, norm, gen)
    idx = idx.cpu()
    logits, grad, labels = _gradient(oracle, start, idx, loss, data, eot)
    f = loss(logits, data)
    s = _Active(
        eps=eps, norm=norm, pos=torch.arange(len(x), device=x.device), idx=idx, x0=x,
        lo=(x - eps).clamp_(min=0.0), hi=(x + eps).clamp_(max=1.0), y=y, data=data,
        x=start, x_prev=start, x_best=start.clone(), grad_best=grad.clone(),
        step=torch.full((len(x),), 2.0 * eps, device=x.device),
        f_prev=f, f_best=f, f_check=f,
        ups=torch.zeros(len(x), dtype=torch.long, device=x.device),
        halved=torch.zeros(len(x), dtype=torch.bool, device=x.device),
    )
    last_mark = 0
    leave = eot == 1  # with EOT every sample runs all steps, keeping its last fooled iterate
    for k in range(steps + 1):
        hit = (labels == s.y) if reach else (labels != s.y)
        some = bool(hit.any())
        if some:
            found[s.pos[hit]] = s.x[hit]
            fooled[s.pos[hit]] = True
        if k == steps or (leave and hit.all()):
            break
        if some and leave:
            keep = ~hit
            s.keep(keep)
            logits, grad, labels = logits[keep], grad[keep], labels[keep]
        if k > 0:
            f = loss(logits, s.data)
            s.ups += f > s.f_prev
            s.f_prev = f
            better = (f > s.f_best).nonzero().flatten()
            if len(better):
                s.x_best.index_copy_(0, better, s.x.index_select(0, better))
                s.grad_best.index_copy_(0, better, grad.index_select(0, better))
                s.f_best = torch.maximum(f, s.f_best)
            if k in marks:
                halve = (s.ups < rho * (k - last_mark)) | (~s.halved & (s.f_best <= s.f_check))
                s.halved, s.f_check, last_mark = halve, s.f_best, k
                s.ups = torch.zeros_like(s.ups)
                back = halve.nonzero().flatten()
                if len(back):
                    s.step = torch.where(halve, s.step / 2, s.step)
                    s.x.index_copy_(0, back, s.x_best.index_select(0, back))
                    grad.index_copy_(0, back, s.grad_best.index_select(0, back))
                    s.f_prev = torch.where(halve, s.f_best, s.f_prev)
        z = s.ascend_(grad)
        if k > 0:
            z.mul_(momentum).add_(s.x, alpha=2 * (1 - momentum)).sub_(s.x_prev, alpha=1 - momentum)
            s.project_(z)
        s.x_prev, s.x = s.x, z
        if k + 1 == steps:
            logits, labels = mean_logits(oracle, s.x, s.idx, eot)
        else:
            logits, grad, labels = _gradient(oracle, s.x, s.idx, loss, s.data, eot)
    return found, fooled


@dataclass(frozen=True)
class APGDConfig(Attack):
    """Settings shared by APGD and targeted APGD (Alg. 1's ρ and momentum α)."""

    oracle = GradientOracle
    kind = FIXED_EPS
    norms = NORMS
    paper = (
        "Croce and Hein, Reliable evaluation of adversarial robustness with an ensemble "
        "of diverse parameter-free attacks, ICML 2020"
    )

    norm: str = "linf"
    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    momentum: float = 0.75
    eot: int = 1
    """Passes each step's logits and gradient are averaged over (EOT, for a randomised model)."""

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"{self.name} norm must be one of {NORMS}")
        if self.steps < 1 or self.restarts < 1 or self.eot < 1:
            raise ValueError(f"{self.name} needs steps >= 1, restarts >= 1 and eot >= 1")
        if not 0 < self.momentum <= 1 or not 0 < self.rho <= 1:
            raise ValueError(f"{self.name} needs rho and momentum in (0, 1]")


@dataclass(frozen=True)
class APGD(APGDConfig):
    name = "apgd"

    loss: str = "ce"

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"APGD loss must be one of {LOSSES}")

    @property
    def label(self) -> str:
        return f"{self.name}-{self.loss}-{self.norm}"

    @property
    def min_classes(self) -> int:
        """DLR's denominator takes the third-largest logit."""
        return 3 if self.loss == "dlr" else 2

    @property
    def in_default_battery(self) -> bool:
        """APGD-CE runs by default (AutoAttack's standard version); APGD-DLR on request."""
        return self.loss == "ce"

    def __call__(self, oracle: GradientOracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        gen = generator(seed, x.device)
        loss = cross_entropy if self.loss == "ce" else dlr
        x_adv = x.clone()
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            can_pay = oracle.remaining().to(x.device) >= (self.steps + 1) * self.eot
            rows = (~success & can_pay).nonzero().flatten()
            if len(rows) == 0:
                break
            found, fooled = apgd_run(
                oracle, x[rows], y[rows], rows, y[rows], loss, eps=eps, norm=self.norm,
                steps=self.steps, rho=self.rho, momentum=self.momentum, gen=gen, eot=self.eot,
            )
            x_adv[rows[fooled]] = found[fooled]
            success[rows[fooled]] = True
        return AttackResult(x_adv=x_adv, success=success, queries=oracle.queries())
