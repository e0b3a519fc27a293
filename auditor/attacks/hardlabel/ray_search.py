"""The ray-search skeleton shared by OPT and Sign-OPT (hard-label, L2 and L∞).

Both attacks follow OPT's reformulation (Cheng et al., ICLR 2019, Sec. 3.1):
a search direction θ is scored by its distance to the decision boundary,

    g(θ) = min λ > 0  s.t.  f(x0 + λ θ/‖θ‖) is adversarial,

and θ is optimised with a gradient estimated from label queries only. They
differ only in that estimate (OPT: finite differences of g over q random
directions; Sign-OPT: one query per direction for the sign of the
difference), which each attack's own file implements as ``_estimate``.
"Adversarial" is a label other than y0, or, in targeted mode, the target.
The norm ‖·‖ is the attack's: L2, or L∞ as in the official L∞ variants
(``Sign_OPT_lf.py``, ``OPT_attack_lf.py``: every direction, probe and
candidate is scaled to unit L∞ norm, so g is an L∞ distance). This module
holds what they share, all batched over samples:

* ``Boundary``: label queries along rays ``x0 + λθ`` (every image clipped
  to [0,1]), OPT's binary search for g and its local search ("compute g(θ)
  locally", ratio 0.01, as the official code runs it);
* ``BestAdversarial`` (:mod:`.shared`): per sample, the adversarial image
  of smallest distortion among all the boundary queried, and the trace of
  (queries, best distortion), exact to the query;
* ``RaySearch.__call__``: clean check, initialisation, then iterations of
  estimate, step-size line search (``line_search``, the official code's)
  and the α/β resets; a sample whose g stalls (``stall_drop``, Sign-OPT in
  L2: :class:`Stall`, :class:`StallSwitch`) draws its directions in full
  dimension from then on. The initialisation takes the best of
  ``n_init`` directions: Gaussian ones, or in targeted mode ``s − x0`` for
  images ``s`` of the target class from the data (the official targeted
  attacks' start), each sample walking through its class's images from a
  random offset; the data index of the image behind the best start is
  returned as ``start_index``.
  Untargeted, a sample no Gaussian direction took across the boundary then
  tries images of the other classes from the data, when it is given them.

Budget: a sample starts an iteration only if it can afford
``iteration_cost`` queries; any query in a search is sent only for samples
with budget left, and a search cut short keeps its last adversarial λ, so
every g held is a verified adversarial distance.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ...access import Access
from ...oracles import LabelOracle
from ..base import MIN_NORM, NORMS, Attack, AttackResult, distortion
from .shared import (
    PROBE_VALUES,
    SUBSPACE_AUTO,
    BestAdversarial,
    Directions,
    Goal,
    LabelRun,
    PoolWalk,
    StartPool,
    begin,
    check_subspace,
    col,
    unit,
)

_ALPHA_FLOOR = 1e-4
_ALPHA_RESET = 1.0
_BETA_FLOOR = 1e-8
_STEP_DOWN = 0.99


class Boundary:
    """Label queries along rays ``x0 + λ θ`` for a subset of the samples."""

    def __init__(self, oracle: LabelOracle, x0: torch.Tensor, goal: Goal, norm: str):
        self.oracle = oracle
        self.x0 = x0
        self.goal = goal
        self.norm = norm
        self.best = BestAdversarial(x0, norm, oracle.queries)
        """Every adversarial image queried through :meth:`judge` is offered to it."""

    def unit(self, v: torch.Tensor) -> torch.Tensor:
        """Directions scaled to unit norm in the attack's norm."""
        return unit(v, self.norm)

    def affordable(self, rows: torch.Tensor) -> torch.Tensor:
        """Mask over ``rows``: samples with at least one query left."""
        return self.oracle.remaining().to(rows.device)[rows] >= 1

    def adversarial(self, rows: torch.Tensor, theta: torch.Tensor, lbd: torch.Tensor) -> torch.Tensor:
        """One query per row: is ``clip(x0 + λ θ)`` adversarial?"""
        base = self.x0[rows]
        images = (base + col(lbd) * theta).clamp_(0.0, 1.0)
        return self.judge(rows, images, distortion(images - base, self.norm))

    def judge(self, rows: torch.Tensor, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """One query per row: is the image adversarial for its sample? The
        adversarial ones go to :attr:`best`; ``sizes`` gives the images'
        distortions where the caller already has them."""
        before = self.oracle.queries()
        adversarial = self.goal.reached(rows, self.oracle.labels(images, idx=rows.cpu()))
        self.best.record(rows, images, adversarial, before, sizes)
        return adversarial

    def probe_images(
        self,
        rows: torch.Tensor,
        owner: torch.Tensor,
        theta: torch.Tensor,
        u: torch.Tensor,
        coef: torch.Tensor,
        lbd: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``clip(x0 + λ (θ + c u)/‖θ + c u‖)`` for probe rows ``u`` (P, d) of
        the samples ``rows[owner]``, with ``theta`` (one row per sample of
        ``rows``) and per-probe ``coef`` c and ``lbd`` λ, as (P, C, H, W)
        images, and their distortions. Built in place, a handful of passes
        over the probes."""
        flat = theta.flatten(1)
        probe = torch.index_select(flat, 0, owner)
        probe.addcmul_(u, coef[:, None])
        probe.mul_((lbd / distortion(probe, self.norm).clamp_min(1e-12))[:, None])
        base = torch.index_select(self.x0[rows].flatten(1), 0, owner)
        probe.add_(base).clamp_(0.0, 1.0)
        sizes = distortion(base.neg_().add_(probe), self.norm)
        return probe.view(len(owner), *theta.shape[1:]), sizes

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


class Stall:
    """Per sample, its distance g at the start of its last ``window``
    iterations (g(θ) for the ray searches, ‖x_t − x*‖ for HopSkipJump).

    A sample whose g fell by less than the fraction ``drop`` over its last
    ``window`` iterations (or rose: HopSkipJump's distance can) has stalled
    in the low-frequency subspace, and draws its directions in full
    dimension from then on (:meth:`Directions.refine
    <.shared.Directions.refine>`). ``drop = 0`` turns the rule off.
    """

    def __init__(self, n: int, window: int, drop: float, device):
        self.drop = drop
        self.past = torch.full((n, window), float("inf"), dtype=torch.float64, device=device)
        """Oldest first; inf until a sample has had ``window`` iterations."""

    def stalled(self, rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Mask over ``rows`` of the samples that stalled, given g at the start
        of their iteration now; records that g."""
        g = g.to(torch.float64)
        past = self.past[rows]
        self.past[rows] = torch.cat([past[:, 1:], g[:, None]], dim=1)
        if self.drop == 0:
            return torch.zeros_like(g, dtype=torch.bool)
        return g > (1.0 - self.drop) * past[:, 0]


class StallSwitch:
    """The switch to full-dimensional directions on a stall, for attacks with
    fields ``norm``, ``stall_window`` (iterations over which a sample's
    progress is judged) and ``stall_drop`` (the fraction its distance must
    fall by over them: 0 never switches; None takes ``auto_stall_drop`` for
    the norm, else 0)."""

    auto_stall_drop: ClassVar[dict[str, float]] = {}
    """``stall_drop`` per norm where it is None (absent: 0)."""

    def check_stall(self) -> None:
        window, drop = self.stall_window, self.stall_drop
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"stall_window must be an integer >= 1, got {window!r}")
        if drop is not None and not 0 <= drop < 1:
            raise ValueError(f"stall_drop must be in [0, 1) or None, got {drop}")

    @property
    def stall_fraction(self) -> float:
        """``stall_drop``, or where it is None the attack's choice for its norm."""
        return self.auto_stall_drop.get(self.norm, 0.0) if self.stall_drop is None else self.stall_drop

    def stall(self, n: int, device) -> Stall:
        """A fresh :class:`Stall` for a run on ``n`` samples."""
        return Stall(n, self.stall_window, self.stall_fraction, device)

    def as_run(self, num_classes: int, targeted: bool):
        """With ``stall_drop`` resolved, so the record says which rule ran."""
        return replace(self, stall_drop=self.stall_fraction)


@dataclass(frozen=True)
class RaySearch(StallSwitch, Attack):
    """OPT-family attack: the shared settings and loop; subclasses give ``_estimate``."""

    oracle: ClassVar[type] = LabelOracle
    kind: ClassVar[str] = MIN_NORM
    norms: ClassVar[tuple[str, ...]] = NORMS
    targeted: ClassVar[bool] = True
    starts_from_data: ClassVar[bool] = True
    # Label-only, they are far weaker than Square at a fixed ε and would
    # double the cost of the gradient-masking check above hard-label access;
    # AutoAttack's check is Square alone.
    default_up_to: ClassVar[Access] = Access.HARD_LABEL
    counts: ClassVar[tuple[str, ...]] = ("n_init", "max_line_search", "max_values")
    """Integer fields that must be at least 1."""

    norm: str = "l2"
    n_init: int = 100
    """Directions tried at initialisation: Gaussian, or targeted, data images
    of the target class."""
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
    max_values: int = PROBE_VALUES
    """Input values per oracle call for the probes (10,000 MNIST digits): the
    probes of as many samples as fit, at least one sample's. It bounds
    memory whatever the image size and never changes results."""
    subspace: int | str = SUBSPACE_AUTO
    """Factor f of the low-frequency subspace the gradient estimate's random
    directions are drawn in (:class:`~.shared.Directions`); 1 draws them in
    full dimension, as the paper does; ``"auto"`` takes f = 2 for 28 × 28
    and 32 × 32 images."""
    stall_window: int = 4
    """Iterations over which a sample's progress is judged (:class:`Stall`)."""
    stall_drop: float | None = None
    """A sample whose g fell by less than this fraction over its last
    ``stall_window`` iterations draws its directions in full dimension from
    then on; 0 keeps every sample in the subspace; None takes the attack's
    measured choice for its norm (:class:`StallSwitch`)."""

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"{self.name} supports norms {self.norms}, got {self.norm!r}")
        for field in self.counts:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if self.max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {self.max_iter}")
        for field in ("alpha", "beta", "tol"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)}")
        self.check_stall()
        check_subspace(self.subspace)

    @property
    @abc.abstractmethod
    def iteration_cost(self) -> int:
        """Queries a sample must have left to start an iteration."""

    @abc.abstractmethod
    def _estimate(
        self, ray, directions: Directions, rows, theta, g, beta
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(ĝ, best probe direction or None, its g) for the rows' (θ, g(θ), β),
        with the probe directions drawn from each row's own stream."""

    def __call__(
        self, oracle, x, y, *, eps=None, seed=0, target=None, starts: StartPool | None = None
    ) -> AttackResult:
        run = begin(self, oracle, x, y, eps=eps, seed=seed, target=target, starts=starts)
        x0 = run.x0
        device = oracle.device
        n = len(x0)
        ray = Boundary(oracle, x0, run.goal, self.norm)
        start = ray_start(ray, run, self.n_init, self.tol)
        theta, g, attack = start.theta, start.g, start.attack

        active = attack & torch.isfinite(g)
        alpha = torch.full((n,), self.alpha, device=device)
        beta = torch.full((n,), self.beta, device=device)
        stall = self.stall(n, device)

        for _ in range(self.max_iter):
            active &= oracle.remaining().to(device) >= self.iteration_cost
            rows = active.nonzero().squeeze(1)
            if not len(rows):
                break
            th, gg = theta[rows], g[rows]
            run.directions.refine(rows[stall.stalled(rows, gg)])
            step, smooth = alpha[rows], beta[rows]
            grad, probe_th, probe_g = self._estimate(ray, run.directions, rows, th, gg, smooth)
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

        return AttackResult(
            x_adv=ray.best.x, success=torch.isfinite(ray.best.size), queries=oracle.queries(),
            trace=ray.best.closed_trace(),
            start_index=start.start_index(),
        )


@dataclass
class RayStart:
    """Where a ray search starts: per sample θ, g(θ) and the pool position of
    a start from the data (-1: none)."""

    attack: torch.Tensor
    """Samples to attack: not adversarial already, with a query left then."""
    theta: torch.Tensor
    g: torch.Tensor
    start_at: torch.Tensor
    walk: PoolWalk | None = None
    """The walk through the data the pool positions refer to, if any."""

    def start_index(self) -> torch.Tensor | None:
        """Data set index of each sample's start image (-1: none), or None
        when no sample looked at the data."""
        return None if self.walk is None else self.walk.start_index(self.start_at)

    def search(self, ray: Boundary, run: LabelRun, looking: torch.Tensor, n_init: int, tol: float) -> None:
        """``n_init`` rounds over the samples in ``looking``, one direction per
        sample and round for all of them at once: Gaussian, or with a walk
        ``s − x0`` for its next data image ``s``. One query at
        ``min(‖θ‖, g*)`` decides whether θ can beat the best g* so far; a
        direction that passes is bisected on ``[0, min(‖θ‖, g*)]`` down to
        ``tol`` and kept if its g is smaller."""
        everyone = torch.arange(len(self.g), device=self.g.device)
        for r in range(n_init):
            mask = looking & ray.affordable(everyone)
            if self.walk is not None:
                mask &= self.walk.has(everyone, r)
            rows = mask.nonzero().squeeze(1)
            if not len(rows):
                break
            if self.walk is None:
                direction, positions = run.directions.gaussian(rows, 1), None
            else:
                positions = self.walk.positions(rows, r)
                direction = self.walk.images(positions, run.x0.device, run.x0.dtype) - run.x0[rows]
            scale = torch.minimum(distortion(direction, ray.norm), self.g[rows])
            direction = ray.unit(direction)
            adv = ray.adversarial(rows, direction, scale)
            hi = ray.bisect(rows, direction, torch.zeros_like(scale), scale, torch.full_like(scale, tol), adv)
            better = adv & (hi < self.g[rows])
            self.g[rows[better]] = hi[better].to(self.g.dtype)
            self.theta[rows[better]] = direction[better]
            if positions is not None:
                self.start_at[rows[better]] = positions[better]


def ray_start(ray: Boundary, run: LabelRun, n_init: int, tol: float) -> RayStart:
    """The clean check and OPT's initialisation, batched over the samples.

    Clean check: one query of ``x0``; a sample already adversarial gets
    g = 0 and is not attacked. Then :meth:`RayStart.search` over ``n_init``
    directions per sample: Gaussian ones, or in targeted mode towards the
    data images of the target class. Untargeted, the samples for which no
    Gaussian direction crossed the boundary (on a model that labels noise
    as their class, none can) then search ``n_init`` directions towards
    data images of the other classes, when the run has a pool: such an image
    is usually classified as its own class, so the ray reaches the boundary.
    """
    x0 = run.x0
    n = len(x0)
    everyone = torch.arange(n, device=x0.device)
    start = RayStart(
        attack=ray.affordable(everyone),
        theta=torch.zeros_like(x0),
        g=torch.full((n,), float("inf"), device=x0.device),
        start_at=torch.full((n,), -1, dtype=torch.long, device=x0.device),
        walk=run.walk,
    )
    sel = start.attack.nonzero().squeeze(1)
    if len(sel):
        clean_adv = ray.adversarial(sel, start.theta[sel], start.g.new_zeros(len(sel)))
        start.g[sel[clean_adv]] = 0.0
        start.attack[sel[clean_adv]] = False

    start.search(ray, run, start.attack, n_init, tol)
    lost = start.attack & torch.isinf(start.g)
    if run.walk is None and run.pool is not None and lost.any():
        start.walk = PoolWalk.away_from(run.pool, run.goal.y, lost.nonzero().squeeze(1), run.rng)
        start.search(ray, run, lost, n_init, tol)
    return start


def line_search(
    ray: Boundary,
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
        cand = ray.unit(theta[sel] - col(alpha[sel]) * grad[sel])
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
        cand = ray.unit(theta[sel] - col(alpha[sel]) * grad[sel])
        new_g = ray.local_search(rows[sel], cand, g[sel], tol[sel])
        better = new_g < g[sel]
        best_th[sel[better]], best_g[sel[better]] = cand[better], new_g[better]
        shrinking[sel[better]] = False
    return best_th, best_g
