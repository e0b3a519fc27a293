"""Number formats shared by the report, its transfer matrix and the CLI summary."""

from __future__ import annotations

import math
from decimal import Decimal

MISSING = "—"


def percent(fraction: float | None) -> str:
    """A fraction as a percentage with one decimal, e.g. ``"62.0 %"``.

    Only exactly 1 and exactly 0 read ``"100.0 %"`` and ``"0.0 %"``: a value
    that one decimal would round to either end reads ``"> 99.9 %"`` or
    ``"< 0.1 %"``, so 1 sample broken of 4,000 never shows as 100 % robust.
    """
    if fraction is None:
        return MISSING
    text = f"{fraction * 100:.1f}"
    if text == "100.0" and fraction < 1:
        return "> 99.9 %"
    if text == "0.0" and fraction > 0:
        return "< 0.1 %"
    return f"{text} %"


def exact_percent(fraction: str) -> str:
    """A threshold written as a fraction (``"0.95"``, ``"0.7000001"``,
    ``"1e-07"``), as a percentage with every digit it was written with:
    ``"95 %"``, ``"70.00001 %"``, ``"0.00001 %"``."""
    return f"{format((Decimal(fraction) * 100).normalize(), 'f')} %"


def percent_beside(fraction: float, threshold: str) -> str:
    """``fraction`` as :func:`percent` shows it, with more decimals (up to
    6) where that would read as the ``threshold`` it is compared with: 70.0 %
    beside a threshold of 70.00001 % would hide why it failed, and
    "> 99.9 %" beside 99.99 % too. A value equal to its threshold reads as
    :func:`percent` shows it; no precision reads 100 % or 0 % unless exact."""
    plain = percent(fraction)
    if fraction == float(threshold):
        return plain
    limit = Decimal(threshold) * 100
    for decimals in range(1, 7):
        shown = Decimal(f"{fraction * 100:.{decimals}f}")
        if shown == limit or (shown in (0, 100) and 0 < fraction < 1):
            continue
        return plain if decimals == 1 else f"{shown} %"
    return plain


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion of ``successes`` in ``n``
    trials (95 % for the default ``z``); ``n`` must be at least 1."""
    share = successes / n
    scale = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval_text(fraction: float, n: int) -> str:
    """The 95 % Wilson interval of an accuracy measured on ``n`` samples, e.g.
    ``"83.4–98.7 %"``, its bounds rounded outwards ("" when ``n`` is 0)."""
    if n == 0:
        return ""
    low, high = wilson_interval(round(fraction * n), n)
    return f"{math.floor(low * 1000) / 10:.1f}–{math.ceil(high * 1000) / 10:.1f} %"
