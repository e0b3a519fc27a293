"""The logits of a model whose last layer is a softmax.

A model that returns probabilities masks gradients: a softmax of large logits
rounds every other class's probability to exactly 0 in float32, and no
gradient reaches them. An attacker holding the weights removes that layer and
attacks the logits beneath it (AutoAttack asks auditors to; ART's Keras
classifier does it by itself). :func:`logits_before_softmax` does the same
for the differentiable copy white-box and transfer attacks use. The real
runtime is untouched: every adversarial example is still verified on it.

The final softmax is found where it is explicit: an ONNX ``Softmax`` node
making the graph's output, an ``nn.Softmax`` ending an ``nn.Sequential``, a
softmax call or module ending a ``torch.fx`` graph (``.pt2`` programs, and
modules ``torch.fx`` can trace), looking through layers that leave an (N, K)
output as it is (identity, dropout at inference, flatten, a cast; in an
ONNX graph also a Reshape, Squeeze or Unsqueeze whose (N, K) output has one
softmax group per row, see ``OnnxGraphModule.without_final_softmax``). A
TorchScript module keeps its softmax.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn

from .base import ChannelsLast, Model
from .convert import OnnxGraphModule
from .pytorch import BatchLimits, InputDtype, _ExportedModule

log = logging.getLogger(__name__)

ADAPTER_WRAPPERS = (BatchLimits, ChannelsLast, InputDtype)
"""The modules adapters wrap a model's own module in (batching, layout, dtype)."""

_WRAPPERS = (nn.Sequential, _ExportedModule, *ADAPTER_WRAPPERS)
"""Modules whose output is their last child's output, batched or cast."""

_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
"""Layers that leave a classifier's (N, K) output as it is, at inference."""

_PASS_THROUGH_CALLS = (
    torch.flatten, torch.nn.functional.dropout, torch.ops.aten.flatten.using_ints, torch.ops.aten.dropout.default,
    torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.alias.default,
)
_PASS_THROUGH_METHODS = ("float", "to", "contiguous", "clone", "flatten", "view_as")

_SOFTMAX_CALLS = (
    torch.softmax, torch.nn.functional.softmax, torch.ops.aten.softmax.int, torch.ops.aten._softmax.default,
)

AGREEMENT_ATOL = 1e-3
"""How far softmax of the stripped module's outputs may be from the model's
probabilities (float16 graphs round their softmax to about 1e-3)."""


def are_probabilities(outputs: torch.Tensor) -> bool:
    """Whether a model's (N,K) outputs are probabilities: non-negative, rows summing to one."""
    sums = outputs.sum(dim=1)
    return bool((outputs >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def _with_child(module: nn.Module, name: str, child: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (sharing its weights) whose child ``name`` is ``child``."""
    clone = copy.copy(module)
    clone._modules = {**module._modules, name: child}
    return clone


def _passes_through(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _PASS_THROUGH_CALLS
    if node.op == "call_method":
        return node.target in _PASS_THROUGH_METHODS
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), _PASS_THROUGH_MODULES)
    return False


def _is_softmax(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_CALLS
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), nn.Softmax)
    return False


def _fx_without_softmax(graph_module: torch.fx.GraphModule) -> nn.Module | None:
    """``graph_module`` with the softmax that makes its one output (through
    pass-through layers after it) replaced by its input."""
    graph = copy.deepcopy(graph_module.graph)
    output = next(node for node in graph.nodes if node.op == "output")
    returned = output.args[0]
    packed = isinstance(returned, (tuple, list))
    if packed and len(returned) != 1:
        return None
    final = returned[0] if packed else returned
    while isinstance(final, torch.fx.Node) and final.args and _passes_through(final, graph_module):
        final = final.args[0]
    if not isinstance(final, torch.fx.Node) or not _is_softmax(final, graph_module) or not final.args:
        return None
    final.replace_all_uses_with(final.args[0])
    graph.erase_node(final)
    return torch.fx.GraphModule(graph_module, graph)


def _traced(module: nn.Module, both_modes: bool) -> torch.fx.GraphModule | None:
    """``module`` traced by torch.fx in its mode, or ``None`` where it cannot be
    traced, or (``both_modes``) where it traces to other code in the other
    mode: a forward that reads ``self.training`` has it frozen in the trace."""
    try:
        traced = torch.fx.symbolic_trace(module)
        if both_modes:
            mode = module.training
            other = torch.fx.symbolic_trace(module.train(not mode))
            module.train(mode)
            if other.code != traced.code:
                log.debug("%s traces to other code in training mode", type(module).__name__)
                return None
    except Exception as exc:  # untraceable control flow: the softmax stays
        log.debug("cannot trace %s for its final softmax: %s", type(module).__name__, exc)
        return None
    return traced


def _without_final_softmax(module: nn.Module, both_modes: bool) -> nn.Module | None:
    if isinstance(module, OnnxGraphModule):
        return module.without_final_softmax()
    if isinstance(module, nn.Softmax):
        return nn.Identity()
    if isinstance(module, torch.fx.GraphModule):
        return _fx_without_softmax(module)
    if isinstance(module, _WRAPPERS) and module._modules:
        children = list(module._modules.items())
        while len(children) > 1 and isinstance(children[-1][1], _PASS_THROUGH_MODULES):
            children.pop()
        name, child = children[-1]
        stripped = _without_final_softmax(child, both_modes)
        return None if stripped is None else _with_child(module, name, stripped)
    if isinstance(module, torch.jit.ScriptModule):
        return None
    traced = _traced(module, both_modes)
    return None if traced is None else _fx_without_softmax(traced)


def logits_before_softmax(module: nn.Module, x: torch.Tensor, *, training: bool = False) -> nn.Module | None:
    """``module`` without its final softmax, or ``None`` where none is found.

    The result is checked on ``x``: softmax of its outputs must be
    ``module``'s probabilities (within :data:`AGREEMENT_ATOL`), so a softmax
    over another axis, or one followed by more layers, is left alone. For
    ``training``, a module torch.fx traces must trace to the same code in
    both modes (training mode is read at trace time).
    """
    stripped = _without_final_softmax(module, training)
    if stripped is None:
        return None
    with torch.no_grad():
        try:
            logits = stripped(x)
        except Exception as exc:  # a traced copy that no longer runs: keep the softmax
            log.debug("the module without its softmax fails: %s", exc)
            return None
        probabilities = module(x)
        if logits.shape != probabilities.shape:
            return None
        agrees = torch.allclose(torch.softmax(logits.float(), dim=1), probabilities.float(), atol=AGREEMENT_ATOL)
    return stripped.eval() if agrees else None


def attacked_module(module: nn.Module, x: torch.Tensor, *, training: bool = False) -> tuple[nn.Module, bool]:
    """The module to take gradients of, and whether a softmax still masks
    them: ``module`` where its outputs on ``x`` are logits; where they are
    probabilities, :func:`logits_before_softmax` (``training`` as there), or
    ``module`` itself and ``True`` where its final softmax cannot be removed."""
    with torch.no_grad():
        outputs = module(x)
    if not are_probabilities(outputs):
        return module, False
    logits = logits_before_softmax(module, x, training=training)
    return (module, True) if logits is None else (logits, False)


class BeforeSoftmax(Model):
    """``model`` whose differentiable form stops before its final softmax;
    its forward pass, on the real runtime, still returns probabilities."""

    def __init__(self, model: Model, module: nn.Module):
        self._model = model
        self._module = module
        self.info = model.info

    @property
    def device(self) -> torch.device:
        return self._model.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.forward(x)

    def torch_module(self) -> nn.Module:
        return self._module

    @property
    def access_ceiling(self):
        return self._model.access_ceiling
