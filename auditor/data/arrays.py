"""Labelled images from a ``.npz`` file with arrays ``x`` and ``y``.

``x`` is (N,C,H,W) float in [0,1], (N,H,W,C) uint8, or (N,H,W) uint8/float
for single-channel images; ``y`` is (N,) non-negative integers. Pickled
(object) arrays are refused.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from numpy.lib.npyio import NpzFile

from ..errors import AuditError, short_reason
from .base import Dataset


MAX_VALUES = 2**28
"""The most values ``x`` (and ``y``) may hold: 1 GiB as float32, 2 GiB while
a float64 ``x`` is converted. Checked on the ``.npy`` headers, before
anything is decompressed: a 1 MB archive can declare gigabytes of zeros."""

HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read(path: str | Path) -> dict[str, np.ndarray]:
    """The ``x`` and ``y`` arrays, both present, once their headers pass :func:`_check_headers`."""
    if not Path(path).exists():
        raise AuditError(f"data {path}: file not found")
    if not Path(path).is_file():  # np.load would wait on a FIFO for ever, and read a device without end
        raise AuditError(f"data {path}: not a regular file (FIFOs and devices are refused)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise AuditError(f"data {path}: not a valid .npz file") from exc
    if not isinstance(archive, NpzFile):
        raise AuditError(f"data {path}: not a valid .npz file (a single .npy array)")
    with archive:
        for key in ("x", "y"):
            if key not in archive.files:
                raise AuditError(f"data {path}: missing array '{key}'")
        try:
            _check_headers(path, *(_header(path, archive.zip, key) for key in ("x", "y")))
            return {key: archive[key] for key in ("x", "y")}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise AuditError(f"data {path}: cannot read its arrays ({short_reason(exc)})") from exc


def _header(path: str | Path, archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype the ``.npy`` header of array ``key`` declares."""
    name = f"{key}.npy" if f"{key}.npy" in archive.namelist() else key
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        if version not in HEADER_READERS:
            raise ValueError(f"{key} is a version {version[0]}.{version[1]} .npy array; save it with numpy.savez")
        shape, _, dtype = HEADER_READERS[version](member)
    if dtype.hasobject:
        raise ValueError(f"{key} is a pickled object array")
    return shape, dtype


def _check_headers(
    path: str | Path, x: tuple[tuple[int, ...], np.dtype], y: tuple[tuple[int, ...], np.dtype]
) -> None:
    """The shapes and dtypes of ``x`` and ``y`` (from their headers) fit
    together, and neither holds more than :data:`MAX_VALUES` values."""
    (x_shape, x_dtype), (y_shape, y_dtype) = x, y
    if len(x_shape) not in (3, 4):
        raise AuditError(f"data {path}: x has shape {x_shape}; expected (N,C,H,W), (N,H,W,C) or (N,H,W)")
    if x_dtype != np.uint8 and not np.issubdtype(x_dtype, np.floating):
        raise AuditError(f"data {path}: x must be float in [0,1] or uint8, not {x_dtype}")
    if len(y_shape) != 1 or not np.issubdtype(y_dtype, np.integer):
        raise AuditError(f"data {path}: y must be a 1-D integer array, not {y_dtype} of shape {y_shape}")
    if x_shape[0] != y_shape[0]:
        raise AuditError(f"data {path}: x and y lengths differ ({x_shape[0]} and {y_shape[0]})")
    for key, shape in (("x", x_shape), ("y", y_shape)):
        if math.prod(shape) > MAX_VALUES:
            raise AuditError(
                f"data {path}: {key} has shape {shape}, over the limit of {MAX_VALUES} values; "
                "audit a subset of the images"
            )


def _images(x: np.ndarray) -> np.ndarray:
    """``x`` (uint8 or float, as :func:`_check_headers` lets through) as (N,C,H,W) float32."""
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
        if x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
    if x.ndim == 3:
        x = x[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def load_npz(path: str | Path) -> Dataset:
    """The labelled images of a ``.npz`` file; the name is ``path`` as given."""
    arrays = _read(path)
    x, y = arrays["x"], arrays["y"]
    if len(y) == 0:
        raise AuditError(f"data {path}: contains no images")
    if np.issubdtype(x.dtype, np.floating):
        if np.isnan(x).any():
            raise AuditError(f"data {path}: x has NaN values")
        if not ((x >= 0) & (x <= 1)).all():
            raise AuditError(f"data {path}: x has values outside [0,1]")
    if (y < 0).any():
        raise AuditError(f"data {path}: y has negative labels")
    if y.max() > np.iinfo(np.int64).max:  # only unsigned 64-bit labels can be; as int64 they would wrap
        raise AuditError(f"data {path}: y has labels too large for a class index (up to {y.max()})")
    return Dataset(name=str(path), x=torch.from_numpy(_images(x)), y=torch.from_numpy(y.astype(np.int64)))
