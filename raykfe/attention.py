"""Multi-head attention as raykfe owns it: four plain ``nn.Linear`` projections.

``nn.MultiheadAttention`` keeps its q, k and v projections as one ``in_proj_weight`` parameter
(and its ``out_proj`` as a private Linear subclass), so no layer-level method can see them: a
VisionTransformer's attention was dense to every method. :class:`Attention` computes the same
function with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` modules, so that
the KFE methods collect their K-FAC factors (a Linear over ``[batch, tokens, features]``: tokens
are positions, see :mod:`raykfe.layers`) and rebuild each projection in its pruned form like any
other Linear; the rebuilt projections keep their output widths, so the heads are untouched.

Decisions:

* **Same call, same result.** ``forward(query, key, value, key_padding_mask=None,
  need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False)`` returns
  ``(output, weights or None)`` like ``nn.MultiheadAttention`` (batched and unbatched inputs,
  ``batch_first`` either way, boolean masks (True: not attended) and float masks (added),
  ``attn_mask`` of shape ``[L, S]`` or ``[batch * heads, L, S]``, ``kdim`` / ``vdim``, dropout on
  the attention weights in training). ``is_causal`` is, as there, a hint that ``attn_mask`` IS the
  causal mask: the mask is what is applied, and ``is_causal`` without a mask is an error.
  ``add_bias_kv`` and ``add_zero_attn`` are not supported: such a module is left as it is.
* **Batch first inside.** The projections always see ``[batch, tokens, features]`` (inputs of a
  ``batch_first=False`` module are transposed before them), so the statistics' example axis is the
  batch: a sequence-first projection would otherwise count tokens as examples.
* **Scale fixed at conversion.** Scores are scaled by ``1/sqrt(embed_dim / num_heads)`` of the
  original module, and the head split reads the projections' actual output widths.
* **Loads MultiheadAttention weights.** A state_dict written for ``nn.MultiheadAttention``
  (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj.*``) loads into an
  :class:`Attention` directly (a load hook splits it), so pretrained torchvision weights still
  load into a model built by :func:`raykfe.models.build_model`.

Swin's windowed attention (torchvision's ``ShiftedWindowAttention``) has ``qkv`` and ``proj``
Linear modules but applies their weights functionally, on windows flattened into the batch, so
their hooks never fire. :class:`WindowAttention` (a subclass: same parameters, buffers and
state_dict keys) computes the same function calling the two modules on the padded, shifted
``[batch, H, W, C]`` map BEFORE the window partition and after its reverse (a Linear acts per
token, so it commutes with the shift and the partition, and padded tokens still get ``qkv``'s
bias as there); the statistics' examples are then the images, not the windows. The V2 variant
(cosine attention, a continuous position bias) is left as it is.

:func:`convert_attention` replaces every convertible module of a model IN PLACE;
:func:`raykfe.models.build_model`, the engine (on a copy, before pruning) and
:func:`raykfe.surgery.rebuild` (on load) all do it, so a plan always meets the converted modules.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "WindowAttention", "convert_attention", "attention_names"]


def _float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True: not attended) as ``-inf`` / 0 in ``dtype``; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class Attention(nn.Module):
    """``nn.MultiheadAttention``'s function with ``nn.Linear`` projections (module docstring)."""

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, float(dropout), batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.scale = 1.0 / math.sqrt(embed_dim // num_heads)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self._register_load_state_dict_pre_hook(_split_mha_state)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True is a hint that attn_mask is the causal mask: pass attn_mask too")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n_q, n_k, h = query.shape[0], query.shape[1], key.shape[1], self.num_heads
        q = self.q_proj(query).reshape(b, n_q, h, -1).transpose(1, 2)  # [B, h, L, dq]
        k = self.k_proj(key).reshape(b, n_k, h, -1).transpose(1, 2)  # [B, h, S, dq]
        v = self.v_proj(value).reshape(b, n_k, h, -1).transpose(1, 2)  # [B, h, S, dv]
        scores = torch.matmul(q * self.scale, k.transpose(-2, -1))  # [B, h, L, S]
        if attn_mask is not None:
            m = _float_mask(attn_mask, scores.dtype)
            scores = scores + (m.reshape(b, h, n_q, n_k) if m.dim() == 3 else m)
        if key_padding_mask is not None:
            scores = scores + _float_mask(key_padding_mask, scores.dtype).reshape(b, 1, 1, n_k)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout)
        out = self.out_proj(torch.matmul(weights, v).transpose(1, 2).reshape(b, n_q, -1))  # [B, L, E]
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        w = weights.mean(dim=1) if average_attn_weights else weights
        return out, (w if batched else w.squeeze(0))


def _split_mha_state(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Rename an ``nn.MultiheadAttention`` state_dict's entries to :class:`Attention`'s (in place)."""
    packed = state_dict.pop(prefix + "in_proj_weight", None)
    if packed is not None:
        for name, w in zip("qkv", packed.chunk(3)):
            state_dict[f"{prefix}{name}_proj.weight"] = w
    for name in "qkv":
        w = state_dict.pop(f"{prefix}{name}_proj_weight", None)
        if w is not None:
            state_dict[f"{prefix}{name}_proj.weight"] = w
    bias = state_dict.pop(prefix + "in_proj_bias", None)
    if bias is not None:
        for name, b in zip("qkv", bias.chunk(3)):
            state_dict[f"{prefix}{name}_proj.bias"] = b


def unsupported(mha: nn.MultiheadAttention) -> Optional[str]:
    """Why ``mha`` cannot become an :class:`Attention` (None when it can)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "MultiheadAttention with add_bias_kv=True"
    if mha.add_zero_attn:
        return "MultiheadAttention with add_zero_attn=True"
    return None


@torch.no_grad()
def from_mha(mha: nn.MultiheadAttention) -> Attention:
    """An :class:`Attention` computing exactly what ``mha`` computes (same dtype, device, mode)."""
    w = mha.out_proj.weight
    att = Attention(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                    kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device=w.device, dtype=w.dtype)
    att.load_state_dict(mha.state_dict())
    return att.train(mha.training)


def _swin_class():
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    return ShiftedWindowAttention


_SWA = _swin_class()


class WindowAttention(_SWA if _SWA is not None else nn.Module):  # type: ignore[misc]
    """Swin's shifted-window attention with its ``qkv`` / ``proj`` called as modules (module
    docstring); the same parameters and state_dict as torchvision's ``ShiftedWindowAttention``."""

    def forward(self, x: Tensor) -> Tensor:  # [B, H, W, C] -> [B, H, W, C]
        b, h, w, c = x.shape
        wh, ww = self.window_size[0], self.window_size[1]
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        ph, pw = x.shape[1], x.shape[2]
        sh = 0 if wh >= ph else self.shift_size[0]  # a window as large as the map needs no shift
        sw = 0 if ww >= pw else self.shift_size[1]
        if sh + sw > 0:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nh, nw, n = ph // wh, pw // ww, wh * ww
        qkv = self.qkv(x)  # per token, on the whole map: [B, pH, pW, 3C]
        qkv = qkv.reshape(b, nh, wh, nw, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*nW, heads, N, d]
        attn = torch.matmul(q * (c // self.num_heads) ** -0.5, k.transpose(-2, -1)) + self.get_relative_position_bias()
        if sh + sw > 0:  # tokens from different regions of the shifted map do not attend to each other
            region = torch.zeros(ph, pw, dtype=x.dtype, device=x.device)
            label = 0
            for hs in (slice(0, ph - wh), slice(ph - wh, ph - sh), slice(ph - sh, ph)):
                for ws_ in (slice(0, pw - ww), slice(pw - ww, pw - sw), slice(pw - sw, pw)):
                    region[hs, ws_] = label
                    label += 1
            region = region.reshape(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, n)
            differ = region[:, None, :] != region[:, :, None]  # [nW, N, N]
            mask = torch.zeros(differ.shape, dtype=attn.dtype, device=attn.device).masked_fill(differ, -100.0)
            attn = (attn.reshape(b, nh * nw, self.num_heads, n, n) + mask[None, :, None]).reshape(-1, self.num_heads, n, n)
        attn = F.dropout(torch.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, nh, nw, wh, ww, -1)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)  # windows back on the map
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)
        if sh + sw > 0:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out[:, :h, :w, :].contiguous()


@torch.no_grad()
def from_window_attention(m: nn.Module) -> WindowAttention:
    """A :class:`WindowAttention` with ``m``'s parameters, buffers, settings and mode."""
    new = WindowAttention(m.qkv.in_features, list(m.window_size), list(m.shift_size), m.num_heads,
                          qkv_bias=m.qkv.bias is not None, proj_bias=m.proj.bias is not None,
                          attention_dropout=m.attention_dropout, dropout=m.dropout)
    new.to(device=m.qkv.weight.device, dtype=m.qkv.weight.dtype)
    new.load_state_dict(m.state_dict())
    return new.train(m.training)


def _converter(m: nn.Module):
    """The function converting ``m`` to raykfe's module, or None when ``m`` is not convertible."""
    if isinstance(m, nn.MultiheadAttention) and unsupported(m) is None:
        return from_mha
    if _SWA is not None and type(m) is _SWA:
        return from_window_attention
    return None


def attention_names(model: nn.Module) -> list[str]:
    """Names of the convertible attention modules of ``model`` (``nn.MultiheadAttention``,
    torchvision's ``ShiftedWindowAttention``), in registration order."""
    return [n for n, m in model.named_modules() if _converter(m) is not None]


def convert_attention(model: nn.Module) -> list[str]:
    """Replace every convertible attention module of ``model`` IN PLACE by raykfe's; returns the
    names replaced. A module that is not convertible (already converted, or with options raykfe
    does not cover) is left alone."""
    from .surgery import set_module

    names = attention_names(model)
    for name in names:
        set_module(model, name, _converter(model.get_submodule(name))(model.get_submodule(name)))
    return names
