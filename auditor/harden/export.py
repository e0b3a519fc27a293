"""Writing the hardened network back in the format it came in, and checking it.

* ONNX: the trained values replace the initializers of the original graph,
  which is otherwise kept node for node (so every consumer of the file sees
  the same graph, inputs and outputs); external weights are embedded.
* safetensors / ``state_dict``: the network's state dict (same keys, so the
  same ``--arch`` loads it).
* TorchScript: ``torch.jit.save`` of the loaded program with its new weights.
* ``torch.export``: the module is exported again, with the original
  program's batch size, or its dynamic batch dimension and that dimension's
  range (the batch sizes it accepts).
* pickle: ``torch.save`` of the module (it loads with ``--trust-pickle`` as before).

Each writer saves the file's own module (:attr:`Trainable.artifact`), on the
CPU, not the adapter's wrappers around it.

Every written file is loaded again with :func:`auditor.models.load_model`
(for ONNX, an onnxruntime session) and its logits are compared with the
trained module's on a check batch; a disagreement is an :class:`AuditError`.
An ONNX graph is held to the tolerance of its own precision, as when it was
loaded: a graph with float16 arithmetic agrees with onnxruntime only to
float16's rounding, which float32's tolerance would refuse.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

from ..errors import AuditError, short_reason
from ..models import load_model
from ..models.convert import ConversionError, OnnxGraphModule, check_agreement
from .trainable import Trainable

Writer = Callable[[Trainable, Path, Path, torch.Tensor], None]


def _state_dict(trainable: Trainable) -> dict[str, torch.Tensor]:
    state = trainable.artifact.state_dict()
    return {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}


def _onnx(trainable: Trainable, source: Path, dest: Path, example: torch.Tensor) -> None:
    proto = onnx.load(str(source))
    trained = {
        value: getattr(trainable.artifact, attribute).detach().cpu()
        for value, attribute in trainable.initializers.items()
    }
    for tensor in proto.graph.initializer:
        if tensor.name in trained:
            dtype = numpy_helper.to_array(tensor).dtype
            tensor.CopyFrom(numpy_helper.from_array(trained[tensor.name].numpy().astype(dtype), tensor.name))
    onnx.save(proto, str(dest))


def _safetensors(trainable: Trainable, source: Path, dest: Path, example: torch.Tensor) -> None:
    save_file(_state_dict(trainable), str(dest))


def _torch_state_dict(trainable: Trainable, source: Path, dest: Path, example: torch.Tensor) -> None:
    torch.save(_state_dict(trainable), dest)


def _torchscript(trainable: Trainable, source: Path, dest: Path, example: torch.Tensor) -> None:
    trained = io.BytesIO()  # saved and loaded back onto the CPU: .cpu() on a scripted copy warns about .grad
    torch.jit.save(trainable.artifact, trained)
    trained.seek(0)
    torch.jit.save(torch.jit.load(trained, map_location="cpu"), str(dest))


def _torch_export(trainable: Trainable, source: Path, dest: Path, example: torch.Tensor) -> None:
    # what the program said of its input, kept when it was loaded (and checked): the file is not read again
    program = trainable.artifact
    low, high = program.batch_range
    network = copy.deepcopy(program).cpu()
    example = example.to(program.input_dtype)
    if program.static_batch:
        exported = torch.export.export(network, (_rows(example, low),))
    else:
        # the batch range the original program takes: a fresh Dim("batch") (0 to unbounded) conflicts
        # with the bound the loaded module checks, and Dim.DYNAMIC would narrow 1 to 2 (0/1 specialisation)
        batch = torch.export.Dim("batch", min=low, **({} if high is None else {"max": high}))
        rows = max(2, low) if high is None else min(max(2, low), high)  # export specialises a batch of 0 or 1
        exported = torch.export.export(network, (_rows(example, rows),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(dest))


def _rows(example: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` rows of ``example``'s, repeated as needed."""
    return example[torch.arange(rows) % len(example)].contiguous()


def _pickle(trainable: Trainable, source: Path, dest: Path, example: torch.Tensor) -> None:
    torch.save(copy.deepcopy(trainable.artifact).cpu(), dest)


WRITERS: dict[str, Writer] = {
    "onnx": _onnx,
    "safetensors": _safetensors,
    "state-dict": _torch_state_dict,
    "torchscript": _torchscript,
    "torch-export": _torch_export,
    "pickle": _pickle,
}
"""Model format -> writer of that format."""


def hardened_name(source: Path) -> str:
    """``model.onnx`` -> ``model-hardened.onnx`` (the suffix decides the format on loading)."""
    return f"{source.stem}-hardened{source.suffix}"


def export(trainable: Trainable, fmt: str, source: Path, dest: Path, check: torch.Tensor, *,
           arch: str | None, trust_pickle: bool) -> float:
    """Write ``trainable.artifact`` to ``dest`` in ``fmt`` and return the max abs logit difference
    between the written file (loaded as a scan would load it) and the trained module on ``check``."""
    trainable.network.eval()
    try:
        WRITERS[fmt](trainable, source, dest, check)
    except Exception as exc:
        raise AuditError(f"cannot write the hardened {fmt} model: {short_reason(exc)}") from exc
    written = load_model(dest, arch=arch, trust_pickle=trust_pickle, device="cpu")
    device = next(iter(trainable.parameters)).device
    artifact = trainable.artifact
    precision = artifact.precision if isinstance(artifact, OnnxGraphModule) else torch.float32
    try:
        return check_agreement(lambda x: trainable.network(x.to(device)), written.forward, check,
                               precision=precision)
    except ConversionError as exc:
        raise AuditError(f"the written {fmt} model disagrees with the trained one: {exc}") from exc
