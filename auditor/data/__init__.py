"""Loading the labelled images a scan runs on."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AuditError
from .arrays import load_npz
from .base import Dataset
from .builtin import mnist

__all__ = ["Dataset", "load_data", "load_npz", "mnist"]


def load_data(spec: str | os.PathLike, split: str = "test") -> Dataset:
    """``mnist`` (the built-in set, split ``split``), an image folder or a ``.npz`` file.

    ``spec`` is a string or a path (``pathlib.Path``); only the string
    ``"mnist"`` names the built-in set (``Path("mnist")`` is a folder).
    ``split`` only applies to ``mnist``; other sources are used whole.
    """
    if spec == "mnist":
        return mnist(split)
    spec = os.fsdecode(spec)
    if Path(spec).is_dir():
        from .folder import load_folder  # torchvision takes seconds to import: only for folders

        return load_folder(spec)
    if spec.lower().endswith(".npz"):
        return load_npz(spec)
    raise AuditError(f"unknown data {spec!r}: use mnist, a .npz file or an image folder")
