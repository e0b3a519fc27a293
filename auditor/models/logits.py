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
modules ``torch.fx`` can trace). A TorchScript module keeps its softmax.
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

_WRAPPERS = (nn.Sequential, BatchLimits, ChannelsLast, InputDtype, _ExportedModule)
"""Modules whose output is their last child's output, batched or cast."""

_SOFTMAX_CALLS = (
    torch.softmax, torch.nn.functional.softmax, torch.ops.aten.softmax.int, torch.ops.aten._softmax.default,
)

AGREEMENT_ATOL = 1e-3
"""How far softmax of the stripped module's outputs may be from the model's
probabilities (float16 graphs round their softmax to about 1e-3)."""


def _with_last_child(module: nn.Module, child: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (sharing its weights) whose last child is ``child``."""
    name = next(reversed(module._modules))
    clone = copy.copy(module)
    clone._modules = {**module._modules, name: child}
    return clone


def _is_softmax(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_CALLS
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), nn.Softmax)
    return False


def _fx_without_softmax(graph_module: torch.fx.GraphModule) -> nn.Module | None:
    """``graph_module`` returning the input of the softmax that makes its one output."""
    graph = copy.deepcopy(graph_module.graph)
    output = next(node for node in graph.nodes if node.op == "output")
    returned = output.args[0]
    packed = isinstance(returned, (tuple, list))
    if packed and len(returned) != 1:
        return None
    final = returned[0] if packed else returned
    if not isinstance(final, torch.fx.Node) or not _is_softmax(final, graph_module) or not final.args:
        return None
    logits = final.args[0]
    output.args = ((logits,),) if packed else (logits,)
    if not final.users:
        graph.erase_node(final)
    return torch.fx.GraphModule(graph_module, graph)


def _without_final_softmax(module: nn.Module) -> nn.Module | None:
    if isinstance(module, OnnxGraphModule):
        return module.without_final_softmax()
    if isinstance(module, nn.Softmax):
        return nn.Identity()
    if isinstance(module, torch.fx.GraphModule):
        return _fx_without_softmax(module)
    if isinstance(module, _WRAPPERS) and module._modules:
        child = _without_final_softmax(next(reversed(module._modules.values())))
        return None if child is None else _with_last_child(module, child)
    if isinstance(module, torch.jit.ScriptModule):
        return None
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception as exc:  # untraceable control flow: the softmax stays
        log.debug("cannot trace %s for its final softmax: %s", type(module).__name__, exc)
        return None
    return _fx_without_softmax(traced)


def logits_before_softmax(module: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """``module`` without its final softmax, or ``None`` where none is found.

    The result is checked on ``x``: softmax of its outputs must be
    ``module``'s probabilities (within :data:`AGREEMENT_ATOL`), so a softmax
    over another axis, or one followed by more layers, is left alone.
    """
    stripped = _without_final_softmax(module)
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
