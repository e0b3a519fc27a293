"""Labelled images from a ``.npz`` file with arrays ``x`` and ``y``.

``x`` is float in [0,1] or uint8 (divided by 255), as (N,C,H,W), (N,H,W,C)
or, for single-channel images, (N,H,W); ``y`` is (N,) non-negative
integers. The channel axis is told from the shape: it is axis 1 or axis 3,
whichever has 1, 3 or 4 entries; where both do (small images), the dtype's
convention decides, with a warning ((N,H,W,C) for uint8, (N,C,H,W) for
float), and a shape where neither does is refused. Pickled (object) arrays
are refused.
"""

from __future__ import annotations

import logging
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from numpy.lib.npyio import NpzFile

from ..errors import AuditError, short_reason
from .base import CHANNEL_COUNTS, Dataset

MAX_VALUES = 2**28
"""The most values ``x`` (and ``y``) may hold: 1 GiB as float32, 2 GiB while
a float64 ``x`` is converted. Checked on the ``.npy`` headers, before
anything is decompressed: a 1 MB archive can declare gigabytes of zeros."""

HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}

UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError)
"""What reading a damaged archive raises: besides OSError, ValueError and
EOFError from numpy, BadZipFile, zlib.error (a damaged deflate stream),
RuntimeError (an encrypted member) and NotImplementedError (an unsupported
zip version or compression method) from zipfile."""

logger = logging.getLogger(__name__)


def _read(path: str | Path) -> dict[str, np.ndarray]:
    """The ``x`` and ``y`` arrays, both present, once their headers pass :func:`_check_headers`."""
    if not Path(path).exists():
        raise AuditError(f"data {path}: file not found")
    if not Path(path).is_file():  # np.load would wait on a FIFO for ever, and read a device without end
        raise AuditError(f"data {path}: not a regular file (FIFOs and devices are refused)")
    try:
        archive = np.load(path, allow_pickle=False)
    except UNREADABLE as exc:
        raise AuditError(f"data {path}: not a valid .npz file") from exc
    if not isinstance(archive, NpzFile):
        raise AuditError(f"data {path}: not a valid .npz file (a single .npy array)")
    with archive:
        names = {key: _member(path, archive.zip, key) for key in ("x", "y")}
        try:
            _check_headers(path, *(_header(archive.zip, key, names[key]) for key in ("x", "y")))
            return {key: _array(archive.zip, name) for key, name in names.items()}
        except UNREADABLE as exc:
            raise AuditError(f"data {path}: cannot read its arrays ({short_reason(exc)})") from exc


def _member(path: str | Path, archive: zipfile.ZipFile, key: str) -> str:
    """The archive member that holds array ``key``: ``key.npy`` as
    ``numpy.savez`` names it, or ``key``. An archive with both is refused,
    as numpy would read one and the header check the other."""
    present = [name for name in (f"{key}.npy", key) if name in archive.namelist()]
    if not present:
        raise AuditError(f"data {path}: missing array '{key}'")
    if len(present) > 1:
        raise AuditError(f"data {path}: has both members '{key}' and '{key}.npy'; keep one array '{key}'")
    return present[0]


def _header(archive: zipfile.ZipFile, key: str, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype that the ``.npy`` header of member ``name`` (array ``key``) declares."""
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        if version not in HEADER_READERS:
            raise ValueError(f"{key} is a version {version[0]}.{version[1]} .npy array; save it with numpy.savez")
        shape, _, dtype = HEADER_READERS[version](member)
    if dtype.hasobject:
        raise ValueError(f"{key} is a pickled object array")
    return shape, dtype


def _array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """The array in member ``name``: the member whose header was checked."""
    with archive.open(name) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _check_headers(
    path: str | Path, x: tuple[tuple[int, ...], np.dtype], y: tuple[tuple[int, ...], np.dtype]
) -> None:
    """The shapes and dtypes of ``x`` and ``y`` (from their headers) fit
    together, neither holds more than :data:`MAX_VALUES` values, ``x`` has
    one channel axis (:func:`_channel_axis`) and its images have pixels."""
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
    channel_axis = _channel_axis(path, x_shape, x_dtype)
    height, width = (size for axis, size in enumerate(x_shape) if axis not in (0, channel_axis))
    if height == 0 or width == 0:
        raise AuditError(f"data {path}: x has shape {x_shape}: images of height {height} and width {width} "
                         "have no pixels")


def _channel_axis(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> int | None:
    """The channel axis of an ``x`` of ``shape``: 1 for (N,C,H,W), 3 for
    (N,H,W,C), ``None`` for (N,H,W). It is the one of axes 1 and 3 that has
    :data:`CHANNEL_COUNTS` entries; where both have (small images: (N,1,8,4)),
    the dtype's convention decides: (N,H,W,C) for uint8, as images are
    saved, (N,C,H,W) for float, as torch holds them (:func:`load_npz` warns).
    AuditError where neither has."""
    if len(shape) == 3:
        return None
    candidates = [axis for axis in (1, 3) if shape[axis] in CHANNEL_COUNTS]
    if len(candidates) == 2:
        return 3 if dtype == np.uint8 else 1
    if candidates:
        return candidates[0]
    counts = " or ".join(map(str, CHANNEL_COUNTS))
    raise AuditError(
        f"data {path}: x has shape {shape}, where neither axis 1 nor axis 3 could be the channels; "
        f"expected (N,C,H,W) or (N,H,W,C) with C {counts}, or (N,H,W)"
    )


def _images(path: str | Path, x: np.ndarray) -> np.ndarray:
    """``x`` (uint8 or float, as :func:`_check_headers` lets through) as (N,C,H,W) float32."""
    channel_axis = _channel_axis(path, x.shape, x.dtype)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if channel_axis is None:
        x = x[:, None]
    elif channel_axis == 3:
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def load_npz(path: str | Path) -> Dataset:
    """The labelled images of a ``.npz`` file; the name is ``path`` as given."""
    arrays = _read(path)
    x, y = arrays["x"], arrays["y"]
    if len(y) == 0:
        raise AuditError(f"data {path}: contains no images")
    if x.ndim == 4 and x.shape[1] in CHANNEL_COUNTS and x.shape[3] in CHANNEL_COUNTS:
        logger.warning(
            "data %s: x has shape %s, where both axis 1 and axis 3 could be the channels; read as %s, "
            "the convention for %s arrays", path, x.shape, "(N,H,W,C)" if x.dtype == np.uint8 else "(N,C,H,W)",
            x.dtype,
        )
    if x.dtype == np.uint8 and x.max() <= 1:
        logger.warning(
            "data %s: x is uint8 with no value above 1; uint8 images are divided by 255, so these read as 0 "
            "to 1/255 (save images with values in [0,1] as float)", path
        )
    if np.issubdtype(x.dtype, np.floating):
        if np.isnan(x).any():
            raise AuditError(f"data {path}: x has NaN values")
        if not ((x >= 0) & (x <= 1)).all():
            raise AuditError(f"data {path}: x has values outside [0,1]")
    if (y < 0).any():
        raise AuditError(f"data {path}: y has negative labels")
    if y.max() > np.iinfo(np.int64).max:  # only unsigned 64-bit labels can be; as int64 they would wrap
        raise AuditError(f"data {path}: y has labels too large for a class index (up to {y.max()})")
    return Dataset(name=str(path), x=torch.from_numpy(_images(path, x)), y=torch.from_numpy(y.astype(np.int64)))
