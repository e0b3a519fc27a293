"""The ray-search skeleton shared by OPT and Sign-OPT (hard-label, L2).

Both attacks follow OPT's reformulation (Cheng et al., ICLR 2019, Sec. 3.1):
a search direction θ is scored by its distance to the decision boundary,

    g(θ) = min λ > 0  s.t.  f(x0 + λ θ/‖θ‖) ≠ y0,

and θ is optimised with a gradient estimated from label queries only. They
differ only in that estimate (OPT: finite differences of g over q random
directions; Sign-OPT: one query per direction for the sign of the
difference), which each attack's own file implements as ``_estimate``.
This module holds what they share, all batched over samples:

* ``_Boundary``: label queries along rays ``x0 + λθ`` (every image clipped
  to [0,1]), OPT's binary search for g and its local search ("compute g(θ)
  locally", ratio 0.01, as the official code runs it);
* ``_Best``: per sample, the clipped adversarial image of smallest L2
  distortion among the (θ, g) held (clipping can make a smaller g farther);
* ``RaySearch.__call__``: clean check, initialisation from the best of
  ``n_init`` Gaussian directions, then iterations of estimate, step-size
  line search (``line_search``, the official code's) and the α/β resets,
  with a trace of (queries, best distortion) after each iteration.

Budget: a sample starts an iteration only if it can afford
``iteration_cost`` queries; any query in a search is sent only for samples
with budget left, and a search cut short keeps its last adversarial λ, so
every g held is a verified adversarial distance.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...oracles import LabelOracle
from ..base import MIN_NORM, Attack, AttackResult, check_call, distortion, generator

_ALPHA_FLOOR = 1e-4
_ALPHA_RESET = 1.0
_BETA_FLOOR = 1e-8
_STEP_DOWN = 0.99


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Normalise each row of a (M, ...) batch to unit L2 norm."""
    norms = v.flatten(1).norm(dim=1).clamp_min(1e-12)
    return v / norms.view(-1, *([1] * (v.dim() - 1)))


def _col(v: torch.Tensor) -> torch.Tensor:
    """A (M,) vector shaped to broadcast against (M,C,H,W)."""
    return v.view(-1, 1, 1, 1)


class _Boundary:
    """Label queries along rays ``x0 + λ θ`` for a subset of the samples."""

    def __init__(self, oracle: LabelOracle, x0: torch.Tensor, y0: torch.Tensor):
        self.oracle = oracle
        self.x0 = x0
        self.y0 = y0

    def affordable(self, rows: torch.Tensor) -> torch.Tensor:
        """Mask over ``rows``: samples with at least one query left."""
        return self.oracle.remaining().to(rows.device)[rows] >= 1

    def image(self, rows: torch.Tensor, theta: torch.Tensor, lbd: torch.Tensor) -> torch.Tensor:
        return (self.x0[rows] + _col(lbd) * theta).clamp(0.0, 1.0)

    def adversarial(self, rows: torch.Tensor, theta: torch.Tensor, lbd: torch.Tensor) -> torch.Tensor:
        """One query per row: is ``clip(x0 + λ θ)`` misclassified?"""
        labels = self.oracle.labels(self.image(rows, theta, lbd), idx=rows.cpu())
        return labels.to(rows.device) != self.y0[rows]

    def bisect(
        self,
        rows: torch.Tensor,
        theta: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        tol: torch.Tensor,
        searching: torch.Tensor,
    ) -> torch.Tensor:
        """Binary search between a benign ``lo`` and an adversarial ``hi``.

        Only rows in ``searching`` with budget left are queried; the returned
        ``hi`` is always a queried adversarial distance (or the input).
        """
        lo, hi = lo.clone(), hi.clone()
        while True:
            go = searching & (hi - lo > tol) & self.affordable(rows)
            sel = go.nonzero().squeeze(1)
            if not len(sel):
                return hi
            mid = (lo[sel] + hi[sel]) / 2
            adv = self.adversarial(rows[sel], theta[sel], mid)
            hi[sel] = torch.where(adv, mid, hi[sel])
            lo[sel] = torch.where(adv, lo[sel], mid)

    def local_search(
        self, rows: torch.Tensor, theta: torch.Tensor, g_best: torch.Tensor, tol: torch.Tensor
    ) -> torch.Tensor:
        """g(θ) where it is below ``g_best``, else ``inf`` (official local search).

        One query at ``g_best``; where adversarial, step down by 0.99 while
        still adversarial, then bisect to ``tol``.
        """
        out = torch.full_like(g_best, float("inf"))
        ok = self.affordable(rows)
        sel = ok.nonzero().squeeze(1)
        if not len(sel):
            return out
        ok[sel] = self.adversarial(rows[sel], theta[sel], g_best[sel])
        hi = g_best.clone()
        lo = g_best * _STEP_DOWN
        stepping = ok.clone()
        while True:
            stepping &= (lo > tol) & self.affordable(rows)
            sel = stepping.nonzero().squeeze(1)
            if not len(sel):
                break
            adv = self.adversarial(rows[sel], theta[sel], lo[sel])
            hi[sel] = torch.where(adv, lo[sel], hi[sel])
            lo[sel] = torch.where(adv, lo[sel] * _STEP_DOWN, lo[sel])
            stepping[sel] = adv
        lo = torch.where(lo > tol, lo, torch.zeros_like(lo))
        hi = self.bisect(rows, theta, lo, hi, tol, ok)
        return torch.where(ok, hi, out)


class _Best:
    """Per sample, the adversarial image of smallest L2 distortion held so far."""

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0
        self.x = x0.clone()
        self.size = torch.full((len(x0),), float("inf"), device=x0.device)

    def update(self, rows: torch.Tensor, images: torch.Tensor, valid: torch.Tensor) -> None:
        size = distortion(images - self.x0[rows], "l2")
        better = valid & (size < self.size[rows])
        self.x[rows[better]] = images[better]
        self.size[rows[better]] = size[better]


@dataclass(frozen=True)
class RaySearch(Attack):
    """OPT-family attack: the shared settings and loop; subclasses give ``_estimate``."""

    oracle: ClassVar[type] = LabelOracle
    kind: ClassVar[str] = MIN_NORM
    norms: ClassVar[tuple[str, ...]] = ("l2",)
    # Label-only and L2, they are far weaker than Square at a fixed ε and would
    # double the cost of the gradient-masking check above hard-label access;
    # AutoAttack's check is Square alone.
    at_stronger_levels: ClassVar[bool] = False
    counts: ClassVar[tuple[str, ...]] = ("n_init", "max_line_search", "max_rows")
    """Integer fields that must be at least 1."""

    norm: str = "l2"
    n_init: int = 100
    """Gaussian directions tried at initialisation."""
    alpha: float = 0.2
    """Initial step size of the line search."""
    beta: float = 0.001
    """Smoothing radius of the probes θ + βu."""
    tol: float = 1e-3
    """Tolerance of the initial binary search."""
    max_line_search: int = 15
    """Step-size tries per phase of the line search."""
    max_iter: int = 1000
    """Iteration cap (bounds the attack when the oracle has no budget)."""
    max_rows: int = 10000
    """Images per oracle call for the probes (at least one probe per sample).

    It bounds memory; a different value draws the probes in a different order."""

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"{self.name} supports norms {self.norms}, got {self.norm!r}")
        for field in self.counts:
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {self.max_iter}")
        for field in ("alpha", "beta", "tol"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)}")

    @property
    @abc.abstractmethod
    def iteration_cost(self) -> int:
        """Queries a sample must have left to start an iteration."""

    @abc.abstractmethod
    def _estimate(
        self, ray, gen, rows, theta, g, beta
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(ĝ, best probe direction or None, its g) for the rows' (θ, g(θ), β)."""

    def __call__(self, oracle, x, y, *, eps=None, seed=0, target=None) -> AttackResult:
        check_call(self, eps, target, y)
        device = oracle.device
        gen = generator(seed, device)
        x0 = x.to(device)
        y0 = y.to(device)
        n = len(x0)
        ray = _Boundary(oracle, x0, y0)
        everyone = torch.arange(n, device=device)

        theta = torch.zeros_like(x0)
        g = torch.full((n,), float("inf"), device=device)
        best = _Best(x0)

        # Clean check: a sample already misclassified costs one query.
        attack = ray.affordable(everyone)
        sel = attack.nonzero().squeeze(1)
        if len(sel):
            clean_adv = ray.adversarial(sel, theta[sel], g.new_zeros(len(sel)))
            g[sel[clean_adv]] = 0.0
            attack[sel[clean_adv]] = False
            best.update(sel, x0[sel], clean_adv)

        # Initialisation: n_init Gaussian directions, one step for all samples.
        for _ in range(self.n_init):
            rows = (attack & ray.affordable(everyone)).nonzero().squeeze(1)
            if not len(rows):
                break
            direction = torch.randn(
                (len(rows), *x0.shape[1:]), generator=gen, device=device, dtype=x0.dtype
            )
            scale = torch.minimum(direction.flatten(1).norm(dim=1), g[rows])
            direction = _unit(direction)
            adv = ray.adversarial(rows, direction, scale)
            hi = ray.bisect(
                rows, direction, torch.zeros_like(scale), scale, torch.full_like(scale, self.tol), adv
            )
            better = adv & (hi < g[rows])
            g[rows[better]] = hi[better]
            theta[rows[better]] = direction[better]
            best.update(rows, ray.image(rows, direction, hi), better)

        active = attack & torch.isfinite(g)
        alpha = torch.full((n,), self.alpha, device=device)
        beta = torch.full((n,), self.beta, device=device)
        trace = [(int(oracle.queries().max()) if n else 0, best.size.clone())]

        for _ in range(self.max_iter):
            active &= oracle.remaining().to(device) >= self.iteration_cost
            rows = active.nonzero().squeeze(1)
            if not len(rows):
                break
            th, gg = theta[rows], g[rows]
            step, smooth = alpha[rows], beta[rows]
            grad, probe_th, probe_g = self._estimate(ray, gen, rows, th, gg, smooth)
            best_th, best_g = line_search(ray, rows, th, gg, grad, step, smooth / 500, self.max_line_search)
            if probe_th is not None:  # a probe better than the step is kept (official OPT)
                use_probe = probe_g < best_g
                best_th[use_probe], best_g[use_probe] = probe_th[use_probe], probe_g[use_probe]
            reset = step < _ALPHA_FLOOR
            step[reset] = _ALPHA_RESET
            smooth[reset] = smooth[reset] * 0.1
            theta[rows], g[rows] = best_th, best_g
            alpha[rows], beta[rows] = step, smooth
            active[rows[smooth < _BETA_FLOOR]] = False
            best.update(rows, ray.image(rows, best_th, best_g), torch.isfinite(best_g))
            trace.append((int(oracle.queries().max()), best.size.clone()))

        return AttackResult(
            x_adv=best.x, success=torch.isfinite(g), queries=oracle.queries(), trace=trace
        )


def line_search(
    ray: _Boundary,
    rows: torch.Tensor,
    theta: torch.Tensor,
    g: torch.Tensor,
    grad: torch.Tensor,
    alpha: torch.Tensor,
    tol: torch.Tensor,
    tries: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-size search of the official code (Sign-OPT's and OPT's): at most
    ``tries`` growing, then ``tries`` shrinking steps; updates ``alpha`` in place."""
    best_th, best_g = theta.clone(), g.clone()
    growing = torch.ones_like(g, dtype=torch.bool)
    for _ in range(tries):
        sel = (growing & ray.affordable(rows)).nonzero().squeeze(1)
        if not len(sel):
            break
        cand = _unit(theta[sel] - _col(alpha[sel]) * grad[sel])
        new_g = ray.local_search(rows[sel], cand, best_g[sel], tol[sel])
        alpha[sel] *= 2
        better = new_g < best_g[sel]
        best_th[sel[better]], best_g[sel[better]] = cand[better], new_g[better]
        growing[sel[~better]] = False
    shrinking = best_g >= g
    for _ in range(tries):
        sel = (shrinking & ray.affordable(rows)).nonzero().squeeze(1)
        if not len(sel):
            break
        alpha[sel] *= 0.25
        cand = _unit(theta[sel] - _col(alpha[sel]) * grad[sel])
        new_g = ray.local_search(rows[sel], cand, g[sel], tol[sel])
        better = new_g < g[sel]
        best_th[sel[better]], best_g[sel[better]] = cand[better], new_g[better]
        shrinking[sel[better]] = False
    return best_th, best_g
