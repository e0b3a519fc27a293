"""HopSkipJumpAttack, L2 and L∞ (Chen, Jordan and Wainwright, IEEE S&P 2020).

"HopSkipJumpAttack: A Query-Efficient Decision-Based Attack",
https://arxiv.org/abs/1904.02144. The attack walks along the decision
boundary of the top-1 label: at a boundary point ``x_t`` it estimates the
normal of the boundary from the signs of label queries around ``x_t``, takes
a geometric-progression step along it away from the clean image ``x*`` and
binary-searches back to the boundary towards ``x*``. Every image sent to the
oracle lies in [0,1].

Steps, batched over the samples (per-sample ``x_t``, distortion, iteration
count t, δ_t; masks of active samples; the probes of all active samples of
one stage gathered into oracle calls of up to ``max_values`` input values):

* clean check: one query of ``x*``; a sample already misclassified is a
  success at distortion 0 and is not attacked.
* initialisation (not the paper's): OPT's search for a starting direction
  (:func:`.ray_search.ray_start`, shared with OPT and Sign-OPT): ``n_init``
  random directions per sample in the low-frequency subspace, each checked
  with one query at the best distance so far and bisected where it beats
  it, so the start is the closest boundary point along the best of them.
  The paper (Sec. 4.1) and the official code start from the first uniform
  noise image that is adversarial; on the example CNN 99.8 % of noise
  images are classified "3", so every "3" found no start (7 of 94 digits),
  and the others started far away. With 20 directions the median L2 on 94
  example digits went from 1.49 to 1.25 at 1,000 queries and from 1.39 to
  1.16 at 4,000, and 93 digits found a start instead of 87. In targeted mode
  (adversarial means "classified as the target", the paper's targeted
  setting) the directions point at data images of the target class, as
  the paper starts from "a target image", each sample walking through its
  class's images from a random offset; ``start_index`` records the one
  kept. Untargeted, a sample that no random direction took across the
  boundary then tries images of the other classes from the data, when the
  call is given them (``starts``); ``start_index`` records those too. A
  boundary binary search (below) then refines the start.
* binary search (Sec. 3, Eq. 7 and the projection of Sec. 4.3): between the
  benign ``x*`` (``lo = 0``) and an adversarial point ``x̃`` (``hi``), halving
  ``hi − lo`` until it is at most the threshold θ; for L2 the points are the
  interpolations ``(1 − α) x* + α x̃`` with ``α ∈ [0, 1]``; for L∞ they are
  ``x̃`` clipped to the box ``[x* − α, x* + α]`` with ``α ∈ [0, ‖x̃ − x*‖∞]``
  and threshold ``min(θ · ‖x̃ − x*‖∞, θ)``. θ = γ d^{-3/2} for L2 and
  γ d^{-2} for L∞ (Sec. 4.3, Theorem 2), d the input dimension, γ = 1.
  The point returned is the last adversarial one (a queried ``hi``, or
  ``x̃`` itself), so every boundary point held is verified adversarial.
* gradient-direction estimate (Algorithm 1 line 5, Eq. 16): at ``x_t``,
  B_t = B_0 · sqrt(t) directions ``u_b`` (Gaussian for L2, uniform in
  [−1,1]^d for L∞ as in the official code; each sample draws its own from
  its own random stream, so batching is exact), each normalised to unit L2
  norm, capped by ``max_num_evals`` and by what the sample can pay; probe
  ``clip(x_t + δ_t u_b)`` (one query each) with
  δ_t = sqrt(d) θ ‖x_t − x*‖₂ (L2) or d θ ‖x_t − x*‖∞ (L∞), and δ_1 = 0.1
  (Sec. 4.2, Theorem 2; the official code's δ at t = 1); with φ_b = +1 for
  an adversarial probe and −1 otherwise and ``u_b`` replaced by the clipped
  step ``(probe − x_t)/δ_t``, the estimate is the baseline-subtracted mean
  ``(1/B) Σ (φ_b − φ̄) u_b`` (Eq. 16), or ``±(1/B) Σ u_b`` when every φ_b
  has the same sign (the official code), then normalised; the update
  direction ``v_t`` is that unit vector for L2 and its sign for L∞
  (Algorithm 1 line 6).
* subspace and the switch out of it (not the paper's): the ``u_b`` are
  drawn in a low-frequency subspace (``subspace``,
  :class:`~.shared.Directions`); in L2 a sample whose distance
  ``‖x_t − x*‖`` fell by less than 5 % over its last 4 iterations (or
  rose) draws them in full dimension from then on (``stall_drop``,
  :class:`~.ray_search.Stall`, as Sign-OPT). Median L2 at 4,000 queries,
  93-99 correctly classified MNIST test digits per model, rule off → on:
  example CNN 1.157 → 1.147; the same CNN after FGSM-RS training 2.191 →
  2.118; an MLP after FGSM-RS 2.136 → 2.135; an MLP 0.940 → 0.941.
  Targeted (target y + 1): 2.121 → 2.148 on the example CNN, 3.027 →
  2.901 on the FGSM-RS CNN. 56 colour digits (3 × 32 × 32, a small CNN):
  0.812 → 0.812 at 4,000 queries, 0.732 → 0.679 at 8,000. A window of 6
  iterations gave 1.146, 2.140, 2.098 and 0.955 on the four MNIST models
  (worse on the MLP). In L∞ the switch did not help (FGSM-RS CNN: 0.276 →
  0.278), so it is off.
* tangent probes (L2, not the paper's; ``tangent_probes``): each ``u_b``
  has its component along ``x_t − x*`` removed before it is normalised, so
  the probes lie in the tangent space of the sphere around ``x*`` through
  ``x_t``, and so does the estimate. The radial component is the one part
  of the boundary normal the attack cannot use: a step along ``x_t − x*``
  is undone by the binary search back towards ``x*`` (on a flat boundary
  it returns exactly to the same distance), while near convergence the
  normal is almost radial, so with full-space probes most of each sign
  φ_b is spent re-measuring it. Restricted to the tangent space, every
  probe measures the tilt that the step and binary search turn into
  progress, as Sign-OPT's probes on the sphere do. Median L2 on 38
  colour digits with a small ResNet (3 × 32 × 32): from 1.60 to 1.44 at
  1,000 queries and from 1.18 to 1.00 at 4,000 (ART's HopSkipJump: 2.52
  and 1.18); on the example CNN (94 digits, seeds 0-1) from 1.27 to 1.20
  at 1,000 and from 1.169 to 1.160 at 4,000. The L∞ attack's box binary
  search has no such symmetry, and there the same change did worse (0.089
  to 0.097 at 1,000 queries), so it probes in all directions.
* step size (Algorithm 1 line 7, "geometric progression", Sec. 4.4):
  ξ_t = ‖x_t − x*‖/sqrt(t) in the attack's norm, halved until
  ``clip(x_t + ξ_t v_t)`` is adversarial (one query per try, at most
  ``max_step_halvings + 1`` tries); a sample whose search fails keeps
  ``x_t`` for this iteration.
* boundary search (Algorithm 1 line 8): binary search from the new point
  back towards ``x*``; it is the next ``x_t``.

Budget: every label query is counted (clean check, initial search, binary searches,
gradient probes, step tries). An iteration of a sample costs
``B_t + s + b`` queries, with ``s ≥ 1`` step tries and
``b = ⌈log2(1/θ)⌉`` binary-search queries (15 for L2 and 20 for L∞ on
28×28 images); a sample starts an iteration only if it can pay one gradient
probe plus one step try plus ``b + 1`` (the binary search, with a margin for
rounding): B_t is capped so that this reserve is left, and a step try is sent
only while the reserve can still pay the binary search. No oracle call asks
for more than a sample's ``remaining()``. The attack runs at most
``max_iter`` iterations, which bounds it when the oracle has no budget.
``eps`` is ignored: a minimum-norm attack keeps shrinking the distortion
until its budget is spent.

Per sample the attack keeps the adversarial image of smallest distortion in
``norm`` among all it queried (probes, step tries and binary searches
alike); that is ``x_adv``, and the trace records each improvement at the
query that found it.

Defaults are those of the official code (``Jianbo-Lab/HSJA``, ``hsja.py``):
``init_num_evals = 100`` (B_0), ``max_num_evals = 1e4``, ``gamma = 1``,
geometric-progression step search; 64 iterations.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...access import Access
from ...oracles import LabelOracle, items_within
from ..base import MIN_NORM, NORMS, Attack, AttackResult, distortion
from .shared import (
    PROBE_VALUES,
    SUBSPACE_AUTO,
    Directions,
    StartPool,
    begin,
    check_subspace,
    col,
    unit,
)
from .ray_search import Boundary, StallSwitch, ray_start

_DELTA_FIRST = 0.1
"""δ_1: the official code probes at 0.1 × (clip_max − clip_min) at t = 1."""
_INIT_TOL = 1e-3
"""Tolerance of the initial ray search's bisection (Sign-OPT's ``tol``); the
boundary search after it refines to HopSkipJump's own threshold."""


@dataclass(frozen=True)
class HopSkipJump(StallSwitch, Attack):
    """HopSkipJumpAttack (L2 or L∞), a minimum-norm hard-label attack."""

    name: ClassVar[str] = "hop-skip-jump"
    oracle: ClassVar[type] = LabelOracle
    kind: ClassVar[str] = MIN_NORM
    norms: ClassVar[tuple[str, ...]] = NORMS
    targeted: ClassVar[bool] = True
    starts_from_data: ClassVar[bool] = True
    paper: ClassVar[str] = "Chen, Jordan and Wainwright, HopSkipJumpAttack, IEEE S&P 2020"
    # A soft-label attacker reads the labels too, and in L2 Square is the
    # weaker attack: without it soft-label audits came out above hard-label
    # ones. Above soft-label, AutoAttack's gradient-masking check is Square alone.
    default_up_to: ClassVar[Access] = Access.SOFT_LABEL

    norm: str = "l2"
    init_num_evals: int = 100
    """B_0: gradient probes at t = 1 (B_t = B_0 · sqrt(t))."""
    max_num_evals: int = 10000
    """Cap on the gradient probes of one iteration."""
    gamma: float = 1.0
    """θ = γ d^{-3/2} (L2) or γ d^{-2} (L∞): binary-search threshold."""
    n_init: int = 20
    """Directions tried at initialisation (random in the subspace, or in
    targeted mode towards data images of the target class); 20 did as well
    as 50 on the example CNN."""
    max_step_halvings: int = 30
    """Halvings of ξ_t before a step search gives up for the iteration."""
    max_iter: int = 64
    """Iteration cap (bounds the attack when the oracle has no budget)."""
    max_values: int = PROBE_VALUES
    """Input values per oracle call for the gradient probes (10,000 MNIST
    digits): the probes of as many samples as fit, at least one sample's. It
    bounds memory whatever the image size and never changes results."""
    subspace: int | str = SUBSPACE_AUTO
    """Factor f of the low-frequency subspace the gradient probes are drawn
    in (:class:`~.shared.Directions`, QEBA's spatial subspace); 1 draws
    them in full dimension, as the paper does; ``"auto"`` takes f = 2 for
    28 × 28 and 32 × 32 images."""
    tangent_probes: bool = True
    """L2: draw the gradient probes orthogonal to ``x_t − x*`` (see the
    module docstring); False probes in all directions, as the paper does.
    The L∞ attack always probes in all directions."""
    stall_window: int = 4
    """Iterations over which a sample's progress is judged."""
    stall_drop: float | None = None
    """A sample whose distance fell by less than this fraction over its last
    ``stall_window`` iterations draws its probes in full dimension from then
    on; 0 keeps every sample in the subspace; None takes 0.05 in L2 and 0 in
    L∞ (:class:`~.ray_search.StallSwitch`)."""
    auto_stall_drop: ClassVar[dict[str, float]] = {"l2": 0.05}

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"HopSkipJump supports norms {self.norms}, got {self.norm!r}")
        for field in ("init_num_evals", "max_num_evals", "n_init", "max_values"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        for field in ("max_iter", "max_step_halvings"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        self.check_stall()
        check_subspace(self.subspace)

    def __call__(
        self, oracle, x, y, *, eps=None, seed=0, target=None, starts: StartPool | None = None
    ) -> AttackResult:
        run = begin(self, oracle, x, y, eps=eps, seed=seed, target=target, starts=starts)
        x0 = run.x0
        device = oracle.device
        n = len(x0)
        d = x0[0].numel() if n else 1
        theta = self.gamma / (d**1.5 if self.norm == "l2" else d**2)
        bs_cost = math.ceil(math.log2(1.0 / theta)) + 1 if theta < 1 else 1

        def remaining() -> torch.Tensor:
            return oracle.remaining().to(device)

        ray = Boundary(oracle, x0, run.goal, self.norm)
        adversarial = ray.judge  # one query per row: is the image adversarial?

        def bisect(rows: torch.Tensor, far: torch.Tensor, searching: torch.Tensor) -> torch.Tensor:
            """Boundary binary search from adversarial ``far`` towards x*.

            Only rows in ``searching`` with budget left are queried; returns
            the last adversarial point per row (``far`` where none was queried).
            """
            base = x0[rows]
            if self.norm == "l2":
                hi = torch.ones(len(rows), device=device, dtype=x0.dtype)
                thr = torch.full_like(hi, theta)
            else:
                hi = distortion(far - base, "linf").to(x0.dtype)
                thr = torch.clamp(hi * theta, max=theta)
            lo = torch.zeros_like(hi)

            def point(sel: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
                if self.norm == "l2":
                    return (1 - col(a)) * base[sel] + col(a) * far[sel]
                a = col(a)
                return torch.minimum(torch.maximum(far[sel], base[sel] - a), base[sel] + a)

            while True:
                go = searching & (hi - lo > thr) & (remaining()[rows] >= 1)
                sel = go.nonzero().squeeze(1)
                if not len(sel):
                    break
                mid = (lo[sel] + hi[sel]) / 2
                adv = adversarial(rows[sel], point(sel, mid))
                hi[sel] = torch.where(adv, mid, hi[sel])
                lo[sel] = torch.where(adv, lo[sel], mid)
            out = far.clone()
            sel = searching.nonzero().squeeze(1)
            if len(sel):
                out[sel] = point(sel, hi[sel]).clamp(0.0, 1.0)
            return out

        # Clean check and initialisation: OPT's search over n_init random
        # directions (targeted: target-class images), then the boundary search.
        start = ray_start(ray, run, self.n_init, _INIT_TOL)
        found = start.attack & torch.isfinite(start.g)
        current = ray.best.x.clone()
        rows = found.nonzero().squeeze(1)
        if len(rows):
            current[rows] = bisect(rows, current[rows], torch.ones_like(rows, dtype=torch.bool))

        active = found.clone()
        t = torch.zeros(n, dtype=torch.long, device=device)
        stall = self.stall(n, device)

        for _ in range(self.max_iter):
            t_next = t + 1
            evals = torch.clamp(
                (self.init_num_evals * t_next.to(torch.float64).sqrt()).floor().long(),
                max=self.max_num_evals,
            )
            # reserve: at least one step try and the binary search after it
            evals = torch.minimum(evals, remaining() - 1 - bs_cost)
            active &= evals >= 1
            rows = active.nonzero().squeeze(1)
            if not len(rows):
                break
            t[rows] = t_next[rows]
            tt = t[rows].to(x0.dtype)
            xt = current[rows]
            dist = distortion(xt - x0[rows], self.norm).to(x0.dtype)
            run.directions.refine(rows[stall.stalled(rows, dist)])

            # (1) gradient-direction estimate at x_t (Alg. 1 line 5, Eq. 16)
            scale = math.sqrt(d) if self.norm == "l2" else float(d)
            delta = torch.where(tt == 1, torch.full_like(dist, _DELTA_FIRST), scale * theta * dist)
            radial = unit(xt - x0[rows]).flatten(1) if self.norm == "l2" and self.tangent_probes else None
            grad = self._gradient(adversarial, run.directions, rows, xt, delta, evals[rows], radial)
            update = grad if self.norm == "l2" else grad.sign()

            # (2) geometric progression of the step size (Alg. 1 line 7)
            xi = dist / tt.sqrt()
            stepped = xt.clone()
            pending = torch.ones(len(rows), dtype=torch.bool, device=device)
            moved = torch.zeros_like(pending)
            for _ in range(self.max_step_halvings + 1):
                go = pending & (remaining()[rows] >= 1 + bs_cost)
                sel = go.nonzero().squeeze(1)
                if not len(sel):
                    break
                cand = (xt[sel] + col(xi[sel]) * update[sel]).clamp(0.0, 1.0)
                adv = adversarial(rows[sel], cand)
                stepped[sel[adv]] = cand[adv]
                moved[sel[adv]] = True
                pending[sel[adv]] = False
                xi[sel[~adv]] = xi[sel[~adv]] / 2

            # (3) binary search back to the boundary (Alg. 1 line 8)
            if moved.any():
                new = bisect(rows, stepped, moved)
                current[rows[moved]] = new[moved]

        return AttackResult(
            x_adv=ray.best.x, success=torch.isfinite(ray.best.size), queries=oracle.queries(),
            trace=ray.best.closed_trace(),
            start_index=start.start_index(),
        )

    def _gradient(self, adversarial, directions: Directions, rows, xt, delta, evals, radial=None) -> torch.Tensor:
        """Unit estimate of the boundary normal at ``xt`` from ``evals`` probes per row.

        With ``radial`` (unit rows of ``xt − x*``, flattened) each direction
        loses its component along its row's radial vector first.

        Consecutive rows are grouped so that a group's probes fit in
        ``max_values`` input values (a row with more probes is a group
        alone), one oracle call per group; each row draws its probes from
        its own stream, all in one draw, and its sums run over
        its own probes in order, so they do not depend on the batch. They sum
        the clipped steps ``δ_t u_b``: dividing by δ_t does not change the
        unit direction, so it is left out.
        """
        flat = xt.flatten(1)
        dtype = xt.dtype
        sums = torch.zeros((2, len(rows), flat.shape[1]), device=xt.device, dtype=dtype)
        sum_f = torch.zeros(len(rows), device=xt.device, dtype=dtype)
        ends = torch.cumsum(evals, 0).tolist()
        cap = items_within(self.max_values, xt[0].numel())
        draw = directions.gaussian if self.norm == "l2" else directions.uniform
        first = 0
        while first < len(rows):
            done = ends[first - 1] if first else 0
            last = max(first + 1, bisect_right(ends, done + cap))
            mine = torch.arange(first, last, device=xt.device)
            first = last
            counts = evals[mine]
            m = len(mine)
            owner = torch.repeat_interleave(torch.arange(m, device=xt.device), counts)
            who = mine[owner]
            step = draw(rows[mine], counts).flatten(1)
            if radial is not None:
                _project_out(step, radial[mine], counts)
            step.mul_((delta[who] / distortion(step, "l2").clamp_min(1e-12))[:, None])
            base = torch.index_select(flat[mine], 0, owner)
            probe = step.add_(base).clamp_(0.0, 1.0)
            phi = adversarial(rows[who], probe.view(len(who), *xt.shape[1:])).to(dtype) * 2 - 1
            step = torch.sub(probe, base, out=base)  # the clipped step, δ_t u_b after clipping
            sums[0].index_add_(0, who, step)
            sums[1].index_add_(0, who, step.mul_(phi[:, None]))
            sum_f.index_add_(0, who, phi)
        sum_u, sum_fu = sums[0], sums[1]
        mean_f = (sum_f / evals.to(dtype))[:, None]
        grad = torch.where(mean_f == 1, sum_u, torch.where(mean_f == -1, -sum_u, sum_fu - mean_f * sum_u))
        return unit(grad.view_as(xt))


def _project_out(step: torch.Tensor, radial: torch.Tensor, counts: torch.Tensor) -> None:
    """Remove from each row of ``step`` its component along its owner's unit
    ``radial`` row, in place; ``step`` holds ``counts[i]`` rows for owner i,
    in owner order. Owners with equal counts are taken together as a
    (owners, count, d) block, so no radial row is copied per probe."""
    sizes, owners = torch.unique_consecutive(counts, return_counts=True)
    start, first = 0, 0
    for size, many in zip(sizes.tolist(), owners.tolist()):
        block = step[start : start + many * size].view(many, size, -1)
        along = radial[first : first + many].unsqueeze(1)  # (owners, 1, d)
        # per-probe dot products and an elementwise update, so a sample's
        # probes come out the same in any batch (a batched matmul would not)
        block.addcmul_(torch.linalg.vecdot(block, along).unsqueeze(2), along, value=-1)
        start, first = start + many * size, first + many
