"""ONNX graph -> differentiable torch module, for white-box attacks on ONNX files.

:func:`convert_onnx` turns the graph into an :class:`OnnxGraphModule` that runs
the nodes in topological order with torch ops, so gradients flow back to the
input. Each supported op type has a small converter function in
:data:`CONVERTERS`; a graph with any other op is refused up front with a
:class:`ConversionError` naming the op types.

Shapes are never frozen: ``Shape`` yields a real int64 tensor at run time and
the ops that consume shapes (``Reshape``, ``Expand``, ``Slice``...) read it
then, so a graph exported with a dynamic batch size keeps it. The semantics
follow the ONNX operator docs for opsets 11-20 (axes, pads, min/max and split
sizes as inputs or as attributes, ``Reshape``'s ``allowzero``...), and those
of ``Upsample`` (opsets 7-9) and ``Resize`` at opset 10.

The module only approximates onnxruntime numerically; :func:`check_agreement`
measures how closely, and callers refuse a conversion that disagrees.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx
import onnx.inliner
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import short_reason

DEFAULT_DOMAINS = ("", "ai.onnx")

TORCH_DTYPES = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}
"""ONNX element type -> torch dtype, for the types a classifier graph uses."""


class ConversionError(Exception):
    """The graph cannot be converted (or the conversion is wrong); one line."""


@dataclass(frozen=True)
class Node:
    """What a converter needs besides its input tensors."""

    op_type: str
    attrs: dict[str, Any]
    opset: int
    """The version of the default ONNX domain the model imports."""
    outputs: int
    """How many outputs the node declares."""

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


Tensor = torch.Tensor
Converter = Callable[..., Tensor | Sequence[Tensor]]
"""``converter(node, *inputs)``: an absent optional input is ``None``."""


def _ints(values: Tensor | None) -> list[int] | None:
    """A 0-D or 1-D integer tensor as a list of ints (``None`` stays ``None``)."""
    return None if values is None else [int(value) for value in values.reshape(-1).tolist()]


def _from_input_or_attr(node: Node, values: Tensor | None, name: str) -> list[int] | None:
    """Integers given as an input (newer opsets) or as the attribute ``name`` (older ones)."""
    return _ints(values) if values is not None else node.attr(name)


def _tensor(proto: TensorProto) -> Tensor:
    """An ONNX tensor (initializer or attribute value) as a torch tensor."""
    if proto.data_type not in TORCH_DTYPES:
        raise ConversionError(
            f"tensor {proto.name!r} has unsupported element type {TensorProto.DataType.Name(proto.data_type)}"
        )
    return torch.from_numpy(numpy_helper.to_array(proto).copy()).to(TORCH_DTYPES[proto.data_type])


# Element-wise ops -----------------------------------------------------------


def _elementwise(fn: Callable[..., Tensor]) -> Converter:
    """A converter for an op without attributes that maps straight to ``fn``."""

    def convert(node: Node, *inputs: Tensor) -> Tensor:
        return fn(*inputs)

    return convert


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Converter:
    """``Max``/``Min``/``Sum``: ``fn`` folded over any number of inputs."""

    def convert(node: Node, *inputs: Tensor) -> Tensor:
        return functools.reduce(fn, inputs)

    return convert


def _div(node: Node, a: Tensor, b: Tensor) -> Tensor:
    """Integer division truncates in ONNX (shape arithmetic uses it)."""
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _mod(node: Node, a: Tensor, b: Tensor) -> Tensor:
    return torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)


def _pow(node: Node, base: Tensor, exponent: Tensor) -> Tensor:
    return torch.pow(base, exponent).to(base.dtype)


def _mean(node: Node, *inputs: Tensor) -> Tensor:
    return functools.reduce(torch.add, inputs) / len(inputs)


def _cast(node: Node, x: Tensor) -> Tensor:
    to = node.attr("to")
    if to not in TORCH_DTYPES:
        raise ConversionError(f"Cast to unsupported element type {TensorProto.DataType.Name(to)}")
    return x.to(TORCH_DTYPES[to])


def _cast_like(node: Node, x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


def _clip(node: Node, x: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    """Bounds are inputs since opset 11 and attributes before."""
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    if low is None and high is None:
        return x
    return torch.clamp(x, low, high)


def _where(node: Node, condition: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(condition, a, b)


def _is_inf(node: Node, x: Tensor) -> Tensor:
    """ONNX IsInf: +inf unless ``detect_positive`` is 0, -inf unless ``detect_negative`` is 0."""
    found = torch.zeros_like(x, dtype=torch.bool)
    if node.attr("detect_positive", 1):
        found |= x == math.inf
    if node.attr("detect_negative", 1):
        found |= x == -math.inf
    return found


# Activations ------------------------------------------------------------------


def _leaky_relu(node: Node, x: Tensor) -> Tensor:
    return F.leaky_relu(x, node.attr("alpha", 0.01))


def _prelu(node: Node, x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x >= 0, x, x * slope)


def _elu(node: Node, x: Tensor) -> Tensor:
    return F.elu(x, node.attr("alpha", 1.0))


def _selu(node: Node, x: Tensor) -> Tensor:
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    return gamma * F.elu(x, alpha)


def _celu(node: Node, x: Tensor) -> Tensor:
    return F.celu(x, node.attr("alpha", 1.0))


def _hard_sigmoid(node: Node, x: Tensor) -> Tensor:
    return torch.clamp(node.attr("alpha", 0.2) * x + node.attr("beta", 0.5), 0.0, 1.0)


def _thresholded_relu(node: Node, x: Tensor) -> Tensor:
    return torch.where(x > node.attr("alpha", 1.0), x, torch.zeros_like(x))


def _gelu(node: Node, x: Tensor) -> Tensor:
    return F.gelu(x, approximate=node.attr("approximate", "none"))


def _softmax_like(fn: Callable[..., Tensor]) -> Converter:
    """``Softmax``/``LogSoftmax``: along ``axis`` since opset 13; before, over
    the input flattened to 2-D at ``axis`` (default 1)."""

    def convert(node: Node, x: Tensor) -> Tensor:
        if node.opset >= 13:
            return fn(x, dim=node.attr("axis", -1))
        axis = node.attr("axis", 1) % max(x.ndim, 1)
        flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
        return fn(flat, dim=1).reshape(x.shape)

    return convert


# Linear algebra -----------------------------------------------------------------


def _gemm(node: Node, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    if node.attr("transA", 0):
        a = a.t()
    if node.attr("transB", 0):
        b = b.t()
    out = node.attr("alpha", 1.0) * (a @ b)
    if c is not None:
        out = out + node.attr("beta", 1.0) * c
    return out


def _einsum(node: Node, *inputs: Tensor) -> Tensor:
    return torch.einsum(node.attr("equation"), *inputs)


# Convolution and pooling ---------------------------------------------------------

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@dataclass(frozen=True)
class _Window:
    """Kernel, strides, dilations and pads (ONNX order: all begins, then all ends)."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[int]

    @property
    def begins(self) -> list[int]:
        return self.pads[: len(self.kernel)]

    @property
    def ends(self) -> list[int]:
        return self.pads[len(self.kernel) :]

    @property
    def symmetric(self) -> bool:
        """Pads torch can apply itself: the same at both ends, at most half the kernel."""
        return self.begins == self.ends and all(pad <= k // 2 for pad, k in zip(self.begins, self.kernel))

    def pooled_sizes(self, x: Tensor, ceil_mode: bool) -> list[int]:
        """ONNX's pooling output size in each spatial dimension of ``x``: with
        ``ceil_mode`` a last window that would start in the end padding is dropped."""
        sizes = []
        for size, k, stride, dilation, begin, end in zip(
            x.shape[2:], self.kernel, self.strides, self.dilations, self.begins, self.ends
        ):
            span = size + begin + end - (k - 1) * dilation - 1
            count = (-(-span // stride) if ceil_mode else span // stride) + 1
            if ceil_mode and (count - 1) * stride >= size + begin:
                count -= 1
            sizes.append(count)
        return sizes

    def torch_pads(self) -> list[int]:
        """The pads in ``F.pad`` order (last dimension first)."""
        spatial = len(self.kernel)
        pairs = [(self.pads[i], self.pads[i + spatial]) for i in reversed(range(spatial))]
        return [pad for pair in pairs for pad in pair]


def _window(node: Node, x: Tensor, kernel: list[int]) -> _Window:
    """The window of a conv/pool node on input ``x``, resolving ``auto_pad``."""
    spatial = len(kernel)
    strides = node.attr("strides") or [1] * spatial
    dilations = node.attr("dilations") or [1] * spatial
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = node.attr("pads") or [0] * (2 * spatial)
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    else:
        begins, ends = [], []
        for size, k, stride, dilation in zip(x.shape[2:], kernel, strides, dilations):
            total = max(0, (math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        pads = begins + ends
    return _Window(list(kernel), list(strides), list(dilations), list(pads))


def _conv(node: Node, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    window = _window(node, x, list(weight.shape[2:]))
    padding = window.begins
    if window.pads[: len(padding)] != window.pads[len(padding) :]:
        x = F.pad(x, window.torch_pads())
        padding = [0] * len(padding)
    conv = CONV[len(window.kernel)]
    return conv(x, weight, bias, window.strides, padding, window.dilations, node.attr("group", 1))


def _crop(x: Tensor, sizes: list[int]) -> Tensor:
    """``x`` cut to ``sizes`` in its trailing dimensions."""
    return x[(..., *(slice(0, size) for size in sizes))]


def _max_pool(node: Node, x: Tensor) -> Tensor:
    """ONNX MaxPool without the Indices output. Pads torch cannot apply go in
    explicitly as -inf, and the output is cut to ONNX's size: with
    ``ceil_mode`` torch would keep a last window starting in the end padding."""
    if node.outputs > 1:
        raise ConversionError("MaxPool with an Indices output is not supported")
    window = _window(node, x, node.attr("kernel_shape"))
    pool = MAX_POOL[len(window.kernel)]
    ceil_mode = bool(node.attr("ceil_mode", 0))
    if window.symmetric:
        return pool(x, window.kernel, window.strides, window.begins, window.dilations, ceil_mode=ceil_mode)
    padded = F.pad(x, window.torch_pads(), value=-math.inf)
    no_pads = [0] * len(window.kernel)
    out = pool(padded, window.kernel, window.strides, no_pads, window.dilations, ceil_mode=ceil_mode)
    return _crop(out, window.pooled_sizes(x, ceil_mode))


def _average_pool(node: Node, x: Tensor) -> Tensor:
    """ONNX AveragePool without dilations. Pads torch cannot apply go in
    explicitly, the output is cut to ONNX's size as in :func:`_max_pool`, and
    unless ``count_include_pad`` the pads are divided out with the same
    pooling over a mask of ones."""
    window = _window(node, x, node.attr("kernel_shape"))
    if any(dilation != 1 for dilation in window.dilations):
        raise ConversionError("AveragePool with dilations is not supported")
    pool = AVG_POOL[len(window.kernel)]
    ceil_mode = bool(node.attr("ceil_mode", 0))
    count_pads = bool(node.attr("count_include_pad", 0))
    if window.symmetric:
        return pool(x, window.kernel, window.strides, window.begins, ceil_mode, count_pads)
    no_pads = [0] * len(window.kernel)
    sizes = window.pooled_sizes(x, ceil_mode)
    padded = F.pad(x, window.torch_pads())
    total = _crop(pool(padded, window.kernel, window.strides, no_pads, ceil_mode, True), sizes)
    if count_pads:
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), window.torch_pads())
    return total / _crop(pool(ones, window.kernel, window.strides, no_pads, ceil_mode, True), sizes)


def _global_average_pool(node: Node, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


def _global_max_pool(node: Node, x: Tensor) -> Tensor:
    return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)


# Normalisation -------------------------------------------------------------------


def _batch_norm(
    node: Node, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor
) -> Tensor:
    if node.attr("training_mode", 0) or node.outputs > 1:
        raise ConversionError("BatchNormalization in training mode is not supported")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attr("epsilon", 1e-5))


def _instance_norm(node: Node, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attr("epsilon", 1e-5))


def _layer_norm(node: Node, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    if node.outputs > 1:
        raise ConversionError("LayerNormalization with Mean/InvStdDev outputs is not supported")
    axis = node.attr("axis", -1) % x.ndim
    out = F.layer_norm(x, x.shape[axis:], eps=node.attr("epsilon", 1e-5)) * scale
    return out if bias is None else out + bias


def _dropout(node: Node, x: Tensor, *_: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    """Inference: the identity (and an all-true mask when the graph asks for it)."""
    if node.outputs > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


# Reductions ----------------------------------------------------------------------


def _reduce(fn: Callable[..., Tensor]) -> Converter:
    """``Reduce*``: axes as an input (``ReduceSum`` since opset 13, the others
    since 18) or an attribute; no axes means all of them, or none with
    ``noop_with_empty_axes``."""

    def convert(node: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
        dims = _from_input_or_attr(node, axes, "axes")
        if not dims:
            if node.attr("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.ndim))
        return fn(x, dim=tuple(dims), keepdim=bool(node.attr("keepdims", 1)))

    return convert


def _sum_square(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.sum(x * x, dim=dim, keepdim=keepdim)


def _l1(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.linalg.vector_norm(x, 1, dim=dim, keepdim=keepdim)


def _l2(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.linalg.vector_norm(x, 2, dim=dim, keepdim=keepdim)


def _arg_extreme(fn: Callable[..., Tensor]) -> Converter:
    """``ArgMax``/``ArgMin``; ``select_last_index`` searches the flipped axis."""

    def convert(node: Node, x: Tensor) -> Tensor:
        axis = node.attr("axis", 0) % x.ndim
        keepdim = bool(node.attr("keepdims", 1))
        if node.attr("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keepdim)
        return fn(x, dim=axis, keepdim=keepdim)

    return convert


# Shapes and indexing -------------------------------------------------------------


def _shape(node: Node, x: Tensor) -> Tensor:
    dims = x.shape[node.attr("start", 0) : node.attr("end")]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


def _size(node: Node, x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


def _reshape(node: Node, x: Tensor, shape: Tensor | None = None) -> Tensor:
    """A 0 copies the input's dimension unless ``allowzero``; -1 is inferred."""
    target = _from_input_or_attr(node, shape, "shape")
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if dim == 0 else dim for i, dim in enumerate(target)]
    return x.reshape(target)


def _flatten(node: Node, x: Tensor) -> Tensor:
    axis = node.attr("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(node: Node, x: Tensor) -> Tensor:
    return x.permute(node.attr("perm") or list(reversed(range(x.ndim))))


def _squeeze(node: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = _from_input_or_attr(node, axes, "axes")
    return torch.squeeze(x) if dims is None else torch.squeeze(x, tuple(dims))


def _unsqueeze(node: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
    """Axes index the output, whose rank is the input's plus their number."""
    dims = _from_input_or_attr(node, axes, "axes")
    rank = x.ndim + len(dims)
    for dim in sorted(dim % rank for dim in dims):
        x = x.unsqueeze(dim)
    return x


def _concat(node: Node, *inputs: Tensor) -> Tensor:
    return torch.cat(inputs, dim=node.attr("axis"))


def _split(node: Node, x: Tensor, sizes: Tensor | None = None) -> Sequence[Tensor]:
    """Sizes as an input (opset 13+) or attribute; else equal parts, the last
    one smaller if need be (``num_outputs``, opset 18)."""
    axis = node.attr("axis", 0)
    parts = _from_input_or_attr(node, sizes, "split")
    if not parts:
        return torch.split(x, math.ceil(x.shape[axis] / node.outputs), dim=axis)
    return torch.split(x, parts, dim=axis)


def _slice(
    node: Node,
    x: Tensor,
    starts: Tensor | None = None,
    ends: Tensor | None = None,
    axes: Tensor | None = None,
    steps: Tensor | None = None,
) -> Tensor:
    """ONNX clamps starts/ends like Python slicing does, for either sign of step."""
    begin = _from_input_or_attr(node, starts, "starts")
    end = _from_input_or_attr(node, ends, "ends")
    dims = _from_input_or_attr(node, axes, "axes") or list(range(len(begin)))
    strides = _ints(steps) or [1] * len(begin)
    index: list[slice] = [slice(None)] * x.ndim
    reversed_dims = []
    for dim, first, last, step in zip(dims, begin, end, strides):
        if step > 0:
            index[dim] = slice(first, last, step)
        else:
            reversed_dims.append((dim, range(*slice(first, last, step).indices(x.shape[dim]))))
    x = x[tuple(index)]
    for dim, positions in reversed_dims:
        x = x.index_select(dim, torch.tensor(positions, dtype=torch.int64, device=x.device))
    return x


def _gather(node: Node, x: Tensor, indices: Tensor) -> Tensor:
    axis = node.attr("axis", 0) % x.ndim
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = x.index_select(axis, indices.reshape(-1))
    return out.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])


def _gather_elements(node: Node, x: Tensor, indices: Tensor) -> Tensor:
    axis = node.attr("axis", 0) % x.ndim
    return torch.gather(x, axis, torch.where(indices < 0, indices + x.shape[axis], indices))


def _constant_of_shape(node: Node, shape: Tensor) -> Tensor:
    value = node.attr("value")
    if value is None:
        value = torch.zeros(1, dtype=torch.float32)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype, device=shape.device)


def _expand(node: Node, x: Tensor, shape: Tensor) -> Tensor:
    """Two-way broadcasting: the target may have ones where the input does not."""
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def _tile(node: Node, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(_ints(repeats))


def _range(node: Node, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_positions(mode: str, size: int, begin: int, end: int, device: torch.device) -> Tensor:
    """The input positions an edge, reflect or wrap pad of ``begin``/``end``
    reads along a dimension of ``size``. Negative pads crop first, and the
    positive ones then pad what is left (as onnxruntime does)."""
    start = max(-begin, 0)
    kept = size - start - max(-end, 0)
    positions = torch.arange(-max(begin, 0), kept + max(end, 0), device=device)
    if mode == "edge":
        positions = positions.clamp(0, kept - 1)
    elif mode == "wrap":
        positions = positions.remainder(kept)
    else:
        period = max(2 * (kept - 1), 1)
        positions = positions.remainder(period)
        positions = torch.where(positions < kept, positions, period - positions)
    return start + positions


def _pad(
    node: Node,
    x: Tensor,
    pads: Tensor | None = None,
    value: Tensor | None = None,
    axes: Tensor | None = None,
) -> Tensor:
    """ONNX Pad: pads (all begins, then all ends; negative ones crop), value
    and axes are inputs since opset 11 (axes since 18), attributes before.
    Constant pads use ``F.pad``; edge, reflect and wrap gather the positions
    they read along each padded dimension, which may be any dimension
    (``F.pad``'s own modes pad only the trailing ones)."""
    amounts = _from_input_or_attr(node, pads, "pads")
    count = len(amounts) // 2
    dims = [dim % x.ndim for dim in (_ints(axes) or range(count))]
    full = [0] * (2 * x.ndim)
    for i, dim in enumerate(dims):
        full[dim], full[dim + x.ndim] = amounts[i], amounts[i + count]
    padded = [d for d in range(x.ndim) if full[d] or full[d + x.ndim]]
    mode = node.attr("mode", "constant")
    if mode not in PAD_MODES:
        raise ConversionError(f"Pad mode {mode!r} is not supported")
    if mode != "constant":
        for dim in padded:
            positions = _pad_positions(mode, x.shape[dim], full[dim], full[dim + x.ndim], x.device)
            x = x.index_select(dim, positions)
        return x
    first = padded[0] if padded else x.ndim
    torch_pads = [pad for d in reversed(range(first, x.ndim)) for pad in (full[d], full[d + x.ndim])]
    fill = value.item() if value is not None else node.attr("value", 0.0)
    return F.pad(x, torch_pads, value=fill)


RESIZE_MODES = {
    ("nearest", "asymmetric"): ("nearest", None),
    ("linear", "half_pixel"): ("linear", False),
    ("linear", "pytorch_half_pixel"): ("linear", False),
    ("linear", "align_corners"): ("linear", True),
}
"""(mode, coordinate_transformation_mode) -> (interpolation family, ``align_corners``)."""
LINEAR_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}


def _interpolate(
    x: Tensor,
    interpolation: str,
    align_corners: bool | None,
    target: list[int] | None,
    factors: list[float] | None,
) -> Tensor:
    """``F.interpolate`` of ``x`` to the full-rank ``target`` size or by the
    full-rank ``factors`` (used for the coordinates too), over the spatial dimensions only."""
    if x.ndim not in LINEAR_MODES:
        raise ConversionError(f"resizing a {x.ndim}-D tensor is not supported")
    if interpolation == "linear":
        interpolation = LINEAR_MODES[x.ndim]
    if target is not None:
        if target[:2] != list(x.shape[:2]):
            raise ConversionError("Resize of the batch or channel dimension is not supported")
        return F.interpolate(x, size=target[2:], mode=interpolation, align_corners=align_corners)
    if factors[:2] != [1.0, 1.0]:
        raise ConversionError("Resize of the batch or channel dimension is not supported")
    return F.interpolate(
        x, scale_factor=factors[2:], mode=interpolation, align_corners=align_corners, recompute_scale_factor=False
    )


def _resize(
    node: Node,
    x: Tensor,
    roi: Tensor | None = None,
    scales: Tensor | None = None,
    sizes: Tensor | None = None,
) -> Tensor:
    """ONNX Resize from opset 11: nearest with asymmetric coordinates rounded
    down, and (bi/tri)linear with half_pixel, pytorch_half_pixel or
    align_corners coordinates, over the spatial dimensions only. ``scales``
    or ``sizes`` cover the ``axes`` (opset 18; all by default); an output
    length of 1 samples coordinate 0 under pytorch_half_pixel. At opset 10
    the second input is ``scales`` (there is no ``roi``): see :func:`_upsample`."""
    if node.opset < 11:
        return _upsample(node, x, roi)
    mode = node.attr("mode", "nearest")
    transform = node.attr("coordinate_transformation_mode", "half_pixel")
    family = RESIZE_MODES.get((mode, transform))
    if family is None:
        raise ConversionError(f"Resize mode {mode!r} with {transform!r} coordinates is not supported")
    nearest_mode = node.attr("nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nearest_mode != "floor":
        raise ConversionError(f"Resize nearest_mode {nearest_mode!r} is not supported (only 'floor')")
    if node.attr("antialias", 0):
        raise ConversionError("Resize with antialias is not supported")
    axes = [axis % x.ndim for axis in node.attr("axes") or range(x.ndim)]
    target, factors = None, None
    if sizes is not None and sizes.numel():
        policy = node.attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            raise ConversionError(f"Resize keep_aspect_ratio_policy {policy!r} is not supported")
        target = list(x.shape)
        for axis, size in zip(axes, _ints(sizes)):
            target[axis] = size
    else:
        factors = [1.0] * x.ndim
        for axis, factor in zip(axes, scales.tolist()):
            factors[axis] = float(factor)
    if transform == "pytorch_half_pixel":
        for dim in range(2, x.ndim):
            length = target[dim] if target is not None else math.floor(x.shape[dim] * factors[dim])
            if length == 1:
                x = x.narrow(dim, 0, 1)
                if factors is not None:
                    factors[dim] = 1.0
    return _interpolate(x, *family, target, factors)


def _upsample(node: Node, x: Tensor, scales: Tensor | None = None) -> Tensor:
    """ONNX Upsample (opsets 7 to 9: ``scales`` an attribute at 7, an input
    from 9) and Resize-10: asymmetric coordinates. Mode nearest rounds them
    down, as torch's ``mode="nearest"`` does, when no scale is below 1
    (onnxruntime rounds a downsampled coordinate up, so that is refused);
    mode linear is refused, its asymmetric coordinates being unlike torch's."""
    mode = node.attr("mode", "nearest")
    if mode != "nearest":
        raise ConversionError(
            f"{node.op_type} mode {mode!r} at opset {node.opset} is not supported (asymmetric coordinates)"
        )
    factors = [float(value) for value in scales.tolist()] if scales is not None else node.attr("scales")
    if factors is None:
        raise ConversionError(f"{node.op_type} without scales (opset {node.opset}) is not supported")
    if any(factor < 1 for factor in factors):
        raise ConversionError(
            f"{node.op_type} nearest with a scale below 1 at opset {node.opset} is not supported"
        )
    return _interpolate(x, "nearest", None, None, factors)


def _identity(x: Tensor) -> Tensor:
    return x


CONVERTERS: dict[str, Converter] = {
    **{
        op_type: _elementwise(fn)
        for op_type, fn in {
            "Abs": torch.abs,
            "Add": torch.add,
            "And": torch.logical_and,
            "Ceil": torch.ceil,
            "Cos": torch.cos,
            "Equal": torch.eq,
            "Erf": torch.erf,
            "Exp": torch.exp,
            "Floor": torch.floor,
            "Greater": torch.gt,
            "GreaterOrEqual": torch.ge,
            "HardSwish": F.hardswish,
            "Identity": _identity,
            "IsNaN": torch.isnan,
            "Less": torch.lt,
            "LessOrEqual": torch.le,
            "Log": torch.log,
            "MatMul": torch.matmul,
            "Mish": F.mish,
            "Mul": torch.mul,
            "Neg": torch.neg,
            "Not": torch.logical_not,
            "Or": torch.logical_or,
            "Reciprocal": torch.reciprocal,
            "Relu": torch.relu,
            "Round": torch.round,
            "Sigmoid": torch.sigmoid,
            "Sign": torch.sign,
            "Sin": torch.sin,
            "Softplus": F.softplus,
            "Softsign": F.softsign,
            "Sqrt": torch.sqrt,
            "Sub": torch.sub,
            "Tanh": torch.tanh,
            "Xor": torch.logical_xor,
        }.items()
    },
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Div": _div,
    "Mod": _mod,
    "Pow": _pow,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Clip": _clip,
    "Where": _where,
    "IsInf": _is_inf,
    "LeakyRelu": _leaky_relu,
    "PRelu": _prelu,
    "Elu": _elu,
    "Selu": _selu,
    "Celu": _celu,
    "HardSigmoid": _hard_sigmoid,
    "ThresholdedRelu": _thresholded_relu,
    "Gelu": _gelu,
    "Softmax": _softmax_like(torch.softmax),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "Gemm": _gemm,
    "Einsum": _einsum,
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "Dropout": _dropout,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "ReduceSumSquare": _reduce(_sum_square),
    "ReduceL1": _reduce(_l1),
    "ReduceL2": _reduce(_l2),
    "ReduceLogSumExp": _reduce(torch.logsumexp),
    "ArgMax": _arg_extreme(torch.argmax),
    "ArgMin": _arg_extreme(torch.argmin),
    "Shape": _shape,
    "Size": _size,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": _tile,
    "Range": _range,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _upsample,
}
"""ONNX op type (default domain) -> converter. ``Constant`` nodes are folded
into the module's buffers when it is built."""


SHAPE_ONLY = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")
"""Ops that change a tensor's shape but not the row-major order of its
elements (Caffe2 and older exporters end a classifier in a ``Flatten`` or
``Reshape`` to (N, K) after its softmax; PyTorch's ``squeeze()`` after it)."""

PASS_THROUGH = ("Identity", "Dropout", "Cast", *SHAPE_ONLY)
"""Ops looked through for a final softmax: those that leave a classifier's
(N, K) output as it is (``Dropout`` at inference; a ``Cast`` between float
types) and the :data:`SHAPE_ONLY` ones, which do when each row of the output
is one group the softmax normalises; :meth:`OnnxGraphModule.forward` checks
that of a graph whose softmax was removed, on every call."""


def _softmax_group(node: Node, shape: Sequence[int]) -> int | None:
    """The size of the groups a ``Softmax`` ``node`` normalises over an input
    of ``shape``, where each group is a run of consecutive elements in
    row-major order; ``None`` where the groups interleave.

    From opset 13 a group runs along ``axis`` (default -1), consecutive only
    when every later dimension is 1; before, it is everything from ``axis``
    (default 1) on, flattened. A shape-only op after the softmax keeps the
    element order, so its (N, K) output has one group per row exactly when
    the group size is K: then removing the softmax leaves the logits of each
    row, and softmax over the rows gives the graph's output back.
    """
    rank = max(len(shape), 1)
    if node.opset >= 13:
        axis = node.attr("axis", -1) % rank
        return shape[axis] if math.prod(shape[axis + 1 :]) == 1 else None
    return math.prod(shape[node.attr("axis", 1) % rank :])


# The module ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One node, ready to run."""

    convert: Converter
    node: Node
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...]
    """Values no later step needs, dropped after this one to free memory."""


class OnnxGraphModule(nn.Module):
    """An ONNX graph run with torch ops; differentiable w.r.t. its input.

    Initializers and ``Constant`` values are buffers, so ``.to(device)``
    moves them. The input is cast to the graph's input type and the graph
    output ``output_name`` is returned as float32. ``precision`` is the least
    precise floating type among the input and the constants, the one the
    graph's arithmetic rounds to (float32 when there is none).
    ``removed_softmax`` is the index of the step that was the graph's final
    ``Softmax`` (:meth:`without_final_softmax`), if any.
    """

    def __init__(
        self,
        input_name: str,
        input_dtype: torch.dtype,
        output_name: str,
        constants: dict[str, Tensor],
        steps: list[_Step],
        *,
        removed_softmax: tuple[int, Node] | None = None,
    ):
        super().__init__()
        self.input_name = input_name
        self.input_dtype = input_dtype
        self.output_name = output_name
        self._removed_softmax = removed_softmax
        dtypes = (input_dtype, *(value.dtype for value in constants.values()))
        floating = [dtype for dtype in dtypes if dtype.is_floating_point]
        self.precision = max(floating, key=lambda dtype: torch.finfo(dtype).eps, default=torch.float32)
        self._buffers_by_value: dict[str, str] = {}
        for index, (name, value) in enumerate(constants.items()):
            buffer = f"constant_{index}"
            self.register_buffer(buffer, value)
            self._buffers_by_value[name] = buffer
        self._steps = steps

    @property
    def value_buffers(self) -> dict[str, str]:
        """ONNX value name (initializer or ``Constant`` output) -> the attribute holding its tensor."""
        return dict(self._buffers_by_value)

    def without_final_softmax(self) -> OnnxGraphModule | None:
        """The graph with the ``Softmax`` node that makes its output (through
        any :data:`PASS_THROUGH` nodes after it) made an ``Identity``, or
        ``None`` if no ``Softmax`` makes it. Shares this module's constants.

        The removal is exact only where each row of the output is one group
        the softmax normalises; that depends on shapes known at run time, so
        the returned module checks it on every call and raises a
        :class:`ConversionError` where it does not hold
        (:func:`~auditor.models.logits.logits_before_softmax` then keeps the softmax).
        """
        producers = {name: step for step in self._steps for name in step.outputs}
        final = producers.get(self.output_name)
        while final is not None and final.node.op_type in PASS_THROUGH:
            final = producers.get(final.inputs[0])
        if final is None or final.node.op_type != "Softmax":
            return None
        identity = replace(final, convert=CONVERTERS["Identity"], node=replace(final.node, op_type="Identity", attrs={}))
        steps = [identity if step is final else step for step in self._steps]
        constants = {name: getattr(self, buffer) for name, buffer in self._buffers_by_value.items()}
        removed = (next(index for index, step in enumerate(steps) if step is identity), final.node)
        return OnnxGraphModule(
            self.input_name, self.input_dtype, self.output_name, constants, steps, removed_softmax=removed
        ).eval()

    def forward(self, x: Tensor) -> Tensor:
        values = {name: getattr(self, buffer) for name, buffer in self._buffers_by_value.items()}
        values[self.input_name] = x.to(self.input_dtype)
        group: int | None = None
        for index, step in enumerate(self._steps):
            args = [values[name] if name else None for name in step.inputs]
            if self._removed_softmax is not None and index == self._removed_softmax[0]:
                group = _softmax_group(self._removed_softmax[1], args[0].shape)
            try:
                result = step.convert(step.node, *args)
            except Exception as exc:
                raise ConversionError(
                    f"{step.node.op_type} node {step.name!r} failed: {short_reason(exc)}"
                ) from exc
            outputs = (result,) if isinstance(result, Tensor) else result
            values.update((name, value) for name, value in zip(step.outputs, outputs) if name)
            for name in step.release:
                values.pop(name, None)
        output = values[self.output_name]
        if self._removed_softmax is not None and (output.ndim != 2 or group != output.shape[1]):
            raise ConversionError(
                f"the rows of the graph's output {tuple(output.shape)} are not the groups its final Softmax "
                "normalises, so the softmax cannot be removed exactly"
            )
        return output.float()


def _attribute(attr: onnx.AttributeProto) -> Any:
    """An attribute value: ints, floats, strings, lists of them or a tensor."""
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise ConversionError(f"attribute {attr.name!r} holds a subgraph, which is not supported")
    value = helper.get_attribute_value(attr)
    if isinstance(value, TensorProto):
        return _tensor(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [item.decode() for item in value]
    return value


CONSTANT_ATTRIBUTES = {
    "value": lambda value: value,
    "value_float": lambda value: torch.tensor(value, dtype=torch.float32),
    "value_floats": lambda value: torch.tensor(value, dtype=torch.float32),
    "value_int": lambda value: torch.tensor(value, dtype=torch.int64),
    "value_ints": lambda value: torch.tensor(value, dtype=torch.int64),
}
"""``Constant`` attribute -> its value as a tensor."""


def _constant(node: onnx.NodeProto) -> Tensor:
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None or attr.name not in CONSTANT_ATTRIBUTES:
        raise ConversionError(f"Constant node {node.name!r} has no supported value attribute")
    return CONSTANT_ATTRIBUTES[attr.name](_attribute(attr))


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def _check_supported(nodes: Iterable[onnx.NodeProto]) -> None:
    unsupported = sorted(
        {
            _op_name(node)
            for node in nodes
            if node.domain not in DEFAULT_DOMAINS or (node.op_type not in CONVERTERS and node.op_type != "Constant")
        }
    )
    if unsupported:
        raise ConversionError(f"unsupported ONNX op(s): {', '.join(unsupported)}")


def _topological(nodes: Sequence[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` ordered so that each runs after the nodes producing its inputs."""
    known = set(known)
    ordered: list[onnx.NodeProto] = []
    pending = list(nodes)
    while pending:
        waiting = []
        for node in pending:
            if all(not name or name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted({name for node in waiting for name in node.input if name and name not in known})
            raise ConversionError(f"graph values never produced: {', '.join(missing[:5])}")
        pending = waiting
    return ordered


def _default_opset(model_proto: onnx.ModelProto) -> int:
    for opset in model_proto.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            return opset.version
    raise ConversionError("the model imports no version of the default ONNX domain")


def _steps(nodes: list[onnx.NodeProto], opset: int, output_name: str) -> list[_Step]:
    """The runnable steps of ``nodes`` (topologically sorted, no ``Constant``)."""
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in (*node.input, *node.output):
            if name:
                last_use[name] = index
    last_use.pop(output_name, None)
    released: dict[int, list[str]] = {}
    for name, index in last_use.items():
        released.setdefault(index, []).append(name)
    return [
        _Step(
            convert=CONVERTERS[node.op_type],
            node=Node(
                op_type=node.op_type,
                attrs={attr.name: _attribute(attr) for attr in node.attribute},
                opset=opset,
                outputs=len(node.output),
            ),
            name=node.name or node.output[0],
            inputs=tuple(node.input),
            outputs=tuple(node.output),
            release=tuple(released.get(index, ())),
        )
        for index, node in enumerate(nodes)
    ]


def _needed(nodes: Sequence[onnx.NodeProto], output_name: str) -> list[onnx.NodeProto]:
    """The nodes of ``nodes`` that ``output_name`` depends on, in their order.

    A classifier exported by sklearn-onnx or tf2onnx computes other outputs
    too (a label through ``ArgMax``, a ``ZipMap`` of the probabilities, an op
    of the ``ai.onnx.ml`` domain the converter lacks); they have no part in
    the audited output and must not stop its conversion.
    """
    producers = {name: node for node in nodes for name in node.output if name}
    needed: set[int] = set()
    pending = [output_name]
    while pending:
        node = producers.get(pending.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            pending.extend(name for name in node.input if name)
    return [node for node in nodes if id(node) in needed]


def convert_onnx(model_proto: onnx.ModelProto, output: str | None = None) -> OnnxGraphModule:
    """The graph of ``model_proto`` as a torch module in eval mode.

    The graph must take one input besides its initializers; the module
    returns its output named ``output`` (by default its first), and only the
    nodes that output depends on are converted. Local functions are inlined
    first. Raises :class:`ConversionError` naming the unsupported op types,
    if any.
    """
    if model_proto.functions:
        model_proto = onnx.inliner.inline_local_functions(model_proto)
    graph = model_proto.graph
    opset = _default_opset(model_proto)
    names = [value.name for value in graph.output]
    if not names:
        raise ConversionError("the graph has no outputs")
    output_name = names[0] if output is None else output
    if output_name not in names:
        raise ConversionError(f"the graph has no output {output_name!r}")
    graph_nodes = _needed(graph.node, output_name)
    _check_supported(graph_nodes)
    if graph.sparse_initializer:
        raise ConversionError("sparse initializers are not supported")
    used = {name for node in graph_nodes for name in node.input}
    constants = {tensor.name: _tensor(tensor) for tensor in graph.initializer if tensor.name in used}
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ConversionError(f"the graph has {len(inputs)} inputs; expected one")
    elem_type = inputs[0].type.tensor_type.elem_type
    if elem_type not in TORCH_DTYPES:
        raise ConversionError(f"unsupported input type {TensorProto.DataType.Name(elem_type)}")
    for node in graph_nodes:
        if node.op_type == "Constant":
            constants[node.output[0]] = _constant(node)
    nodes = [node for node in graph_nodes if node.op_type != "Constant"]
    ordered = _topological(nodes, {inputs[0].name, *constants})
    module = OnnxGraphModule(
        input_name=inputs[0].name,
        input_dtype=TORCH_DTYPES[elem_type],
        output_name=output_name,
        constants=constants,
        steps=_steps(ordered, opset, output_name),
    )
    return module.eval()


AGREEMENT_TOLERANCES = {
    torch.float64: (1e-6, 1e-5),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (10 * torch.finfo(torch.float16).eps, 10 * torch.finfo(torch.float16).eps),
    torch.bfloat16: (10 * torch.finfo(torch.bfloat16).eps, 10 * torch.finfo(torch.bfloat16).eps),
}
"""A graph's precision -> the (atol, rtol) :func:`check_agreement` allows it.
float32's leave room for torch and onnxruntime summing in different orders;
float16's and bfloat16's are ten units in the last place at 1 (about 1e-2 and
8e-2), as both runtimes round every intermediate result to them; float64's
are tighter, though the outputs are compared in float32."""


def check_agreement(
    module: nn.Module,
    session_forward: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    precision: torch.dtype = torch.float32,
    atol: float | None = None,
    rtol: float | None = None,
) -> float:
    """The max abs difference between ``module`` and the session on ``x``.

    Raises :class:`ConversionError` when the outputs differ in shape or by
    more than ``atol + rtol * |session output|`` anywhere. Tolerances not
    given are those of :data:`AGREEMENT_TOLERANCES` for ``precision``, the
    graph's (:attr:`OnnxGraphModule.precision`).
    """
    default_atol, default_rtol = AGREEMENT_TOLERANCES[precision]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    with torch.no_grad():
        converted = module(x).detach().float().cpu()
        reference = session_forward(x).detach().float().cpu()
    if converted.shape != reference.shape:
        raise ConversionError(
            f"converted graph returns shape {tuple(converted.shape)} but onnxruntime {tuple(reference.shape)}"
        )
    diff = float((converted - reference).abs().max()) if converted.numel() else 0.0
    if not torch.allclose(converted, reference, atol=atol, rtol=rtol):
        raise ConversionError(f"converted graph disagrees with onnxruntime: max abs diff {diff:.3g}")
    return diff
