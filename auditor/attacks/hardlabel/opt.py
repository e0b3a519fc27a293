"""OPT, L2 and L∞ (Cheng, Le, Chen, Zhang, Yi and Hsieh, ICLR 2019).

"Query-Efficient Hard-label Black-box Attack: An Optimization-based
Approach", https://arxiv.org/abs/1807.04457. A search direction θ is scored
by its distance to the decision boundary,

    g(θ) = min λ > 0  s.t.  f(x0 + λ θ/‖θ‖) ≠ y0,

and θ is optimised with a zeroth-order gradient of g estimated from label
queries only (Algorithm 1). Sign-OPT (:mod:`.sign_opt`) is built on this
attack and differs only in the gradient estimate, so OPT reuses its ray
queries (``Boundary``), its best-example bookkeeping and its step-size
search (``ray_search.line_search``), its L∞ variant (the official
``OPT_attack_lf.py``) and its targeted start from data images. Every image sent to the oracle is clipped
to [0,1]; per sample the attack returns the clipped ``x0 + g(θ) θ/‖θ‖`` of
smallest distortion among the (θ, g) it has held (as Sign-OPT does).

Steps, batched over the samples (per-sample θ, g, α, β and masks):

* clean check: one query of ``x0``; a sample already adversarial is a
  success at distortion 0 and is not attacked.
* initialisation (the θ0 input of Algorithm 1): ``n_init`` Gaussian
  directions, one per step for all samples at once, each checked with one
  query at ``min(‖θ‖, g*)`` (the official code's two checks, at ‖θ‖ and at
  the best g so far, folded into the one that decides) and, where
  adversarial, bisected on ``[0, min(‖θ‖, g*)]`` down to ``tol`` (official
  1e-5) and kept if its g is smaller.
* gradient (Algorithm 1, lines 3-5, with the official averaging over ``q``
  directions): for ``q`` unit Gaussian ``u`` per sample, g(θ') of the probe
  θ' = (θ+βu)/‖θ+βu‖ is measured by the official two-sided local search
  started at λ = g(θ): one query there; if adversarial, step down by 0.99
  while still adversarial, otherwise step up by 1.01 until adversarial
  (given up, the direction dropped, past ``2 g(θ)``; the official code gives
  up past λ = 20), then bisect to ``β/500``. All probes of all samples run
  together, one oracle call per search step carrying every row still
  searching (``max_values`` bounds the input values: the probes of as many
  samples as fit search together, then the next samples'; each sample draws its ``u``
  from its own random stream, so batching is exact). ``ĝ = (1/q) Σ (g(θ') − g(θ))/β · u`` over the probes that found g.
* update (Algorithm 1, line 6) with the official step-size search, done by
  ``ray_search.line_search``: try ``θ − α ĝ`` and double α while g keeps
  decreasing (at most ``max_line_search`` tries); if the first try fails,
  quarter α until some try improves. g of a candidate is searched only below
  the current g (one query there decides; the official search also steps up
  from a failed candidate, spending queries on a value the comparison then
  discards, so the decisions are the same). As in the official code, the
  best probe θ' replaces the line search's result when its g is smaller;
  when α falls below 1e-4 it is reset to 1 and β divided by 10. Unlike the
  official code, a sample whose β falls below 1e-8 stops (as in Sign-OPT
  here: the probes are then below the images' float resolution).

Budget: every image is one query for its sample. A sample starts an
iteration only if it can afford the estimate's minimal cost, two queries
per probe (the query at g(θ) and one step), plus one line-search query:
``2q + 1``. Rows of one sample in one oracle call are admitted only up to
its remaining budget; a search cut short keeps its last adversarial λ (a
probe cut short before any adversarial λ is dropped from ĝ), so every g
held is a verified adversarial distance and the budget is never exceeded.
At most ``max_iter`` iterations (official ``iterations=1500``), which bounds
the attack without a budget. ``eps`` is ignored.

Defaults are the official code's (``cmhcbb/attackbox``,
``attack/OPT_attack.py``): ``q = 10``, ``n_init = 100``, ``alpha = 0.2``,
``beta = 0.001``, ``tol = 1e-5``, 15 line-search tries, 1500 iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...oracles import LabelOracle, items_within
from .shared import call_rank, col
from .ray_search import Boundary, RaySearch

_STEP_DOWN = 0.99
_STEP_UP = 1.01
_UP_LIMIT = 2.0
"""The upward search of a probe gives up past this multiple of g(θ)."""

# States of a probe's two-sided search.
_START, _DOWN, _UP, _BISECT, _DONE = range(5)


def _ration(oracle: LabelOracle, rows: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Positions in ``rows`` (where ``want``) to query now, at most the
    remaining budget of each sample (rows may repeat a sample; first come first)."""
    cand = want.nonzero().squeeze(1)
    if not len(cand):
        return cand
    samples = rows[cand]
    left = oracle.remaining().to(rows.device)[samples]
    return cand[call_rank(samples) < left]


def _two_sided_search(
    ray: Boundary, rows: torch.Tensor, theta: torch.Tensor, g0: torch.Tensor, tol: torch.Tensor
) -> torch.Tensor:
    """g along each ``theta`` row from a start at ``g0`` (official local search).

    Returns the last adversarial λ found (``inf`` where none was), to ``tol``
    where the budget allowed. All rows step together, one oracle call a step.
    """
    lo = torch.zeros_like(g0)
    hi = torch.full_like(g0, float("inf"))
    lam = g0.clone()
    limit = g0 * _UP_LIMIT
    state = torch.full(g0.shape, _START, dtype=torch.long, device=g0.device)
    while True:
        sel = _ration(ray.oracle, rows, state != _DONE)
        if not len(sel):
            return hi
        adv = ray.adversarial(rows[sel], theta[sel], lam[sel])
        st, lm = state[sel], lam[sel]
        h, l_ = hi[sel], lo[sel]
        h = torch.where(adv, lm, h)
        l_ = torch.where(adv, l_, lm)
        nxt = lm.clone()
        new_st = st.clone()
        # start: adversarial -> step down, benign -> step up
        s = st == _START
        new_st[s & adv], nxt[s & adv] = _DOWN, lm[s & adv] * _STEP_DOWN
        new_st[s & ~adv], nxt[s & ~adv] = _UP, lm[s & ~adv] * _STEP_UP
        # stepping down: keep going while adversarial; a benign step brackets g
        d = st == _DOWN
        new_st[d & adv], nxt[d & adv] = _DOWN, lm[d & adv] * _STEP_DOWN
        new_st[d & ~adv] = _BISECT
        # stepping up: until adversarial, or give up past the limit
        u = st == _UP
        new_st[u & adv] = _BISECT
        nxt[u & ~adv] = lm[u & ~adv] * _STEP_UP
        new_st[u & ~adv & (nxt > limit[sel])] = _DONE
        # a step down to (almost) zero: bisect from 0
        tiny = (new_st == _DOWN) & (nxt <= tol[sel])
        new_st[tiny], l_[tiny] = _BISECT, 0.0
        b = new_st == _BISECT
        new_st[b & (h - l_ <= tol[sel])] = _DONE
        b = new_st == _BISECT
        nxt[b] = (l_[b] + h[b]) / 2
        state[sel], lam[sel], hi[sel], lo[sel] = new_st, nxt, h, l_


@dataclass(frozen=True)
class OPT(RaySearch):
    """OPT (L2 or L∞), a minimum-norm hard-label attack."""

    name: ClassVar[str] = "opt"
    paper: ClassVar[str] = "Cheng et al., OPT, ICLR 2019"
    in_default_battery: ClassVar[bool] = False
    counts: ClassVar[tuple[str, ...]] = ("q", *RaySearch.counts)

    q: int = 10
    """Random directions per gradient estimate."""
    tol: float = 1e-5
    """Tolerance of the initial binary search (the official code's)."""
    max_iter: int = 1500
    """Iteration cap (the official code's ``iterations``)."""

    @property
    def iteration_cost(self) -> int:
        """Two queries a probe's search at the least, and one line-search query."""
        return 2 * self.q + 1

    def _estimate(self, ray: Boundary, directions, rows, theta, g, beta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ĝ = (1/q) Σ (g(θ') − g(θ))/β · u, and the best probe θ' with its g,
        for as many samples per search as ``max_values`` allows."""
        shape = theta.shape[1:]
        group = items_within(self.max_values, self.q * theta[0].numel())
        grad = torch.empty_like(theta)
        probe_th = theta.clone()
        probe_g = torch.full_like(g, float("inf"))
        for start in range(0, len(rows), group):
            part = slice(start, start + group)
            mine = rows[part]
            m = len(mine)
            u = ray.unit(directions.gaussian(mine, self.q))
            b = beta[part].repeat_interleave(self.q)
            g_rep = g[part].repeat_interleave(self.q)
            probe = ray.unit(theta[part].repeat_interleave(self.q, dim=0) + col(b) * u)
            g1 = _two_sided_search(ray, mine.repeat_interleave(self.q), probe, g_rep, b / 500)
            found = torch.isfinite(g1)
            coef = torch.where(found, (g1 - g_rep) / b, torch.zeros_like(g1))
            grad[part] = (col(coef.to(theta.dtype)) * u).view(m, self.q, *shape).sum(dim=1)
            low, arg = g1.view(m, self.q).min(dim=1)
            pick = probe.view(m, self.q, *shape)[torch.arange(m, device=theta.device), arg]
            better = low < probe_g[part]
            probe_th[part][better], probe_g[part][better] = pick[better], low[better]
        return grad / self.q, probe_th, probe_g
