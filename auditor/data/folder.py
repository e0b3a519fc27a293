"""Labelled images from a folder with one subfolder per class (``ImageFolder`` layout).

Classes are the sorted subfolder names, labelled 0, 1, ...; hidden
subfolders (``.ipynb_checkpoints``) are not classes. Grayscale images
keep one channel (8-bit, 16-bit, or a palette of greys); all others are
read as RGB. All images must have the same
shape, since the auditor evaluates them as one batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from ..errors import AuditError, short_reason
from .base import Dataset

logger = logging.getLogger(__name__)

GRAYSCALE_MODES = ("1", "L", "LA")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What Pillow raises for a file it cannot decode: OSError (UnidentifiedImageError,
truncated data), ValueError, SyntaxError and EOFError from format plugins, and
DecompressionBombError for an image whose header claims too many pixels."""


@contextlib.contextmanager
def _truncated_images_refused():
    """Pillow raises OSError on a truncated image for the duration, whatever
    another library (WeasyPrint does, on import) set for the process: filled
    in with black rows, it would be audited as if it were whole. The setting
    is put back after."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _open(path: str) -> Image.Image | torch.Tensor:
    """The image at ``path``: single-channel if it is grayscale (16-bit ones
    as a (1, H, W) float tensor scaled from 0..65535, palette images whose
    palette is all grey as 8-bit), else RGB. A 32-bit integer image (mode
    ``I``) has no range of its own and is refused, as is a truncated one."""
    with _truncated_images_refused(), Image.open(path) as image:
        if image.mode in SIXTEEN_BIT_MODES:
            values = np.asarray(image, dtype=np.float64)
            return torch.from_numpy((values / 65535).astype(np.float32))[None]
        if image.mode in ("I", "F"):
            raise ValueError(f"{image.mode} ({'32-bit integer' if image.mode == 'I' else 'float'}) "
                             "images have no fixed range; save 8- or 16-bit images")
        if image.mode in ("P", "PA") and _grey_palette(image):
            return image.convert("L")
        return image.convert("L" if image.mode in GRAYSCALE_MODES else "RGB")


def _grey_palette(image: Image.Image) -> bool:
    palette = image.getpalette("RGB") or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3))


def _visible_image(path: str, root: str) -> bool:
    """An image file with no hidden (dot-named) folder or name on its path below ``root``."""
    return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(
        part.startswith(".") for part in Path(os.path.relpath(path, root)).parts
    )


class _VisibleFolders(ImageFolder):
    """``ImageFolder`` whose classes are the subfolders not hidden by a dot,
    and whose images are the files not hidden inside them."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_names(directory)
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: label for label, name in enumerate(classes)}


def _class_names(directory: str) -> list[str]:
    """The subfolders of ``directory`` not hidden by a dot, sorted."""
    return sorted(entry.name for entry in Path(directory).iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _no_images(path: str | Path, root: str) -> str:
    """Why a folder gave no data set: no class folders, or which are empty."""
    classes = _class_names(root)
    if not classes:
        return f"data folder {path} has no class folders (one subfolder of images per class)"
    empty = [
        name for name in classes
        if not any(_visible_image(str(file), root) for file in Path(root, name).rglob("*") if file.is_file())
    ]
    if len(empty) == len(classes):
        return f"data folder {path} contains no images"
    which = f"class folder {empty[0]} has" if len(empty) == 1 else f"class folders {', '.join(empty)} have"
    return f"data folder {path}: {which} no images (every class folder needs one)"


def load_folder(path: str | Path) -> Dataset:
    """All images under ``path/<class>/``; the name is ``path`` as given."""
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    root = os.path.expanduser(path)
    try:
        folder = _VisibleFolders(str(path), transform=to_tensor, loader=_open,
                                 is_valid_file=lambda file: _visible_image(file, root))
    except FileNotFoundError as exc:
        raise AuditError(_no_images(path, root)) from exc
    images = []
    for index, (file, _) in enumerate(folder.samples):
        try:
            image, _ = folder[index]
        except UNREADABLE as exc:
            reason = short_reason(exc)
            raise AuditError(f"data folder {path}: cannot read an image ({file}: {reason})") from exc
        if images and image.shape != images[0].shape:
            raise AuditError(
                f"data folder {path}: images must all have the same shape; {file} "
                f"is {tuple(image.shape)}, {folder.samples[0][0]} is {tuple(images[0].shape)}"
            )
        images.append(image)
    x, y = torch.stack(images), torch.tensor(folder.targets, dtype=torch.long)
    logger.info("data folder %s: %d images in classes %s", path, len(y), ", ".join(folder.classes))
    return Dataset(name=str(path), x=x, y=y, classes=tuple(folder.classes))
