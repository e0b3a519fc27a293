"""Number formats shared by the report, its transfer matrix and the CLI summary."""

from __future__ import annotations

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
