"""Per-layer-type adapters: how a Linear or Conv2d maps to the K-FAC picture ``s = W~ a~``.

Layout conventions, fixed here for the whole package (see ALGORITHMS.md sections 0-1):

* Linear, weight ``W [d_out, d_in]``. With a bias the augmented matrix is
  ``W~ = [W | b]  [d_out, d_in + 1]`` and the input gets a constant 1 appended, ``a~ = [a; 1]``.
  Inputs with extra leading dims ``[N, *, d_in]`` are treated like conv positions (T = prod(*)).
* Conv2d (groups=1, zero padding), weight ``[out_c, in_c, kh, kw]``, T = number of output positions.

  - ``full`` mode: ``W~ [out_c, in_c*kh*kw (+1)]`` in :func:`torch.nn.functional.unfold` order
    (channel-major, then kh, then kw); ``a~`` is the unfolded patch with a constant 1 appended per
    output position (the homogeneous coordinate is never padded, so the bias is exact everywhere).
  - ``patch`` mode (EigenDamage's default): every kernel offset kappa is a separate sample, so
    ``W~ [out_c, in_c (+1), kh*kw]`` is one ``[out_c, in_c(+1)]`` matrix per offset and ``a~`` is one
    input pixel ``[in_c (+1)]``. The bias is the weight of a constant-1 input channel that is
    zero-padded like the real channels (exactly what unfolding ``[x; 1]`` gives), placed at the
    centre tap. That is exact only when the centre tap reads a real pixel at every output position,
    i.e. ``pad_before <= dilation * c`` and ``pad_after <= dilation * (k-1-c)`` with
    ``c = (k-1)//2`` in both dims (true for every "valid" conv, every odd-kernel "same" conv and
    every even-kernel "same" conv with dilation 1; false e.g. for an even kernel with dilation 3).
    When it is not, the bias is not folded in: it stays a plain, unpruned bias on the rebuilt
    layer's output and A has no constant channel (``fold_bias`` is False).
* Padding: :func:`conv_pad` gives the zero padding a conv applies as ``F.pad`` amounts
  ``(left, right, top, bottom)``. PyTorch's ``padding="same"`` pads ``d*(k-1)`` per dim, ``//2``
  before and the rest after, so an even kernel (odd dilation) gets one more pixel on the
  right/bottom; every patch, pixel count and T here is computed on the explicitly padded input.

Layers that are not handled (grouped or depthwise convs, transposed convs, non-zero padding modes,
anything else) are left dense by the KFE method; :func:`unsupported_reason` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Adapter", "LinearAdapter", "Conv2dAdapter", "make_adapter", "unsupported_reason", "conv_pad"]

CONV_MODES = ("patch", "full")

#: full-mode statistics unfold at most this many bytes of patches at a time (per layer, per batch)
UNFOLD_CHUNK_BYTES = 64 << 20


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_pad(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """The padding ``module`` applies to its input, as ``F.pad`` amounts ``(left, right, top, bottom)``.

    int or tuple ``(p_h, p_w)``: ``(p_w, p_w, p_h, p_h)``; ``'valid'``: zeros; ``'same'``: a total of
    ``d*(k-1)`` per dim, ``total // 2`` before and the rest after (PyTorch's rule: an even kernel
    with odd dilation pads one more pixel on the right / bottom). The padding mode is not included.
    """
    p = module.padding
    if p == "valid":
        return (0, 0, 0, 0)
    if p == "same":
        (th, tw) = (d * (k - 1) for d, k in zip(_pair(module.dilation), _pair(module.kernel_size)))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = _pair(p)
    return (pw, pw, ph, ph)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Factors are accumulated in float32 or better, never in half precision."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def unsupported_reason(module: nn.Module) -> str | None:
    """None when the KFE method can prune ``module``, else a short reason for the report."""
    if type(module) is nn.Linear:
        return None
    if type(module) is nn.Conv2d:
        if module.groups != 1:
            return f"grouped conv (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding not in ("valid", "same"):
            return f"padding={module.padding!r}"
        return None
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "transposed conv"
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"subclass {type(module).__name__} of a supported layer"
    return f"layer type {type(module).__name__}"


@dataclass
class Adapter:
    """Base adapter. Subclasses implement the sample extraction and the weight layout."""

    name: str
    module: nn.Module
    mode: str = "patch"

    kind: str = ""

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def fold_bias(self) -> bool:
        """Whether the bias is the last column of ``W~`` (and A has a homogeneous coordinate)."""
        return self.has_bias

    @property
    def d_out(self) -> int:
        raise NotImplementedError

    @property
    def d_in(self) -> int:
        """Size of ``a~`` (including the homogeneous coordinate when the bias is folded)."""
        raise NotImplementedError

    # --- statistics -----------------------------------------------------------------------
    def a_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_n (1/T_n) sum_t a~ a~^T`` (patch: also ``/k^2``) over the batch, float32+."""
        raise NotImplementedError

    def s_sum(self, g: torch.Tensor) -> torch.Tensor:
        """``sum_{n,t} Ds Ds^T`` over the batch from the per-example output gradient ``g``."""
        g = _at_least_fp32(g.detach())
        if self.kind == "conv":
            g = g.movedim(1, -1)  # [N, out, H, W] -> [N, H, W, out]
        g = g.reshape(-1, g.shape[-1])  # [N*T, out]
        return g.T @ g

    # --- weights --------------------------------------------------------------------------
    def weight_matrix(self) -> torch.Tensor:
        """``W~`` as float64: ``[d_out, d_in]`` (Linear, full) or ``[d_out, d_in, k*k]`` (patch)."""
        raise NotImplementedError


@dataclass
class LinearAdapter(Adapter):
    kind: str = "linear"

    @property
    def d_out(self) -> int:
        return self.module.out_features

    @property
    def d_in(self) -> int:
        return self.module.in_features + int(self.fold_bias)

    def a_sum(self, x: torch.Tensor) -> torch.Tensor:
        x = _at_least_fp32(x.detach())
        n = x.shape[0]
        a = x.reshape(n, -1, x.shape[-1])  # [N, T, d_in]
        t = a.shape[1]
        a = a.reshape(n * t, -1)
        if self.fold_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return (a.T @ a) / t

    def weight_matrix(self) -> torch.Tensor:
        w = self.module.weight.detach().double()
        if self.fold_bias:
            w = torch.cat([w, self.module.bias.detach().double()[:, None]], dim=1)
        return w


@dataclass
class Conv2dAdapter(Adapter):
    kind: str = "conv"

    def __post_init__(self) -> None:
        if self.mode not in CONV_MODES:
            raise ValueError(f"conv_mode must be one of {CONV_MODES}, got {self.mode!r}")
        m = self.module
        self.kernel = _pair(m.kernel_size)
        self.stride = _pair(m.stride)
        self.dilation = _pair(m.dilation)
        self._count_cache: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}

    def padding_for(self, hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """The zero padding as ``F.pad`` amounts ``(left, right, top, bottom)`` (:func:`conv_pad`;
        the same for every input size ``hw``)."""
        return conv_pad(self.module)

    @property
    def centre_tap(self) -> tuple[int, int]:
        return ((self.kernel[0] - 1) // 2, (self.kernel[1] - 1) // 2)

    @property
    def fold_bias(self) -> bool:
        if not self.has_bias:
            return False
        if self.mode == "full":
            return True
        left, right, top, bottom = self.padding_for((0, 0))
        (ch, cw), (dh, dw), (kh, kw) = self.centre_tap, self.dilation, self.kernel
        # the centre tap of output position o reads input o*s - before + d*c: a real pixel at the first
        # position iff before <= d*c, at the last one (for any input size) iff after <= d*(k-1-c)
        return top <= dh * ch and bottom <= dh * (kh - 1 - ch) and left <= dw * cw and right <= dw * (kw - 1 - cw)

    @property
    def k2(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def d_out(self) -> int:
        return self.module.out_channels

    @property
    def d_in(self) -> int:
        c = self.module.in_channels
        return (c if self.mode == "patch" else c * self.k2) + int(self.fold_bias)

    def out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        left, right, top, bottom = self.padding_for(hw)
        padded = (hw[0] + top + bottom, hw[1] + left + right)
        return tuple(
            (padded[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1 for i in range(2)
        )

    def _pixel_counts(self, hw: tuple[int, int], device) -> tuple[torch.Tensor, int]:
        """How many (output position, kernel offset) pairs read each input pixel: ``[H*W]``, and T."""
        key = (hw, str(device))
        if key not in self._count_cache:
            ones = torch.ones(1, 1, *hw, dtype=torch.float64, device=device)
            left, right, top, bottom = pad = self.padding_for(hw)
            padded = F.pad(ones, pad)  # [1, 1, H + top + bottom, W + left + right]
            cols = F.unfold(padded, self.kernel, dilation=self.dilation, stride=self.stride)
            t = cols.shape[-1]
            counts = F.fold(cols, padded.shape[-2:], self.kernel, dilation=self.dilation, stride=self.stride)
            counts = counts[..., top:top + hw[0], left:left + hw[1]]  # the padded pixels read zeros: drop them
            self._count_cache[key] = (counts.reshape(-1), t)
        return self._count_cache[key]

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Patches ``[N, in_c*kh*kw, T]`` (dilation, stride and the possibly asymmetric padding honoured)."""
        pad = self.padding_for(tuple(x.shape[-2:]))
        if any(pad):
            x = F.pad(x, pad)
        return F.unfold(x, self.kernel, dilation=self.dilation, stride=self.stride)

    def a_sum(self, x: torch.Tensor) -> torch.Tensor:
        x = _at_least_fp32(x.detach())
        n, c = x.shape[:2]
        hw = tuple(x.shape[-2:])
        if self.mode == "full":
            # the unfolded patches are k^2 times the input: form them a few examples at a time so
            # the transient stays under UNFOLD_CHUNK_BYTES (resnet50's layer1 at 224x224 would
            # otherwise need 58 MB per example, 3.7 GB at batch 64)
            t = math.prod(self.out_hw(hw))
            per_example = 2 * (self.d_in * t) * x.element_size()  # unfolded + transposed copy
            step = max(1, UNFOLD_CHUNK_BYTES // max(1, per_example))
            total = x.new_zeros(self.d_in, self.d_in)
            for i in range(0, n, step):
                cols = self.unfold(x[i:i + step])  # [n_i, C*k*k, T]
                a = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [n_i*T, C*k*k]
                if self.fold_bias:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
                total += a.T @ a
            return total / t
        # patch mode: sum_{t,kappa} a a^T = sum_pixels count(pixel) * x x^T (padding contributes 0)
        counts, t = self._pixel_counts(hw, x.device)
        counts = counts.to(x.dtype)
        a = x.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)  # [N*H*W, C]
        if self.fold_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        w = counts.repeat(n)[:, None]
        return (a.T @ (a * w)) / (t * self.k2)

    def weight_matrix(self) -> torch.Tensor:
        w = self.module.weight.detach().double()  # [out, in, kh, kw]
        out, cin = w.shape[:2]
        if self.mode == "full":
            w = w.reshape(out, -1)
            if self.fold_bias:
                w = torch.cat([w, self.module.bias.detach().double()[:, None]], dim=1)
            return w
        w = w.reshape(out, cin, self.k2)
        if self.fold_bias:
            col = w.new_zeros(out, 1, self.k2)
            c = self.centre_tap
            col[:, 0, c[0] * self.kernel[1] + c[1]] = self.module.bias.detach().double()
            w = torch.cat([w, col], dim=1)
        return w


def make_adapter(name: str, module: nn.Module, conv_mode: str = "patch") -> Adapter:
    """The adapter for a supported module; raises ValueError for unsupported ones."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise ValueError(f"layer {name!r} is not prunable by the KFE method: {reason}")
    if type(module) is nn.Linear:
        return LinearAdapter(name, module, conv_mode)
    return Conv2dAdapter(name, module, conv_mode)


def positions(shape: torch.Size | tuple[int, ...], kind: str) -> int:
    """T for an output of ``shape``: spatial positions (conv) or extra leading dims (linear)."""
    if kind == "conv":
        return int(math.prod(shape[2:]))
    return int(math.prod(shape[1:-1])) if len(shape) > 2 else 1
