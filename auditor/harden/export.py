"""Writing the hardened network back in the format it came in, and checking it.

* ONNX: the trained values replace the initializers of the original graph,
  which is otherwise kept node for node (so every consumer of the file sees
  the same graph, inputs and outputs); external weights are embedded.
* safetensors / ``state_dict``: the network's state dict (same keys, so the
  same ``--arch`` loads it).
* TorchScript: ``torch.jit.save`` of the loaded program with its new weights.
* ``torch.export``: the module is exported again, with a dynamic batch
  dimension when the original program had one.
* pickle: ``torch.save`` of the module (it loads with ``--trust-pickle`` as before).

Each writer saves the file's own module (:attr:`Trainable.artifact`), on the
CPU, not the adapter's wrappers around it.

Every written file is loaded again with :func:`auditor.models.load_model`
(for ONNX, an onnxruntime session) and its logits are compared with the
trained module's on a check batch; a disagreement is an :class:`AuditError`.
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
from ..models.convert import ConversionError, check_agreement
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
    program = torch.export.load(str(source))
    (name,) = program.graph_signature.user_inputs
    image = next(node for node in program.graph.nodes if node.name == name).meta["val"]
    batch = image.shape[0]
    network = copy.deepcopy(trainable.artifact).cpu()
    example = example.to(image.dtype)
    if isinstance(batch, int):
        example = example[:1].expand(batch, *example.shape[1:]).contiguous()
        exported = torch.export.export(network, (example,))
    else:
        dynamic = ({0: torch.export.Dim("batch")},)
        exported = torch.export.export(network, (example[:2],), dynamic_shapes=dynamic)
    torch.export.save(exported, str(dest))


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
    try:
        return check_agreement(lambda x: trainable.network(x.to(device)), written.forward, check)
    except ConversionError as exc:
        raise AuditError(f"the written {fmt} model disagrees with the trained one: {exc}") from exc
