"""PyTorch adapters: TorchScript, ``torch.export`` programs, weights files and pickles.

Every torch artifact ends up as one :class:`TorchModel` around an
``nn.Module``; the loaders below differ only in how they obtain the module.
Weights files (``state_dict`` and safetensors) need the architecture, given as
``--arch module:factory``. Pickled modules run arbitrary code when loaded, so
they are refused unless the user passes ``--trust-pickle``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import logging
import math
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..access import Access
from ..errors import AuditError, short_reason
from .base import Model, ModelFailed, ModelInfo, Normalize, last_line, plural, require_classes
from .export_archive import check_archive, check_layout, check_program

if TYPE_CHECKING:
    from . import ModelRequest

logger = logging.getLogger(__name__)

CHUNK = 1024
"""Rows per forward call, at most."""

FORWARD_VALUES = 2**22
"""Input values per forward call, at most: the model's activations grow with
rows × pixels, so larger images go in fewer rows (1,024 MNIST digits or
CIFAR images, 341 images of 3 × 64 × 64, 27 of 3 × 224 × 224)."""


def chunk_rows(image_shape: Sequence[int]) -> int:
    """Rows per forward call for images of ``image_shape`` (C, H, W)."""
    return max(1, min(CHUNK, FORWARD_VALUES // max(1, math.prod(image_shape))))

DESCRIPTIONS = {
    "torchscript": "PyTorch TorchScript program",
    "torch-export": "PyTorch torch.export program",
    "state-dict": "PyTorch state_dict with --arch",
    "safetensors": "safetensors weights with --arch",
    "pickle": "pickled PyTorch module",
}


@contextlib.contextmanager
def deterministic_kernels():
    """cuDNN's deterministic kernels and no autotuning for the duration, so
    that a seed gives the same gradients on a GPU (its fastest kernels may
    add in any order); the earlier settings are put back after. Also a
    decorator."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise AuditError(f"--device {device}: {short_reason(exc)}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AuditError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def run_chunked(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    chunk: int,
    fixed_batch: bool,
    min_rows: int = 0,
) -> torch.Tensor:
    """``fn`` applied to ``x`` in chunks of ``chunk`` rows, concatenated.

    A chunk of fewer than ``min_rows`` rows (with ``fixed_batch``, of fewer
    than ``chunk``: the graph only accepts exactly ``chunk`` rows) is padded
    with zeros up to that many and the padding rows are dropped from the
    output. The models are in eval mode, where each row's output depends on
    that row alone, so the padding changes no other row's output.
    """
    least = chunk if fixed_batch else min_rows
    if least <= len(x) <= chunk:
        return fn(x)
    outputs = []
    for part in x.split(chunk):
        rows = len(part)
        if rows < least:
            part = torch.cat([part, part.new_zeros((least - rows, *part.shape[1:]))])
        outputs.append(fn(part)[:rows])
    return torch.cat(outputs)


class BatchLimits(nn.Module):
    """Runs a graph that only accepts batches of ``low`` to ``high`` rows
    (``high`` None: no upper limit) on any number of rows: in chunks of at
    most ``high`` rows, a chunk shorter than ``low`` zero-padded (see
    :func:`run_chunked`); differentiable."""

    def __init__(self, module: nn.Module, low: int, high: int | None):
        super().__init__()
        self.module = module
        self.low = low
        self.high = high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.high if self.high is not None else max(len(x), self.low, 1)
        return run_chunked(self.module, x, chunk, False, self.low)


class FixedBatch(BatchLimits):
    """Runs a graph that only accepts ``batch`` rows on any number of rows
    (chunked and zero-padded, see :func:`run_chunked`); differentiable."""

    def __init__(self, module: nn.Module, batch: int):
        super().__init__(module, batch, batch)
        self.batch = batch


class _ExportedModule(nn.Module):
    """Holds the module of a ``torch.export`` program, with what the program
    said of its input: its dtype, whether its batch size is static, and the
    batch sizes it takes (``harden`` exports it again with the same).

    Such a module refuses ``train()``/``eval()``: its mode was fixed when it
    was exported. This wrapper makes both a no-op, so it can sit inside an
    ``nn.Sequential`` that callers put in eval mode.
    """

    def __init__(self, program: nn.Module, input_dtype: torch.dtype, static_batch: bool,
                 batch_range: tuple[int, int | None]):
        super().__init__()
        self.program = program
        self.input_dtype = input_dtype
        self.static_batch = static_batch
        self.batch_range = batch_range

    def train(self, mode: bool = True) -> _ExportedModule:
        """Record ``mode``; the exported graph keeps the mode it was exported in."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


class InputDtype(nn.Module):
    """A module whose weights are not float32 (float64, say), fed its input
    in their dtype; it returns float32 logits, as every adapter does."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).float()


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point weight (float32 if none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


class TorchModel(Model):
    """An ``nn.Module`` (normalisation folded in front) in eval mode on ``device``."""

    def __init__(
        self,
        module: nn.Module,
        info: ModelInfo,
        *,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        device: str = "auto",
        fixed_batch: int | None = None,
        batch_limits: tuple[int, int | None] | None = None,
    ):
        """``fixed_batch`` is the batch size the module only accepts, if any:
        the module then runs (for logits and for gradients) in chunks of
        exactly that many rows, the last one zero-padded. ``batch_limits``
        (``low``, ``high``) are the fewest and most rows it accepts (``high``
        None: no most), if limited: it then runs in chunks of at most
        ``high`` rows, each padded to at least ``low`` (:class:`BatchLimits`)."""
        self.info = info
        self._device = resolve_device(device)
        if fixed_batch is not None:
            module = FixedBatch(module, fixed_batch)
        elif batch_limits is not None:
            module = BatchLimits(module, *batch_limits)
        dtype = weight_dtype(module)
        if dtype != torch.float32:
            module = InputDtype(module, dtype)
        if mean is not None and std is not None:
            module = nn.Sequential(Normalize(mean, std), module)
        self._module = module.eval().to(self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def run(part: torch.Tensor) -> torch.Tensor:
            logits = self._module(part.to(self._device, torch.float32))
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"the model returns a {type(logits).__name__}, not a tensor of logits")
            if logits.ndim != 2 or len(logits) != len(part):  # as OnnxModel._run: never a shape to fail on later
                raise ValueError(f"its output has shape {tuple(logits.shape)} for {plural(len(part), 'image')}; "
                                 f"expected ({len(part)}, classes)")
            return logits.float().to(x.device)

        try:
            return run_chunked(run, x, chunk_rows(x.shape[1:]), False)
        except Exception as exc:
            raise ModelFailed(self.info.path, len(x), exc) from exc

    def torch_module(self) -> nn.Module:
        return self._module

    @property
    def access_ceiling(self) -> tuple[Access, str]:
        return Access.WHITE_BOX, f"{DESCRIPTIONS[self.info.format]}: gradients available"


def _info(
    request: ModelRequest,
    fmt: str,
    input_shape: tuple[int | None, ...] | None = None,
    num_classes: int | None = None,
) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded artifact."""
    return ModelInfo(
        path=request.path,
        format=fmt,
        sha256=request.sha256,
        input_shape=input_shape,
        num_classes=num_classes,
    )


def _model(
    request: ModelRequest,
    module: nn.Module,
    info: ModelInfo,
    fixed_batch: int | None = None,
    batch_limits: tuple[int, int | None] | None = None,
) -> TorchModel:
    """The :class:`TorchModel` of ``module`` with the request's normalisation and device."""
    return TorchModel(
        module,
        info,
        mean=request.mean,
        std=request.std,
        device=request.device,
        fixed_batch=fixed_batch,
        batch_limits=batch_limits,
    )


def load_torchscript(request: ModelRequest) -> TorchModel:
    """A TorchScript archive (``torch.jit.save``)."""
    try:
        module = torch.jit.load(str(request.file), map_location="cpu")
    except Exception as exc:
        raise AuditError(
            f"model {request.path}: not a readable TorchScript file ({short_reason(exc)})"
        ) from exc
    return _model(request, module, _info(request, "torchscript"))


def _static(dim: int | torch.SymInt) -> int | None:
    """A static dimension as an int; ``None`` for a symbolic one."""
    return dim if isinstance(dim, int) else None


def export_input(program: torch.export.ExportedProgram):
    """The fake tensor of a ``torch.export`` program's single user input
    (its shape and dtype, possibly symbolic)."""
    (name,) = program.graph_signature.user_inputs
    return next(node for node in program.graph.nodes if node.name == name).meta["val"]


def batch_range(program: torch.export.ExportedProgram) -> tuple[int, int | None]:
    """The fewest and most rows (``None``: no most) a ``torch.export``
    program's single input takes, from its ``range_constraints``; a static
    batch size ``b`` gives ``(b, b)``."""
    batch = export_input(program).shape[0]
    if isinstance(batch, int):
        return batch, batch
    import sympy
    from torch.utils._sympy.value_ranges import bound_sympy

    bounds = bound_sympy(batch.node.expr, program.range_constraints)

    def bound(value) -> int | None:
        return int(value) if isinstance(value, (int, sympy.Integer)) else None

    return max(0, bound(bounds.lower) or 0), bound(bounds.upper)


EXPORT_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")
"""The loggers ``torch.export.load`` writes to. When a file is not an archive
it can read, it logs a warning with a whole traceback, then raises an error
that says to look at it."""


class _HeldRecords(logging.Filter):
    """A filter that keeps the records of the loggers it is added to instead of letting them print."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def _held_export_logs():
    """Hold back the records of :data:`EXPORT_LOGGERS` for the duration (the
    filter is removed after); yields the list they are kept in."""
    held = _HeldRecords()
    loggers = [logging.getLogger(name) for name in EXPORT_LOGGERS]
    for export_logger in loggers:
        export_logger.addFilter(held)
    try:
        yield held.records
    finally:
        for export_logger in loggers:
            export_logger.removeFilter(held)


def _load_failure(exc: Exception, records: list[logging.LogRecord]) -> str:
    """Why ``torch.export.load`` failed, in one line: the last line of the
    last error it logged (its own error then only points at that log), else
    of ``exc``."""
    logged = [record.exc_info[1] for record in records if record.exc_info]
    return last_line(logged[-1] if logged else exc)


def load_export(request: ModelRequest) -> TorchModel:
    """A ``torch.export`` program (``.pt2``); shapes come from its graph.

    Unless ``request.trust_pickle``, the archive is first checked for
    anything that would unpickle or run code (:mod:`.export_archive`); the
    bytes checked are the bytes loaded. A program exported with a static
    batch size runs in chunks of exactly that size, one with a dynamic batch
    in chunks within the range of its ``range_constraints`` (at most its upper
    bound, zero-padded to its lower bound; see :func:`run_chunked`).
    """
    if not zipfile.is_zipfile(request.file):
        raise AuditError(f"model {request.path}: not a readable torch.export program (not a zip archive)")
    data = request.file.read_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        raise AuditError(
            f"model {request.path}: not a readable torch.export program ({short_reason(exc)})"
        ) from exc
    with archive:
        check_layout(archive, request.path)
        if not request.trust_pickle:
            check_archive(archive, request.path)
    with _held_export_logs() as records:
        try:
            program = torch.export.load(io.BytesIO(data))
        except Exception as exc:
            raise AuditError(
                f"model {request.path}: not a readable torch.export program ({_load_failure(exc, records)})"
            ) from exc
    if not request.trust_pickle:
        check_program(program, request.path)
    user_inputs = program.graph_signature.user_inputs
    if len(user_inputs) != 1:
        raise AuditError(
            f"model {request.path} takes {len(user_inputs)} inputs; the auditor needs exactly one image input"
        )
    shape = tuple(export_input(program).shape)
    if len(shape) != 4:
        raise AuditError(f"model {request.path} takes a {len(shape)}-D input; expected (N, C, H, W)")
    output = next(node for node in program.graph.nodes if node.op == "output").meta.get("val")
    num_classes = _static(output[0].shape[-1]) if output and output[0].ndim == 2 else None
    require_classes(num_classes, request.path)
    input_shape = tuple(_static(dim) for dim in shape[1:])
    fixed_batch = _static(shape[0])
    limits = None
    low, high = accepted = batch_range(program)
    if fixed_batch is not None:
        logger.warning("model %s was exported with a fixed batch size of %d", request.path, fixed_batch)
    elif low > 1 or high is not None:
        limits = accepted
        rows = f"{low} or more" if high is None else f"{low} to {high}"
        logger.info("model %s takes batches of %s rows", request.path, rows)
    known = any(dim is not None for dim in input_shape)
    info = _info(request, "torch-export", input_shape if known else None, num_classes)
    exported = _ExportedModule(program.module(), export_input(program).dtype, fixed_batch is not None, accepted)
    return _model(request, exported, info, fixed_batch, limits)


_ARCH_SHA256: dict[str, str | None] = {}
"""``module`` of an ``--arch module:factory`` -> SHA-256 of its source file:
for a .py path, of the bytes :func:`build_arch` last ran; for a dotted name,
of the file as it was when this process imported the module (None: no .py
source file)."""


def _sha256(path: str | None) -> str | None:
    """SHA-256 of the file at ``path`` if it is Python source, else None."""
    if path is None or not path.endswith(".py") or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _arch_file(path: str) -> tuple[ModuleType, bytes]:
    """A new, empty module for the .py file ``path`` and the file's bytes, to
    be run in it at each load, so that the network is built by the bytes that
    are hashed (compiled from them: a ``__pycache__`` file of one rewritten
    within the same second can be stale). Its private name
    (``auditor_arch_<stem>``) is no module the user imports."""
    spec = importlib.util.spec_from_file_location(f"auditor_arch_{Path(path).stem}", path)
    return importlib.util.module_from_spec(spec), Path(path).read_bytes()


def _arch_module(arch: str, module_name: str) -> ModuleType:
    """The dotted module ``module_name``, imported as ``import`` does (the
    ``sys.modules`` entry if any, parent packages as usual, the working
    directory searched within :func:`_working_directory_searched`), its source
    hash remembered in :data:`_ARCH_SHA256`.

    Not run afresh: a module is one object per process, and running a library
    module again breaks it (torchvision's model registry, say, refuses the
    second ``resnet18``). So the code that runs is the module as this process
    imported it, and its hash is taken then: right after the import if this
    one imported it, else when first seen here. If the file has changed on
    disk since, the code that would run is not the file's, and no hash would
    name it: the load is refused rather than record the wrong one.
    """
    imported_here = module_name not in sys.modules
    module = importlib.import_module(module_name)
    sha256 = _sha256(getattr(module, "__file__", None))
    if imported_here or module_name not in _ARCH_SHA256:
        _ARCH_SHA256[module_name] = sha256
    elif sha256 != _ARCH_SHA256[module_name]:
        raise AuditError(f"--arch {arch}: {module.__file__} has changed on disk since this process imported "
                         f"{module_name}, so the code that would run is not the file's: restart the process "
                         "to audit the new code")
    return module


@contextlib.contextmanager
def _in_sys_modules(module: ModuleType):
    """``module`` (of a .py file) in ``sys.modules`` under its name within
    the ``with`` block, as during an import (a dataclass or
    ``torch.jit.script`` may look it up there), and only then: the entry it
    replaced, if any, is put back."""
    replaced = sys.modules.get(module.__name__)
    sys.modules[module.__name__] = module
    try:
        yield
    finally:
        if replaced is None:
            sys.modules.pop(module.__name__, None)
        else:
            sys.modules[module.__name__] = replaced


@contextlib.contextmanager
def _working_directory_searched():
    """The working directory on ``sys.path`` while ``--arch`` imports its
    module and runs its factory (which may import modules beside it), and
    only then: left there, every later lazy import (``weasyprint`` in the PDF
    writer, say) would prefer a file of that name planted in the directory."""
    cwd = os.getcwd()
    if cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        # by identity: only our entry goes, whatever the module did to sys.path
        sys.path[:] = [entry for entry in sys.path if entry is not cwd]


def arch_sha256(arch: str) -> str | None:
    """SHA-256 of the source file of ``arch``'s module as :func:`build_arch`
    ran it in this process (see :data:`_ARCH_SHA256`), so the results identify
    the code that built the network as well as its weights; None if it has
    not run it or the module has no .py source file."""
    return _ARCH_SHA256.get(arch.rpartition(":")[0])


def build_arch(arch: str) -> nn.Module:
    """The ``nn.Module`` built by ``factory()`` of ``arch = "module:factory"``:
    a dotted module imported once per process (:func:`_arch_module`), a .py
    file run afresh at each load (:func:`_arch_file`)."""
    module_name, _, factory_name = arch.rpartition(":")
    if not module_name or not factory_name:
        raise AuditError(f"--arch {arch}: expected module:factory, e.g. examples.mnist_cnn:build")
    cannot_import = f"--arch {arch}: cannot import {module_name}"
    with _working_directory_searched(), contextlib.ExitStack() as stack:
        try:
            if module_name.endswith(".py"):
                module, source = _arch_file(module_name)
                stack.enter_context(_in_sys_modules(module))
                exec(compile(source, module.__file__, "exec", dont_inherit=True), module.__dict__)  # noqa: S102
            else:
                module = _arch_module(arch, module_name)
        except AuditError:
            raise
        except Exception as exc:
            raise AuditError(f"{cannot_import} ({short_reason(exc)})") from exc
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise AuditError(f"--arch {arch}: {module_name} has no function {factory_name}")
        try:
            built = factory()
        except Exception as exc:
            raise AuditError(f"--arch {arch}: {factory_name}() failed ({short_reason(exc)})") from exc
    if not isinstance(built, nn.Module):
        raise AuditError(f"--arch {arch}: {factory_name}() returned {type(built).__name__}, not an nn.Module")
    if module_name.endswith(".py"):
        _ARCH_SHA256[module_name] = hashlib.sha256(source).hexdigest()
    return built


class WeightsWithoutArch(AuditError):
    """A weights file loaded with no ``--arch`` to build its network. A class
    of its own because ``--arch`` is the remedy for the audited model only: a
    caller loading a surrogate, which ``--arch`` does not build, says what
    is instead."""


def _from_weights(request: ModelRequest, state_dict: Mapping, fmt: str) -> TorchModel:
    """Build ``--arch`` and load ``state_dict`` into it (strictly)."""
    if request.arch is None:
        raise WeightsWithoutArch(f"model {request.path} is a weights file: pass --arch module:factory")
    module = build_arch(request.arch)
    try:
        module.load_state_dict(state_dict, strict=True)
    except Exception as exc:
        raise AuditError(
            f"model {request.path} does not fit --arch {request.arch}: {short_reason(exc)}"
        ) from exc
    return _model(request, module, _info(request, fmt))


def load_safetensors(request: ModelRequest) -> TorchModel:
    """A safetensors weights file plus ``--arch``."""
    try:
        state_dict = load_file(str(request.file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AuditError(
            f"model {request.path}: not a readable safetensors file ({short_reason(exc)})"
        ) from exc
    return _from_weights(request, state_dict, "safetensors")


def _torch_load(request: ModelRequest):
    """``torch.load`` of the file; full unpickling only with ``trust_pickle``."""
    try:
        return torch.load(request.file, map_location="cpu", weights_only=not request.trust_pickle)
    except pickle.UnpicklingError as exc:
        if request.trust_pickle:
            raise AuditError(f"model {request.path}: cannot unpickle ({short_reason(exc)})") from exc
        raise AuditError(
            f"model {request.path} contains pickled code/objects and was refused; "
            "pass --trust-pickle only if you trust its source"
        ) from exc
    except Exception as exc:
        raise AuditError(f"model {request.path}: not a readable PyTorch file ({short_reason(exc)})") from exc


def load_torch_save(request: ModelRequest) -> TorchModel:
    """A ``torch.save`` file: a ``state_dict`` (plus ``--arch``) or, trusted, a whole module."""
    loaded = _torch_load(request)
    if isinstance(loaded, nn.Module):
        return _model(request, loaded, _info(request, "pickle"))
    if isinstance(loaded, Mapping) and all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return _from_weights(request, loaded, "state-dict")
    raise AuditError(
        f"model {request.path} holds a {type(loaded).__name__}, not a state_dict of tensors or an nn.Module"
    )
