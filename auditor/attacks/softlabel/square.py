"""Square Attack, L∞ and L2 (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020).

[ACFH20] "Square Attack: a query-efficient black-box adversarial attack via
random search", https://arxiv.org/abs/1912.00049. A score-based random
search: each step proposes a perturbation that differs from the current best
one only inside random square windows, queries the model once and keeps the
proposal if the loss went down.

Steps of Algorithm 1 (random search), all batched over the samples with
per-sample windows and a compact working set of those still attacked, one
oracle call per iteration for all of them:

* the loss L, untargeted: the margin ``log p_y - max_{j≠y} log p_j`` (equal
  to the logit margin, since softmax preserves logit differences), or
  ``"ce"``, the negative cross-entropy ``log p_y`` that AutoAttack's version
  offers. Targeted (``target=t``): the reference code's targeted loss, the
  cross-entropy towards the target ``-log p_t``, whatever ``loss`` says (both
  the reference code and AutoAttack switch to it for targeted runs).
  Success is judged on the margin, ``log p_y - max_{j≠y} log p_j < 0``
  untargeted, ``max_{j≠t} log p_j - log p_t < 0`` targeted (the target is
  the strict argmax): such a sample leaves the active set (line 2) and spends
  nothing more.
* line 3, the side length from the reference code's schedule of ``p`` (the
  fraction of pixels changed): ``p_init`` halved at queries 10, 50, 200,
  500, 1000, 2000, 4000, 6000 and 8000 of 10,000; ``s = round(sqrt(p·H·W))``.
  The reference code stretches the schedule to the budget; AutoAttack's
  standard evaluation (``resc_schedule=False``, 5,000 queries) runs its
  first half unstretched. Here L∞ stretches it to the budget, and L2 to
  the budget only above 10,000 queries (``schedule_queries``), since each
  rule did better on its own norm (seeds 0-2, those of 292 MNIST test
  digits each model classifies correctly):

  - L2 ε = 2 on a CNN trained with FGSM-RS at L∞ ε = 0.2: stretched, the
    windows shrink too early, and 24.5 % of the digits were broken with
    1,000 queries and 40.0 % with 5,000; unstretched, 30.3 % and 41.6 %,
    and with the corners and the fill described below 31.3 % and 42.6 %
    (AutoAttack's Square: 31.5 % and 42.5 %). On the example CNN at ε = 1.5
    and 1,000 queries: 52.9 % stretched, 55.6 % unstretched.
  - L∞ with 1,000 queries: stretched, 76.4 % on the example CNN at ε = 0.1
    and 13.5 % on the trained one at ε = 0.2; unstretched, 71.7 % and
    11.8 %.
* lines 6-7, one query per active sample with budget left; the proposal is
  accepted where its loss is strictly lower or where it succeeds
  (AutoAttack's rule: under ``"ce"`` a success need not lower ``log p_y``).

L∞ (Algorithm 2 sampling distribution):

* line 1, initialisation: the vertical stripes, every column set to +ε or
  -ε independently per channel, clipped to [0,1]; one query per sample.
* line 3: ``s`` clipped to ``[1, min(H, W)]``.
* line 4, δ ~ P (Algorithm 2): a random window per sample; inside it δ is
  set to ±ε, one sign per channel. The reference code redraws the signs
  while the (clipped) image would stay unchanged; since at most one sign
  vector can leave a window unchanged, that draw is made exactly in one
  step by flipping a uniform non-empty subset of its channels.
* line 5, the candidate is projected onto the ε-ball and [0,1].

L2 (Algorithm 3 sampling distribution):

* line 1, initialisation (§4.1 and the Appendix; ``square_attack_l2`` in
  the reference code): a 5 × 5 grid of squares of side ``min(H, W) // 5``,
  centred, each holding the "meta pseudo-Gaussian" bump η (below) with a
  random sign per channel, the whole rescaled to ‖δ‖₂ = ε and clipped to
  [0,1] (:func:`l2_init`); one query per sample.
* η, the bump of §4.1 (Eq. 5): on a rectangle, ``Σ_{k ≥ d} 1/(k+1)²`` at
  Chebyshev distance d from its centre (:func:`pseudo_gaussian`); the s × s
  meta bump puts one on the top ``s // 2`` rows and its negative on the
  rest, at unit L2 norm, transposed with probability 1/2
  (:func:`meta_pseudo_gaussian`).
* line 3: the reference code's L2 rule, ``s`` at least 3 and odd (then at
  most ``min(H, W)``).
* line 4, δ ~ P (Algorithm 3, :func:`l2_proposal`): two windows W1 and W2
  of side s per sample. Per channel, W1 becomes ``η·sign +
  δ_W1/‖δ_W1‖``, rescaled to ``sqrt(‖δ_{W1∪W2}‖² + max(ε² - ‖δ‖², 0)/c)``
  with ‖δ_{W1∪W2}‖ the norm of both windows over *all* channels, and the
  rest of W2 becomes 0, as AutoAttack does (the original repository's
  ``square_attack_l2`` takes that norm per channel instead; the two agree
  for one channel). With one channel the mass of both windows moves into
  W1, plus the norm the current perturbation lacks (what clipping to [0,1]
  took); with c
  channels each channel's W1 gets the whole windows' mass, so line 5's
  rescale concentrates the perturbation in W1 more strongly.
* line 5: the whole δ rescaled to ‖δ‖₂ = ε, then clipped to [0,1], which can
  only shrink it. Float32 round-off can leave ‖δ‖₂ a few 1e-7 above ε.

Several proposals per step (not in the paper; ``fill_values``,
``max_proposals``, ``hits_per_step``): as long as a call stays within
``fill_values`` input values (64 MNIST digits; 16 images of 3 × 32 × 32),
so from 32 MNIST digits attacked down, a step may draw k proposals per
sample from its current point, send all of them in one oracle call (k
counted queries per sample) and keep the best if it improves (a
successful one first). The p
schedule follows the queries spent, so the windows shrink as in the paper.
k proposals from one point can improve it once, where k sequential steps
could improve it k times; but when a proposal improves with probability r,
k sequential steps improve about k·r times, so for k·r well below one
nothing is lost. The run keeps an estimate of r (the share of proposals that
improved, over about the last 500 proposals, starting at 1) and takes
k = ⌊``hits_per_step`` / r⌋ proposals, at most ``fill_values`` values'
worth and ``max_proposals``: one proposal while many improve (the start of a
run), more in the tail, where the hard samples spend most of the budget and
acceptance falls to 2-8 % on the example CNN. Without them the tail is
thousands of oracle calls of a few images each, where each call's fixed
cost dwarfs its compute; with them it is k times fewer, larger calls.
Calls are filled only up to where the model's throughput stops growing
with the batch: the example CNN's onnxruntime session answers 111,641
queries per second in calls of 32 digits, 128,249 in calls of 64 and
137,405 in calls of 256. Past that, proposals from one point buy little
time and lose progress. On the FGSM-RS CNN (above; L2 ε = 2, 5,000
queries, seeds 0-5), filling calls up to 512 digits broke 41.8 % of the
digits, up to 64 digits 42.4 % (seeds 0-2: 42.6 %, as one proposal per
step did; AutoAttack's Square 42.5 %). The wider fill took about 10 % less
wall time there, and a third less on the example CNN (278 digits: 4 s
against 6 s).
The fill is counted in input values, not images, because a model's compute
per image grows with its input (on a 3 × 32 × 32 CNN, 188 images, L2
ε = 1, seeds 0-2: mean queries to success 4 % higher with up to 512 images
per call than with one proposal per step, in the same wall time), so
larger inputs fill calls with fewer images: 16 of 3 × 32 × 32, and none
of 3 × 224 × 224, where a step is one proposal per sample as in the paper.

Defaults: ``p_init = 0.8`` for both norms. For L∞ it is the value the
reference repository (``max-andr/square-attack``, README) runs on the
adversarially trained MNIST model at ε = 0.3, and AutoAttack's default; the
reference code's command-line default 0.05 is its choice for the undefended
ImageNet models. For L2 the README gives no MNIST/CIFAR setting (it points
to the paper's supplement); the reference code's ``--p`` help gives 0.1 as
the "L2 standard" (beside 0.05, its ImageNet value, for L∞) and says that
robust models need a higher p; AutoAttack uses 0.8 for L2 as well. On the
tests' tiny MNIST CNN (32 digits, ε = 2.0, 1000 queries, seeds 0-5) 0.8 did
better than 0.1: 74 % vs 66 % success on average, 160 vs 196 mean queries
to success (a direct transcription of the reference loop, seeds 0-2: 75 %
vs 67 %), so one default serves both norms. Without an oracle budget the
schedule assumes ``n_iters = 10000`` queries, the reference code's
``--n_iter`` default, and stops there.

Window corners are drawn as the reference code and AutoAttack draw them,
from ``randint(0, H - s)``: the last row and column are in a window only
when it spans the image. On MNIST, whose digits are centred, that did
better for L2 than corners uniform over all ``H - s + 1`` positions (FGSM-RS
CNN above, 1,000 queries, seeds 0-5: 32.1 % against 31.0 % broken) and
made no difference for L∞.

Deviations from the reference code: its L∞ code caps ``s`` at ``H - 1``;
here, as in AutoAttack, a window may span the image (``s`` at most
``min(H, W)``). The reference L2 code draws one pair of windows, one bump
orientation and, in the initialisation, one orientation per square for the
whole batch; here each sample draws its own. Its initial grid is laid out
for square images of side at least 25 (for some smaller sides its last
squares run off the image); here the grid is at most 5 × 5 squares of side
``max(min(H, W) // 5, 1)`` that always fit, which is the same grid for
square images of side 25 or more.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import ClassVar

import torch

from ...oracles import ScoreOracle
from ..base import FIXED_EPS, Attack, AttackResult, check_call, generator
from .margins import log_margin

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_LOSSES = ("margin", "ce")
_ACCEPTANCE_WINDOW = 500
"""Proposals the acceptance estimate averages over, roughly."""
_L2_SCHEDULE_QUERIES = 10000
"""Queries the L2 p schedule spans at least (AutoAttack's standard evaluation)."""


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Piecewise-constant schedule of ``p`` (Alg. 1 line 3, reference code)."""
    scaled = int(it / n_iters * 10000)
    halvings = bisect_left(_SCHEDULE, scaled)  # the bounds below ``scaled``
    return p_init / 2**halvings


def _margin_and_loss(
    logp: torch.Tensor, labels: torch.Tensor, loss: str, targeted: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row margin (negative exactly on success) and the loss to minimise,
    from log-probabilities ``logp``.

    Untargeted (``labels`` = y): margin ``log p_y - max_{j≠y} log p_j``, loss
    the margin or ``log p_y``. Targeted (``labels`` = t): margin
    ``max_{j≠t} log p_j - log p_t``, loss the cross-entropy ``-log p_t``.
    """
    own, others = log_margin(logp, labels)
    if targeted:
        return others - own, -own
    margin = own - others
    return margin, (margin if loss == "margin" else own)


def pseudo_gaussian(rows: int, cols: int, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The pseudo-Gaussian bump on a ``rows`` × ``cols`` rectangle, unit L2 norm.

    A sum of nested rectangles centred at ``(rows // 2, cols // 2)``, the k-th
    (k = 0, 1, …, of half-side k) weighted ``1 / (k+1)²``: a cell at Chebyshev
    distance d from the centre holds ``Σ_{k ≥ d} 1/(k+1)²`` ([ACFH20] §4.1,
    Eq. 5; ``pseudo_gaussian_pert_rectangles`` in the reference code).
    """
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, dtype=dtype, device=device)
    k = max(rows, cols) // 2 + 1
    weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{k ≥ d} weights[k]
    di = (torch.arange(rows) - rows // 2).abs()
    dj = (torch.arange(cols) - cols // 2).abs()
    bump = tail[torch.maximum(di[:, None], dj[None, :])]
    return (bump / bump.norm()).to(dtype=dtype, device=device)


def meta_pseudo_gaussian(s: int, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The s × s "meta" bump η of [ACFH20] §4.1: a pseudo-Gaussian bump on the
    top ``s // 2`` rows, minus one on the other rows, unit L2 norm. The
    reference code also transposes it with probability 1/2; callers draw that."""
    bump = torch.cat(
        [
            pseudo_gaussian(s // 2, s, dtype=torch.float64),
            -pseudo_gaussian(s - s // 2, s, dtype=torch.float64),
        ]
    )
    return (bump / bump.norm()).to(dtype=dtype, device=device)


def l2_init(
    n: int,
    c: int,
    h: int,
    w: int,
    eps: float,
    gen: torch.Generator,
    *,
    dtype=torch.float32,
    device="cpu",
) -> torch.Tensor:
    """The L2 initialisation ([ACFH20] §4.1/Appendix), before clipping.

    A grid of (at most) 5 × 5 squares of side ``s = max(min(H, W) // 5, 1)``,
    centred in the image, each holding the meta pseudo-Gaussian bump
    (transposed with probability 1/2, per sample and square) with a random
    sign per channel; zero elsewhere; the whole rescaled to ‖δ‖₂ = ε.
    """
    s = max(min(h, w) // 5, 1)
    nh, nw = min(5, h // s), min(5, w // s)
    top, left = (h - nh * s) // 2, (w - nw * s) // 2
    bump = meta_pseudo_gaussian(s, dtype=dtype, device=device)
    transposed = torch.randint(0, 2, (n, 1, nh, nw, 1, 1), generator=gen, device=device).bool()
    signs = _signs((n, c, nh, nw, 1, 1), gen, bump)
    tiles = torch.where(transposed, bump.T, bump) * signs  # (n, c, nh, nw, s, s)
    delta = torch.zeros(n, c, h, w, dtype=dtype, device=device)
    grid = tiles.permute(0, 1, 2, 4, 3, 5).reshape(n, c, nh * s, nw * s)
    delta[:, :, top : top + nh * s, left : left + nw * s] = grid
    size = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / size).view(n, 1, 1, 1)


def l2_proposal(
    delta: torch.Tensor,
    corner: torch.Tensor,
    bump: torch.Tensor,
    eps: float,
    norm2: torch.Tensor | None = None,
) -> torch.Tensor:
    """One draw of the L2 sampling distribution ([ACFH20] Algorithm 3).

    ``delta`` (m, c, H, W) is the current (clipped) perturbation, ``corner``
    (m, 2, 2) the (row, column) of the top-left corners of the windows W1
    and W2 of side s, ``bump`` (m, c, s, s) the signed bump η per sample and
    channel. Per channel, W1 gets ``η + δ_W1 / ‖δ_W1‖`` rescaled to norm
    ``sqrt(‖δ_{W1∪W2}‖² + max(ε² - ‖δ‖², 0) / c)``, where ‖δ_{W1∪W2}‖ is
    the norm of both windows over all channels (AutoAttack's
    ``norms_windows``), and the rest of W2 is zeroed. With one channel this
    moves the mass of both windows into W1, plus the norm that ``delta``
    lacks (the part clipping took). ``norm2`` is ‖δ‖₂² per row, if the
    caller has it. Writes the new perturbation, before the rescale to
    ‖δ‖₂ = ε, into ``delta`` and returns it.
    """
    m, c, h, w = delta.shape
    s = bump.shape[-1]
    if norm2 is None:
        flat = delta.view(m, c * h * w)
        norm2 = torch.linalg.vecdot(flat, flat)
    start = corner[:, :, 0] * w + corner[:, :, 1]  # (m, window): flat index of the corner
    windows = (start[:, :, None] + _window_offsets(s, w, delta.device)).view(m, 1, 2 * s * s)
    index = windows.expand(m, c, 2 * s * s)
    new = delta.view(m, c, h * w)
    in_w1, in_w2 = new.gather(2, index).split(s * s, dim=2)
    new.scatter_(2, index[:, :, s * s :], 0.0)
    # W1 read again after W2 is zeroed: its pixels outside W2, so the two
    # give the mass of W1 ∪ W2 without a full-image mask
    w1_only = new.gather(2, index[:, :, : s * s])
    norm_union = (torch.linalg.vecdot(in_w2, in_w2) + w1_only.square().sum(2)).sum(1, keepdim=True)
    content = bump.reshape(m, c, s * s) + in_w1 / (in_w1.square().sum(2, keepdim=True).sqrt() + 1e-12)
    target = ((eps**2 - norm2).clamp_min(0.0)[:, None] / c + norm_union).sqrt()
    scale = target / torch.linalg.vector_norm(content, dim=2).clamp_min(1e-12)
    new.scatter_(2, index[:, :, : s * s], content * scale[:, :, None])
    return delta


@lru_cache(maxsize=64)
def _window_offsets(s: int, w: int, device: torch.device) -> torch.Tensor:
    """Flat pixel offsets (s², row-major) of an s × s window from its top-left
    corner, in images of width ``w``."""
    span = torch.arange(s, device=device)
    return (span[:, None] * w + span).view(s * s)


@dataclass(frozen=True)
class SquareAttack(Attack):
    """Square Attack (L∞ and L2), a fixed-ε random search on scores."""

    name: ClassVar[str] = "square"
    oracle: ClassVar[type] = ScoreOracle
    kind: ClassVar[str] = FIXED_EPS
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    paper: ClassVar[str] = "Andriushchenko et al., Square Attack, ECCV 2020"
    targeted: ClassVar[bool] = True

    norm: str = "linf"
    p_init: float = 0.8
    """Initial fraction of pixels changed (both norms; see the module docstring)."""
    loss: str = "margin"
    """Untargeted loss, ``"margin"`` or ``"ce"``; a targeted run always uses CE."""
    n_iters: int = 10000
    """Query budget per sample assumed when the oracle has none."""
    schedule_queries: int | None = None
    """Queries the p schedule spans at least; a larger budget stretches it
    to the budget (see line 3 above). 1 stretches it to every budget, as the
    reference code does. None: 1 for L∞, 10,000 for L2 (results record
    the value that ran)."""
    fill_values: int = 64 * 28 * 28
    """Input values per oracle call the proposals fill up to: while the
    samples attacked hold fewer, a step may draw several proposals per
    sample (see "Several proposals per step" above). 1 turns it off."""
    max_proposals: int = 32
    """Proposals per sample and step at most."""
    hits_per_step: float = 0.3
    """Improving proposals per sample and step that k is sized for: k =
    ⌊hits_per_step / r⌋ for an acceptance rate r."""

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"Square Attack supports norms {self.norms}, got {self.norm!r}")
        if not 0.0 < self.p_init <= 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")
        if self.loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {self.loss!r}")
        for name in ("n_iters", "schedule_queries", "fill_values", "max_proposals"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.hits_per_step <= 1.0:
            raise ValueError(f"hits_per_step must be in (0, 1], got {self.hits_per_step}")

    def _schedule_floor(self) -> int:
        """``schedule_queries``, or where it is None the norm's choice."""
        if self.schedule_queries is not None:
            return self.schedule_queries
        return _L2_SCHEDULE_QUERIES if self.norm == "l2" else 1

    def as_run(self, num_classes: int, targeted: bool) -> "SquareAttack":
        """With ``schedule_queries`` resolved, so the record says which schedule ran."""
        return replace(self, schedule_queries=self._schedule_floor())

    def _schedule_length(self, budget: int) -> int:
        """Queries the p schedule spans for a budget (Alg. 1 line 3)."""
        return max(budget, self._schedule_floor())

    def _proposals(self, m: int, size: int, acceptance: float, left: int, queries_left: int) -> int:
        """Proposals per sample this step, for ``m`` samples of ``size`` input
        values: ⌊hits_per_step / acceptance⌋, at most ``fill_values`` values
        in all and ``max_proposals``, and never more than any sample can pay."""
        wanted = int(self.hits_per_step / max(acceptance, 1e-6) + 1e-9)
        fill = self.fill_values // size // m
        return max(1, min(wanted, self.max_proposals, fill, left, queries_left))

    def __call__(self, oracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        device = oracle.device
        gen = generator(seed, device)
        x = x.to(device)
        y = y.to(device)
        targeted = target is not None
        labels = (target if targeted else y).to(device=device, dtype=torch.long)
        n_iters = self.n_iters if oracle.budget is None else oracle.budget
        run = self._linf if self.norm == "linf" else self._l2
        search = run(oracle, x, labels, eps, gen, n_iters, targeted)
        return AttackResult(
            x_adv=search.x, success=search.queried & (search.margin < 0), queries=oracle.queries()
        )

    def _judge(self, oracle, work: "_Working", x_new, k: int, targeted: bool):
        """Alg. 1 lines 6-7 for k proposals per row: query them all (row i's
        are rows ``i·k … i·k+k-1`` of ``x_new``) and pick each row's best, the
        first successful one if any, else the one of lowest loss. Returns its
        index into ``x_new``, whether it improves the row, its loss and margin."""
        _, rows, labels = work.spread(k)
        margin, loss = _margin_and_loss(oracle.log_probs(x_new, idx=rows), labels, self.loss, targeted)
        m = len(work.rows)
        score = torch.where(margin < 0, -torch.inf, loss).view(m, k)
        best = torch.arange(m, device=loss.device) * k + score.argmin(dim=1)
        loss, margin = loss[best], margin[best]
        return best, work.improved(loss, margin), loss, margin

    def _linf(self, oracle, x, labels, eps, gen, n_iters, targeted):
        """Algorithm 1 with the L∞ sampling distribution (Algorithm 2)."""
        device = x.device
        n, c, h, w = x.shape

        # The ε-box ∩ [0,1] per pixel: a coordinate set to ±ε and projected
        # (line 5) is exactly ``upper`` or ``lower``.
        lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        search = _Search.begin(x)

        # Alg. 1 line 1: vertical-stripe initialisation, one query each.
        can = oracle.remaining().to(device) >= 1
        rows = can.nonzero().squeeze(1)
        if len(rows):
            stripes = _signs((len(rows), c, 1, w), gen, x) > 0
            x_init = torch.where(stripes, upper[rows], lower[rows])
            margin, loss = _margin_and_loss(
                oracle.log_probs(x_init, idx=rows.cpu()), labels[rows], self.loss, targeted
            )
            search.start_at(rows, x_init, loss, margin)

        span = torch.arange(max(h, w), device=device)
        channel_bits = torch.arange(c, device=device)
        # The loop works on a compact copy of the samples still attacked and
        # rebuilds it only when one succeeds or a budget runs out, so an
        # iteration costs a handful of tensor operations besides its query.
        work = None
        # With eps = 0 no window can change the image: the initial query is all.
        it, last = 0, n_iters - 1 if eps > 0 else 0
        schedule = self._schedule_length(n_iters)
        while it < last:
            if work is None:
                work = search.working(oracle, labels, lower, upper)
                if work is None:
                    break
            m = len(work.rows)
            k = self._proposals(m, c * h * w, search.acceptance, work.left, last - it)
            owner = work.spread(k)[0]
            mk = m * k

            # Alg. 1 line 3: side of the square from the schedule of p.
            p = p_selection(self.p_init, it, schedule)
            s = min(max(int(round((p * h * w) ** 0.5)), 1), h, w)

            # Alg. 1 lines 4-5 (Alg. 2): a random window per proposal, ±ε per
            # channel inside it, projected onto the ε-box ∩ [0,1].
            corner = _corners((mk,), h, w, s, gen, device)
            # The window as flat pixel indices (mk, c, s²), and as indices into
            # the whole working set; the step reads and writes only those
            # pixels, never the whole image.
            offsets = (corner[:, :1] + span[:s]) * w
            window = (offsets[:, :, None] + corner[:, 1:, None] + span[None, :s]).view(mk, 1, s * s)
            window = window.expand(mk, c, s * s)
            flat = (owner[:, None, None] * c + channel_bits[None, :, None]) * (h * w) + window
            high = work.constants[1].reshape(-1)[flat]
            low = work.constants[0].reshape(-1)[flat]
            current = work.x.reshape(-1)[flat]
            positive = torch.randint(0, 2, (mk, c, 1), generator=gen, device=device).bool()
            # A draw that changes nothing is redrawn in the reference code. At
            # most one sign vector leaves a window unchanged (the one matching
            # a window already at one bound per channel), so XOR-ing it with a
            # uniform non-zero channel mask is an exact draw from that
            # rejection loop, made in one step for the rows that need it.
            same = (torch.where(positive, high, low) == current).flatten(1).all(dim=1)
            code = torch.randint(1, 2**c, (mk, 1), generator=gen, device=device)
            flip = ((code >> channel_bits) & 1).bool() & same[:, None]
            proposal = torch.where(positive ^ flip[:, :, None], high, low)
            x_new = torch.index_select(work.x, 0, owner) if k > 1 else work.x.clone()
            x_new.view(mk, c, h * w).scatter_(2, window, proposal)

            # Alg. 1 lines 6-7: k queries, keep the best proposal if it is a
            # strict improvement.
            best, improved, loss, margin = self._judge(oracle, work, x_new, k, targeted)
            kept = torch.where(improved.view(m, 1, 1), proposal[best], current[best])
            work.x.view(m, c, h * w).scatter_(2, window[best], kept)
            work = search.settle(work, improved, loss, margin, k)
            it += k
        if work is not None:
            search.absorb(work)

        return search

    def _l2(self, oracle, x, labels, eps, gen, n_iters, targeted):
        """Algorithm 1 with the L2 sampling distribution (Algorithm 3)."""
        device = x.device
        n, c, h, w = x.shape
        search = _Search.begin(x)

        # Alg. 1 line 1: the grid of meta pseudo-Gaussian squares at ‖δ‖₂ = ε,
        # clipped to [0,1]; one query each.
        can = oracle.remaining().to(device) >= 1
        rows = can.nonzero().squeeze(1)
        if len(rows):
            delta = l2_init(len(rows), c, h, w, eps, gen, dtype=x.dtype, device=device)
            x_init = (x[rows] + delta).clamp(0.0, 1.0)
            margin, loss = _margin_and_loss(
                oracle.log_probs(x_init, idx=rows.cpu()), labels[rows], self.loss, targeted
            )
            search.start_at(rows, x_init, loss, margin)

        bumps: dict[int, torch.Tensor] = {}
        work = None
        it, last = 0, n_iters - 1 if eps > 0 else 0
        schedule = self._schedule_length(n_iters)
        while it < last:
            if work is None:
                work = search.working(oracle, labels, x)
                if work is None:
                    break
            m = len(work.rows)
            k = self._proposals(m, c * h * w, search.acceptance, work.left, last - it)
            owner = work.spread(k)[0]
            mk = m * k

            # Alg. 1 line 3, with the reference code's L2 rule: an odd side of
            # at least 3 (here also at most min(H, W)).
            p = p_selection(self.p_init, it, schedule)
            s = max(round((p * h * w) ** 0.5), 3)
            s = min(s + 1 - s % 2, h, w)
            if s not in bumps:
                eta = meta_pseudo_gaussian(s, dtype=x.dtype, device=device)
                bumps[s] = torch.stack([-eta, -eta.T, eta, eta.T])  # by 2·(sign > 0) + transposed

            # Alg. 3: two random windows per proposal, W1 and W2 (corner[:, k]
            # the (row, column) of W(k+1)), and the signed bump η of W1.
            corner = _corners((mk, 2), h, w, s, gen, device)
            transposed = torch.randint(0, 2, (mk,), generator=gen, device=device)
            positive = torch.randint(0, 2, (mk, c), generator=gen, device=device)
            which = positive.mul_(2).add_(transposed[:, None]).view(mk * c)
            bump = torch.index_select(bumps[s], 0, which).view(mk, c, s, s)
            clean = work.constants[0]
            delta = work.x - clean
            flat = delta.view(m, -1)
            norm2 = torch.linalg.vecdot(flat, flat)
            if k > 1:
                delta, norm2 = torch.index_select(delta, 0, owner), torch.index_select(norm2, 0, owner)
            delta = l2_proposal(delta, corner, bump, eps, norm2)

            # Alg. 1 line 5: back to ‖δ‖₂ = ε, then clipped to [0,1]
            # (clean images broadcast over each row's k proposals).
            size = torch.linalg.vector_norm(delta.view(mk, -1), dim=1).clamp_min(1e-12)
            x_new = torch.addcmul(clean.view(m, 1, -1), delta.view(m, k, -1), (eps / size).view(m, k, 1))
            x_new = x_new.clamp_(0.0, 1.0).view(mk, c, h, w)

            # Alg. 1 lines 6-7: k queries, keep the best proposal if it is a
            # strict improvement.
            best, improved, loss, margin = self._judge(oracle, work, x_new, k, targeted)
            taken = improved.nonzero().squeeze(1)
            work.x.index_copy_(0, taken, torch.index_select(x_new, 0, best[taken]))
            work = search.settle(work, improved, loss, margin, k)
            it += k
        if work is not None:
            search.absorb(work)

        return search


@dataclass
class _Search:
    """Per-sample state of one Square run: the best point found and its losses."""

    x: torch.Tensor
    loss: torch.Tensor
    margin: torch.Tensor
    queried: torch.Tensor
    acceptance: float = 1.0
    """Estimated share of proposals that improve their sample."""

    @classmethod
    def begin(cls, x: torch.Tensor) -> "_Search":
        inf = torch.full((len(x),), float("inf"), device=x.device)
        return cls(x.clone(), inf, inf.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device))

    def start_at(self, rows, x_init, loss, margin) -> None:
        """Alg. 1 line 1: the initial point and its losses (one query each)."""
        self.x[rows], self.loss[rows], self.margin[rows], self.queried[rows] = x_init, loss, margin, True

    def working(self, oracle, labels, *constants) -> "_Working | None":
        """A compact copy of the samples still attacked with budget left, or None.

        ``constants`` are per-sample tensors the loop reads (the ε-box for
        L∞, the clean images for L2), gathered once for the set."""
        remaining = oracle.remaining().to(self.x.device)
        rows = (self.queried & (self.margin >= 0) & (remaining >= 1)).nonzero().squeeze(1)
        if not len(rows):
            return None
        return _Working(
            rows=rows, rows_cpu=rows.cpu(), y=labels[rows], x=self.x[rows], loss=self.loss[rows],
            margin=self.margin[rows], left=int(remaining[rows].min()),
            constants=tuple(tensor[rows] for tensor in constants),
        )

    def settle(self, work: "_Working", improved, loss, margin, spent: int) -> "_Working | None":
        """Record a step of the working set (``spent`` queries per row) and
        its acceptance; absorb and drop the set when a row succeeded or
        reached its budget."""
        self.observe(float(improved.float().mean()), spent, len(improved))
        if work.settle(improved, loss, margin, spent):
            self.absorb(work)
            return None
        return work

    def observe(self, improved: float, k: int, m: int) -> None:
        """Update the acceptance estimate with a step in which a share
        ``improved`` of ``m`` rows took one of their ``k`` proposals: a
        proposal improves with probability r where 1 - (1 - r)^k = improved,
        weighed in as ``m·k`` proposals of a window of about 500."""
        rate = 1.0 - (1.0 - improved) ** (1.0 / k)
        weight = 1.0 - (1.0 - 1.0 / _ACCEPTANCE_WINDOW) ** (m * k)
        self.acceptance += weight * (rate - self.acceptance)

    def absorb(self, work: "_Working") -> None:
        self.x[work.rows], self.loss[work.rows], self.margin[work.rows] = work.x, work.loss, work.margin


@dataclass
class _Working:
    """The samples a Square run still attacks, row for row."""

    rows: torch.Tensor
    rows_cpu: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    loss: torch.Tensor
    margin: torch.Tensor
    left: int
    """Queries every row can still spend before the set must be rebuilt."""
    constants: tuple[torch.Tensor, ...]
    _spread: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def spread(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For k proposals per row (row i's are ``i·k … i·k+k-1``): the row
        each proposal belongs to, its sample index (CPU) and its label."""
        if k not in self._spread:
            owner = torch.arange(len(self.rows), device=self.rows.device).repeat_interleave(k)
            self._spread[k] = (owner, self.rows_cpu[owner.cpu()], self.y[owner])
        return self._spread[k]

    def improved(self, loss: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """Alg. 1 line 7: a strictly lower loss, or a successful proposal
        (AutoAttack's rule; a success need not lower the cross-entropy)."""
        return (loss < self.loss) | (margin < 0)

    def settle(self, improved: torch.Tensor, loss: torch.Tensor, margin: torch.Tensor, spent: int) -> bool:
        """Record a step's losses and queries; True when the set must be
        rebuilt (a row succeeded or reached its budget)."""
        self.loss = torch.where(improved, loss, self.loss)
        self.margin = torch.where(improved, margin, self.margin)
        self.left -= spent
        return self.left == 0 or bool((self.margin < 0).any())


def _corners(count: tuple[int, ...], h: int, w: int, s: int, gen: torch.Generator, device) -> torch.Tensor:
    """(row, column) of the top-left corners of ``count`` s × s windows in
    H × W images, shape ``(*count, 2)``: uniform over ``[0, H - s) × [0,
    W - s)`` (0 where s spans the image), as the reference code and
    AutoAttack draw them, so that the last row and column are in a window
    only when s spans the image."""
    if h == w:
        return torch.randint(0, max(h - s, 1), (*count, 2), generator=gen, device=device)
    rows = torch.randint(0, max(h - s, 1), count, generator=gen, device=device)
    columns = torch.randint(0, max(w - s, 1), count, generator=gen, device=device)
    return torch.stack([rows, columns], dim=-1)


def _signs(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform random ±1 of ``shape``, with the dtype and device of ``like``."""
    bits = torch.randint(0, 2, shape, generator=gen, device=like.device)
    return bits.to(like.dtype) * 2 - 1
