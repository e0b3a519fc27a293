"""Data loading: the built-in split, .npz files, image folders and one-line errors."""

from __future__ import annotations

import io
import logging
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from auditor.data import arrays, folder, load_data, load_npz
from auditor.data.base import Dataset
from auditor.data.folder import load_folder
from auditor.errors import AuditError


def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_mnist_splits_are_fixed_and_disjoint(mnist_train, mnist_test):
    assert (len(mnist_train), len(mnist_test)) == (4000, 1000)
    assert mnist_test.x.shape == (1000, 1, 28, 28)
    both = torch.cat([mnist_train.x, mnist_test.x]).flatten(1)
    assert len(torch.unique(both, dim=0)) == 5000
    assert load_data("mnist").sha256 == mnist_test.sha256


def test_balanced_indices(mnist_test):
    picked = mnist_test.balanced_indices(100)
    assert torch.equal(picked, mnist_test.balanced_indices(100))
    assert torch.equal(picked, picked.sort().values)
    assert torch.bincount(mnist_test.y[picked]).tolist() == [10] * 10
    assert len(mnist_test.balanced_indices(None)) == 1000


def test_npz_nchw_float(tmp_path):
    x = np.random.RandomState(0).rand(6, 3, 8, 8).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(6))
    data = load_data(str(path))
    assert data.name == str(path)
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert torch.equal(data.x, torch.from_numpy(x))
    assert data.y.tolist() == list(range(6))


def test_npz_nhwc_uint8(tmp_path):
    x = np.random.RandomState(0).randint(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.array([0, 1, 1, 0]))
    data = load_npz(path)
    assert data.x.shape == (4, 3, 8, 8)
    torch.testing.assert_close(data.x, torch.from_numpy(x.transpose(0, 3, 1, 2) / 255.0).float())


def _pattern(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Distinct values in ``shape``: a transposed or reshaped read cannot match."""
    values = np.arange(np.prod(shape)).reshape(shape) % 251
    return values.astype(np.uint8) if dtype == np.uint8 else (values / 250).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_npz_layout_is_told_from_the_shape_not_the_dtype(tmp_path, dtype, channels, layout):
    """uint8 (N,1,28,28) was read as (N,H,W,C), transposed (digits flipped and
    the MNIST radii replaced by photo ones), and float (N,28,28,1) as 28
    channels of 28x1 pixels, where the model declared no input shape."""
    nchw = _pattern((2, channels, 6, 5), dtype)
    path = tmp_path / "d.npz"
    np.savez(path, x=nchw if layout == "NCHW" else nchw.transpose(0, 2, 3, 1), y=np.arange(2))
    data = load_npz(path)
    expected = nchw / np.float32(255) if dtype == np.uint8 else nchw
    assert data.x.shape == (2, channels, 6, 5)
    assert torch.equal(data.x, torch.from_numpy(expected.astype(np.float32)))


@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (2, 28, 28, 28)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_npz_without_a_channel_axis_is_refused_in_one_line(tmp_path, shape, dtype):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros(shape, dtype), y=np.arange(2))
    with pytest.raises(AuditError) as excinfo:
        load_npz(path)
    assert _message(excinfo) == (
        f"data {path}: x has shape {shape}, where neither axis 1 nor axis 3 could be the channels; "
        "expected (N,C,H,W) or (N,H,W,C) with C 1 or 3 or 4, or (N,H,W)"
    )


@pytest.mark.parametrize(("shape", "dtype", "images"), [
    ((2, 1, 8, 4), np.float32, (1, 8, 4)), ((2, 3, 16, 3), np.float32, (3, 16, 3)),
    ((2, 1, 8, 4), np.uint8, (4, 1, 8)), ((2, 4, 4, 3), np.uint8, (3, 4, 4)),
])
def test_small_images_of_an_unclear_layout_follow_their_dtypes_convention(tmp_path, caplog, shape, dtype, images):
    """Float arrays are (N,C,H,W), uint8 ones (N,H,W,C), where the shape cannot tell: the
    small float images of (N,1,8,4) were refused."""
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros(shape, dtype), y=np.arange(2))
    with caplog.at_level(logging.WARNING, logger="auditor.data.arrays"):
        assert tuple(load_npz(path).x.shape[1:]) == images
    assert "both axis 1 and axis 3 could be the channels" in caplog.text


@pytest.mark.parametrize(("shape", "height", "width"), [
    ((2, 1, 0, 5), 0, 5), ((2, 0, 5, 3), 0, 5), ((2, 5, 0), 5, 0), ((2, 1, 0, 0), 0, 0),
])
def test_npz_of_images_without_pixels_is_refused(tmp_path, shape, height, width):
    """Images of 0x0 pixels were loaded, and failed later inside the model."""
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros(shape, np.float32), y=np.arange(2))
    with pytest.raises(AuditError) as excinfo:
        load_npz(path)
    assert _message(excinfo) == (
        f"data {path}: x has shape {shape}: images of height {height} and width {width} have no pixels"
    )


def test_binary_uint8_images_are_divided_by_255_with_a_warning(tmp_path, caplog):
    """0/1 images saved as uint8 read as 0 and 1/255, nearly black: said, not refused."""
    binary, grey = tmp_path / "binary.npz", tmp_path / "grey.npz"
    np.savez(binary, x=np.eye(5, dtype=np.uint8)[None].repeat(2, 0), y=np.arange(2))
    np.savez(grey, x=np.full((2, 5, 5), 2, np.uint8), y=np.arange(2))
    with caplog.at_level(logging.WARNING, logger="auditor.data.arrays"):
        assert load_npz(binary).x.max() == np.float32(1 / 255)
        assert load_npz(grey).x.max() == np.float32(2 / 255)
    assert [record.getMessage() for record in caplog.records] == [
        (f"data {binary}: x is uint8 with no value above 1; uint8 images are divided by 255, so these read "
         "as 0 to 1/255 (save images with values in [0,1] as float)")
    ]


def test_npz_single_channel(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((5, 28, 28), 255, np.uint8), y=np.zeros(5, np.int32))
    data = load_npz(path)
    assert data.x.shape == (5, 1, 28, 28)
    assert data.x.max() == 1.0


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((2, 1, 5, 5), np.float32)}, "missing array 'y'"),
        ({"y": np.zeros(2, np.int64)}, "missing array 'x'"),
        ({"x": np.full((2, 1, 5, 5), 2.0), "y": np.zeros(2, np.int64)}, r"x has values outside \[0,1\]"),
        ({"x": np.full((2, 1, 5, 5), np.nan), "y": np.zeros(2, np.int64)}, r"x has NaN values"),
        ({"x": np.zeros((3, 1, 5, 5)), "y": np.zeros(2, np.int64)}, "x and y lengths differ"),
        ({"x": np.zeros((2, 4)), "y": np.zeros(2, np.int64)}, "x has shape"),
        ({"x": np.zeros((2, 1, 5, 5), np.int64), "y": np.zeros(2, np.int64)}, "x must be float"),
        ({"x": np.zeros((2, 1, 5, 5)), "y": np.zeros(2)}, "y must be a 1-D integer array"),
        ({"x": np.zeros((2, 1, 5, 5)), "y": np.array([0, -1])}, "y has negative labels"),
        ({"x": np.zeros((2, 1, 5, 5)), "y": np.array([0, 2**63], np.uint64)}, "y has labels too large"),
        ({"x": np.zeros((0, 1, 5, 5)), "y": np.zeros(0, np.int64)}, "contains no images"),
        ({"x": np.array([None, 1], dtype=object), "y": np.zeros(2, np.int64)}, "cannot read its arrays"),
    ],
)
def test_npz_malformed(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(AuditError, match=f"data {path}: {match}") as excinfo:
        load_npz(path)
    _message(excinfo)


def test_npz_not_an_archive(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"definitely not numpy")
    single = tmp_path / "single.npz"
    with single.open("wb") as handle:
        np.save(handle, np.zeros(3))
    for path in (garbage, single):
        with pytest.raises(AuditError, match="not a valid .npz file"):
            load_npz(path)
    with pytest.raises(AuditError, match="file not found"):
        load_data(str(tmp_path / "missing.npz"))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("x_member", [_npy(np.zeros((2, 1, 500, 500), np.float32)), b"not an array"])
def test_npz_with_both_x_and_x_npy_members_is_refused(tmp_path, x_member, monkeypatch):
    """The header of member x.npy was checked, and numpy read member x: past
    the size limit, or an internal error where x was not an array."""
    path = tmp_path / "two.npz"
    _zip(path, {"x.npy": _npy(np.zeros((2, 1, 5, 5), np.float32)), "y.npy": _npy(np.arange(2)), "x": x_member})
    monkeypatch.setattr(arrays, "MAX_VALUES", 1000)
    with pytest.raises(AuditError) as excinfo:
        load_npz(path)
    assert _message(excinfo) == f"data {path}: has both members 'x' and 'x.npy'; keep one array 'x'"


def test_npz_members_without_the_npy_suffix_are_read(tmp_path):
    path = tmp_path / "bare.npz"
    x = _pattern((3, 1, 5, 5), np.float32)
    _zip(path, {"x": _npy(x), "y": _npy(np.arange(3))})
    assert torch.equal(load_npz(path).x, torch.from_numpy(x))


def _damaged(path, damage: str) -> None:
    """A compressed .npz of one member, x.npy, and y.npy with ``damage``:
    ``deflate`` (its data's first block type invalid), ``encrypted`` (the
    flag set), ``method`` (an unknown compression method) or ``version``
    (a zip version past what Python reads), the last three set in the
    central directory, where zipfile reads them."""
    np.savez_compressed(path, x=np.random.RandomState(0).rand(4, 1, 8, 8).astype(np.float32), y=np.arange(4))
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("x.npy")
    if damage == "deflate":
        name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        data[info.header_offset + 30 + name_length + extra_length] = 0xFF
    else:
        entry = data.index(b"PK\x01\x02")  # the central directory's first entry, x.npy's
        field, value = {"encrypted": (8, info.flag_bits | 1), "method": (10, 99), "version": (6, 200)}[damage]
        data[entry + field:entry + field + 2] = struct.pack("<H", value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "reason"), [
    ("deflate", "cannot read its arrays (Error -3 while decompressing data"),
    ("encrypted", "cannot read its arrays (File 'x.npy' is encrypted, password required for extraction)"),
    ("method", "cannot read its arrays (That compression method is not supported)"),
    ("version", "not a valid .npz file"),
])
def test_a_damaged_npz_is_refused_in_one_line(tmp_path, damage, reason):
    """zlib.error, RuntimeError and NotImplementedError from zipfile were internal errors."""
    path = tmp_path / "damaged.npz"
    _damaged(path, damage)
    with pytest.raises(AuditError) as excinfo:
        load_npz(path)
    assert _message(excinfo).startswith(f"data {path}: {reason}")


def test_load_data_takes_a_path(tmp_path, monkeypatch):
    """load_data(Path) failed: 'PosixPath' object has no attribute 'lower'."""
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 1, 5, 5), np.float32), y=np.arange(2))
    assert load_data(path).name == str(path)
    _png(tmp_path / "folder" / "a" / "x.png", 0)
    assert load_data(tmp_path / "folder").classes == ("a",)
    _png(tmp_path / "mnist" / "b" / "x.png", 0)
    monkeypatch.chdir(tmp_path)
    assert load_data(Path("mnist")).classes == ("b",)  # a folder called mnist, not the built-in set


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_npz_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    """Reading a FIFO would wait for ever, and /dev/zero would never end."""
    path = tmp_path / "data.npz"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(AuditError) as excinfo:
        load_data(str(path))
    assert _message(excinfo) == f"data {path}: not a regular file (FIFOs and devices are refused)"


def _png(path, value: int, size: int = 8, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value,) * 3).save(path)


def test_image_folder(tmp_path):
    _png(tmp_path / "dog" / "a.png", 255)
    _png(tmp_path / "cat" / "a.png", 0)
    _png(tmp_path / "cat" / "b.png", 51)
    data = load_data(str(tmp_path))
    assert isinstance(data, Dataset) and data.name == str(tmp_path)
    assert data.x.shape == (3, 1, 8, 8) and data.x.dtype == torch.float32
    assert data.y.tolist() == [0, 0, 1] and data.classes == ("cat", "dog")
    torch.testing.assert_close(data.x.amax(dim=(1, 2, 3)), torch.tensor([0.0, 0.2, 1.0]))


def test_hidden_folders_are_not_classes(tmp_path):
    _png(tmp_path / "cat" / "a.png", 0)
    _png(tmp_path / "dog" / "a.png", 255)
    _png(tmp_path / ".ipynb_checkpoints" / "a.png", 128)  # would be class 0 and shift the labels
    _png(tmp_path / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png", 128)  # a second cat
    _png(tmp_path / "dog" / ".hidden.png", 128)
    data = load_folder(tmp_path)
    assert data.classes == ("cat", "dog") and data.y.tolist() == [0, 1]


def test_image_folder_rgb(tmp_path):
    _png(tmp_path / "a" / "x.png", 255, mode="RGB")
    _png(tmp_path / "b" / "x.png", 0, mode="RGB")
    data = load_folder(tmp_path)
    assert data.x.shape == (2, 3, 8, 8)


def test_sixteen_bit_and_grey_palette_images_stay_one_channel_with_their_values(tmp_path):
    """A 16-bit greyscale PNG reads as one channel scaled from 0..65535 (it
    was made RGB with every non-zero pixel saturated), and a palette image
    with a grey palette as 8-bit greyscale (it was made RGB)."""
    ramp = np.arange(64, dtype=np.float64).reshape(8, 8) / 63
    (tmp_path / "wide").mkdir()
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "wide" / "a.png")
    assert Image.open(tmp_path / "wide" / "a.png").mode.startswith("I")
    (tmp_path / "palette").mkdir()
    grey = Image.fromarray((ramp * 255).round().astype(np.uint8), "P")
    grey.putpalette([level for i in range(256) for level in (i, i, i)])
    grey.save(tmp_path / "palette" / "a.png")
    data = load_folder(tmp_path)
    assert data.classes == ("palette", "wide") and data.x.shape == (2, 1, 8, 8)
    torch.testing.assert_close(data.x[1, 0], torch.from_numpy(ramp).float(), atol=0.5 / 65535 + 1e-6, rtol=0)
    torch.testing.assert_close(data.x[0, 0], torch.from_numpy(ramp).float(), atol=0.5 / 255 + 1e-6, rtol=0)


def _pgm(path, maxval: int, values: list[int]) -> None:
    """A binary PGM of one row of ``values``, 16-bit where ``maxval`` is over 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.array(values, ">u2" if maxval > 255 else "u1")
    path.write_bytes(f"P5\n{len(values)} 1\n{maxval}\n".encode() + pixels.tobytes())


def test_sixteen_bit_pgms_are_read_scaled_by_their_maxval(tmp_path):
    """Pillow opens a PGM whose maxval is over 255 as mode I, scaled to
    0..65535; it was refused as a 32-bit image "with no fixed range"."""
    for name, maxval in (("a", 1023), ("b", 65535), ("c", 255)):
        _pgm(tmp_path / name / "x.pgm", maxval, [0, maxval // 2, maxval])
    data = load_folder(tmp_path)
    assert data.x.shape == (3, 1, 1, 3)
    expected = torch.tensor([[0, 511 / 1023, 1], [0, 32767 / 65535, 1], [0, 127 / 255, 1]])
    torch.testing.assert_close(data.x[:, 0, 0], expected, atol=1 / 65535, rtol=0)


def _grey_alpha_16_png(path, grey: np.ndarray) -> None:
    """A 16-bit grey+alpha PNG (colour type 4) of ``grey``, opaque."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    height, width = grey.shape
    pixels = np.stack([grey, np.full_like(grey, 65535)], -1).astype(">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_sixteen_bit_grey_alpha_pngs_stay_one_channel(tmp_path):
    """Pillow opens a 16-bit grey+alpha PNG as RGBA, and an all-greyscale
    folder of them was read as RGB; its 8-bit grey is now its one channel."""
    levels = np.random.RandomState(0).randint(0, 256, (2, 6, 5))
    for name, image in zip("ab", levels):
        _grey_alpha_16_png(tmp_path / name / "x.png", image * 257)
    with Image.open(tmp_path / "a" / "x.png") as image:
        assert image.mode == "RGBA"
    data = load_folder(tmp_path)
    assert data.x.shape == (2, 1, 6, 5)
    assert torch.equal(data.x[:, 0], torch.from_numpy(levels / np.float32(255)).float())


def test_labels_of_number_classes_follow_their_names_sorted_as_strings_with_a_warning(tmp_path, caplog):
    """Folders 1, 2 and 10 are labels 0, 2 and 1 as in torchvision: a model
    trained on label int(name) would be scored against the wrong labels."""
    for name in ("1", "2", "10"):
        _png(tmp_path / "numbers" / name / "x.png", int(name))
    for name in ("3", "7"):
        _png(tmp_path / "in_order" / name / "x.png", int(name))
    with caplog.at_level(logging.WARNING, logger="auditor.data.folder"):
        assert load_folder(tmp_path / "numbers").classes == ("1", "10", "2")
        assert load_folder(tmp_path / "in_order").classes == ("3", "7")
    assert [record.getMessage() for record in caplog.records] == [
        (f"data folder {tmp_path / 'numbers'}: class folders are numbers; labels follow their sorted names "
         "as torchvision's ImageFolder does: '10' is label 1, '2' is label 2")
    ]


def test_a_32_bit_integer_image_is_refused_in_one_line(tmp_path):
    """Mode I has no range of its own: 8-bit values in it would read 257
    times too dark as 16-bit, 16-bit ones saturated as 8-bit."""
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 4), 200, dtype=np.int32)).save(tmp_path / "a" / "x.tiff")
    with pytest.raises(AuditError, match=r"x.tiff: I \(32-bit integer\) images have no fixed range"):
        load_folder(tmp_path)


def test_image_folder_mixed_sizes(tmp_path):
    _png(tmp_path / "a" / "x.png", 0, size=8)
    _png(tmp_path / "b" / "x.png", 0, size=16)
    with pytest.raises(AuditError, match="must all have the same shape") as excinfo:
        load_folder(tmp_path)
    assert _message(excinfo).endswith(f"{tmp_path / 'b' / 'x.png'} is 16x16 pixels, {tmp_path / 'a' / 'x.png'} is 8x8")
    _png(tmp_path / "b" / "x.png", 0, size=16, mode="RGB")  # a colour image is no exception
    with pytest.raises(AuditError, match="must all have the same shape") as excinfo:
        load_folder(tmp_path)
    assert _message(excinfo).endswith(f"{tmp_path / 'b' / 'x.png'} is 16x16 pixels, {tmp_path / 'a' / 'x.png'} is 8x8")


def _random_png(path, mode: str, seed: int, size: int = 8) -> np.ndarray:
    """A PNG of random 8-bit pixels in ``mode`` (L or RGB); its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    pixels = np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def test_a_greyscale_image_among_colour_ones_is_read_as_rgb(tmp_path):
    """ImageNet has greyscale JPEGs among its RGB ones; torchvision's
    ImageFolder reads them as RGB, and the folder was refused for mixing
    (1, H, W) with (3, H, W) images."""
    colour = [_random_png(tmp_path / name / "x.png", "RGB", seed) for seed, name in enumerate("ac")]
    grey = _random_png(tmp_path / "b" / "grey.png", "L", 7)
    data = load_folder(tmp_path)
    assert data.x.shape == (3, 3, 8, 8) and data.y.tolist() == [0, 1, 2]
    expected = [colour[0].transpose(2, 0, 1), np.broadcast_to(grey, (3, 8, 8)), colour[1].transpose(2, 0, 1)]
    for image, pixels in zip(data.x, expected):
        assert torch.equal(image, torch.from_numpy(pixels / np.float32(255)))
    assert torch.equal(data.x[1, 0], data.x[1, 1]) and torch.equal(data.x[1, 0], data.x[1, 2])


def test_greyscale_modes_among_colour_images_read_as_pillow_converts_them_to_rgb(tmp_path):
    """1-bit, greyscale with alpha and grey-palette images among colour
    ones read as Pillow's RGB conversion of them (alpha dropped), a colour
    palette image as RGB, and a 16-bit one with its 16-bit values in
    all three channels."""
    pixels = np.random.RandomState(3).randint(0, 256, (8, 8), dtype=np.uint8)
    images = {
        "bits": Image.fromarray(pixels > 127),
        "grey_alpha": Image.merge("LA", (Image.fromarray(pixels), Image.new("L", (8, 8), 9))),
        "grey_palette": Image.fromarray(pixels, "P"),
        "colour_palette": Image.fromarray(pixels, "P"),
        "rgba": Image.fromarray(np.dstack([pixels, 255 - pixels, pixels // 2, pixels]), "RGBA"),
    }
    images["grey_palette"].putpalette([level for i in range(256) for level in (i, i, i)])
    images["colour_palette"].putpalette([level for i in range(256) for level in (i, 255 - i, i // 3)])
    for name, image in images.items():
        (tmp_path / name).mkdir()
        image.save(tmp_path / name / "x.png")
    ramp = np.arange(64, dtype=np.float64).reshape(8, 8) / 63
    (tmp_path / "wide").mkdir()
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "wide" / "x.png")
    data = load_folder(tmp_path)
    assert data.x.shape == (6, 3, 8, 8)
    for label, name in enumerate(data.classes[:-1]):
        rgb = np.asarray(Image.open(tmp_path / name / "x.png").convert("RGB")).transpose(2, 0, 1)
        assert torch.equal(data.x[label], torch.from_numpy(rgb / np.float32(255))), name
    for channel in data.x[-1]:
        torch.testing.assert_close(channel, torch.from_numpy(ramp).float(), atol=0.5 / 65535 + 1e-6, rtol=0)


def test_an_all_greyscale_folder_stays_one_channel(tmp_path):
    grey = [_random_png(tmp_path / name / "x.png", "L", seed) for seed, name in enumerate("ab")]
    data = load_folder(tmp_path)
    assert data.x.shape == (2, 1, 8, 8)
    for image, pixels in zip(data.x, grey):
        assert torch.equal(image[0], torch.from_numpy(pixels / np.float32(255)))


def test_empty_image_folders(tmp_path):
    with pytest.raises(AuditError, match="has no class folders"):
        load_data(str(tmp_path))
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(AuditError, match="contains no images"):
        load_folder(tmp_path)
    _png(tmp_path / "dogs" / "x.png", 0)
    (tmp_path / "owls").mkdir()
    with pytest.raises(AuditError, match="class folders cats, owls have no images") as excinfo:
        load_folder(tmp_path)
    _message(excinfo)
    _png(tmp_path / "owls" / "x.png", 0)
    with pytest.raises(AuditError, match="class folder cats has no images"):
        load_folder(tmp_path)


def test_unknown_data_spec():
    with pytest.raises(AuditError, match="unknown data 'cifar10': use mnist, a .npz file or an image folder"):
        load_data("cifar10")


def test_a_truncated_image_is_refused_even_after_weasyprint_is_imported(tmp_path):
    """WeasyPrint sets Pillow's LOAD_TRUNCATED_IMAGES for the whole process
    when it is imported (by the report): a truncated image then read as one
    with black rows. It is refused, and the setting is left as it was."""
    import weasyprint  # noqa: F401  (imported for its side effect)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES
    _png(tmp_path / "a" / "whole.png", 200, size=64)
    cut = tmp_path / "b" / "cut.png"
    cut.parent.mkdir()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(AuditError, match=f"cannot read an image \\({cut}: ") as excinfo:
        load_folder(tmp_path)
    _message(excinfo)
    assert ImageFile.LOAD_TRUNCATED_IMAGES


def _png_claiming(path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height`` greyscale pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path):
    """Pillow refuses an image claiming 400 million pixels with an error that
    is not an OSError; it was an internal error."""
    _png(tmp_path / "a" / "x.png", 0)
    _png_claiming(tmp_path / "b" / "bomb.png", 20000, 20000)
    with pytest.raises(AuditError, match=f"cannot read an image \\({tmp_path / 'b' / 'bomb.png'}: Image size") as excinfo:
        load_folder(tmp_path)
    _message(excinfo)


@pytest.mark.parametrize("link", ["file", "folder", "class-folder"])
def test_symlinks_out_of_the_image_folder_are_refused(tmp_path, link):
    """torchvision follows symlinks anywhere: an image outside the folder
    was audited, and copied into adversarials.npz."""
    root, outside = tmp_path / "data", tmp_path / "private"
    _png(root / "a" / "x.png", 0)
    _png(root / "b" / "x.png", 0)
    _png(outside / "holiday.png", 77)
    escape = {"file": root / "a" / "z.png", "folder": root / "b" / "linked", "class-folder": root / "c"}[link]
    escape.symlink_to(outside / "holiday.png" if link == "file" else outside)
    with pytest.raises(AuditError, match=f"data folder {root}: {escape} leads out of the folder") as excinfo:
        load_folder(root)
    _message(excinfo)


def test_symlinks_inside_a_class_folder_are_followed_once(tmp_path):
    """A folder or file reached twice from one class counts once, the path first in order kept."""
    _png(tmp_path / "a" / "x.png", 0)
    _png(tmp_path / "b" / "x.png", 255)
    _png(tmp_path / "b" / "sub" / "z.png", 51)
    (tmp_path / "b" / "loop").symlink_to(tmp_path / "b")  # walked for ever by torchvision
    (tmp_path / "b" / "also").symlink_to(tmp_path / "b" / "sub")
    (tmp_path / "b" / "y.png").symlink_to(tmp_path / "b" / "x.png")
    data = load_folder(tmp_path)
    assert data.y.tolist() == [0, 1, 1]
    torch.testing.assert_close(data.x.amax(dim=(1, 2, 3)), torch.tensor([0.0, 1.0, 0.2]))


@pytest.mark.parametrize("link", ["file", "folder", "class-folder"])
def test_an_image_reached_from_two_classes_is_refused(tmp_path, link):
    """A class folder linked to another, or a file or folder linked into two
    classes, counted its images twice, under both labels."""
    _png(tmp_path / "a" / "x.png", 0)
    _png(tmp_path / "b" / "sub" / "x.png", 255)
    target, linked, kind = {
        "file": (tmp_path / "b" / "sub" / "x.png", tmp_path / "a" / "y.png", "file"),
        "folder": (tmp_path / "b" / "sub", tmp_path / "a" / "sub", "folder"),
        "class-folder": (tmp_path / "b", tmp_path / "c", "folder"),
    }[link]
    linked.symlink_to(target)
    first, second = sorted([(linked, linked.relative_to(tmp_path).parts[0]),
                            (target, target.relative_to(tmp_path).parts[0])], key=lambda found: found[1])
    with pytest.raises(AuditError) as excinfo:
        load_folder(tmp_path)
    assert _message(excinfo) == (f"data folder {tmp_path}: {second[0]} (class {second[1]}) and {first[0]} "
                                 f"(class {first[1]}) are the same {kind}; an image can have only one label")


def test_a_fifo_in_the_image_folder_is_refused(tmp_path):
    _png(tmp_path / "a" / "x.png", 0)
    os.mkfifo(tmp_path / "a" / "y.png")  # reading it would wait for ever
    with pytest.raises(AuditError, match=f"{tmp_path / 'a' / 'y.png'} is not a regular file"):
        load_folder(tmp_path)


def test_images_over_the_limits_are_refused_before_they_are_decoded(tmp_path, monkeypatch):
    """Sizes come from the headers: a 9000x9000 PNG of 80 KB took 2 GB as float32."""
    _png_claiming(tmp_path / "a" / "big.png", 5000, 4000)  # its data would not even decode
    with pytest.raises(AuditError, match="big.png is 5000x4000 pixels, over the limit of 16777216") as excinfo:
        load_folder(tmp_path)
    _message(excinfo)
    (tmp_path / "a" / "big.png").unlink()
    for name in "abc":
        _png(tmp_path / name / "x.png", 0, size=8)
    monkeypatch.setattr(folder, "MAX_VALUES", 2 * 64)
    with pytest.raises(AuditError, match="the images hold over 128 values"):
        load_folder(tmp_path)
    monkeypatch.setattr(folder, "MAX_VALUES", 3 * 64)  # three greyscale images of 64 values
    assert load_folder(tmp_path).x.shape == (3, 1, 8, 8)
    _png(tmp_path / "c" / "x.png", 0, size=8, mode="RGB")  # all three are then read as RGB
    monkeypatch.setattr(folder, "MAX_VALUES", 5 * 64)  # not one value per greyscale pixel
    with pytest.raises(AuditError, match="the images hold over 320 values"):
        load_folder(tmp_path)


def _npz_declaring(path, x_shape: tuple[int, ...], y_length: int) -> None:
    """A .npz whose float32 ``x`` and int64 ``y`` headers declare these shapes, with no data."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, shape, dtype in (("x", x_shape, "<f4"), ("y", (y_length,), "<i8")):
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": dtype, "fortran_order": False, "shape": shape}
                )


def test_npz_over_the_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 1 MB archive declaring 2**28 float32 values took 2.3 GB before its
    lengths were compared: headers are now checked before any data is read."""
    path = tmp_path / "bomb.npz"
    _npz_declaring(path, (2**24, 1, 4, 4), 0)
    with pytest.raises(AuditError, match=r"x and y lengths differ \(16777216 and 0\)"):
        load_npz(path)
    _npz_declaring(path, (2**25, 1, 4, 4), 2**25)
    with pytest.raises(AuditError, match=r"x has shape \(33554432, 1, 4, 4\), over the limit of 268435456 values"):
        load_npz(path)
    np.savez(path, x=np.zeros((3, 1, 4, 4), np.float32), y=np.zeros(3, np.int64))
    monkeypatch.setattr(arrays, "MAX_VALUES", 47)
    with pytest.raises(AuditError, match="x has shape .* over the limit of 47 values") as excinfo:
        load_npz(path)
    _message(excinfo)
