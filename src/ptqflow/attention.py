"""Attention as traceable ops, so that placement sees its projections and its two matmuls (graph.md).

``nn.MultiheadAttention`` is an fx leaf and, in eval mode, runs one fused kernel: its in/out projections
and the activation-by-activation products Q·Kᵀ and softmax·V are invisible to the placement rules, and
its weights would stay float. :class:`DecomposedAttention` computes the same function (Vaswani et al.,
"Attention Is All You Need", NeurIPS 2017, eq. 1 and section 3.2.2) from plain modules and ops:

    Q = X_q W_q + b_q,  K = X_k W_k + b_k,  V = X_v W_v + b_v     (three ``nn.Linear``)
    A = softmax(Q_h K_hᵀ / sqrt(d_h)) per head h,  O = concat_h(A V_h) W_o + b_o

so the rules of :mod:`ptqflow.ops` place quantizers on the projections' weights, on both operands of each
matmul (Q and K after their projections, the softmax output and V) and on the merged heads before the
output projection -- the placement of the ViT PTQ literature (e.g. RepQ-ViT, Li et al., ICCV 2023) --
while LayerNorm and softmax themselves are computed in float.

Swin's shifted-window attention (Liu et al., "Swin Transformer", ICCV 2021, section 3.2; V2: Liu et al.,
CVPR 2022, scaled cosine attention) is decomposed the same way by :class:`DecomposedWindowAttention`; its
shape logic (padding to whole windows, the cyclic shift, the shift mask) runs in fx leaf functions that
hold no weights: :func:`window_partition` and :func:`window_merge` only move values (pass-through for
placement), :func:`add_shift_mask` adds the constant mask to the logits. The relative position bias is an
additive constant table (V1: gathered from a learned table; V2: a small MLP of fixed coordinates, which a
runtime folds to a constant) and stays float, like the position embedding of a ViT.

:func:`decompose_attention` swaps every such module of a model (except float leaves) for its
decomposition; the FP output matches the fused module to float rounding (tested at 1e-5). Masks, a
causal flag, ``add_bias_kv`` and ``add_zero_attn`` are not decomposed: such a module is refused with a
one-line error naming it (keep it a float leaf).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ptqflow import kernels
from ptqflow.errors import ModelError

__all__ = [
    "DecomposedAttention",
    "DecomposedWindowAttention",
    "add_shift_mask",
    "decompose_attention",
    "position_bias",
    "position_bias_v2",
    "window_merge",
    "window_partition",
]

_HINT = "list its module path in base.float_leaves to keep it in float (reported in metrics)"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.to(weight.device, weight.dtype)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` when traced (the graph keeps the plain op, which unit bodies route themselves), else
    :func:`ptqflow.kernels.matmul` (one thread in portable mode: the same bytes for any thread count)."""
    if torch.fx._symbolic_trace.is_fx_tracing():
        return torch.matmul(a, b)
    return kernels.matmul(a, b)


class DecomposedAttention(nn.Module):
    """Multi-head attention from three input projections, two matmuls, a softmax and an output projection.

    Same call signature and results as ``nn.MultiheadAttention`` without masks (module docstring).

    Args:
        embed_dim: model width E.
        num_heads: heads h (E divisible by h).
        q_proj, k_proj, v_proj, out_proj: the projections (``nn.Linear``).
        dropout: dropout on the attention probabilities (active in training mode only).
        batch_first: inputs are ``(N, L, E)`` (else ``(L, N, E)``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        out_proj: nn.Linear,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ModelError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.batch_first = batch_first
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.attn_drop = nn.Dropout(dropout)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, path: str = "") -> DecomposedAttention:
        """The decomposition of ``mha`` (weights copied; ``path`` names it in errors)."""
        where = f"module {path} (MultiheadAttention)" if path else "MultiheadAttention"
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ModelError(f"{where} uses add_bias_kv/add_zero_attn, which ptqflow does not decompose; {_HINT}")
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        bias = mha.in_proj_bias
        biases = bias.detach().chunk(3) if bias is not None else (None, None, None)
        q, k, v = (_linear(w, b) for w, b in zip(weights, biases, strict=True))
        out = mha.out_proj
        out_proj = _linear(out.weight.detach(), None if out.bias is None else out.bias.detach())
        if out_proj.weight.shape != (e, e):
            raise ModelError(f"{where}: output projection of shape {tuple(out_proj.weight.shape)}, expected {(e, e)}")
        module = cls(e, mha.num_heads, q, k, v, out_proj, mha.dropout, mha.batch_first)
        module.train(mha.training)
        return module

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ModelError(f"attention masks are not decomposed by ptqflow; {_HINT}")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(query).unflatten(-1, heads).transpose(1, 2)  # (N, h, L, d)
        k = self.k_proj(key).unflatten(-1, heads).transpose(1, 2)  # (N, h, S, d)
        v = self.v_proj(value).unflatten(-1, heads).transpose(1, 2)  # (N, h, S, d)
        scores = _matmul(q, k.transpose(-2, -1)) * self.scale  # (N, h, L, S)
        probs = self.attn_drop(torch.softmax(scores, dim=-1))
        merged = _matmul(probs, v).transpose(1, 2).flatten(2)  # (N, L, E)
        out = self.out_proj(merged)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, probs.mean(dim=1) if average_attn_weights else probs


def _shift(height: int, width: int, window: Sequence[int], shift: Sequence[int]) -> tuple[int, int]:
    """The shift actually applied: none along an axis that one window already covers (Swin's rule)."""
    return (0 if window[0] >= height else shift[0]), (0 if window[1] >= width else shift[1])


@torch.fx.wrap
def window_partition(x: torch.Tensor, window: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * windows, wh * ww, C)``: zero-pad H and W to whole windows, roll the map by
    ``-shift``, cut it into non-overlapping windows. Moves values only (and adds zeros)."""
    b, h, w, c = x.shape
    wh, ww = window
    height, width = h + (-h % wh), w + (-w % ww)
    x = F.pad(x, (0, 0, 0, width - w, 0, height - h))
    sh, sw = _shift(height, width, window, shift)
    if sh or sw:
        x = torch.roll(x, (-sh, -sw), (1, 2))
    x = x.reshape(b, height // wh, wh, width // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


@torch.fx.wrap
def window_merge(y: torch.Tensor, x: torch.Tensor, window: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`window_partition` for windows ``y`` of the map ``x`` (read for its shape only)."""
    b, h, w, _ = x.shape
    c = y.shape[-1]
    wh, ww = window
    height, width = h + (-h % wh), w + (-w % ww)
    y = y.reshape(b, height // wh, width // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)
    sh, sw = _shift(height, width, window, shift)
    if sh or sw:
        y = torch.roll(y, (sh, sw), (1, 2))
    return y[:, :h, :w, :].contiguous()


@torch.fx.wrap
def add_shift_mask(scores: torch.Tensor, x: torch.Tensor, window: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """Add -100 to the logits of token pairs that the cyclic shift brought into one window from different
    regions of the map ``x`` (read for its shape only); ``scores`` is ``(B * windows, heads, N, N)``."""
    _, h, w, _ = x.shape
    wh, ww = window
    height, width = h + (-h % wh), w + (-w % ww)
    sh, sw = _shift(height, width, window, shift)
    if not (sh or sw):
        return scores

    def bands(size: int, win: int, s: int) -> torch.Tensor:
        label = torch.zeros(size, device=scores.device)
        if s:
            label[size - win :] = 1
            label[size - s :] = 2
        return label

    region = bands(height, wh, sh)[:, None] * 3 + bands(width, ww, sw)[None, :]
    region = region.reshape(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    mask = (region[:, None, :] != region[:, :, None]).to(scores.dtype) * -100.0  # (windows, N, N)
    n, heads, length, _ = scores.shape
    windows = mask.shape[0]
    scores = scores.reshape(n // windows, windows, heads, length, length) + mask[None, :, None]
    return scores.reshape(n, heads, length, length)


@torch.fx.wrap
def position_bias(table: torch.Tensor, index: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Swin's relative position bias ``(1, heads, N, N)`` gathered from ``table`` ``((2wh-1)(2ww-1), heads)``."""
    n = window[0] * window[1]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)


@torch.fx.wrap
def position_bias_v2(
    coords: torch.Tensor, mlp: Sequence[torch.Tensor | None], index: torch.Tensor, window: Sequence[int], heads: int
) -> torch.Tensor:
    """Swin V2's continuous position bias: ``16 sigmoid(MLP(coords))`` gathered like :func:`position_bias`;
    ``mlp`` = (weight 1, bias 1, weight 2, bias 2) of its two linear layers (a ReLU between)."""
    w1, b1, w2, b2 = mlp
    assert w1 is not None and w2 is not None
    hidden = F.relu(_matmul(coords, w1.t()) + (0 if b1 is None else b1))
    table = (_matmul(hidden, w2.t()) + (0 if b2 is None else b2)).reshape(-1, heads)
    return 16 * torch.sigmoid(position_bias(table, index, window))


def _split_qkv(qkv: nn.Linear, zero_k_bias: bool) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    weights = qkv.weight.detach().chunk(3)
    biases = qkv.bias.detach().chunk(3) if qkv.bias is not None else (None, None, None)
    if zero_k_bias and biases[1] is not None:
        biases = (biases[0], torch.zeros_like(biases[1]), biases[2])  # V2 has no key bias (zeroed in its forward)
    q, k, v = (_linear(w, b) for w, b in zip(weights, biases, strict=True))
    return q, k, v


class DecomposedWindowAttention(nn.Module):
    """Swin (V1 and V2) shifted-window attention from plain modules and ops (module docstring).

    Built by :meth:`from_module` from torchvision's ``ShiftedWindowAttention`` or ``ShiftedWindowAttentionV2``;
    ``forward`` maps ``(B, H, W, C)`` to ``(B, H, W, C)`` as they do.
    """

    relative_position_index: torch.Tensor
    relative_coords_table: torch.Tensor

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        source: Any = module  # torchvision's attributes, typed loosely there
        v2 = isinstance(source, sys.modules[TORCHVISION_SWIN].ShiftedWindowAttentionV2)
        self.window_size = list(source.window_size)
        self.shift_size = list(source.shift_size)
        self.num_heads = int(source.num_heads)
        dim = source.proj.in_features
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj = _split_qkv(source.qkv, zero_k_bias=v2)
        self.proj = _linear(
            source.proj.weight.detach(), None if source.proj.bias is None else source.proj.bias.detach()
        )
        self.attn_drop = nn.Dropout(float(source.attention_dropout))
        self.proj_drop = nn.Dropout(float(source.dropout))
        self.register_buffer("relative_position_index", source.relative_position_index.clone())
        self.logit_scale: nn.Parameter | None = None
        self.cpb_mlp: nn.Sequential | None = None
        if v2:
            self.logit_scale = nn.Parameter(source.logit_scale.detach().clone())
            self.cpb_mlp = copy.deepcopy(source.cpb_mlp)
            self.register_buffer("relative_coords_table", source.relative_coords_table.clone())
        else:
            self.relative_position_bias_table = nn.Parameter(source.relative_position_bias_table.detach().clone())
        self.train(source.training)

    @classmethod
    def from_module(cls, source: nn.Module, path: str = "") -> DecomposedWindowAttention:
        """The decomposition of a torchvision shifted-window attention module (weights copied)."""
        return cls(source)

    def _bias(self) -> torch.Tensor:
        if self.cpb_mlp is None:
            return position_bias(self.relative_position_bias_table, self.relative_position_index, self.window_size)
        first: Any = self.cpb_mlp[0]
        last: Any = self.cpb_mlp[2]
        mlp = (first.weight, first.bias, last.weight, last.bias)
        return position_bias_v2(
            self.relative_coords_table, mlp, self.relative_position_index, self.window_size, self.num_heads
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = window_partition(x, self.window_size, self.shift_size)  # (B * windows, N, C)
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(windows).unflatten(-1, heads).transpose(1, 2)  # (B * windows, h, N, d)
        k = self.k_proj(windows).unflatten(-1, heads).transpose(1, 2)
        v = self.v_proj(windows).unflatten(-1, heads).transpose(1, 2)
        if self.logit_scale is not None:  # V2: cosine attention with a learned, clamped temperature
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scores = _matmul(q, k.transpose(-2, -1)) * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            scores = _matmul(q, k.transpose(-2, -1)) * self.scale
        scores = add_shift_mask(scores + self._bias(), x, self.window_size, self.shift_size)
        probs = self.attn_drop(torch.softmax(scores, dim=-1))
        merged = _matmul(probs, v).transpose(1, 2).flatten(2)  # (B * windows, N, C)
        return window_merge(self.proj_drop(self.proj(merged)), x, self.window_size, self.shift_size)


#: torchvision's Swin module, looked up in ``sys.modules`` and never imported here: a model holding its
#: attention (or calling its functions) was built by a process that imported it, and a process that did not
#: (the embedded ResNet-20's stages) skips torchvision's import, 3.5 s per stage on a 2-core AMD EPYC.
TORCHVISION_SWIN = "torchvision.models.swin_transformer"


def _decompositions() -> dict[type[nn.Module], type[DecomposedAttention] | type[DecomposedWindowAttention]]:
    """Attention modules and their decompositions (torchvision's Swin classes when it is imported)."""
    table: dict[type[nn.Module], type[DecomposedAttention] | type[DecomposedWindowAttention]] = {
        nn.MultiheadAttention: DecomposedAttention
    }
    swin = sys.modules.get(TORCHVISION_SWIN)
    if swin is not None:
        table[swin.ShiftedWindowAttention] = DecomposedWindowAttention
        table[swin.ShiftedWindowAttentionV2] = DecomposedWindowAttention
    return table


def decompose_attention(model: nn.Module, keep: Collection[str] = ()) -> list[str]:
    """Replace every attention module of ``model`` (in place) by its decomposition: ``nn.MultiheadAttention``
    by :class:`DecomposedAttention`, torchvision's shifted-window attention by
    :class:`DecomposedWindowAttention`.

    Args:
        model: modified in place.
        keep: module paths left alone (float leaves, and everything inside them).

    Returns:
        The paths replaced, in module order.
    """
    replaced = []
    table = _decompositions()
    for path, module in list(model.named_modules()):
        decomposition = table.get(type(module))
        if decomposition is None or not path:
            continue
        if any(path == leaf or path.startswith(leaf + ".") for leaf in keep):
            continue
        model.set_submodule(path, decomposition.from_module(module, path))
        replaced.append(path)
    return replaced
