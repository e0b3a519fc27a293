"""Files shipped inside the wheel: report templates and policies."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def templates_dir() -> Path:
    return Path(str(importlib.resources.files("auditor.templates")))


def policies_dir() -> Path:
    return Path(str(importlib.resources.files("auditor.policies")))
