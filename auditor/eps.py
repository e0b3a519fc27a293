"""Radii as people write and read them: ``8/255`` as well as ``0.0313725``.

results.json keys each ε by :func:`eps_key`; the command line and policies
also take a fraction (:func:`parse_eps`), and the report and terminal show a
whole number of 8-bit grey levels as one (:func:`eps_text`), the notation of
AutoAttack and RobustBench.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from .errors import AuditError

GREY_LEVELS = 255


def eps_key(eps: float) -> str:
    """ε's key in results.json (``robust_accuracy``, the transfer matrix)."""
    return f"{eps:g}"


def parse_eps(text: str) -> float:
    """A radius from ``0.03`` or ``8/255``; ValueError unless a finite number
    (its range is the caller's to check: ``--eps`` needs > 0, policies >= 0)."""
    numerator, slash, denominator = str(text).partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{text!r} is not a number or a fraction such as 8/255") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite radius")
    return value


def eps_text(eps: float | str) -> str:
    """ε for reading: ``8/255`` where ε is a whole number of grey levels that
    its decimal key spells with many digits (``0.0313725``), else the key
    (``0.3``, ``2``; ``0.2`` stays ``0.2``, not ``51/255``)."""
    value = float(eps)
    key = eps_key(value)
    levels = round(value * GREY_LEVELS)
    if len(key) > 6 and 0 < levels < GREY_LEVELS and abs(value * GREY_LEVELS - levels) < 1e-4:
        return f"{levels}/{GREY_LEVELS}"
    return key


def check_radius(eps: float, norm: str, shape: Sequence[int] | None = None) -> None:
    """AuditError unless ``eps`` is a radius that leaves an image somewhere to
    go: > 0, at most 1 in L∞ and, given the image ``shape`` (C, H, W), at most
    the diameter √(C·H·W) of the pixel cube [0,1]^d in L2."""
    if not eps > 0:
        raise AuditError(f"--eps must be > 0, got {eps:g}")
    if norm == "linf" and eps > 1:
        raise AuditError(f"--eps {eps:g} exceeds the [0,1] pixel range for linf")
    if norm == "l2" and shape is not None and eps > math.sqrt(math.prod(shape)):
        raise AuditError(
            f"--eps {eps:g} exceeds the L2 diameter {math.sqrt(math.prod(shape)):.4g} of [0,1] images of shape "
            f"{'x'.join(map(str, shape))}"
        )


def eps_at_half(distortions: Iterable[float | None]) -> float | None:
    """The ε at which robust accuracy, read from the per-sample records
    (None or inf: never broken), falls to 50 %: the smallest record at which
    at least half of the samples are broken (the lower median for an even
    count), rounded to 6 decimals as results.json stores it, or None when
    more than half of the samples were never broken.

    A record is the smallest distortion an attack found (a fixed-ε attack's
    lies at the ε it ran at), so robust accuracy reaches 50 % at or below
    this ε; records of minimum-norm attacks can put it beyond the largest
    audited ε, outside the threat model (the report says which)."""
    ordered = sorted(math.inf if size is None else float(size) for size in distortions)
    middle = ordered[(len(ordered) - 1) // 2] if ordered else math.inf
    return round(middle, 6) if math.isfinite(middle) else None


DEFAULT_EPS = {
    ("digits", "linf"): (0.1, 0.2, 0.3),
    ("digits", "l2"): (1.0, 1.5, 2.0),
    ("photos", "linf"): (2 / 255, 4 / 255, 8 / 255),
    ("photos", "l2"): (0.25, 0.5, 1.0),
}
"""ε grids used when ``--eps`` is not given, by the kind of image: the
standard MNIST radii for greyscale images of at most 32 × 32 (MNIST,
Fashion-MNIST and the like, built in or not), the usual CIFAR/ImageNet radii
for anything else."""


def image_kind(shape: Sequence[int]) -> str:
    """``"digits"`` for greyscale images of at most 32 × 32 (C, H, W), else ``"photos"``."""
    channels, height, width = shape
    return "digits" if channels == 1 and max(height, width) <= 32 else "photos"


def default_eps(shape: Sequence[int], norm: str) -> tuple[float, ...]:
    """The radii audited in ``norm`` (``linf`` or ``l2``) for images of
    ``shape`` (C, H, W) when ``--eps`` is not given: :data:`DEFAULT_EPS` of
    their :func:`image_kind`. The policies' ``eps: min``/``max`` read them too."""
    return DEFAULT_EPS[(image_kind(shape), norm)]
