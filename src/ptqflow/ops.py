"""What each traced op is to quantizer placement: the tables behind :mod:`ptqflow.units`.

The placement rule (graph.md; BRECQ/QDrop's placement, algorithms.md section 1.2, stated on the graph):
every tensor that a *reader* -- a conv/linear layer or an activation-by-activation matmul -- consumes is
quantized once, at its *producer*, and shared by all of the producer's consumers. Walking back from a
reader to its producer skips *pass-through* ops, which keep values on the grid (max pooling, reshapes,
dropout, concatenation) or, as BRECQ/QDrop place the quantizer before the final average pooling, average
them. Every other known op (activations, arithmetic, normalisation, the readers themselves) is a
*compute* op and can be a producer. An op in no table can only stay float if it never produces a
reader's input; if it does, placement stops with an error that names it, never a silent float.

Classes are data, not code: extend a table to teach ptqflow an op.
"""

from __future__ import annotations

import operator
import sys
from enum import Enum
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ptqflow import attention, kernels

__all__ = [
    "ACTIVATION_MODULES",
    "AVERAGING_MODULES",
    "NORM_MODULES",
    "OpKind",
    "PASS_MODULES",
    "WEIGHT_MODULES",
    "averages",
    "classify_function",
    "classify_method",
    "classify_node",
    "classify_module",
    "is_softmax",
]


class OpKind(Enum):
    """The role of a traced node in placement."""

    WEIGHT = "weight"  # a conv/linear module: its weight is quantized, its input is a reader input
    MATMUL = "matmul"  # activation x activation product: both operands are reader inputs
    PASS = "pass"  # keeps (or averages) values: placement walks through it to the producer
    COMPUTE = "compute"  # a known op that computes a new value: may be a producer
    UNSUPPORTED = "unsupported"  # holds or reads weights ptqflow cannot quantize (keep it a float leaf)
    UNKNOWN = "unknown"  # in no table: an error if it produces a reader's input


#: Layers whose weights ptqflow quantizes (per output channel) and whose input it quantizes.
WEIGHT_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

#: Activation functions (computed in float; their output is quantized when a reader consumes it).
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Hardsigmoid, nn.Mish, nn.Tanh,
    nn.Softmax, nn.LogSoftmax, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh,
    nn.Softsign, nn.GLU, nn.Threshold,
)  # fmt: skip

#: Normalisations, computed in float (BatchNorm after a conv is folded into it first).
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, nn.RMSNorm,
)  # fmt: skip

#: Modules placement walks through (grid-preserving, or the average pooling BRECQ/QDrop quantize before).
PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad1d, nn.ZeroPad2d,
    nn.ZeroPad3d,
)  # fmt: skip

#: Other parameter-free modules that compute a new value.
_COMPUTE_MODULES: tuple[type[nn.Module], ...] = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)

_MATMUL_FUNCTIONS: set[Any] = {torch.matmul, torch.bmm, operator.matmul, torch.einsum, kernels.matmul}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}

#: Functions that read a weight directly: only ``nn`` modules get their weights quantized.
_WEIGHT_FUNCTIONS: set[Any] = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.bilinear, F.embedding, F.scaled_dot_product_attention, F.multi_head_attention_forward,
}  # fmt: skip

_PASS_FUNCTIONS: set[Any] = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.cat,
    torch.concat, torch.concatenate, torch.chunk, torch.split, torch.tensor_split, torch.roll, torch.narrow,
    torch.stack, torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims, torch.channel_shuffle,
    torch.mean, torch.clone, operator.getitem,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.pixel_shuffle, F.pixel_unshuffle,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
    torch.adaptive_max_pool1d, torch.dropout,
    # Swin's windows (ptqflow.attention): zero padding, cyclic shift, reshapes
    attention.window_partition, attention.window_merge,
}  # fmt: skip
_PASS_METHODS = {
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze",
    "mean", "chunk", "split", "tensor_split", "narrow", "roll", "clone", "movedim", "moveaxis", "swapaxes",
    "swapdims", "view_as", "reshape_as", "unbind",
    "__getitem__",
}  # fmt: skip

_COMPUTE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.neg,
    torch.pow, torch.sqrt, torch.rsqrt, torch.exp, torch.log, torch.abs, torch.clamp, torch.clip,
    torch.maximum, torch.minimum, torch.where, torch.sum, torch.amax, torch.amin, torch.erf,
    torch.relu, torch.sigmoid, torch.tanh, torch.softmax, torch.log_softmax, torch.layer_norm,
    torch.batch_norm, torch.group_norm, torch.nn.functional.normalize, F.relu, F.relu6, F.silu, F.gelu,
    F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.mish, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus,
    F.hardtanh, F.softmax, F.log_softmax, F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm,
    F.interpolate, F.glu, F.pad, torch.constant_pad_nd,
    # additive constants of attention logits (ptqflow.attention): shift mask, relative position bias tables
    attention.add_shift_mask, attention.position_bias, attention.position_bias_v2,
}  # fmt: skip
_COMPUTE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "sqrt", "rsqrt", "exp", "log", "abs", "clamp", "clip",
    "sum", "amax", "amin", "relu", "sigmoid", "tanh", "softmax", "log_softmax", "expand", "expand_as",
    "repeat", "__add__", "__sub__", "__mul__", "__truediv__", "__radd__", "__rmul__", "masked_fill",
    "type_as", "to", "float",
}  # fmt: skip


def classify_node(
    node: torch.fx.Node, modules: dict[str, nn.Module], float_leaves: frozenset[str] = frozenset()
) -> OpKind:
    """The kind of any fx node (``modules``: the graph module's submodules by path; constants pass through)."""
    if node.op == "call_module":
        return classify_module(modules[str(node.target)], str(node.target) in float_leaves)
    if node.op == "call_function":
        return classify_function(node.target)
    if node.op == "call_method":
        return classify_method(str(node.target))
    return OpKind.PASS if node.op == "get_attr" else OpKind.COMPUTE


def classify_module(module: nn.Module, float_leaf: bool = False) -> OpKind:
    """The kind of a ``call_module`` node's module (``float_leaf``: kept as an opaque float op)."""
    if float_leaf:
        return OpKind.COMPUTE
    if type(module) in WEIGHT_MODULES:
        return OpKind.WEIGHT
    if isinstance(module, PASS_MODULES):
        return OpKind.PASS
    if isinstance(module, ACTIVATION_MODULES + NORM_MODULES + _COMPUTE_MODULES):
        return OpKind.COMPUTE
    if any(True for _ in module.parameters()):
        return OpKind.UNSUPPORTED  # e.g. MultiheadAttention, ConvTranspose2d, Embedding: weights out of reach
    return OpKind.UNKNOWN


def classify_function(target: Any) -> OpKind:
    """The kind of a ``call_function`` node's target."""
    if target in _MATMUL_FUNCTIONS:
        return OpKind.MATMUL
    if target in _WEIGHT_FUNCTIONS:
        return OpKind.UNSUPPORTED
    if target in _PASS_FUNCTIONS or target is _torchvision_patch_merging_pad():
        return OpKind.PASS
    if target in _COMPUTE_FUNCTIONS:
        return OpKind.COMPUTE
    return OpKind.UNKNOWN


def _torchvision_patch_merging_pad() -> Any:
    """torchvision's Swin patch merging (zero padding + strided slices + concat: pass-through, as zero is on
    every asymmetric grid, its zero point being an integer), when that module is imported (a graph calling
    it was traced in a process that imported it; :data:`ptqflow.attention.TORCHVISION_SWIN`)."""
    swin = sys.modules.get(attention.TORCHVISION_SWIN)
    return None if swin is None else swin._patch_merging_pad


def classify_method(name: str) -> OpKind:
    """The kind of a ``call_method`` node's method name."""
    if name in _MATMUL_METHODS:
        return OpKind.MATMUL
    if name in _PASS_METHODS:
        return OpKind.PASS
    if name in _COMPUTE_METHODS:
        return OpKind.COMPUTE
    return OpKind.UNKNOWN


#: Pass-through ops that average: a quantized input leaves the grid (the probe in :mod:`ptqflow.coverage`
#: does not count distinct values behind them).
AVERAGING_MODULES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
_AVERAGING_FUNCTIONS: set[Any] = {
    torch.mean, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
}  # fmt: skip


def averages(op: str, target: Any, module: nn.Module | None = None) -> bool:
    """Whether a pass-through node (``op`` as fx names it) averages its input."""
    if op == "call_module":
        return isinstance(module, AVERAGING_MODULES)
    if op == "call_function":
        return target in _AVERAGING_FUNCTIONS
    return op == "call_method" and target == "mean"


_SOFTMAX_FUNCTIONS: set[Any] = {torch.softmax, F.softmax}


def is_softmax(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` computes a softmax (its output may take the log2 grid, :mod:`ptqflow.quant.quantizer`)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.Softmax)
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCTIONS
    return node.op == "call_method" and node.target == "softmax"
