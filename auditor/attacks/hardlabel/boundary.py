"""What the hard-label attacks share: the goal of a label query, the best
adversarial image held per sample, and starting images for targeted mode.

* :class:`Goal`: a label is adversarial when it differs from the true label
  (untargeted) or equals the sample's target class (targeted).
* :class:`BestAdversarial`: per sample, the verified adversarial image of
  smallest distortion in the attack's norm held so far; it is the attack's
  ``x_adv`` and its sizes are the trace.
* :class:`SampleRandom`: one random stream per sample, so that batching is
  exact: a sample gets the same result in a batch as alone, with the same
  seed.
* :class:`StartPool` and :class:`PoolWalk`: in targeted mode an attack
  starts from images of the target class taken from the data, as Sign-OPT's
  and HopSkipJump's official targeted attacks do; the pool holds the data,
  and each sample walks through the images of its target class from a
  random offset, so no image is tried twice before all were.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..base import check_call, distortion, generator


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


class BestAdversarial:
    """Per sample, the adversarial image of smallest distortion held so far."""

    def __init__(self, x0: torch.Tensor, norm: str):
        self.x0 = x0
        self.norm = norm
        self.x = x0.clone()
        self.size = torch.full((len(x0),), float("inf"), device=x0.device)

    def update(self, rows: torch.Tensor, images: torch.Tensor, valid: torch.Tensor) -> None:
        size = distortion(images - self.x0[rows], self.norm).to(self.size.dtype)
        better = valid & (size < self.size[rows])
        self.x[rows[better]] = images[better]
        self.size[rows[better]] = size[better]


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
        self._gens = [generator(self._seed(seed, image.tobytes()), x.device) for image in images]

    @staticmethod
    def _seed(seed: int, image: bytes) -> int:
        digest = hashlib.blake2b(image, digest_size=8, key=str(int(seed)).encode()).digest()
        return int.from_bytes(digest, "little") >> 1

    def _draw(self, kind, rows: torch.Tensor, counts, shape, dtype) -> torch.Tensor:
        parts = [
            kind((int(count), *shape), generator=self._gens[row], device=self.device, dtype=dtype)
            for row, count in zip(rows.tolist(), counts)
        ]
        if not parts:
            return torch.empty((0, *shape), device=self.device, dtype=dtype)
        return torch.cat(parts)

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
    """Per sample, the pool images of its target class in a seeded order.

    Round r gives sample i the image at position ``(offset_i + r) mod count``
    among the pool images whose label is ``target_i``; a sample whose class
    has no image in the pool gets none.
    """

    def __init__(self, pool: StartPool, target: torch.Tensor, rng: SampleRandom):
        device = target.device
        labels = pool.y.to(device)
        self.pool = pool
        self.order = torch.argsort(labels, stable=True)
        classes = int(max(int(labels.max()) if len(labels) else 0, int(target.max()) if len(target) else 0)) + 1
        counts = torch.bincount(labels, minlength=classes)
        self.first = torch.cumsum(counts, 0) - counts
        self.count = counts[target]
        self.start = self.first[target]
        draw = rng.rand(torch.arange(len(target)), 1, ()).to(device)
        self.offset = (draw * self.count.clamp_min(1)).long()

    def has(self, rows: torch.Tensor, r: int) -> torch.Tensor:
        """Mask over ``rows``: samples with an untried image left at round ``r``."""
        return self.count[rows] > r

    def positions(self, rows: torch.Tensor, r: int) -> torch.Tensor:
        """Pool positions of round ``r``'s image for ``rows`` (which must have one)."""
        step = (self.offset[rows] + r) % self.count[rows]
        return self.order[self.start[rows] + step]

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
    oracle's device, the goal, the per-sample random streams and, targeted,
    the walk through the start pool."""

    x0: torch.Tensor
    goal: Goal
    rng: SampleRandom
    walk: PoolWalk | None


def begin(attack, oracle, x, y, *, eps, seed, target, starts: StartPool | None) -> LabelRun:
    """Check a hard-label call's arguments and set up its run."""
    check_call(attack, eps, target, y)
    if target is not None and starts is None:
        raise ValueError(f"{attack.label} needs starts (images of the target classes) in targeted mode")
    x0 = x.to(oracle.device)
    rng = SampleRandom(seed, x0)
    goal = Goal(y.to(oracle.device), None if target is None else target.to(oracle.device))
    walk = None if target is None else PoolWalk(starts, goal.target, rng)
    return LabelRun(x0, goal, rng, walk)
