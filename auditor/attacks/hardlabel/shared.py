"""What the hard-label attacks share: the goal of a label query, the best
adversarial image held per sample, and starting images from the data.

* :class:`Goal`: a label is adversarial when it differs from the true label
  (untargeted) or equals the sample's target class (targeted).
* :class:`BestAdversarial`: per sample, the adversarial image of smallest
  distortion in the attack's norm among all label queries so far; it is
  the attack's ``x_adv``, and it keeps the trace: an entry (queries spent,
  best distortion) at each query that improved some sample's best, so the
  queries at which a sample's best first came within ε are exact.
* :class:`SampleRandom`: one random stream per sample, so that batching is
  exact: a sample gets the same result in a batch as alone, with the same
  seed.
* :class:`Directions`: the random directions of the gradient estimates,
  drawn from those streams, full-dimensional or in a low-frequency subspace.
* :class:`StartPool` and :class:`PoolWalk`: in targeted mode an attack
  starts from images of the target class taken from the data, as Sign-OPT's
  and HopSkipJump's official targeted attacks do; the pool holds the data,
  and each sample walks through the images of its target class from a
  random offset, so no image is tried twice before all were. Untargeted, a
  sample that no random direction took across the boundary walks through
  images of the other classes instead (Foolbox's and the Boundary Attack's
  starting points from the data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from ..base import check_call, distortion, generator


PROBE_VALUES = 10_000 * 28 * 28
"""Input values per oracle call of gradient probes, by default: 10,000 MNIST
digits, 2,552 images of 3 × 32 × 32, 52 of 3 × 224 × 224 (31 MB of float32
per copy of the probes)."""


def col(v: torch.Tensor) -> torch.Tensor:
    """A (M,) vector shaped to broadcast against (M,C,H,W)."""
    return v.view(-1, *([1] * 3))


def unit(v: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Scale each row of a (M, ...) batch to norm 1 in ``norm``."""
    return v / col(distortion(v, norm).clamp_min(1e-12))


class Goal:
    """Which labels count as adversarial, per sample."""

    def __init__(self, y: torch.Tensor, target: torch.Tensor | None = None):
        self.y = y
        self.target = target

    def reached(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(self.y.device)
        if self.target is None:
            return labels != self.y[rows]
        return labels == self.target[rows]


def call_rank(samples: torch.Tensor) -> torch.Tensor:
    """Per row of one oracle call, how many earlier rows of the call belong
    to the same sample: the row is that sample's query ``rank + 1`` of the call."""
    ordered, perm = torch.sort(samples, stable=True)
    first = torch.searchsorted(ordered, ordered)
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(len(ordered), device=samples.device) - first
    return rank


def _run_keys(samples: torch.Tensor, size: torch.Tensor, n: int) -> torch.Tensor:
    """Integer keys for hits sorted by sample whose running minimum restarts
    with each sample: later samples get smaller high bits, and the bits of
    a non-negative float32 order as the float does."""
    return ((n - samples) << 32) | size.float().view(torch.int32).long()


def _entries(before, best, samples, at, size, last) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Trace entries for improvements (sorted by sample, then query ``at``):
    entry j holds each sample's j-th improvement, or its last one where it
    has fewer; the samples with none keep their count ``before`` the call.
    ``best`` is the best after them all."""
    ordinal = call_rank(samples)
    entries = int(ordinal.max()) + 1
    count = before.expand(entries, -1).clone()
    held = best.cpu().expand(entries, -1).clone()
    # an improvement holds from its ordinal up to the next one of its sample, the last one to the end
    until = torch.where(last, torch.full_like(ordinal, entries), torch.roll(ordinal, -1))
    span = until - ordinal
    rows = torch.repeat_interleave(ordinal, span) + _offsets(span)
    cols = torch.repeat_interleave(samples, span)
    count[rows, cols] = torch.repeat_interleave(at, span)
    held[rows, cols] = torch.repeat_interleave(size, span).to(held.dtype)
    return list(zip(count.unbind(0), held.to(best.device).unbind(0)))


def _offsets(span: torch.Tensor) -> torch.Tensor:
    """0, 1, …, span[i] − 1 for each i, concatenated."""
    return torch.arange(int(span.sum())) - torch.repeat_interleave(torch.cumsum(span, 0) - span, span)


class BestAdversarial:
    """Per sample, the adversarial image of smallest distortion queried so
    far, and the trace of (queries spent, best distortion) over all samples.

    :meth:`record` sees every label query, so the best is the best the
    attacker has seen, whichever step asked, and the trace is exact to the
    query: an entry at the start, then after a call that improved some
    sample's best, entries that give each improvement with that sample's
    count at the very query that found it (samples not improved keep their
    count before the call, at which their best already held).
    :meth:`closed_trace` adds one at the end. ``queries`` is the oracle's
    per-sample count."""

    def __init__(self, x0: torch.Tensor, norm: str, queries: Callable[[], torch.Tensor]):
        self.x0 = x0
        self.norm = norm
        self.x = x0.clone()
        self.size = torch.full((len(x0),), float("inf"), device=x0.device)
        self._queries = queries
        self.trace = [(queries().clone(), self.size.clone())]

    def record(
        self,
        rows: torch.Tensor,
        images: torch.Tensor,
        adversarial: torch.Tensor,
        before: torch.Tensor,
        sizes: torch.Tensor | None = None,
    ) -> None:
        """Take in one oracle call: ``images`` queried for samples ``rows``
        in that order, which were ``adversarial``; ``before`` is each
        sample's query count before the call, ``sizes`` the images'
        distortions where the caller has them."""
        hit = adversarial.nonzero().squeeze(1)
        if not len(hit):
            return
        samples = rows.index_select(0, hit)
        if sizes is None:
            size = distortion(images.index_select(0, hit).sub_(self.x0.index_select(0, samples)), self.norm)
        else:
            size = sizes.index_select(0, hit)
        size = size.to(self.size.dtype)
        keep = (size < self.size.index_select(0, samples)).nonzero().squeeze(1)
        if not len(keep):  # nothing beats the best before the call
            return
        hit, samples, size = hit.index_select(0, keep), samples.index_select(0, keep), size.index_select(0, keep)
        cpu = rows.cpu()
        if len(set(cpu.tolist())) == len(cpu):
            self._take_one_each(images, hit, samples, size, before)
        else:
            at = (before.index_select(0, cpu) + call_rank(cpu) + 1).index_select(0, hit.cpu())
            self._take_in_query_order(images, hit, samples, size, at, before)

    def _take_one_each(self, images, hit, samples, size, before) -> None:
        """A call with one row per sample: each hit is its sample's one
        improvement, at its first query of the call."""
        self.x.index_copy_(0, samples, images.index_select(0, hit))
        self.size.index_copy_(0, samples, size)
        count = before.clone()
        count[samples.cpu()] += 1
        self.trace.append((count, self.size.clone()))

    def _take_in_query_order(self, images, hit, samples, size, at, before) -> None:
        """A call with several rows for some samples: each sample's hits in
        query order ``at``; those that beat all its earlier ones are its
        improvements, the last of them its new best."""
        order = torch.argsort(samples, stable=True)
        hit, samples, size, at = hit[order], samples[order], size[order], at[order.cpu()]
        key = _run_keys(samples, size, len(self.size))
        improves = torch.ones_like(samples, dtype=torch.bool)
        improves[1:] = key[1:] < torch.cummin(key, 0).values[:-1]
        events = improves.nonzero().squeeze(1)
        hit, samples, size, at = hit[events], samples[events], size[events], at[events.cpu()]
        last = torch.ones_like(samples, dtype=torch.bool)
        last[:-1] = samples[1:] != samples[:-1]
        self.x[samples[last]] = images[hit[last]]
        self.size[samples[last]] = size[last]
        self.trace.extend(_entries(before, self.size, samples.cpu(), at, size.cpu(), last.cpu()))

    def closed_trace(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The trace with a last entry at the queries spent now: the run's result."""
        return [*self.trace, (self._queries().clone(), self.size.clone())]


class SampleRandom:
    """One seeded ``torch.Generator`` per sample.

    A sample's stream is seeded from the attack's seed and the bytes of its
    clean image, never its position, and every draw takes a whole per-sample
    request (all k probes of an iteration) in one call, so what a sample
    draws does not depend on the other samples of the batch. torch has no
    batched per-row generator, so the draws loop over the rows; each loop
    step is one generator call, small next to the model queries it feeds.
    """

    def __init__(self, seed: int, x: torch.Tensor):
        self.device = x.device
        images = x.detach().cpu().contiguous().numpy()
        self.samples = len(images)
        self._gens = [generator(self._seed(seed, image.tobytes()), x.device) for image in images]

    @staticmethod
    def _seed(seed: int, image: bytes) -> int:
        digest = hashlib.blake2b(image, digest_size=8, key=str(int(seed)).encode()).digest()
        return int.from_bytes(digest, "little") >> 1

    def _draw(self, kind, rows: torch.Tensor, counts, shape, dtype) -> torch.Tensor:
        """Each row's draws written in place into one tensor, row after row."""
        out = torch.empty((sum(counts), *shape), device=self.device, dtype=dtype)
        start = 0
        for row, count in zip(rows.tolist(), counts):
            kind((count, *shape), generator=self._gens[row], out=out[start : start + count])
            start += count
        return out

    def randn(self, rows: torch.Tensor, counts, shape, dtype=torch.float32) -> torch.Tensor:
        """Standard normal draws: ``counts[i]`` (or ``counts`` for every row)
        arrays of ``shape`` for row i, stacked row after row."""
        return self._draw(torch.randn, rows, self._counts(rows, counts), shape, dtype)

    def rand(self, rows: torch.Tensor, counts, shape, dtype=torch.float32) -> torch.Tensor:
        """Uniform [0,1) draws, laid out as :meth:`randn`'s."""
        return self._draw(torch.rand, rows, self._counts(rows, counts), shape, dtype)

    @staticmethod
    def _counts(rows: torch.Tensor, counts) -> list[int]:
        if isinstance(counts, int):
            return [counts] * len(rows)
        return [int(c) for c in counts.tolist()]


SUBSPACE_AUTO = "auto"


def subspace_factor(setting: int | str, shape: tuple[int, ...]) -> int:
    """The subspace factor f for images of ``shape`` (C, H, W).

    ``setting`` is an int f >= 1, or ``"auto"``: a grid of side
    ``max(14, side // 4)`` for the smaller image side, so f = 2 for MNIST
    (28 × 28) and CIFAR (32 × 32) and f = 4 for 64 × 64 and 224 × 224 images.
    """
    if setting != SUBSPACE_AUTO:
        return int(setting)
    side = min(shape[-2:])
    return max(1, side // max(14, side // 4))


def check_subspace(setting) -> None:
    """Refuse a subspace setting other than ``"auto"`` or an int >= 1."""
    ok = setting == SUBSPACE_AUTO or (isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1)
    if not ok:
        raise ValueError(f"subspace must be 'auto' or an integer >= 1, got {setting!r}")


def _upsampling(small: int, large: int) -> torch.Tensor:
    """The (large, small) matrix of 1-D bilinear upsampling (``align_corners=False``)."""
    eye = torch.eye(small, dtype=torch.float64).view(small, 1, small)
    return F.interpolate(eye, size=large, mode="linear", align_corners=False).view(small, large).T


class Directions:
    """Random directions for the gradient estimates, one stream per sample.

    With factor f = 1 a direction is a full-dimensional draw, as in the
    papers. With f > 1 it is drawn on the coarse grid (C, ⌈H/f⌉, ⌈W/f⌉) and
    upsampled bilinearly to (C, H, W): a low-frequency direction in the
    spatial subspace of QEBA (Li, Xu, Zhang, Yang and Li, "QEBA: Query-
    Efficient Boundary-Based Blackbox Attack", CVPR 2020, Sec. 3.3 "spatial
    transformed subspace"; Guo, Frank and Weinberger, "Low Frequency
    Adversarial Perturbation", UAI 2019). A sign or finite-difference
    estimate then spends its probes on the d/f² directions where decision
    boundaries of image classifiers mostly vary, and draws f² times fewer
    random numbers. On the example MNIST CNN (50 digits, L2), f = 2 took
    Sign-OPT's median distortion (with the official k = 200) at 1,000
    queries from 2.72 to 1.40 and at 4,000 from 1.35 to 1.20, and
    HopSkipJump's from 2.15 to 1.58 and 1.59 to 1.48; f = 4 did no better.

    The subspace buys early progress and caps late progress: the estimate
    sees only the low-frequency part of the gradient. So an attack may
    :meth:`refine` a sample whose progress has stalled; its directions are
    full-dimensional draws from then on (see :class:`~.ray_search.Stall`).
    """

    def __init__(self, rng: SampleRandom, shape: tuple[int, ...], factor: int, dtype=torch.float32):
        c, h, w = shape
        self.rng = rng
        self.dtype = dtype
        self.full = (c, h, w)
        self.shape = (c, -(-h // factor), -(-w // factor))
        self._up = None
        if factor > 1:
            self._up = (
                _upsampling(self.shape[1], h).to(device=rng.device, dtype=dtype),
                _upsampling(self.shape[2], w).T.contiguous().to(device=rng.device, dtype=dtype),
            )
        self.fine = torch.zeros(rng.samples, dtype=torch.bool, device=rng.device)
        """Samples that draw in full dimension (:meth:`refine`)."""

    def refine(self, rows: torch.Tensor) -> None:
        """From now on, draw these samples' directions in full dimension."""
        self.fine[rows] = True

    def _lift(self, small: torch.Tensor) -> torch.Tensor:
        if self._up is None:
            return small
        rows, cols = self._up
        return torch.matmul(torch.matmul(rows, small), cols)

    def _draw(self, draw, rows: torch.Tensor, counts) -> torch.Tensor:
        """``draw(rows, counts, shape)`` on the grid, lifted, for the coarse
        samples, and in full dimension for the :attr:`fine` ones, laid out
        row after row."""
        fine = self.fine[rows]
        if self._up is None or not fine.any():
            return self._lift(draw(rows, counts, self.shape))
        counts = torch.as_tensor(counts, device=rows.device).expand(len(rows))
        per_probe = torch.repeat_interleave(fine, counts)
        out = torch.empty((len(per_probe), *self.full), dtype=self.dtype, device=self.rng.device)
        out[per_probe] = draw(rows[fine], counts[fine], self.full)
        if not fine.all():
            out[~per_probe] = self._lift(draw(rows[~fine], counts[~fine], self.shape))
        return out

    def gaussian(self, rows: torch.Tensor, counts) -> torch.Tensor:
        """``counts[i]`` Gaussian directions for row i, stacked (not normalised)."""
        return self._draw(lambda r, c, shape: self.rng.randn(r, c, shape, self.dtype), rows, counts)

    def uniform(self, rows: torch.Tensor, counts) -> torch.Tensor:
        """Directions uniform in [-1, 1] per coordinate of the grid, laid out as
        :meth:`gaussian`'s (not normalised)."""
        return self._draw(lambda r, c, shape: self.rng.rand(r, c, shape, self.dtype) * 2 - 1, rows, counts)


@dataclass(frozen=True)
class StartPool:
    """Images a targeted hard-label attack may start from.

    ``x`` (P,C,H,W) in [0,1], ``y`` (P,) their true labels, ``index`` (P,)
    their indices in the data set, which the results record."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.index)):
            raise ValueError("StartPool x, y and index must have the same length")


class PoolWalk:
    """Per sample, pool images of the classes it may start from, in a seeded order.

    ``allowed`` (N, C) marks the classes whose images sample i may start
    from: its target class (:meth:`to_targets`), or every class but its own
    (:meth:`away_from`, the untargeted fallback). With ``a_i`` allowed
    classes that have images, round r takes the ``(r mod a_i)``-th of them
    (in class order) and, among its ``count`` images, the one at position
    ``(⌊u_i · count⌋ + r // a_i) mod count``, with u_i uniform from the
    sample's stream. Targeted (one class), round r is image ``offset_i + r``
    of the target class, so no image is tried twice before all were;
    untargeted, the rounds cycle through the other classes. A sample whose
    allowed classes have no image in the pool gets none.
    """

    def __init__(self, pool: StartPool, allowed: torch.Tensor, u: torch.Tensor):
        device = allowed.device
        labels = pool.y.to(device)
        self.pool = pool
        self.order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=allowed.shape[1])
        self.first = torch.cumsum(counts, 0) - counts
        self.counts = counts
        self.allowed = allowed & (counts > 0)
        self.classes = self.allowed.sum(1)
        self.total = (self.allowed * counts).sum(1)
        self.u = u

    @staticmethod
    def _width(pool: StartPool, labels: torch.Tensor) -> int:
        top = max(int(pool.y.max()) if len(pool.y) else 0, int(labels.max()) if len(labels) else 0)
        return top + 1

    @classmethod
    def to_targets(cls, pool: StartPool, target: torch.Tensor, rng: SampleRandom) -> PoolWalk:
        """Images of each sample's target class (one draw from every sample's stream)."""
        allowed = F.one_hot(target, cls._width(pool, target)).bool()
        return cls(pool, allowed, rng.rand(torch.arange(len(target)), 1, ()).to(target.device))

    @classmethod
    def away_from(
        cls, pool: StartPool, y: torch.Tensor, rows: torch.Tensor, rng: SampleRandom
    ) -> PoolWalk:
        """Images of any class but each sample's own, for ``rows`` only (one
        draw from each of their streams; the other samples get none)."""
        chosen = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        chosen[rows] = True
        allowed = ~F.one_hot(y, cls._width(pool, y)).bool() & chosen[:, None]
        u = torch.zeros(len(y), device=y.device)
        u[rows] = rng.rand(rows, 1, ()).to(y.device)
        return cls(pool, allowed, u)

    def has(self, rows: torch.Tensor, r: int) -> torch.Tensor:
        """Mask over ``rows``: samples with an image for round ``r``."""
        return self.total[rows] > r

    def positions(self, rows: torch.Tensor, r: int) -> torch.Tensor:
        """Pool positions of round ``r``'s image for ``rows`` (which must have one)."""
        allowed = self.allowed[rows]
        classes = self.classes[rows]
        # the (r mod a)-th allowed class: the number of columns whose running
        # count of allowed classes is at most r mod a
        label = (allowed.cumsum(1) <= (r % classes)[:, None]).sum(1)
        count = self.counts[label]
        step = ((self.u[rows] * count).long() + r // classes) % count
        return self.order[self.first[label] + step]

    def images(self, positions: torch.Tensor, device, dtype) -> torch.Tensor:
        return self.pool.x[positions.cpu()].to(device=device, dtype=dtype)

    def start_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Data set indices of pool ``positions`` (-1 stays -1: no start), on the CPU."""
        positions = positions.cpu()
        found = positions >= 0
        out = torch.full_like(positions, -1)
        out[found] = self.pool.index[positions[found]]
        return out


@dataclass(frozen=True)
class LabelRun:
    """What a hard-label attack call starts from: the clean images on the
    oracle's device, the goal, the per-sample random streams, the data
    images it may start from (``pool``) and, targeted, the walk through them
    towards the targets, and the directions of the gradient estimates (in
    the attack's ``subspace``)."""

    x0: torch.Tensor
    goal: Goal
    rng: SampleRandom
    walk: PoolWalk | None
    directions: Directions
    pool: StartPool | None = None


def begin(attack, oracle, x, y, *, eps, seed, target, starts: StartPool | None) -> LabelRun:
    """Check a hard-label call's arguments and set up its run."""
    check_call(attack, eps, target, y)
    if target is not None and starts is None:
        raise ValueError(f"{attack.label} needs starts (images of the target classes) in targeted mode")
    x0 = x.to(oracle.device)
    rng = SampleRandom(seed, x0)
    goal = Goal(y.to(oracle.device), None if target is None else target.to(oracle.device))
    walk = None if target is None else PoolWalk.to_targets(starts, goal.target, rng)
    shape = tuple(x0.shape[1:])
    directions = Directions(rng, shape, subspace_factor(attack.subspace, shape), x0.dtype)
    return LabelRun(x0, goal, rng, walk, directions, starts)
