"""Labelled images from a ``.npz`` file with arrays ``x`` and ``y``.

``x`` is (N,C,H,W) float in [0,1], (N,H,W,C) uint8, or (N,H,W) uint8/float
for single-channel images; ``y`` is (N,) non-negative integers. Pickled
(object) arrays are refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from numpy.lib.npyio import NpzFile

from ..errors import AuditError
from .base import Dataset


def _read(path: str | Path) -> dict[str, np.ndarray]:
    """The ``x`` and ``y`` arrays present in the archive."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise AuditError(f"data {path}: file not found") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise AuditError(f"data {path}: not a valid .npz file") from exc
    if not isinstance(archive, NpzFile):
        raise AuditError(f"data {path}: not a valid .npz file (a single .npy array)")
    with archive:
        try:
            return {key: archive[key] for key in ("x", "y") if key in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise AuditError(f"data {path}: cannot read its arrays ({exc})") from exc


def _images(path: str | Path, x: np.ndarray) -> np.ndarray:
    """``x`` as (N,C,H,W) float32 in [0,1]."""
    if x.ndim not in (3, 4):
        raise AuditError(f"data {path}: x has shape {x.shape}; expected (N,C,H,W), (N,H,W,C) or (N,H,W)")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
        if x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
    elif np.issubdtype(x.dtype, np.floating):
        if np.isnan(x).any():
            raise AuditError(f"data {path}: x has NaN values")
        if not ((x >= 0) & (x <= 1)).all():
            raise AuditError(f"data {path}: x has values outside [0,1]")
    else:
        raise AuditError(f"data {path}: x must be float in [0,1] or uint8, not {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def load_npz(path: str | Path) -> Dataset:
    """The labelled images of a ``.npz`` file; the name is ``path`` as given."""
    arrays = _read(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise AuditError(f"data {path}: missing array '{key}'")
    x, y = _images(path, arrays["x"]), arrays["y"]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise AuditError(f"data {path}: y must be a 1-D integer array, not {y.dtype} of shape {y.shape}")
    if len(x) != len(y):
        raise AuditError(f"data {path}: x and y lengths differ ({len(x)} and {len(y)})")
    if len(y) == 0:
        raise AuditError(f"data {path}: contains no images")
    if (y < 0).any():
        raise AuditError(f"data {path}: y has negative labels")
    if y.max() > np.iinfo(np.int64).max:  # only unsigned 64-bit labels can be; as int64 they would wrap
        raise AuditError(f"data {path}: y has labels too large for a class index (up to {y.max()})")
    return Dataset(name=str(path), x=torch.from_numpy(x), y=torch.from_numpy(y.astype(np.int64)))
