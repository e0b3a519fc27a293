"""NES: PGD on a zeroth-order gradient estimate, L∞ and L2 (soft-label).

Ilyas, Engstrom, Athalye and Lin, "Black-box Adversarial Attacks with
Limited Queries and Information", ICML 2018 [IEAL18],
https://arxiv.org/abs/1804.08598, with the finite-difference estimator of
Chen, Zhang, Sharma, Yi and Hsieh, "ZOO: Zeroth Order Optimization Based
Black-box Attacks to Deep Neural Networks without Training Substitute
Models", AISec 2017 [CZS17]. The model's gradient is never seen: it is
estimated from probabilities alone, and projected gradient descent (PGD,
[MMS18]) is run on the estimate.

Steps, all batched over the samples with a compact working set of those
still attacked:

* the loss h, on log-probabilities (``ScoreOracle.log_probs``: the log of
  the probabilities, clamped away from 0; at white-box access the exact
  log-softmax of the logits): untargeted, the margin
  ``h = log p_y - max_{j≠y} log p_j``; targeted (``target=t``),
  ``h = max_{j≠t} log p_j - log p_t``. PGD *minimises* h, and a sample
  succeeds as soon as a checked iterate has ``h < 0`` (misclassified, or
  classified as ``t``). [IEAL18] run NES on the cross-entropy of the
  (target) class; the margin is the loss of [CZS17] Eq. (4) (with κ = 0),
  written on log-probabilities as a soft-label attacker can.
* the estimator: the one-sided random-direction difference of the lecture
  notes, ∇h ≈ (h(x+βu) - h(x))/β · u, made antithetic as NES does
  ([IEAL18] Algorithm 1, "antithetic sampling", §2.2; the symmetric
  difference quotient of [CZS17] Eq. (6) along a random direction)::

      ĝ = 1/(2qβ) · Σ_{i=1..q} (h(x + βu_i) - h(x - βu_i)) · u_i,
      u_i ~ N(0, I_d) independently.

  Every probe is clipped to [0,1], as any image an attacker can send is
  (the estimate keeps u_i: at a saturated pixel the difference then sees
  one side only). On the example CNN (94 digits, budget 5,000, seeds 0-3)
  clipping the probes changed success by -2 to +3 samples against
  unclipped ones, L∞ ε = 0.15 and L2 ε = 1.5.
* the step, PGD on the estimate ([MMS18] Eq. 2, descending since h is
  minimised; [IEAL18] Algorithm 2 uses the same sign step for L∞):
  L∞: ``x ← Π(x - α·sign(ĝ))``; L2: ``x ← Π(x - α·ĝ/‖ĝ‖₂)``, with Π the
  projection onto the ε-ball around the clean image intersected with [0,1].
* momentum, as in [IEAL18]'s reference code (momentum 0.9): the step uses
  ``g ← μ·g + (1-μ)·ĝ`` (g = 0 at the start) in place of ĝ. Averaging the
  estimates over iterations is cheap variance reduction: on the tiny MNIST
  CNN (100 digits, 2000 queries) it raised the L∞ ε = 0.1 success rate from
  0.33 to 0.42 and halved the queries at ε = 0.3; ``momentum=0`` gives plain
  PGD on ĝ.
* start: at the clean image x, as [IEAL18] do (their Algorithm 2 starts at
  the image itself). The clean image is then the first checked iterate,
  so a sample the model already misclassifies is reported by the first
  check, for one query and without being moved (a random start would move
  it for nothing), and the first estimate is taken at x.

Query cost, exact. An iteration is two oracle calls, check first as in
[IEAL18]'s reference code (which tests the iterate before it draws the
samples of the estimate):

* the check: the current iterate of every active sample, one row each, all
  in one call. Its loss h detects success and drives the step-size
  schedule. A sample whose iterate is adversarial stops there, and so does
  one that cannot pay its 2q probes (or, when the oracle has no budget,
  one that has taken ``max_iters`` steps);
* the probes: the 2q antithetic probes of every sample still going, in one
  call (or, where they hold more than ``max_values`` input values, in calls
  of as many samples as fit: 3,057 MNIST digits, 8 images of
  3 × 224 × 224; the probes of a call are drawn when it is made).

So a sample pays 1 to be checked and 2q more only when the check found it
not adversarial: a sample whose k-th checked iterate is adversarial (the
clean image being the first) has spent exactly ``(k-1)·(2q+1) + 1``
queries, never the 2q probes of an iterate that needed none. A sample is
checked while it has a query left and probed while it has 2q, so with a
budget B (and a fresh oracle) one that never succeeds spends
``k·(2q+1) + [B > k·(2q+1)]`` queries with ``k = ⌊B/(2q+1)⌋``: B when B is
a multiple of 2q+1 (its last step then goes unchecked), else
``k·(2q+1) + 1``, leaving the rest of the budget, fewer than 2q queries,
unspent (B = 500 on MNIST, q = 14: 494). Without a budget, ``max_iters``
steps cost ``max_iters·(2q+1) + 1``. ``eps = 0`` costs one query (the clean
image) per sample. The check is a call of its own, one row a sample: one
more model call an iteration than probing the iterate with its probes,
for the 2q queries a success no longer pays.

Step size: α₀ = ``alpha``·ε (ε/4 by default) for both norms, so that four
steps cross the ball: large enough that a 2000-query budget (about 60
iterations on MNIST) reaches the boundary of the ball, small enough that
the estimate's noise does not throw the iterate from corner to corner.
It decays with the plateau rule of [IEAL18] (§3.1 and their reference
code: "we anneal the learning rate when the loss plateaus"), here per
sample and on the exact loss of the checked iterates: when h has not
improved on its best value for ``patience`` consecutive iterations α is
halved, never below α₀/32. The reference code's fixed learning rate (0.01
for ε = 0.05 on ImageNet) is not scale-free; α relative to ε is.

Defaults of q and β from the input dimension d = C·H·W
(:func:`default_q_beta`). The probe βu has expected L2 size β·√d; β is set
so that β·√d = 0.5, clipped to [0.001, 0.01]. On 299×299×3 inputs
([IEAL18]'s InceptionV3) this gives their σ = 0.001; on MNIST 0.01 and on
CIFAR-10 0.009, differences of log-probabilities far above float32
rounding. q = ⌈√d / 2⌉ clipped to [10, 25]: the estimate's alignment with
the gradient grows like √(q/d), so larger inputs get more directions, up to
[IEAL18]'s population of n = 50 samples (25 antithetic pairs, 51 queries an
iteration); MNIST (d = 784) gets q = 14, 29 queries an iteration. On the
tiny MNIST CNN success at 2000 queries was flat in q ∈ [5, 25] and
β ∈ [0.001, 0.05] (within ±0.05). Explicit ``q`` / ``beta`` override the
rule.

Memory: the probes hold 2q images per active sample at once (about
0.8 MB per sample on MNIST, 1.2 GB for 32 ImageNet images at q = 25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...access import Access
from ...oracles import ScoreOracle, items_within
from ..base import FIXED_EPS, NORMS, Attack, AttackResult, check_call, generator, project
from .margins import log_margin

_MIN_ALPHA_FRACTION = 1 / 32
"""α never drops below α₀ times this (five halvings)."""


def default_q_beta(d: int) -> tuple[int, float]:
    """The default number of antithetic pairs q and probe size β for inputs
    of dimension ``d`` (see the module docstring for the rule)."""
    if d < 1:
        raise ValueError(f"input dimension must be >= 1, got {d}")
    root = math.sqrt(d)
    q = min(max(math.ceil(root / 2), 10), 25)
    beta = min(max(0.5 / root, 0.001), 0.01)
    return q, beta


def _loss(logp: torch.Tensor, cls: torch.Tensor, sign: float) -> torch.Tensor:
    """``sign · (log p_c - max_{j≠c} log p_j)`` per row (< 0: success), from log-probabilities."""
    own, others = log_margin(logp, cls)
    return sign * (own - others)


@dataclass(frozen=True)
class NES(Attack):
    """NES gradient estimation + PGD (L∞ or L2), a fixed-ε soft-label attack."""

    name: ClassVar[str] = "nes"
    oracle: ClassVar[type] = ScoreOracle
    kind: ClassVar[str] = FIXED_EPS
    norms: ClassVar[tuple[str, ...]] = NORMS
    targeted: ClassVar[bool] = True
    default_up_to: ClassVar[Access] = Access.SOFT_LABEL
    paper: ClassVar[str] = (
        "Ilyas et al., Black-box Adversarial Attacks with Limited Queries and "
        "Information, ICML 2018"
    )

    norm: str = "linf"
    q: int | None = None
    """Antithetic pairs per estimate (2q probes); ``None``: from d."""
    beta: float | None = None
    """Probe size (std of each probe coordinate); ``None``: from d."""
    alpha: float = 0.25
    """Initial step size as a fraction of ε."""
    momentum: float = 0.9
    """Weight of the previous direction: g ← μ·g + (1-μ)·ĝ ([IEAL18] code)."""
    patience: int = 5
    """Iterations without a new best loss before α is halved."""
    max_iters: int = 1000
    """Steps at most (the last one then checked), used only when the oracle has no budget."""
    max_values: int = 2**26
    """Input values of probes per oracle call, at most (at least one sample's
    2q images): it bounds the memory the probes take (256 MB per copy). A
    check holds one image a sample, no more than the batch itself."""

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"NES supports norms {self.norms}, got {self.norm!r}")
        if self.q is not None and (isinstance(self.q, bool) or int(self.q) != self.q or self.q < 1):
            raise ValueError(f"q must be an integer >= 1, got {self.q}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        if self.max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {self.max_values}")

    def _q_beta(self, d: int) -> tuple[int, float]:
        """q and β for inputs of dimension ``d``: the fields, else the defaults."""
        q_default, beta_default = default_q_beta(d)
        q = int(self.q) if self.q is not None else q_default
        return q, float(self.beta) if self.beta is not None else beta_default

    def step_cost(self, shape: tuple[int, ...]) -> int:
        """One step: the check of the iterate and its 2q probes."""
        return 2 * self._q_beta(math.prod(shape))[0] + 1

    def __call__(self, oracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        device = oracle.device
        gen = generator(seed, device)
        x = x.to(device)
        q, beta = self._q_beta(x[0].numel())
        cls = (y if target is None else target).to(device).long()
        sign = 1.0 if target is None else -1.0
        alpha0 = self.alpha * eps

        # ``x_adv`` is each sample's last checked iterate. The working set
        # holds the samples still attacked, at the iterate they have yet to
        # check, each with a query left to check it.
        x_adv = x.clone()
        success = torch.zeros(len(x), dtype=torch.bool, device=device)
        work = _Working.start((oracle.remaining().to(device) >= 1).nonzero().squeeze(1), x, cls, alpha0, q)
        max_steps = self.max_iters if oracle.budget is None else math.inf
        steps = 0
        while len(work.rows):
            # The check: the iterates, one oracle call, one row a sample.
            h0 = _loss(oracle.log_probs(work.x, idx=work.rows_cpu).to(device), work.cls, sign)
            x_adv[work.rows] = work.x
            success[work.rows] = h0 < 0
            # A sample goes on to its probes unless its iterate succeeded, it
            # cannot pay them, or (without a budget) it has taken max_iters steps.
            # With eps = 0 no step can move the image: the check is all.
            left = oracle.remaining()[work.rows_cpu].to(device)
            go_on = (h0 >= 0) & (left >= 2 * q) & (eps > 0 and steps < max_steps)
            if not bool(go_on.all()):
                work, h0, left = work.select(go_on), h0[go_on], left[go_on]
                if not len(work.rows):
                    break

            # Plateau decay of α on the exact loss of the iterate.
            improved = h0 < work.best
            work.best = torch.where(improved, h0, work.best)
            work.stall = torch.where(improved, torch.zeros_like(work.stall), work.stall + 1)
            drop = work.stall >= self.patience
            work.alpha = torch.where(
                drop, (work.alpha / 2).clamp_min(alpha0 * _MIN_ALPHA_FRACTION), work.alpha
            )
            work.stall = torch.where(drop, torch.zeros_like(work.stall), work.stall)

            # The probes (one oracle call, or one per group of samples where
            # they would hold more than max_values), and the antithetic NES
            # estimate from them.
            grad = self._estimate(oracle, work, q, beta, sign, gen)

            # The PGD step on the estimate (descending h).
            if self.momentum > 0:
                grad = self.momentum * work.g + (1 - self.momentum) * grad
                work.g = grad
            if self.norm == "linf":
                step = grad.sign()
            else:
                size = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
                step = grad / size.view(-1, *([1] * (grad.dim() - 1)))
            moved = work.x - work.alpha.view(-1, *([1] * (grad.dim() - 1))) * step
            work.x = project(moved, work.x0, eps, self.norm)
            steps += 1
            # A sample whose probes took its last query (its budget a multiple
            # of 2q + 1) stops at its last checked iterate, its step unchecked.
            can_check = left > 2 * q
            if not bool(can_check.all()):
                work = work.select(can_check)

        return AttackResult(x_adv=x_adv, success=success, queries=oracle.queries())

    def _estimate(self, oracle, work: _Working, q: int, beta: float, sign: float, gen) -> torch.Tensor:
        """The antithetic estimate ``Σ (h(x+βu) − h(x−βu)) u / (2qβ)`` at each
        iterate of the working set, from its 2q probes ``x ± βu`` (clipped
        to [0,1]); as many samples a call as ``max_values`` allows."""
        per_call = items_within(self.max_values, 2 * q * work.x[0].numel())
        grads = []
        for first in range(0, len(work.rows), per_call):
            centre = work.x[first : first + per_call, None]
            u = torch.randn((len(centre), q, *centre.shape[2:]), generator=gen, device=centre.device)
            probes = torch.cat([centre + beta * u, centre - beta * u], dim=1).clamp_(0.0, 1.0)
            rows = slice(first * 2 * q, (first + len(centre)) * 2 * q)
            logp = oracle.log_probs(probes.flatten(0, 1), idx=work.probe_idx_cpu[rows]).to(work.x.device)
            h = _loss(logp, work.probe_cls[rows], sign).view(len(centre), 2 * q)
            weights = (h[:, :q] - h[:, q:]) / (2 * q * beta)
            grads.append(torch.einsum("mq,mq...->m...", weights, u))
        return torch.cat(grads)


@dataclass
class _Working:
    """Compact state of the samples an NES run still attacks."""

    rows: torch.Tensor
    rows_cpu: torch.Tensor
    """Oracle ``idx`` of a check: each sample once."""
    probe_idx_cpu: torch.Tensor
    """Oracle ``idx`` of the probes: each sample, 2q times."""
    cls: torch.Tensor
    probe_cls: torch.Tensor
    x0: torch.Tensor
    x: torch.Tensor
    """The iterate the next check asks about."""
    alpha: torch.Tensor
    best: torch.Tensor
    stall: torch.Tensor
    g: torch.Tensor
    q: int

    @classmethod
    def start(cls, rows, x, label, alpha0: float, q: int) -> _Working:
        """The samples ``rows`` at their clean images, with step size ``alpha0``."""
        m = len(rows)
        return cls._of(
            rows, label[rows], x[rows], x[rows], torch.full((m,), alpha0, device=x.device),
            torch.full((m,), float("inf"), device=x.device),
            torch.zeros(m, dtype=torch.long, device=x.device), torch.zeros_like(x[rows]), q,
        )

    @classmethod
    def _of(cls, rows, label, x0, x, alpha, best, stall, g, q: int) -> _Working:
        rows_cpu = rows.cpu()
        return cls(
            rows=rows, rows_cpu=rows_cpu, probe_idx_cpu=rows_cpu.repeat_interleave(2 * q), cls=label,
            probe_cls=label.repeat_interleave(2 * q), x0=x0, x=x, alpha=alpha, best=best, stall=stall,
            g=g, q=q,
        )

    def select(self, keep: torch.Tensor) -> _Working:
        """The samples ``keep`` (a mask over the working set)."""
        return self._of(
            self.rows[keep], self.cls[keep], self.x0[keep], self.x[keep], self.alpha[keep],
            self.best[keep], self.stall[keep], self.g[keep], self.q,
        )
