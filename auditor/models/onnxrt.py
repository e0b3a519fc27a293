"""The ONNX adapter: the graph runs on onnxruntime, exactly as deployed.

Logits, and so every verification, come from the onnxruntime session. For
gradients the graph is also converted to a torch module when it is loaded
(:mod:`auditor.models.convert`) and checked against the session on a small
random batch; a graph that cannot be converted, or whose conversion
disagrees, caps the access at soft-label. The converted module lives on the
GPU when the session uses the CUDA execution provider and torch has CUDA;
otherwise everything stays on the CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime
import torch
from google.protobuf.message import Message
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from torch import nn

from ..access import Access
from ..data.base import CHANNEL_COUNTS
from ..errors import AuditError, short_reason
from .base import ChannelsLast, Model, ModelFailed, ModelInfo, Normalize, plural, require_classes
from .convert import ConversionError, check_agreement, convert_onnx
from .pytorch import FixedBatch, chunk_rows, resolve_device, run_chunked

if TYPE_CHECKING:
    from . import ModelRequest

logger = logging.getLogger(__name__)

CHECK_BATCH = 4
"""Random images in [0,1] on which the converted graph must match the session."""

FATAL_ONLY = 4
"""onnxruntime's log severity that logs fatal errors only."""

INPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}

SCORE_TYPES = tuple(INPUT_DTYPES)
"""The output types that can hold a classifier's scores (logits or probabilities)."""


def _static(dim: int | str | None) -> int | None:
    """A static dimension as an int; ``None`` for a symbolic one."""
    return dim if isinstance(dim, int) else None


def external_data_files(file: Path, path: str) -> list[Path]:
    """The external data files the model in ``file`` refers to, sorted.

    The default ``torch.onnx.export`` may keep the weights in a side file
    (``model.onnx.data``); the model's hash must cover it too. The files are
    hashed before onnxruntime reads the graph, so each location is first
    held to onnxruntime's rules (:func:`_external_data_file`), and each
    tensor's ``offset`` + ``length`` must lie within its file.
    """
    try:
        model = onnx.load(str(file), load_external_data=False)
        infos = [ExternalDataInfo(tensor) for tensor in _tensors(model) if uses_external_data(tensor)]
    except Exception as exc:
        raise AuditError(f"model {path}: not a readable ONNX model ({short_reason(exc)})") from exc
    files: dict[str, tuple[Path, int]] = {}
    for info in infos:
        if info.location not in files:
            files[info.location] = _external_data_file(file, info.location, path)
        side, size = files[info.location]
        end = (info.offset or 0) + (info.length or 0)
        if end > size:
            raise AuditError(
                f"model {path}: external data location {info.location!r} is {size} bytes, "
                f"but a tensor reads up to byte {end}"
            )
    return sorted(side for side, _ in files.values())


def _tensors(message: Message) -> Iterator[onnx.TensorProto]:
    """Every ``TensorProto`` within ``message``: initializers, but also the
    tensors of node attributes (Constant values), of sparse initializers and
    of subgraphs (If/Loop bodies) and functions, any of which onnxruntime
    reads from external data. onnx's own walker
    (``external_data_helper._get_all_tensors``) is private and misses the
    sparse ones, so every message field is walked instead."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in (value,) if isinstance(value, Message) else value:
            if isinstance(item, onnx.TensorProto):
                yield item
            else:
                yield from _tensors(item)


def _external_data_file(file: Path, location: str, path: str) -> tuple[Path, int]:
    """The file at ``location`` (relative to the folder of the model
    ``file``) and its size, checked as onnxruntime checks it: a relative path
    with no ``..`` component, that stays inside the model's folder and names a
    regular file, not a symlink (nor a device or FIFO that would never end)."""
    where = f"model {path}: external data location {location!r}"
    relative = Path(location)
    if relative.is_absolute() or ".." in relative.parts:
        raise AuditError(f"{where} must be a relative path inside the model's folder, without '..'")
    side = file.parent / relative
    try:
        info = os.lstat(side)
    except FileNotFoundError:
        raise AuditError(f"model {path}: external data file {side} is missing") from None
    except (OSError, ValueError) as exc:
        raise AuditError(f"{where} cannot be read ({short_reason(exc)})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise AuditError(f"{where} is not a regular file (symlinks, devices and FIFOs are refused)")
    if not Path(os.path.realpath(side)).is_relative_to(os.path.realpath(file.parent)):
        raise AuditError(f"{where} leads out of the model's folder through a symlinked folder")
    return side, info.st_size


def _providers(device: str) -> list[str]:
    """CUDA first when requested (or ``auto``) and available, then the CPU.

    ``device`` is checked as for PyTorch models (:func:`resolve_device`), and
    must be a CPU or CUDA device."""
    if device != "auto" and resolve_device(device).type not in ("cpu", "cuda"):
        raise AuditError(f"--device {device}: ONNX models run on cpu or cuda")
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device == "auto" or device.startswith("cuda"):
        _warn_about_gpu_install(cuda)
    if device.startswith("cuda") and not cuda:
        raise AuditError(
            f"--device {device}: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        )
    if cuda and (device == "auto" or device.startswith("cuda")):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@functools.cache
def _warn_about_gpu_install(cuda: bool) -> None:
    """Warn, once a process, where the install may keep ONNX models off the
    GPU: the distributions ``onnxruntime`` and ``onnxruntime-gpu`` are both
    installed (``auditor[gpu]`` installs both; they ship the same
    ``onnxruntime`` package, so the files of either may be the ones loaded),
    or torch sees a CUDA GPU but onnxruntime offers no CUDA provider."""
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    if all(list(metadata.distributions(name=name)) for name in ("onnxruntime", "onnxruntime-gpu")):
        logger.warning(
            "onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files "
            "(the CUDAExecutionProvider is %s now); to run ONNX models on the GPU, keep onnxruntime-gpu "
            "alone: %s",
            "there" if cuda else "missing",
            fix,
        )
    elif not cuda and torch.cuda.is_available():
        logger.warning(
            "torch sees a CUDA GPU but onnxruntime offers no CUDAExecutionProvider, so ONNX models "
            "run on the CPU; to run them on the GPU: %s",
            fix,
        )


def channels_last(shape: list) -> bool:
    """Whether a 4-D graph input of ``shape`` is (N,H,W,C): its last axis has
    a static size of :data:`CHANNEL_COUNTS` and its second does not (Keras
    models exported by tf2onnx take such input)."""
    return shape[3] in CHANNEL_COUNTS and shape[1] not in CHANNEL_COUNTS


class OnnxModel(Model):
    """An onnxruntime session with one image input, (N,C,H,W) or (N,H,W,C)
    (``info.channels_last``: the adapter transposes (N,C,H,W) images for it);
    logits from the output named ``info.output``, else the first."""

    def __init__(
        self,
        session: onnxruntime.InferenceSession,
        info: ModelInfo,
        *,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        fixed_batch: int | None = None,
    ):
        """``fixed_batch`` is the batch size the graph only accepts, if any."""
        self.info = info
        self._session = session
        graph_input = session.get_inputs()[0]
        self._input_name = graph_input.name
        self._input_dtype = INPUT_DTYPES[graph_input.type]
        self._output_name = info.output if info.output is not None else session.get_outputs()[0].name
        self._normalisation = None if mean is None or std is None else (mean, std)
        self._mean = None if mean is None else np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self._std = None if std is None else np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        self._fixed_batch = fixed_batch
        self._module: nn.Module | None = None
        self._device = torch.device("cpu")
        self._ceiling = (Access.SOFT_LABEL, "ONNX graph: not converted for gradients")

    @property
    def device(self) -> torch.device:
        """The converted module's device (onnxruntime takes numpy input from any device)."""
        return self._device

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one chunk (a CPU tensor).

        onnxruntime returns whatever shape the graph computes, whatever the
        graph declares: one that ends in a ``Squeeze`` without axes (as
        PyTorch's ``x.squeeze()`` exports) returns (K,) for one image. Such
        an output is refused here, so that every caller gets (rows, K) or a
        :class:`ModelFailed`, never a shape to fail on later.
        """
        images = x.numpy()
        if self._mean is not None:
            images = (images - self._mean) / self._std
        if self.info.channels_last:
            images = images.transpose(0, 2, 3, 1)
        outputs = self._session.run([self._output_name], {self._input_name: images.astype(self._input_dtype, copy=False)})
        logits = outputs[0]
        if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.shape[0] != len(x):
            shape = tuple(logits.shape) if isinstance(logits, np.ndarray) else type(logits).__name__
            raise ValueError(
                f"its output {self._output_name!r} has shape {shape} for {plural(len(x), 'image')}; "
                f"expected ({len(x)}, classes)"
            )
        return torch.from_numpy(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32)
        try:
            chunk = self._fixed_batch or chunk_rows(images.shape[1:])
            logits = run_chunked(self._run, images, chunk, self._fixed_batch is not None)
        except Exception as exc:
            raise ModelFailed(self.info.path, len(x), exc) from exc
        return logits.float().to(x.device)

    def torch_module(self) -> nn.Module | None:
        return self._module

    @property
    def access_ceiling(self) -> tuple[Access, str]:
        return self._ceiling

    def _check_shape(self, image_shape: tuple[int, ...] | None) -> tuple[int, int, int]:
        """The (C,H,W) of the images the conversion is checked on: the
        declared input shape, its symbolic dimensions taken from
        ``image_shape`` (the data's, when the caller knows it). A static
        declared dimension is kept even where ``image_shape`` differs:
        :func:`~auditor.models.check_model_on_data` refuses the mismatch."""
        declared = self.info.input_shape or (None, None, None)
        shape = declared
        if image_shape is not None and len(image_shape) == len(declared):
            shape = tuple(want if want is not None else got for want, got in zip(declared, image_shape))
            if shape != declared:
                logger.info(
                    "model %s: symbolic input shape %s; the conversion is checked on images of shape %s",
                    self.info.path, declared, shape,
                )
        if None in shape:
            raise ConversionError(f"symbolic input shape {declared}; no batch to check it on")
        return shape

    def _converted(self, file: Path, image_shape: tuple[int, ...] | None) -> tuple[nn.Module, float]:
        """The graph in ``file`` as a torch module (normalisation in front) on
        the CPU, and its max abs difference from the session on a random check
        batch (of ``image_shape`` where the declared shape is symbolic)."""
        module = convert_onnx(onnx.load(str(file)), output=self._output_name)
        precision = module.precision
        shape = self._check_shape(image_shape)
        if self._fixed_batch:
            module = FixedBatch(module, self._fixed_batch)
        if self.info.channels_last:
            module = ChannelsLast(module)
        if self._normalisation is not None:
            module = nn.Sequential(Normalize(*self._normalisation), module)
        generator = torch.Generator().manual_seed(0)
        batch = torch.rand((CHECK_BATCH, *shape), generator=generator)
        return module.eval(), check_agreement(module, self.forward, batch, precision=precision)

    def enable_gradients(self, file: Path, image_shape: tuple[int, ...] | None = None) -> None:
        """Convert the graph in ``file`` (the session's model, with any external
        data beside it) for white-box attacks, or record why not.

        The conversion keeps shapes dynamic, but is checked against the
        session on images of one shape: a graph whose image size is
        symbolic is checked on ``image_shape`` (C,H,W), the data's, and
        without it cannot be checked. Any failure of the conversion only
        lowers the access ceiling to soft-label; the session keeps working
        either way.
        """
        try:
            module, diff = self._converted(file, image_shape)
        except Exception as exc:
            reason = short_reason(exc)
            expected = isinstance(exc, ConversionError)  # an op or graph the converter refuses, as designed
            if not expected:
                reason = f"{type(exc).__name__}: {reason}"
            # an unexpected error may be a converter bug that costs the audit its white-box access: say so louder
            logger.log(logging.INFO if expected else logging.WARNING,
                       "model %s: no gradients from the ONNX graph (%s)", self.info.path, reason)
            self._ceiling = (Access.SOFT_LABEL, f"ONNX graph could not be converted for gradients: {reason}")
            return
        on_gpu = "CUDAExecutionProvider" in self._session.get_providers() and torch.cuda.is_available()
        self._device = torch.device("cuda" if on_gpu else "cpu")
        self._module = module.to(self._device)
        self._ceiling = (
            Access.WHITE_BOX,
            f"ONNX graph converted to torch for gradients (max abs diff {diff:.1g} against onnxruntime "
            "on a check batch); verification stays on onnxruntime",
        )


def load_onnx(request: ModelRequest) -> OnnxModel:
    """An ONNX file, run on onnxruntime."""
    providers = _providers(request.device)
    options = onnxruntime.SessionOptions()
    # fatal only: a failure is raised as an exception and reported in one line;
    # onnxruntime's own (multi-line, coloured) error log would come before it
    options.log_severity_level = FATAL_ONLY
    # onnxruntime's worker threads spin between runs by default, which starves
    # torch's own threads in the attack code running between queries.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # as many threads as torch's (OMP_NUM_THREADS, torch.set_num_threads): one knob for both runtimes,
    # and parallel workers that set torch to one thread each do not oversubscribe the cores through it
    options.intra_op_num_threads = torch.get_num_threads()
    # on a GPU its fastest kernels may add in any order: a seed must give the same results
    options.use_deterministic_compute = "CUDAExecutionProvider" in providers
    try:
        session = onnxruntime.InferenceSession(str(request.file), options, providers=providers)
    except Exception as exc:
        raise AuditError(f"model {request.path}: not a readable ONNX model ({short_reason(exc)})") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(graph_input.name for graph_input in inputs)
        raise AuditError(
            f"model {request.path} has {len(inputs)} inputs ({names}); the auditor needs exactly one image input"
        )
    if inputs[0].type not in INPUT_DTYPES:
        raise AuditError(f"model {request.path} takes {inputs[0].type} input; expected float, float16 or double")
    shape = inputs[0].shape
    if not shape:
        raise AuditError(
            f"model {request.path}: its input {inputs[0].name!r} has no declared shape (or is a scalar); "
            "re-export it with an (N, C, H, W) input shape"
        )
    if len(shape) != 4:
        raise AuditError(
            f"model {request.path} takes a {len(shape)}-D input {shape}; expected (N, C, H, W) or (N, H, W, C)"
        )
    output = _audited_output(session, request.path)
    output_shape = output.shape or []
    num_classes = _static(output_shape[-1]) if len(output_shape) == 2 else None
    require_classes(num_classes, request.path)
    last = channels_last(shape)
    input_shape = tuple(_static(shape[axis]) for axis in ((3, 1, 2) if last else (1, 2, 3)))
    if last:
        logger.info("model %s takes (N, H, W, C) input; images are transposed for it", request.path)
    fixed_batch = _static(shape[0])
    if fixed_batch is not None:
        logger.warning("model %s has a fixed batch size of %d", request.path, fixed_batch)
    info = ModelInfo(
        path=request.path,
        format="onnx",
        sha256=request.sha256,
        input_shape=input_shape if any(dim is not None for dim in input_shape) else None,
        num_classes=num_classes,
        channels_last=last,
        output=output.name if len(session.get_outputs()) > 1 else None,
    )
    model = OnnxModel(session, info, mean=request.mean, std=request.std, fixed_batch=fixed_batch)
    model.enable_gradients(request.file, request.image_shape)
    return model


def _audited_output(session: onnxruntime.InferenceSession, path: str) -> onnxruntime.NodeArg:
    """The graph output holding the scores: the first float tensor.

    sklearn-onnx and tf2onnx classifiers put an int64 label output first
    and the probabilities after it (as a tensor, or as a ``ZipMap`` sequence
    of maps); graphs with (logits, probabilities) or (probabilities, label)
    outputs have their scores first, and keep them. A graph with no float
    tensor output is refused, naming its outputs and their types.
    """
    outputs = session.get_outputs()
    chosen = next((output for output in outputs if output.type in SCORE_TYPES), None)
    listed = ", ".join(f"{output.name!r} ({output.type})" for output in outputs)
    if chosen is None:
        hint = ""
        if any(output.type.startswith("seq(map(") for output in outputs):
            hint = (
                "; a sequence of maps is a ZipMap of the probabilities: convert the model without it "
                "(sklearn-onnx: options {'zipmap': False}) to get them as an (N, classes) tensor"
            )
        raise AuditError(
            f"model {path} has no float tensor output to audit (outputs: {listed}); expected (N, classes) "
            f"logits or probabilities{hint}"
        )
    if len(outputs) > 1:
        log = logger.info if chosen is outputs[0] else logger.warning
        log("model %s has %d outputs (%s); auditing %r, the first float tensor", path, len(outputs), listed,
            chosen.name)
    return chosen
