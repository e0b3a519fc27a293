"""Loading model artifacts and checking them against a data set.

:func:`load_model` recognises the format from the file name and contents and
hands the file to that format's loader; :func:`check_model_on_data` makes sure
the model and the data fit before any attack runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.base import Dataset
from ..errors import AuditError
from .base import RANDOMNESS_PASSES, Model, ModelFailed, ModelInfo, Normalize, plural, require_classes
from .onnxrt import OnnxModel, external_data_files, load_onnx
from .pytorch import (
    TorchModel,
    load_export,
    load_safetensors,
    load_torch_save,
    load_torchscript,
)

__all__ = [
    "Model",
    "ModelInfo",
    "ModelRequest",
    "Normalize",
    "OnnxModel",
    "TorchModel",
    "check_channels",
    "clean_logits",
    "check_model_on_data",
    "detect_format",
    "load_model",
]

logger = logging.getLogger(__name__)

SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "torch-export", ".safetensors": "safetensors"}
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"
"""The first opcode of a pickle of protocol 2 or later."""
SELF_CONTAINED = {
    "onnx": "an ONNX graph",
    "torchscript": "a TorchScript program",
    "torch-export": "a torch.export program",
    "pickle": "a pickled module",
}
"""Formats that carry their own architecture (so ``--arch`` has no use) -> what they are."""
CHECK_SAMPLES = 16
"""Images run through the model by :func:`check_model_on_data`."""
ODD_BATCH = 3
"""The batch that :func:`check_model_on_data` runs as well: neither a power
of two nor a divisor of :data:`CHECK_SAMPLES`, batch sizes graphs are often exported with."""
BATCH_TOLERANCE = {"rtol": 1e-2, "atol": 1e-3}
"""How close the logits of an image must be in batches of different sizes
(kernels may add in another order)."""


@dataclass(frozen=True)
class ModelRequest:
    """What a format loader needs: the file and the user's options."""

    path: str
    """The path as given, for messages and :class:`ModelInfo`."""
    file: Path
    sha256: str
    arch: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    trust_pickle: bool
    device: str
    image_shape: tuple[int, int, int] | None = None
    """(C,H,W) of the data's images, where the caller knows it: the shape a
    graph with a symbolic image size is checked on (:func:`load_model`)."""


LOADERS: dict[str, Callable[[ModelRequest], Model]] = {
    "onnx": load_onnx,
    "torchscript": load_torchscript,
    "torch-export": load_export,
    "safetensors": load_safetensors,
    "torch-save": load_torch_save,
}
"""Format -> loader; ``torch-save`` yields the ``state-dict`` or ``pickle`` format."""


def detect_format(file: Path, path: str) -> str:
    """The loader format of ``file``: by extension, else by its contents.

    TorchScript and ``torch.save`` files are both zip archives; TorchScript
    ones hold ``constants.pkl`` and a ``code/`` folder. A file starting with a
    pickle opcode is a legacy (pre-zip) ``torch.save`` file; a damaged zip is
    left to ``torch.load`` to report.
    """
    fmt = SUFFIX_FORMATS.get(file.suffix.lower())
    if fmt is not None:
        return fmt
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
            inner = [name.partition("/")[2] for name in archive.namelist()]
        if any(name == "constants.pkl" or name.startswith("code/") for name in inner):
            return "torchscript"
        return "torch-save"
    with file.open("rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        return "torch-save"
    raise AuditError(
        f"model {path}: not a recognised model file "
        "(expected ONNX, TorchScript, torch.export .pt2, safetensors or torch.save)"
    )


def _sha256(files: Iterable[Path]) -> str:
    """One SHA-256 over the bytes of ``files``, in order."""
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def normalisation(
    mean: Iterable[float] | None, std: Iterable[float] | None
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Validated ``(mean, std)``; a missing one defaults to 0 (mean) or 1 (std),
    and a single number is one value for every channel."""
    if mean is None and std is None:
        return None, None
    mean = (0.0,) if mean is None else _values("--mean", mean)
    std = (1.0,) if std is None else _values("--std", std)
    if not mean or not std:
        raise AuditError("--mean and --std need at least one value each")
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise AuditError(f"--mean has {len(mean)} values but --std has {len(std)}")
    if any(value <= 0 for value in std):
        raise AuditError(f"--std values must be positive, got {std}")
    return mean, std


def _values(flag: str, values) -> tuple[float, ...]:
    """``values`` (a number or a sequence of numbers) as a tuple of finite floats."""
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = (values,)
    try:
        if isinstance(values, (str, bytes)) or any(isinstance(value, (str, bool)) for value in values):
            raise TypeError
        result = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise AuditError(f"{flag} must be a number or a sequence of numbers, got {values!r}") from None
    if not all(math.isfinite(value) for value in result):
        raise AuditError(f"{flag} values must be finite, got {result}")
    return result


def check_channels(
    mean: tuple[float, ...] | None, std: tuple[float, ...] | None, channels: int | None, owner: str
) -> None:
    """``--mean``/``--std`` have one value or one per channel; ``owner`` says
    whose ``channels`` these are (``"model m.onnx takes"``, ``"data d.npz has"``).
    Nothing to check without normalisation or a known channel count."""
    if mean is None or std is None or channels is None:
        return
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            raise AuditError(f"{flag} has {len(values)} values but {owner} {channels} channel(s)")


def _check_arch(arch: str | None, fmt: str, path: str) -> None:
    """Refuse ``arch`` for a format that carries its own architecture.

    Called with the detected format before loading and again with the loaded
    one: a ``torch.save`` file is only known to be a weights file or a whole
    pickled module once it is read.
    """
    if arch is not None and fmt in SELF_CONTAINED:
        raise AuditError(
            f"--arch applies only to state_dict/safetensors weights; model {path} is {SELF_CONTAINED[fmt]}"
        )


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    mean: Iterable[float] | None = None,
    std: Iterable[float] | None = None,
    trust_pickle: bool = False,
    device: str = "auto",
    image_shape: Iterable[int] | None = None,
) -> Model:
    """Load a model artifact as a :class:`Model`.

    ``arch`` (``module:factory`` or ``file.py:factory``) builds the module
    for weights files and is refused for any other format; ``mean``/``std``
    fold input normalisation into the model (one number, or one per
    channel); ``trust_pickle`` (a bool, nothing else) allows
    unpickling whole modules (which runs arbitrary code from the file).
    ``device`` is ``auto``, ``cpu`` or ``cuda[:N]``.

    ``image_shape`` is the (C, H, W) of the images the model will be run on,
    where the caller has loaded them already (``scan`` and ``harden`` pass
    the data's). An ONNX graph is converted to torch for gradients with its
    shapes dynamic, but the conversion is checked against onnxruntime on a
    batch of images of one shape: where the graph declares its image size
    symbolic (``(N, 1, H, W)``), that batch takes the hint's sizes, and
    without a hint the graph gets no gradients. The hint fills only symbolic
    dimensions, never a static one, and says nothing of whether the model
    fits the data: :func:`check_model_on_data` checks that.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise AuditError(
            f"model must be the path of a model file, got {type(path).__name__} "
            "(save an nn.Module with torch.jit.save, torch.export or torch.onnx.export)"
        )
    if not isinstance(device, str):
        raise AuditError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if not isinstance(trust_pickle, bool):  # "false" is truthy: it would unpickle the file
        raise AuditError(f"trust_pickle must be True or False, got {type(trust_pickle).__name__}")
    shown = str(path)
    file = Path(path)
    if not file.exists():
        raise AuditError(f"model {shown}: file not found")
    if not file.is_file():
        raise AuditError(f"model {shown} is not a file")
    if file.stat().st_size == 0:
        raise AuditError(f"model {shown} is empty")
    mean, std = normalisation(mean, std)
    hint = _image_shape(image_shape)
    fmt = detect_format(file, shown)
    _check_arch(arch, fmt, shown)
    files = [file, *external_data_files(file, shown)] if fmt == "onnx" else [file]
    request = ModelRequest(
        path=shown,
        file=file,
        sha256=_sha256(files),
        arch=arch,
        mean=mean,
        std=std,
        trust_pickle=trust_pickle,
        device=device,
        image_shape=hint,
    )
    model = LOADERS[fmt](request)
    declared = model.info.input_shape[0] if model.info.input_shape else None
    check_channels(mean, std, declared, f"model {shown} takes")
    _check_arch(arch, model.info.format, shown)
    logger.info("loaded model %s (%s, sha256 %s)", shown, model.info.format, model.info.sha256[:12])
    return model


def _image_shape(shape: Iterable[int] | None) -> tuple[int, int, int] | None:
    """``shape`` as a (C, H, W) tuple of positive ints, or ``None``."""
    if shape is None:
        return None
    try:
        if isinstance(shape, (str, bytes)):
            raise TypeError
        values = tuple(shape)
        if len(values) != 3 or any(
            isinstance(value, bool) or int(value) != value or value < 1 for value in values
        ):
            raise ValueError
    except (TypeError, ValueError):
        raise AuditError(f"image_shape must be (C, H, W), three positive integers, got {shape!r}") from None
    return tuple(int(value) for value in values)


def check_model_on_data(model: Model, dataset: Dataset) -> int:
    """Check that ``model`` fits ``dataset`` and return its number of classes.

    Compares the declared input shape with the images, runs the first few
    images through the model and checks the logits: (N, K), finite, K at
    least 2 and larger than every label. The first :data:`ODD_BATCH` of them
    run again as a batch of their own and must give the same logits: a graph
    with a batch size fixed inside it (in a reshape, say) fails on any other.
    So must the first image alone, as (1, K): attacks query single images,
    and a graph ending in PyTorch's ``x.squeeze()`` returns (K,) for one.
    """
    path, name = model.info.path, dataset.name
    declared = model.info.input_shape
    actual = tuple(dataset.x.shape[1:])
    if declared is not None and (
        len(declared) != len(actual)
        or any(want is not None and want != got for want, got in zip(declared, actual))
    ):
        raise AuditError(f"model {path} expects input {declared} but data {name} has {actual}")
    sample = dataset.x[:CHECK_SAMPLES]
    logits = _logits(model, sample, dataset)
    if logits.ndim != 2 or logits.shape[0] != len(sample):
        raise AuditError(
            f"model {path} returned outputs of shape {tuple(logits.shape)} for {len(sample)} images "
            f"of data {name}; expected (images, classes)"
        )
    if logits.isnan().any():
        raise AuditError(f"model {path} returned NaN outputs on data {name}")
    if logits.isinf().any():
        raise AuditError(f"model {path} returned infinite outputs on data {name}")
    for rows in (ODD_BATCH, 1):
        if len(sample) > rows:
            _check_sub_batch(model, sample, logits, dataset, rows)
    num_classes = int(logits.shape[1])
    require_classes(num_classes, path)
    top_label = int(dataset.y.max())
    if num_classes <= top_label:
        raise AuditError(
            f"model {path} has {plural(num_classes, 'class')} but the labels of data {name} "
            f"go up to {top_label}"
        )
    return num_classes


def _logits(model: Model, images: torch.Tensor, dataset: Dataset) -> torch.Tensor:
    """``model.forward(images)``; a failure names the model, the batch and the data."""
    try:
        return model.forward(images)
    except ModelFailed as exc:
        raise AuditError(
            f"model {model.info.path} failed on a batch of {len(images)} images of shape "
            f"{tuple(images.shape[1:])} from data {dataset.name}: {exc.reason}"
        ) from exc


def _check_sub_batch(
    model: Model, sample: torch.Tensor, logits: torch.Tensor, dataset: Dataset, rows: int
) -> None:
    """The first ``rows`` images of ``sample`` give (rows, K) logits on their
    own, the same as in ``sample`` (``logits``), unless the model is
    randomised (another of :data:`~auditor.models.base.RANDOMNESS_PASSES`
    passes over ``sample`` or its first ``rows`` differs from the first),
    which the preflight checks report. With
    :data:`ODD_BATCH` rows this finds a batch size fixed inside the graph;
    with one, a ``squeeze()`` that drops the batch dimension of a single
    image."""
    path, name = model.info.path, dataset.name
    what = "a single image" if rows == 1 else f"a batch of {rows}"
    hint = ("(a squeeze() that drops the batch dimension?)" if rows == 1
            else "(a batch size fixed inside the graph?)")
    try:
        alone = model.forward(sample[:rows])
    except ModelFailed as exc:
        raise AuditError(
            f"model {path} runs on a batch of {len(sample)} images of data {name} but fails on {what} "
            f"{hint}: {exc.reason}"
        ) from exc
    if alone.shape != (rows, logits.shape[1]):
        raise AuditError(
            f"model {path} returned outputs of shape {tuple(alone.shape)} for {what} of data {name}; "
            f"expected ({rows}, {logits.shape[1]}) {hint}"
        )
    if torch.allclose(alone, logits[:rows], **BATCH_TOLERANCE):
        return
    for _ in range(RANDOMNESS_PASSES - 1):
        if not (torch.allclose(_logits(model, sample, dataset), logits, **BATCH_TOLERANCE)
                and torch.allclose(model.forward(sample[:rows]), alone, **BATCH_TOLERANCE)):
            return  # randomised: the preflight reports it
    raise AuditError(
        f"model {path} gives other outputs for {plural(rows, 'image')} of data {name} alone than in a batch "
        f"of {len(sample)}: its outputs depend on the batch (a batch size fixed inside the graph, or batch "
        f"statistics; {RANDOMNESS_PASSES} passes over each agreed, so it is not randomness)"
    )


def clean_logits(model: Model, x: torch.Tensor, dataset: Dataset) -> torch.Tensor:
    """The model's logits on the audited images ``x`` of ``dataset``, on the
    CPU: the one clean pass the scan makes over them (targets and the
    battery's clean predictions both come from it; a randomised model's
    clean predictions are a vote of passes instead). A model that gives NaN or
    infinite logits on any of them is refused: its predictions there name no
    class."""
    logits = model.forward(x.to(model.device)).cpu()
    bad = int((~torch.isfinite(logits).all(dim=1)).sum())
    if bad:
        raise AuditError(
            f"model {model.info.path} returned NaN or infinite outputs on {bad} of the {len(x)} "
            f"audited images of data {dataset.name}"
        )
    return logits
