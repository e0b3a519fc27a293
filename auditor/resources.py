"""Files shipped inside the wheel: report templates, policies and the docs the report quotes."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def templates_dir() -> Path:
    return Path(str(importlib.resources.files("auditor.templates")))


def policies_dir() -> Path:
    return Path(str(importlib.resources.files("auditor.policies")))


def docs_dir() -> Path:
    """``docs/``: the report quotes the explanation of each check from ``checks.md``."""
    return Path(str(importlib.resources.files("auditor.docs")))
