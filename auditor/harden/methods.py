"""The hardening methods, by the name ``--method`` takes."""

from __future__ import annotations

from collections.abc import Callable

from .config import HardenConfig
from .fast_at import FastAT
from .free_at import FreeAT
from .pgd_at import PGDAT
from .train import Method

METHODS: dict[str, Callable[[HardenConfig], Method]] = {
    "fast": FastAT.from_config,
    "pgd": PGDAT.from_config,
    "free": FreeAT.from_config,
}
"""``--method`` name -> the method built from a :class:`HardenConfig`."""
