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

:func:`convert_attention` replaces every convertible ``nn.MultiheadAttention`` of a model;
the engine does it before pruning and records the names in the plan (``plan.attention``) so
that :func:`raykfe.surgery.rebuild` repeats it on load.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "convert_attention", "attention_names"]


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


def attention_names(model: nn.Module) -> list[str]:
    """Names of the convertible ``nn.MultiheadAttention`` modules of ``model``, forward order of
    registration."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and unsupported(m) is None]


def convert_attention(model: nn.Module, names: Optional[list[str]] = None) -> list[str]:
    """Replace ``nn.MultiheadAttention`` modules of ``model`` IN PLACE by :class:`Attention` (all the
    convertible ones, or ``names``); returns the names replaced. A name that is not a convertible
    ``nn.MultiheadAttention`` (already converted: an :class:`Attention`) is left alone."""
    from .surgery import set_module

    done = []
    for name in attention_names(model) if names is None else names:
        mod = model.get_submodule(name)
        if isinstance(mod, nn.MultiheadAttention) and unsupported(mod) is None:
            set_module(model, name, from_mha(mod))
            done.append(name)
    return done
