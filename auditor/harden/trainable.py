"""A loaded model as a trainable torch module, whatever its file format.

PyTorch artifacts (weights plus ``--arch``, TorchScript, ``torch.export``
programs, trusted pickles) already are modules with parameters. An ONNX
graph is converted to torch (:func:`auditor.models.convert.convert_onnx`,
checked against onnxruntime when it was loaded); the converter keeps the
graph's initializers as constant buffers, so here the floating-point weight
tensors among them become ``nn.Parameter``\\ s. Scalars stay constants, and so
do batch-normalisation running statistics (the converted graph is in
inference mode, where they are fixed) and the constants of a normalisation
the graph applies to its input (``x − mean``, ``/ std``): hardening trains
the network, not its preprocessing.

The model adapters may wrap the file's module: :class:`BatchLimits` runs a
graph or program with a fixed or bounded batch size on any number of rows, and
:class:`InputDtype` feeds a float64 (say) network float32 images. Training
goes through the wrappers; the writers save the module inside them.

Only float32 and float64 weights are trained; a float16 or bfloat16 model is
refused before any work. Adam (Kingma and Ba, ICLR 2015) divides by
√v̂ + ε with ε = 1e-8, which rounds to 0 in float16: from the first update,
a weight whose gradient is 0 becomes 0/0 = NaN, one whose squared gradient
underflows ±inf, and the run ends on the starting weights. bfloat16 keeps
ε, but with 8 significant bits rounds away updates under about 1/256 of a
weight (float16's 11 bits: 1/2048), which is why Micikevicius et al., "Mixed
Precision Training" (ICLR 2018), keep float32 master copies of
half-precision weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import AuditError
from ..models import Model, Normalize
from ..models.convert import OnnxGraphModule
from ..models.logits import ADAPTER_WRAPPERS, attacked_module

BATCH_NORM_STATISTICS = (3, 4)
"""Input positions of ``BatchNormalization``'s running mean and variance."""

TRAINED_DTYPES = (torch.float32, torch.float64)
"""Parameter types Adam updates soundly (see the module docstring)."""

PREPROCESSING = {"Sub", "Div", "Mul", "Add", "Cast", "Identity"}
"""Operators that, applied to the graph's input with constant operands, are
its preprocessing (normalisation), whose constants are not trained."""


def _preprocessing_constants(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Initializers used by the preprocessing chain that starts at the graph
    input: each node of ``PREPROCESSING`` whose other inputs are all
    initializers continues the chain (the nodes are in topological order)."""
    chain = {value.name for value in graph.input} - names
    constants = set()
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type in PREPROCESSING and any(name in chain for name in inputs) and all(
            name in chain or name in names for name in inputs
        ):
            chain.update(node.output)
            constants.update(name for name in inputs if name in names)
    return constants


@dataclass(frozen=True)
class Trainable:
    """The network to train, as the artifact holds it, and the module that trains."""

    network: nn.Module
    """The loaded network (no normalisation) as the adapter runs it: float32 images, any number
    of rows, in; float32 logits out. On the training device."""
    module: nn.Module
    """``network`` behind the ``--mean/--std`` normalisation: what is trained and attacked."""
    artifact: nn.Module
    """The file's own module inside ``network``'s adapter wrappers: what is written back."""
    parameters: tuple[nn.Parameter, ...]
    initializers: dict[str, str] = field(default_factory=dict)
    """ONNX only: initializer name -> the ``artifact`` parameter trained in its place."""


def _unwrapped(network: nn.Module | None) -> nn.Module | None:
    """The file's own module inside the adapter's wrappers (:data:`ADAPTER_WRAPPERS`)."""
    while isinstance(network, ADAPTER_WRAPPERS):
        network = network.module
    return network


def _onnx(model: Model, file: Path) -> tuple[nn.Module, dict[str, str]]:
    network = model.torch_module()
    converted = _unwrapped(network)
    if not isinstance(converted, OnnxGraphModule):
        reason = model.access_ceiling[1]
        raise AuditError(f"model {model.info.path}: cannot train the ONNX graph ({reason})")
    graph = onnx.load(str(file), load_external_data=False).graph
    names = {tensor.name for tensor in graph.initializer}
    statistics = {
        node.input[position]
        for node in graph.node
        if node.op_type == "BatchNormalization"
        for position in BATCH_NORM_STATISTICS
        if len(node.input) > position
    }
    fixed = statistics | _preprocessing_constants(graph, names)
    initializers = {}
    for value, attribute in converted.value_buffers.items():
        tensor = getattr(converted, attribute)
        if value in names and value not in fixed and tensor.is_floating_point() and tensor.numel() > 1:
            delattr(converted, attribute)
            converted.register_parameter(attribute, nn.Parameter(tensor.clone()))
            initializers[value] = attribute
    return network, initializers


def _torch(model: Model, file: Path) -> tuple[nn.Module, dict[str, str]]:
    return model.torch_module(), {}


PREPARERS: dict[str, Callable[[Model, Path], tuple[nn.Module, dict[str, str]]]] = {
    "onnx": _onnx,
    "torchscript": _torch,
    "torch-export": _torch,
    "safetensors": _torch,
    "state-dict": _torch,
    "pickle": _torch,
}
"""Model format -> (trainable network, ONNX initializer map)."""


def make_trainable(model: Model, file: Path, mean: Sequence[float] | None, std: Sequence[float] | None,
                   device: torch.device) -> Trainable:
    """The trainable network of ``model`` (loaded from ``file`` without normalisation).

    Refuses a model with weights of a type outside :data:`TRAINED_DTYPES`.
    """
    network, initializers = PREPARERS[model.info.format](model, file)
    network = network.to(device)
    parameters = tuple(parameter for parameter in network.parameters() if parameter.is_floating_point())
    if not parameters:
        raise AuditError(f"model {model.info.path} has no floating-point weights to train")
    narrow = next((parameter.dtype for parameter in parameters if parameter.dtype not in TRAINED_DTYPES), None)
    if narrow is not None:
        raise AuditError(f"harden trains float32 or float64 weights; model {model.info.path} has "
                         f"{str(narrow).removeprefix('torch.')} parameters: convert it to float32 first")
    for parameter in parameters:
        parameter.requires_grad_(True)
    module = network
    if mean is not None or std is not None:
        mean = (0.0,) if mean is None else tuple(mean)
        std = (1.0,) if std is None else tuple(std)
        module = nn.Sequential(Normalize(mean, std), network).to(device)
    return Trainable(network=network, module=module, artifact=_unwrapped(network), parameters=parameters,
                     initializers=initializers)


def logits_to_train(module: nn.Module, x: torch.Tensor, path: str) -> nn.Module:
    """What training and its guard run: ``module``, or, where ``module``
    returns probabilities, the logits beneath its final softmax (sharing its
    weights; the written file keeps the softmax). Cross-entropy on
    probabilities trains next to nothing, so a softmax that cannot be
    removed (see :mod:`auditor.models.logits`) is refused."""
    trained, masked = attacked_module(module, x, training=True)
    if masked:
        raise AuditError(
            f"model {path} returns probabilities, and its final softmax cannot be removed for training "
            "(a TorchScript module, layers after the softmax, or a forward torch.fx cannot trace the same "
            "way in training and in eval mode): harden the model without its final softmax"
        )
    return trained
