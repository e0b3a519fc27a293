"""The ONNX adapter: the graph runs on onnxruntime, exactly as deployed.

Input goes through numpy, so the adapter's device is the CPU even when the
session uses the CUDA execution provider. Gradients would need the graph as a
torch module, which is not available yet, so the access ceiling is soft-label.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from torch import nn

from ..access import Access
from ..errors import AuditError, short_reason
from .base import Model, ModelInfo
from .pytorch import CHUNK, run_chunked

if TYPE_CHECKING:
    from . import ModelRequest

logger = logging.getLogger(__name__)

INPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def _static(dim: int | str | None) -> int | None:
    """A static dimension as an int; ``None`` for a symbolic one."""
    return dim if isinstance(dim, int) else None


def external_data_files(file: Path, path: str) -> list[Path]:
    """The external data files the graph in ``file`` refers to, sorted.

    The default ``torch.onnx.export`` may keep the weights in a side file
    (``model.onnx.data``); the model's hash must cover it too.
    """
    try:
        graph = onnx.load(str(file), load_external_data=False).graph
    except Exception as exc:
        raise AuditError(f"model {path}: not a readable ONNX model ({short_reason(exc)})") from exc
    locations = {
        ExternalDataInfo(tensor).location for tensor in graph.initializer if uses_external_data(tensor)
    }
    files = sorted(file.parent / location for location in locations)
    missing = [str(side) for side in files if not side.is_file()]
    if missing:
        raise AuditError(f"model {path}: external data file {missing[0]} is missing")
    return files


def _providers(device: str) -> list[str]:
    """CUDA first when requested (or ``auto``) and available, then the CPU."""
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device.startswith("cuda") and not cuda:
        raise AuditError(
            f"--device {device}: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        )
    if cuda and (device == "auto" or device.startswith("cuda")):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel(Model):
    """An onnxruntime session with one (N,C,H,W) image input; logits from the first output."""

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
        self._output_name = session.get_outputs()[0].name
        self._mean = None if mean is None else np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self._std = None if std is None else np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        self._chunk = fixed_batch or CHUNK
        self._fixed_batch = fixed_batch is not None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one chunk (a CPU tensor)."""
        images = x.numpy()
        if self._mean is not None:
            images = (images - self._mean) / self._std
        outputs = self._session.run([self._output_name], {self._input_name: images.astype(self._input_dtype)})
        return torch.from_numpy(outputs[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32)
        logits = run_chunked(self._run, images, self._chunk, self._fixed_batch)
        return logits.float().to(x.device)

    def torch_module(self) -> nn.Module | None:
        return None

    @property
    def access_ceiling(self) -> tuple[Access, str]:
        return Access.SOFT_LABEL, "ONNX graph: gradients need a torch conversion, which is not available yet"


def load_onnx(request: ModelRequest) -> OnnxModel:
    """An ONNX file, run on onnxruntime."""
    providers = _providers(request.device)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
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
    if len(shape) != 4:
        raise AuditError(f"model {request.path} takes a {len(shape)}-D input {shape}; expected (N, C, H, W)")
    output_shape = session.get_outputs()[0].shape
    num_classes = _static(output_shape[-1]) if len(output_shape) == 2 else None
    input_shape = tuple(_static(dim) for dim in shape[1:])
    fixed_batch = _static(shape[0])
    if fixed_batch is not None:
        logger.warning("model %s has a fixed batch size of %d", request.path, fixed_batch)
    info = ModelInfo(
        path=request.path,
        format="onnx",
        sha256=request.sha256,
        input_shape=input_shape if any(dim is not None for dim in input_shape) else None,
        num_classes=num_classes,
    )
    return OnnxModel(session, info, mean=request.mean, std=request.std, fixed_batch=fixed_batch)
