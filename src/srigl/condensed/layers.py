"""Condensed constant fan-in layers and their registry, :data:`CONDENSERS`.

Every condensed layer stores a :class:`~srigl.condensed.tensor.CondensedTensor` (``values``,
``indices``, ``active_rows``) and a full-size bias, is built by a ``from_dense`` classmethod over
:func:`~srigl.condensed.tensor.condense_tensor` and turned back by ``to_dense``. Ablated neurons
output exactly their bias, so a condensed layer computes what the masked dense layer computes.
Layers are registered by dense module type with :func:`register_condenser`; the product itself is
:func:`srigl.kernels.fanin_matmul` (and, for CPU inference of a Linear,
:mod:`srigl.kernels.inference`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from srigl.masks import get_mask
from srigl.condensed.conv_function import condensed_conv2d
from srigl.condensed.exported import export_layout, gather_matmul, scatter_conv2d, scatter_matmul
from srigl.condensed.tensor import CondensedTensor, _scatter_rows, condense_tensor
from srigl.kernels import fanin_matmul, fanin_matmul_rows, index_dtype_for
from srigl.kernels.checks import FanInOperandError, check_indices
from srigl.kernels import cpu
from srigl.kernels.dispatch import _cached_backend, _is_dynamo_compiling, _traced_backend, place_active_rows
from srigl.kernels.dense_route import dense_conv2d
from srigl.kernels.inference import WindowCache, condensed_linear_inference

__all__ = ["CONDENSERS", "CondensedConv2d", "CondensedLinear", "gather_matmul", "register_condenser"]

CONDENSERS: dict[type[nn.Module], type[nn.Module]] = {}


def register_condenser(dense_type: type[nn.Module]) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a condensed layer as the twin of ``dense_type``.

    The class must provide ``from_dense(module, mask=None, *, name=...)`` and ``to_dense()``.
    :func:`condense` matches modules by exact type, so a subclass of ``nn.Linear`` with its own
    forward is never swapped by mistake.
    """

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        CONDENSERS[dense_type] = cls
        return cls

    return decorate


def _mask_of(module: nn.Module, mask: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """The mask to condense ``module.weight`` with: given, else ``weight_mask`` buffer, else ``weight != 0``."""
    if mask is not None:
        return mask, "given"
    buffered = get_mask(module, "weight")
    if isinstance(buffered, torch.Tensor):
        return buffered, "buffer"
    return module.weight.detach() != 0, "weight != 0"


class _CondensedLayer(nn.Module):
    """Storage and fan-in matmul shared by the condensed layers (not registered itself)."""

    def _init_storage(self, out_features, in_features_flat, fan_in, n_active, bias, index_dtype, device, dtype):
        index_dtype = index_dtype if index_dtype is not None else index_dtype_for(in_features_flat)
        self.values = nn.Parameter(torch.zeros(n_active, fan_in, device=device, dtype=dtype))
        self.register_buffer("indices", torch.zeros(n_active, fan_in, device=device, dtype=index_dtype))
        self.register_buffer("active_rows", torch.arange(n_active, device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None)

    # Sizes are read off the tensors, so they cannot disagree with what load_state_dict assigned.
    @property
    def fan_in(self) -> int:
        return self.values.shape[1]

    @property
    def n_active(self) -> int:
        return self.values.shape[0]

    @property
    def index_dtype(self) -> torch.dtype:
        return self.indices.dtype

    def _fill(self, condensed: CondensedTensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.values.copy_(condensed.values)
            self.indices.copy_(condensed.indices)
            self.active_rows.copy_(condensed.active_rows)
            if bias is not None:
                self.bias.copy_(bias)

    def check_storage(self) -> None:
        """Checks that ``values``, ``indices``, ``active_rows`` and ``bias`` describe a valid layer.

        For storage that did not come from :meth:`from_dense` (a loaded file, an edited tensor):
        ``values`` and ``indices`` are ``(n_active, k)``, every index lies in the fan-in,
        ``active_rows`` is an int64 ``(n_active,)`` strictly ascending in ``[0, out)`` (a repeated row
        would silently drop the results of all but one of its copies) and the bias is ``(out,)``.
        One vectorised pass over the indices; nothing is modified.

        Raises:
            FanInOperandError: a shape, dtype or row is wrong (the message names it).
            IndexOutOfRangeError: an index outside the fan-in (first offender named).
        """
        values, indices, rows = self.values, self.indices, self.active_rows
        out_features = self._out_features()
        if values.dim() != 2 or indices.shape != values.shape:
            raise FanInOperandError(
                f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be (n_active, fan_in)"
            )
        n_active = values.shape[0]
        if rows.dtype != torch.int64 or rows.shape != (n_active,):
            raise FanInOperandError(f"active_rows must be int64 of shape ({n_active},), got {rows.dtype} {tuple(rows.shape)}")
        if n_active > out_features:
            raise FanInOperandError(f"{n_active} active rows, but the layer has only {out_features} outputs")
        if self.bias is not None and self.bias.shape != (out_features,):
            raise FanInOperandError(f"bias must be ({out_features},), got {tuple(self.bias.shape)}")
        if n_active:
            low, high = int(rows.min()), int(rows.max())
            if low < 0 or high >= out_features:
                raise FanInOperandError(f"active_rows must lie in [0, {out_features}), got [{low}, {high}]")
            steps = rows[1:] - rows[:-1]  # (n_active - 1,)
            if bool((steps <= 0).any()):
                at = int((steps <= 0).nonzero()[0])
                what = "repeats" if int(steps[at]) == 0 else "is not ascending"
                raise FanInOperandError(
                    f"active_rows {what} at position {at + 1} (active_rows[{at}] = {int(rows[at])}, "
                    f"active_rows[{at + 1}] = {int(rows[at + 1])}); each output row is stored once, in ascending order"
                )
        check_indices(indices, self._in_features_flat())

    def dense_weight(self) -> torch.Tensor:
        """The dense weight viewed as ``(out, fan_in_flat)``, zero outside the mask (detached)."""
        return _scatter_rows(
            self.values.detach(), self.indices, self.active_rows, self._out_features(), self._in_features_flat()
        )

    def dense_mask(self) -> torch.Tensor:
        """The bool ``(out, fan_in_flat)`` mask this layer was condensed from."""
        ones = torch.ones_like(self.values, dtype=torch.bool)
        return _scatter_rows(ones, self.indices, self.active_rows, self._out_features(), self._in_features_flat())

    @property
    def dense_shape(self) -> tuple[int, int]:
        """``(out, fan_in_flat)``: the shape of :meth:`dense_mask` and :meth:`dense_weight`."""
        return self._out_features(), self._in_features_flat()

    def fan_in_counts(self) -> torch.Tensor:
        """Active weights of every output neuron, ``(out,)`` int64: ``dense_mask().sum(1)`` without
        forming the dense mask (``fan_in`` for a stored row, 0 for an ablated one)."""
        counts = torch.zeros(self._out_features(), dtype=torch.long, device=self.values.device)
        counts[self.active_rows] = self.fan_in
        return counts

    def _matmul(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """``y (..., out)`` from ``x (..., in)`` (with this layer's ``indices`` unless given); ablated
        rows output exactly their bias."""
        # Read from the registries, not through nn.Module.__getattr__, whose per-attribute cost is a
        # visible share of a batch-1 product.
        params, buffers = self._parameters, self._buffers
        values, bias, rows = params["values"], params.get("bias"), buffers["active_rows"]
        if indices is None:
            indices = buffers["indices"]
        if torch.is_autocast_enabled(x.device.type):
            # Autocast's rule for matmul-like ops (as nn.Linear gets it): operands in the autocast
            # dtype, the result in it too; the casts are differentiable, so fp32 values get fp32
            # gradients. A dense layer in bf16 feeding this one no longer fails on mixed dtypes.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, values = x.to(dtype), values.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        out_features = self._out_features()
        if values.shape[0] == out_features:
            return _fanin_matmul(x, values, indices, bias)
        if torch.compiler.is_exporting():
            if export_layout() == "matmul":
                return scatter_matmul(x, values, indices, rows, out_features, bias)
            return place_active_rows(gather_matmul, x, values, indices, rows, out_features, bias)
        return fanin_matmul_rows(x, values, indices, rows, out_features, bias)

    def _out_features(self) -> int:  # out_features / out_channels, ablated neurons included
        raise NotImplementedError

    def _in_features_flat(self) -> int:
        raise NotImplementedError


def _fanin_matmul(x, values, indices, bias):
    if torch.compiler.is_exporting():
        # torch.export (under the dynamo ONNX exporter too) cannot trace srigl.kernels: an
        # autograd.Function around a JIT-built operator, with data-dependent index checks and a
        # batch-size-dependent route. The same product in aten ops lowers to ONNX Gather/Mul/ReduceSum
        # and keeps the batch dimension symbolic; or, in the default layout, to ScatterElements + MatMul
        # (srigl.condensed.exported).
        if export_layout() == "matmul":
            return scatter_matmul(x, values, indices, None, values.shape[0], bias)
        return gather_matmul(x, values, indices, bias)
    return fanin_matmul(x, values, indices, bias)


@register_condenser(nn.Linear)
class CondensedLinear(_CondensedLayer):
    """A constant fan-in ``nn.Linear`` that stores only the active weights of its active neurons.

    ``y[..., o] = sum_j values[i, j] * x[..., indices[i, j]] + bias[o]`` for ``o = active_rows[i]``;
    ablated neurons output ``bias[o]`` (or 0). The bias is kept at full size.

    Args:
        in_features: as ``nn.Linear``.
        out_features: as ``nn.Linear``, counting ablated neurons.
        fan_in: ``k``, active weights per active neuron.
        n_active: number of active neurons.
        bias: whether the layer has a bias.
        index_dtype: dtype of ``indices``; the smallest that holds ``in_features`` by default.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fan_in: int,
        n_active: int,
        bias: bool = True,
        index_dtype: torch.dtype | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_storage(out_features, in_features, fan_in, n_active, bias, index_dtype, device, dtype)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None, *, name: str = "weight") -> "CondensedLinear":
        """Condense ``linear`` under ``mask`` (default: its ``weight_mask`` buffer, else ``weight != 0``)."""
        mask, _ = _mask_of(linear, mask)
        condensed = condense_tensor(linear.weight, mask, name=name)
        layer = cls.empty_like(linear, condensed.fan_in, condensed.active_rows.numel(), index_dtype=condensed.indices.dtype)
        layer._fill(condensed, linear.bias)
        return layer

    @classmethod
    def empty_like(cls, linear: nn.Linear, fan_in: int, n_active: int, *, index_dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> "CondensedLinear":
        """A zero-filled twin of ``linear``'s shape holding ``n_active`` rows of ``fan_in`` weights, on
        ``device`` (default: ``linear``'s own; ``linear`` may live on the ``meta`` device)."""
        return cls(
            linear.in_features,
            linear.out_features,
            fan_in,
            n_active,
            bias=linear.bias is not None,
            index_dtype=index_dtype,
            device=linear.weight.device if device is None else device,
            dtype=linear.weight.dtype,
        )

    def to_dense(self) -> nn.Linear:
        """The equivalent masked ``nn.Linear`` (a new module)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.values.device, dtype=self.values.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _out_features(self) -> int:
        return self.out_features

    def _in_features_flat(self) -> int:
        return self.in_features

    #: Whether CPU inference may keep copies of the weights (:class:`srigl.kernels.inference.WindowCache`):
    #: a window-layout copy for small batches, larger than ``values`` + int16 ``indices`` by the
    #: layout's padding, more so the sparser the layer, and not kept at all where the layout stops
    #: paying (measured sizes: results/kernel_tuning.md); and, for large batches on the dense route,
    #: the densified active rows when they are dense enough to cost at most 1.7x the layer
    #: (:data:`srigl.kernels.inference.DENSE_CACHE_MIN_DENSITY`). Set this to False (on the class or
    #: one layer) to trade that memory for the slower gather route at small batches and a densify
    #: per call at large ones.
    window_inference: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            y = self._inference(x)
            if y is not None:
                return y
        elif "_window_cache" in self.__dict__:
            # Training (compact training evaluates under no_grad between steps): the weights are about
            # to change, so the packed copy would only hold memory until the next evaluation repacks.
            del self.__dict__["_window_cache"]
        return self._matmul(x)

    def _inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """The product straight from the compiled operators, or None to take the general path.

        Inference at small batches is dominated by per-call overhead; the module owns values,
        indices and bias, so :func:`srigl.kernels.inference.condensed_linear_inference` checks only
        the input, and keeps the window layout in this layer's cache (``_window_cache``, a
        :class:`~srigl.kernels.inference.WindowCache`, left out of pickles and dropped by ``.to()``
        and by training).
        """
        params, buffers = self._parameters, self._buffers
        values = params["values"]
        windows = None
        if self.window_inference:
            windows = self.__dict__.get("_window_cache")
            if windows is None:
                windows = self.__dict__["_window_cache"] = WindowCache()
        rows = buffers["active_rows"] if values.shape[0] != self.out_features else None
        return condensed_linear_inference(
            x, values, buffers["indices"], params["bias"], rows, self.in_features, self.out_features, windows
        )

    def __getstate__(self):
        # Pickling (torch.save of the module, multiprocessing) leaves the packed copy out: it holds
        # weak references, which cannot be pickled, and is rebuilt on the first call anyway.
        state = dict(super().__getstate__())
        state.pop("_window_cache", None)
        return state

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() make new tensors: drop the packed copy rather than keep it alive.
        self.__dict__.pop("_window_cache", None)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
            f"n_active={self.n_active}, bias={self.bias is not None}"
        )


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _pad_amounts(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) for a Conv2d ``padding`` (pair, 'same', 'valid')."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        # As nn.Conv2d: the odd pixel of an even total goes to the right/bottom.
        total_h, total_w = (d * (k - 1) for d, k in zip(dilation, kernel_size))
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    pad_h, pad_w = _pair(padding)
    return (pad_w, pad_w, pad_h, pad_h)


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
#: dtypes CondensedConv2d runs on its CPU inference routes: the pixel kernel (float32, float64) or
#: the dense route (bfloat16, :func:`srigl.kernels.dense_route.dense_conv2d`).
_CONV_INFERENCE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@register_condenser(nn.Conv2d)
class CondensedConv2d(_CondensedLayer):
    """A constant fan-in ``nn.Conv2d``, computed without a dense weight.

    Each filter reads ``k`` of its group's ``in_channels / groups * kh * kw`` inputs; ``indices`` are
    positions in that per-group fan-in, in the weight's own ``(c, kh, kw)`` order. Three routes:

    * Inference on the CPU (autograd off, float32/float64, C++ kernel built):
      :func:`srigl.kernels.cpu.conv_pixels`, a direct convolution with output pixels as the vector
      lanes that reads ``x`` and writes ``y`` in NCHW and the weights in their stored layout (no
      per-call conversion, no im2col tensor), zero padding and bias applied inside the kernel.
    * Training (grad enabled): :func:`srigl.condensed.conv_function.condensed_conv2d`, which saves
      no unfolded input and runs the direct sparse kernels (zero padding applied inside the kernel).
    * Otherwise (other devices and dtypes, autocast, export): im2col (``F.unfold``) and the fan-in
      matmul. ``F.unfold`` lays out its columns in the weight's order, so group ``g``'s fan-in is
      the column block ``g * fan_in_flat ...`` and every group (grouped and depthwise convolutions
      included) runs in one fan-in matmul with offset indices.

    Padding modes other than zeros are applied with ``F.pad`` first; ``padding='same'`` is turned
    into explicit amounts.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode: as ``nn.Conv2d``.
        fan_in: ``k``, active weights per active filter.
        n_active: number of active filters.
        index_dtype: dtype of ``indices``; the smallest that holds the per-group fan-in by default.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        fan_in: int,
        n_active: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        index_dtype: torch.dtype | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must divide by groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self._pad = _pad_amounts(self.padding, self.kernel_size, self.dilation)
        in_flat = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_storage(out_channels, in_flat, fan_in, n_active, bias, index_dtype, device, dtype)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, *, name: str = "weight") -> "CondensedConv2d":
        """Condense ``conv`` under ``mask`` (default: its ``weight_mask`` buffer, else ``weight != 0``)."""
        mask, _ = _mask_of(conv, mask)
        condensed = condense_tensor(conv.weight, mask, name=name)
        layer = cls.empty_like(conv, condensed.fan_in, condensed.active_rows.numel(), index_dtype=condensed.indices.dtype)
        layer._fill(condensed, conv.bias)
        return layer

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, fan_in: int, n_active: int, *, index_dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> "CondensedConv2d":
        """A zero-filled twin of ``conv``'s shape holding ``n_active`` rows of ``fan_in`` weights, on
        ``device`` (default: ``conv``'s own; ``conv`` may live on the ``meta`` device)."""
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            fan_in,
            n_active,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            index_dtype=index_dtype,
            device=conv.weight.device if device is None else device,
            dtype=conv.weight.dtype,
        )

    def to_dense(self) -> nn.Conv2d:
        """The equivalent masked ``nn.Conv2d`` (a new module)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.values.device, dtype=self.values.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight().view_as(conv.weight))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def _out_features(self) -> int:
        return self.out_channels

    def _in_features_flat(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def _unfolded_indices(self) -> torch.Tensor:
        """Indices into the full unfolded fan-in (all groups), ``(n_active, k)``."""
        if self.groups == 1:
            return self.indices
        group = self.active_rows // (self.out_channels // self.groups)  # (n_active,)
        return self.indices.long() + (group * self._in_features_flat()).unsqueeze(1)  # (n_active, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        exporting = torch.compiler.is_exporting()
        autocast = torch.is_autocast_enabled(x.device.type)
        if not torch.is_grad_enabled() and not autocast and not exporting:
            y = self._inference(x)
            if y is not None:
                return y
        training = torch.is_grad_enabled() and not autocast and not exporting
        if training and self.padding_mode == "zeros":
            # Training: the unfold route would save the kh*kw-times-larger im2col matrix for backward;
            # this function saves only the input and pads it itself (see conv_function).
            y = condensed_conv2d(x, self.values, self.indices, self.active_rows, self.out_channels,
                                 self.kernel_size, self.stride, self.dilation, self.groups,
                                 padding=self._pad)  # (N, out, H_out, W_out)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        if any(self._pad):
            x = F.pad(x, self._pad, mode=_PAD_MODES[self.padding_mode])
        if exporting and export_layout() == "matmul":  # ScatterElements + Conv (srigl.condensed.exported)
            return scatter_conv2d(x, self.values, self.indices, self.active_rows, self.out_channels,
                                  self.kernel_size, self.stride, self.dilation, self.groups, self.bias)
        if training:
            y = condensed_conv2d(x, self.values, self.indices, self.active_rows, self.out_channels,
                                 self.kernel_size, self.stride, self.dilation, self.groups)  # (N, out, H_out, W_out)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        n, _, height, width = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        h_out = (height - dh * (kh - 1) - 1) // sh + 1
        w_out = (width - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (N, C*kh*kw, L)
        y = self._matmul(cols.transpose(1, 2), self._unfolded_indices())  # (N, L, out)
        return y.transpose(1, 2).reshape(n, self.out_channels, h_out, w_out)  # (N, out, H_out, W_out)

    def _inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """The convolution straight from the C++ pixel-lane kernel (:func:`srigl.kernels.cpu.conv_pixels`)
        in float32/float64, or the dense route (:func:`srigl.kernels.dense_route.dense_conv2d`) in bf16;
        None to take the im2col route (another device or dtype, or the C++ kernel unavailable).

        The kernel reads the weights in their stored layout and ``x`` in NCHW, pads with zeros on the
        fly, adds the bias and writes NCHW, so there is no per-call conversion of the weights and no
        im2col tensor; other padding modes are applied with ``F.pad`` first.
        """
        params, buffers = self._parameters, self._buffers
        values = params["values"]
        if not (x.is_cpu and x.dtype is values.dtype and x.dtype in _CONV_INFERENCE_DTYPES and values.is_cpu):
            return None
        # Traced code reads the backend through _traced_backend, which prepares it outside the graph
        # and lets dynamo guard on the choice.
        backend = _traced_backend(None, x) if _is_dynamo_compiling() else _cached_backend("cpu", x.dtype)
        if backend != "cpp":
            return None
        padding = self._pad
        if x.dtype is torch.bfloat16:
            # No bf16 pixel kernel: the filters densified for this call and oneDNN's convolution, which
            # beats the fan-in product over an im2col matrix (results/dense_route.md).
            left, right, top, bottom = padding
            if self.padding_mode != "zeros" or left != right or top != bottom:
                x, padding = F.pad(x, padding, mode=_PAD_MODES[self.padding_mode]), (0, 0, 0, 0)
            return dense_conv2d(x, values, buffers["indices"], buffers["active_rows"], params["bias"],
                                self.out_channels, self.kernel_size, self.stride, (padding[2], padding[0]),
                                self.dilation, self.groups)  # (N, out, H_out, W_out)
        if self.padding_mode != "zeros" and any(padding):
            x, padding = F.pad(x, padding, mode=_PAD_MODES[self.padding_mode]), (0, 0, 0, 0)
        return cpu.conv_pixels(x.contiguous(), values, buffers["indices"], buffers["active_rows"], params["bias"],
                               self.out_channels, self.kernel_size, self.stride, self.dilation, self.groups,
                               padding=padding)  # (N, out, H_out, W_out)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, fan_in={self.fan_in}, "
            f"n_active={self.n_active}, bias={self.bias is not None}"
        )
