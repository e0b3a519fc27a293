"""Labelled images from a folder with one subfolder per class (``ImageFolder`` layout).

Classes are the sorted subfolder names, labelled 0, 1, ... (sorted as
strings, as torchvision's ``ImageFolder`` does: folders ``1``, ``2`` and
``10`` are labels 0, 2 and 1, and a warning says so); hidden subfolders
(``.ipynb_checkpoints``) are not classes. Grayscale images (1-bit, 8-bit,
16-bit, with or without alpha, or a palette of greys) are read as one
channel and all others as RGB, alpha dropped; a folder that
mixes the two (as ImageNet does) is read as RGB, each greyscale image's
values copied to all three channels, so only an all-greyscale folder stays
one channel. All images must have the same size, since the auditor
evaluates them as one batch.
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

from ..errors import AuditError, short_reason
from .arrays import MAX_VALUES
from .base import Dataset

logger = logging.getLogger(__name__)

GRAYSCALE_MODES = ("1", "L", "LA")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
SIXTEEN_BIT_MAX = 65535
"""The white of a 16-bit image. Pillow scales a PGM whose maxval is over 255
(mode ``I``) to 0..65535 itself, so it is divided by this too."""
GREY_ALPHA_16_RAWMODE = "LA;16B"
"""The raw mode of a 16-bit grey+alpha PNG, which Pillow opens as RGBA (its
grey, at 8 bits, copied to R, G and B): such an image is read as greyscale."""
NAMED_CLASSES = 5
"""How many out-of-order number classes the warning about their labels names."""
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What Pillow raises for a file it cannot decode: OSError (UnidentifiedImageError,
truncated data), ValueError, SyntaxError and EOFError from format plugins, and
DecompressionBombError for an image whose header claims too many pixels."""

MAX_PIXELS = 2**24
"""The most pixels one image may have (4096 x 4096). Pillow's own limit lets
through images of some 90 million pixels, gigabytes once read as float32;
sizes are checked on the headers, before any image is decoded."""


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
    """The image at ``path``: single-channel if it is grayscale (16-bit ones,
    PGMs with a maxval over 255 among them, as a (1, H, W) float tensor
    scaled from 0..65535; palette images whose palette is all grey, and
    16-bit grey+alpha PNGs, which Pillow decodes at 8 bits only, as 8-bit),
    else RGB; alpha is dropped. Any other 32-bit integer image (mode ``I``)
    has no range of its own and is refused, as is a truncated one.
    :func:`load_folder` makes a single-channel image RGB where the folder
    has colour ones."""
    with _truncated_images_refused(), Image.open(path) as image:
        if _sixteen_bit(image):
            values = np.asarray(image, dtype=np.float64)
            return torch.from_numpy((values / SIXTEEN_BIT_MAX).astype(np.float32))[None]
        if image.mode in ("I", "F"):
            raise ValueError(f"{image.mode} ({'32-bit integer' if image.mode == 'I' else 'float'}) "
                             "images have no fixed range; save 8- or 16-bit images")
        if image.mode in ("P", "PA") and _grey_palette(image):
            return image.convert("L")
        if _grey_alpha_16(image):
            return image.getchannel("R")
        return image.convert("L" if image.mode in GRAYSCALE_MODES else "RGB")


def _sixteen_bit(image: Image.Image) -> bool:
    """A 16-bit greyscale image: one of :data:`SIXTEEN_BIT_MODES`, or a PGM
    with a maxval over 255, which Pillow opens as mode ``I``, scaled to 0..65535."""
    return image.mode in SIXTEEN_BIT_MODES or (image.format == "PPM" and image.mode == "I")


def _grey_alpha_16(image: Image.Image) -> bool:
    """A 16-bit grey+alpha PNG, opened by Pillow as RGBA (:data:`GREY_ALPHA_16_RAWMODE`).
    The raw mode is in the image's tiles, which Pillow fills on opening and empties on decoding."""
    return image.format == "PNG" and image.mode == "RGBA" and any(
        tile[3] == GREY_ALPHA_16_RAWMODE for tile in image.tile
    )


def _greyscale(image: Image.Image) -> bool:
    """A greyscale image by its header, not decoded: a palette image counts as colour."""
    return image.mode in GRAYSCALE_MODES or _sixteen_bit(image) or _grey_alpha_16(image)


def _to_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """An 8-bit image from :func:`_open` as a (C, H, W) float32 tensor of
    exactly ``value / 255``, as a uint8 ``.npz`` reads (torchvision's
    ``ToDtype`` multiplies by 1/255 instead, one unit in the last place off
    for half the levels); a 16-bit image comes already as a tensor."""
    if isinstance(image, torch.Tensor):
        return image
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return pixels.to(torch.float32) / 255


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

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's samples, but walked by :func:`_files_inside`: torchvision
        follows symlinked folders wherever they lead, and round a loop for ever,
        and counts an image linked into two classes under both labels."""
        root = os.path.expanduser(directory)
        owners: dict[str, tuple[str, str]] = {}
        samples = [
            (file, label)
            for name, label in sorted(class_to_idx.items())
            for file in _files_inside(root, name, is_valid_file, owners)
        ]
        if len({label for _, label in samples}) < len(class_to_idx):
            raise FileNotFoundError(f"a class folder of {directory} has no images")
        return samples


def _files_inside(root: str, name: str, is_valid_file, owners: dict[str, tuple[str, str]]) -> list[str]:
    """The valid files below the class folder ``root/name``, in torchvision's
    order. Symlinks are followed while they stay inside ``root``, each folder
    and file once: ``owners`` maps the real path of every folder and file
    read so far, for all classes, to its class and the path it was first
    reached by. One reached again from the same class is skipped, from
    another class refused, as an image has one label. A symlink that leads
    out of ``root`` is refused, and so is a valid file that is not a regular
    one (a FIFO or a device, which reading would never end). Hidden
    subfolders are skipped, as their files are not valid."""
    top = os.path.realpath(root)

    def inside(path: str) -> str:
        real = os.path.realpath(path)
        if not Path(real).is_relative_to(top):
            raise AuditError(f"data folder {root}: {path} leads out of the folder (to {real})")
        return real

    def first_visit(path: str) -> bool:
        """Whether ``path`` is the first way to its real path, for class ``name``."""
        real = inside(path)
        owner, first = owners.setdefault(real, (name, path))
        if owner != name:
            kind = "folder" if os.path.isdir(real) else "file"
            raise AuditError(f"data folder {root}: {path} (class {name}) and {first} (class {owner}) are "
                             f"the same {kind}; an image can have only one label")
        return first == path

    start = os.path.join(root, name)
    first_visit(start)
    found = []
    for folder, subfolders, files in os.walk(start, followlinks=True):
        subfolders[:] = [sub for sub in sorted(subfolders)
                         if not sub.startswith(".") and first_visit(os.path.join(folder, sub))]
        for file in files:
            path = os.path.join(folder, file)
            if is_valid_file(path):
                inside(path)
                if not os.path.isfile(path):
                    raise AuditError(f"data folder {root}: {path} is not a regular file")
                found.append((folder, file))
    paths = [os.path.join(folder, file) for folder, file in sorted(found)]
    return [path for path in paths if first_visit(path)]


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


def _unreadable(path: str | Path, file: str, exc: Exception) -> AuditError:
    return AuditError(f"data folder {path}: cannot read an image ({file}: {short_reason(exc)})")


def _check_sizes(path: str | Path, files: list[str]) -> None:
    """Every image has the size of the first, at most :data:`MAX_PIXELS`
    pixels, and all of them at most :data:`~auditor.data.arrays.MAX_VALUES`
    values (one per pixel if every image has a greyscale mode, else three,
    as the greyscale ones are then read as RGB), as their headers say:
    Pillow reads the size and mode without decoding the image. A palette
    image counts as colour, as its palette is only read on decoding."""
    first = None
    pixels = 0
    colour = False
    for file in files:
        try:
            with Image.open(file) as image:
                size, grey = image.size, _greyscale(image)
        except UNREADABLE as exc:
            raise _unreadable(path, file, exc) from exc
        first = first or (file, size)
        if size[0] * size[1] > MAX_PIXELS:
            raise AuditError(
                f"data folder {path}: {file} is {size[0]}x{size[1]} pixels, over the limit of {MAX_PIXELS}"
            )
        if size != first[1]:
            raise AuditError(
                f"data folder {path}: images must all have the same shape; {file} "
                f"is {size[0]}x{size[1]} pixels, {first[0]} is {first[1][0]}x{first[1][1]}"
            )
        pixels += size[0] * size[1]
        colour = colour or not grey
        if pixels * (3 if colour else 1) > MAX_VALUES:
            raise AuditError(
                f"data folder {path}: the images hold over {MAX_VALUES} values; audit a subset of them"
            )


def _warn_if_numbers_out_of_order(path: str | Path, classes: list[str]) -> None:
    """Log a warning where every class is a number and sorting them as
    strings (their labels) differs from sorting them as numbers: a model
    trained on label ``int(name)`` would be scored against other labels."""
    if not all(name.isascii() and name.isdigit() for name in classes):
        return
    numeric = sorted(classes, key=lambda name: (int(name), name))
    moved = [f"'{name}' is label {label}" for label, name in enumerate(classes) if numeric[label] != name]
    if moved:
        more = f" (and {len(moved) - NAMED_CLASSES} more)" if len(moved) > NAMED_CLASSES else ""
        logger.warning("data folder %s: class folders are numbers; labels follow their sorted names as "
                       "torchvision's ImageFolder does: %s%s", path, ", ".join(moved[:NAMED_CLASSES]), more)


def load_folder(path: str | Path) -> Dataset:
    """All images under ``path/<class>/``; the name is ``path`` as given.
    Greyscale images are made RGB, their channel copied three times, where
    another image is in colour."""
    root = os.path.expanduser(path)
    try:
        folder = _VisibleFolders(str(path), transform=_to_tensor, loader=_open,
                                 is_valid_file=lambda file: _visible_image(file, root))
    except FileNotFoundError as exc:
        raise AuditError(_no_images(path, root)) from exc
    _check_sizes(path, [file for file, _ in folder.samples])
    images = []
    for index, (file, _) in enumerate(folder.samples):
        try:
            image, _ = folder[index]
        except UNREADABLE as exc:
            raise _unreadable(path, file, exc) from exc
        images.append(image)
    channels = max(image.shape[0] for image in images)
    images = [image.expand(channels, -1, -1) if image.shape[0] == 1 else image for image in images]
    for (file, _), image in zip(folder.samples, images):
        if image.shape != images[0].shape:  # the sizes were checked on the headers; kept as a guard
            raise AuditError(
                f"data folder {path}: images must all have the same shape; {file} "
                f"is {tuple(image.shape)}, {folder.samples[0][0]} is {tuple(images[0].shape)}"
            )
    x, y = torch.stack(images), torch.tensor(folder.targets, dtype=torch.long)
    _warn_if_numbers_out_of_order(path, folder.classes)
    logger.info("data folder %s: %d images in classes %s", path, len(y), ", ".join(folder.classes))
    return Dataset(name=str(path), x=x, y=y, classes=tuple(folder.classes))
