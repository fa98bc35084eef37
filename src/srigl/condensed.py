"""Condensed constant fan-in layers, and :func:`condense` to turn a trained sparse model into them.

A constant fan-in mask gives every active output neuron exactly ``k`` incoming weights, so a layer
can be stored as ``values`` and ``indices`` of shape ``(n_active, k)``: row ``i`` holds the weights
of output neuron ``active_rows[i]`` and the fan-in positions they read. Neurons with no active weight
(*ablated*) are not stored; they output exactly their bias, so a condensed layer computes what the
masked dense layer computes.

* :func:`condense_tensor` is the one place where ``(weight, mask)`` becomes that triple and where
  constant fan-in is checked.
* Every condensed layer is a ``from_dense`` classmethod over it, registered by dense module type
  with :func:`register_condenser` (:data:`CONDENSERS`).
* :func:`condense` copies a model, removes ablated neurons together with the next layer's matching
  inputs where the graph allows it, swaps every constant fan-in layer for its condensed twin and
  returns a plain-dict report.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Any, Callable, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from srigl.errors import InvalidConfigError, NotConstantFanInError, SriglError
from srigl.kernels import (
    WINDOW_MAX_BATCH,
    cpu_inference_ops,
    fanin_matmul,
    fanin_matmul_rows,
    index_dtype_for,
    place_active_rows,
    validate_indices_once,
    window_layout,
)
from srigl.kernels import cpu as _cpu
from srigl.kernels.cpu import FORWARD_GATHER_MAX_BATCH as _GATHER_MAX_BATCH
from srigl.structures import fan_in_counts

__all__ = [
    "CONDENSERS",
    "CondensedConv2d",
    "CondensedLinear",
    "CondensedMultiheadAttention",
    "CondensedTensor",
    "MaskError",
    "condense",
    "condense_tensor",
    "constant_fan_in",
    "masked_dense_twin",
    "register_condenser",
    "why_attention_not_condensable",
]


class MaskError(SriglError, ValueError):
    """A mask that does not fit its weight (shape, dtype, name) or that the weight does not obey."""


# ---------------------------------------------------------------------------------------------------
# (weight, mask) -> (active_rows, indices, values): the one place a layer is condensed.


@dataclasses.dataclass(frozen=True)
class CondensedTensor:
    """A constant fan-in weight stored as the active weights of its active rows.

    Attributes:
        active_rows: ``(n_active,)`` int64, ascending: the output neurons with any active weight.
        indices: ``(n_active, fan_in)``, ascending along each row: positions in the flattened fan-in
            (``in_features`` for a Linear, ``in_channels / groups * kh * kw`` for a Conv2d).
        values: ``(n_active, fan_in)``: the weights at those positions.
        fan_in: ``k``, active weights per active row.
        out_features: rows of the dense weight.
        in_features_flat: columns of the dense weight viewed as ``(out, fan_in_flat)``.
    """

    active_rows: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    fan_in: int
    out_features: int
    in_features_flat: int

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features_flat)`` weight, zero outside the mask."""
        return _scatter_rows(self.values, self.indices, self.active_rows, self.out_features, self.in_features_flat)


def _scatter_rows(values, indices, active_rows, out_features: int, in_features: int) -> torch.Tensor:
    rows = values.new_zeros(values.shape[0], in_features).scatter_(1, indices.long(), values)  # (n_active, in)
    return values.new_zeros(out_features, in_features).index_copy_(0, active_rows, rows)  # (out, in)


def constant_fan_in(mask: torch.Tensor, name: str = "weight") -> int:
    """The number of active weights shared by every active row of ``mask`` (0 if none is active).

    Args:
        mask: bool ``(out, *fan_in_dims)``.
        name: the tensor's name, for the error message.

    Raises:
        NotConstantFanInError: active rows hold different numbers of active weights. The message
            (and the ``counts`` attribute, ``{fan_in: n_rows}``) lists every distinct count.
    """
    counts = fan_in_counts(mask)  # (out,)
    fan_ins, n_rows = torch.unique(counts[counts > 0], return_counts=True)
    if fan_ins.numel() > 1:
        by_count = dict(zip(fan_ins.tolist(), n_rows.tolist()))
        listed = ", ".join(f"{rows} row(s) with {k}" for k, rows in by_count.items())
        error = NotConstantFanInError(
            f"{name}: active rows do not share one fan-in: {listed} active weights "
            f"(and {int((counts == 0).sum())} ablated rows with 0)"
        )
        error.counts = by_count
        raise error
    return int(fan_ins[0]) if fan_ins.numel() else 0


def _check_mask(weight: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if mask.dtype != torch.bool:
        raise MaskError(f"{name}: mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise MaskError(f"{name}: mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    # The condensed layer drops everything outside the mask; a nonzero there would silently change
    # what the model computes, so it is an error, not a rounding detail.
    n_outside = int(torch.count_nonzero(weight.detach().masked_fill(mask, 0)))
    if n_outside:
        raise MaskError(
            f"{name}: {n_outside} weights are nonzero where the mask is False "
            f"(expected the parameter to be exactly zero outside its mask)"
        )


def condense_tensor(weight: torch.Tensor, mask: torch.Tensor, *, name: str = "weight") -> CondensedTensor:
    """Condense a constant fan-in ``weight`` to ``(active_rows, indices, values)``.

    Args:
        weight: ``(out, *fan_in_dims)``; zero wherever ``mask`` is False.
        mask: bool, same shape; the truth about which weights are active (an active weight may be 0).
        name: the tensor's name, for error messages.

    Returns:
        The :class:`CondensedTensor`; indices use the smallest integer dtype that holds the fan-in.

    Raises:
        MaskError: wrong mask dtype or shape, or a nonzero weight outside the mask.
        NotConstantFanInError: active rows with different numbers of active weights.
    """
    _check_mask(weight, mask, name)
    out_features = weight.shape[0]
    fan_in = constant_fan_in(mask, name)
    weight_2d = weight.detach().reshape(out_features, -1)  # (out, in_flat)
    mask_2d = mask.reshape(out_features, -1)  # (out, in_flat)
    in_features_flat = weight_2d.shape[1]
    active_rows = mask_2d.any(dim=1).nonzero().squeeze(1)  # (n_active,)
    # nonzero() lists each row's active columns in ascending order, and every active row has exactly
    # fan_in of them, so the flat column list reshapes to sorted rows: no sort, no loop over neurons.
    columns = mask_2d[active_rows].nonzero()[:, 1].reshape(active_rows.numel(), fan_in)  # (n_active, k)
    values = weight_2d[active_rows].gather(1, columns)  # (n_active, k)
    return CondensedTensor(
        active_rows=active_rows,
        indices=columns.to(index_dtype_for(in_features_flat)),
        values=values,
        fan_in=fan_in,
        out_features=out_features,
        in_features_flat=in_features_flat,
    )


# ---------------------------------------------------------------------------------------------------
# Condensed layers and their registry.

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
    buffered = getattr(module, "weight_mask", None)
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

    def dense_weight(self) -> torch.Tensor:
        """The dense weight viewed as ``(out, fan_in_flat)``, zero outside the mask (detached)."""
        return _scatter_rows(
            self.values.detach(), self.indices, self.active_rows, self._out_features(), self._in_features_flat()
        )

    def dense_mask(self) -> torch.Tensor:
        """The bool ``(out, fan_in_flat)`` mask this layer was condensed from."""
        ones = torch.ones_like(self.values, dtype=torch.bool)
        return _scatter_rows(ones, self.indices, self.active_rows, self._out_features(), self._in_features_flat())

    def _matmul(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """``y (..., out)`` from ``x (..., in)`` (with this layer's ``indices`` unless given); ablated
        rows output exactly their bias."""
        # Read from the registries, not through nn.Module.__getattr__, which costs ~0.4 us per
        # parameter or buffer: 10 % of a 90 %-sparse 3072 -> 768 layer at batch 1.
        params, buffers = self._parameters, self._buffers
        values, bias, rows = params["values"], params.get("bias"), buffers["active_rows"]
        if indices is None:
            indices = buffers["indices"]
        out_features = self._out_features()
        if values.shape[0] == out_features:
            return _fanin_matmul(x, values, indices, bias)
        if torch.compiler.is_exporting():
            return place_active_rows(_gather_matmul, x, values, indices, rows, out_features, bias)
        return fanin_matmul_rows(x, values, indices, rows, out_features, bias)

    def _out_features(self) -> int:  # out_features / out_channels, ablated neurons included
        raise NotImplementedError

    def _in_features_flat(self) -> int:
        raise NotImplementedError


def _gather_matmul(x, values, indices, bias):
    """The fan-in matmul as one gather -> multiply -> sum in plain aten ops, for any batch shape."""
    # ONNX Gather takes int32/int64 indices only.
    indices = indices.long()
    gathered = x.index_select(-1, indices.reshape(-1)).unflatten(-1, indices.shape)  # (..., out, k)
    y = (gathered * values).sum(-1)  # (..., out)
    return y if bias is None else y + bias


# True only while dynamo traces: compiled graphs take the general (traceable) path.
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling


def _fanin_matmul(x, values, indices, bias):
    if torch.compiler.is_exporting():
        # torch.export (under the dynamo ONNX exporter too) cannot trace srigl.kernels: an
        # autograd.Function around a JIT-built operator, with data-dependent index checks and a
        # batch-size-dependent route. The same product in aten ops lowers to ONNX Gather/Mul/ReduceSum
        # and keeps the batch dimension symbolic.
        return _gather_matmul(x, values, indices, bias)
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
        layer = cls(
            linear.in_features,
            linear.out_features,
            condensed.fan_in,
            condensed.active_rows.numel(),
            bias=linear.bias is not None,
            index_dtype=condensed.indices.dtype,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer._fill(condensed, linear.bias)
        return layer

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

    #: Whether CPU inference may keep a window-layout copy of the weights (see :meth:`_windows`).
    #: It is 1.15x / 1.4x / 1.75x the bytes of ``values`` + int16 ``indices`` at 80 / 90 / 95 %
    #: sparsity (not kept at all when sparser than ~98 %, where it stops paying); set this to False
    #: (on the class or one layer) to trade that memory for the slower gather route at small batches.
    window_inference: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
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

        Inference at batch 1 is dominated by per-call overhead (the 90 %-sparse 3072 -> 768 product
        takes ~15 us in the window layout, fanin_matmul's checks ~2 us more). The module owns values,
        indices and bias, so only the input needs checking here; anything unexpected (another device
        or dtype, a non-contiguous operand, a traced graph) goes to the general path, which names
        the problem.
        """
        params, buffers = self._parameters, self._buffers
        values, bias, indices = params["values"], params["bias"], buffers["indices"]
        if not (x.is_cpu and x.dtype is values.dtype and x.shape[-1] == self.in_features and x.is_contiguous()) or (
            _is_dynamo_compiling() or indices.dtype is torch.int64 or x.dim() < 2
        ):
            return None
        x2d = x if x.dim() == 2 else x.view(-1, self.in_features)  # (batch, in): contiguous, so a view
        batch = x2d.shape[0]
        ablated = values.shape[0] != self.out_features
        rows = buffers["active_rows"] if ablated else None
        try:
            # No index validation on this route: packing checks every index, and the cache is
            # rebuilt whenever the indices change.
            windows = self._windows(values, indices) if batch <= WINDOW_MAX_BATCH else None
            if windows is not None and batch <= windows[1]:
                y = windows[2](x2d, windows[0], bias, rows, self.out_features)
            else:
                ops = cpu_inference_ops(values.dtype)
                if ops is None or not values.is_cpu:
                    return None
                validate_indices_once(indices, self.in_features)
                if not ablated:
                    y = ops[0](x2d, values, indices, bias, _GATHER_MAX_BATCH, 0, 0)
                else:
                    y = ops[1](x2d, values, indices, bias, rows, self.out_features, _GATHER_MAX_BATCH, 0, 0)
        except RuntimeError:  # e.g. operands made non-contiguous from outside: let the general path say
            return None
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def _windows(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, int, Any] | None:
        """``(packed, max_batch, forward_windows)``: :func:`srigl.kernels.window_layout` of this
        layer and the operator that runs it, built on first use and cached; None where the layout
        is unavailable or :attr:`window_inference` is off.

        The cache is keyed on the identity, storage and version counter of ``values`` and
        ``indices``, so any change to the weights (an optimizer step, ``load_state_dict``, a new
        Parameter, ``.data`` swapped for a new tensor) repacks on the next call. Tensors without a
        version counter (created under ``torch.inference_mode``) cannot be tracked and are not packed.
        """
        if not self.window_inference:
            return None
        try:
            state = (values.data_ptr(), values._version, indices.data_ptr(), indices._version)
        except RuntimeError:  # inference tensors have no version counter
            return None
        cached = self.__dict__.get("_window_cache")
        # Identity through weak references as well: a freed tensor's address may be reused by a new
        # one whose version counter also starts at 0.
        if cached is None or cached[0][0]() is not values or cached[0][1]() is not indices or cached[0][2] != state:
            layout = window_layout(values, indices, self.in_features)
            key = (weakref.ref(values), weakref.ref(indices), state)
            cached = (key, None if layout is None else (*layout, _cpu.window_ops()[1]))
            self.__dict__["_window_cache"] = cached
        return cached[1]

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


@register_condenser(nn.Conv2d)
class CondensedConv2d(_CondensedLayer):
    """A constant fan-in ``nn.Conv2d``: im2col (``F.unfold``) followed by the fan-in matmul.

    Each filter reads ``k`` of its group's ``in_channels / groups * kh * kw`` inputs; ``indices`` are
    positions in that per-group fan-in, in the weight's own ``(c, kh, kw)`` order. Because
    ``F.unfold`` lays out its columns in the same order, group ``g``'s fan-in is the column block
    ``g * fan_in_flat ...``, so every group (grouped and depthwise convolutions included) runs in one
    fan-in matmul over the unfolded input with offset indices. Padding of every mode is applied with
    ``F.pad`` first, which also covers ``padding='same'``.

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
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            condensed.fan_in,
            condensed.active_rows.numel(),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            index_dtype=condensed.indices.dtype,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        layer._fill(condensed, conv.bias)
        return layer

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
        if any(self._pad):
            x = F.pad(x, self._pad, mode=_PAD_MODES[self.padding_mode])
        n, _, height, width = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        h_out = (height - dh * (kh - 1) - 1) // sh + 1
        w_out = (width - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (N, C*kh*kw, L)
        y = self._matmul(cols.transpose(1, 2), self._unfolded_indices())  # (N, L, out)
        return y.transpose(1, 2).reshape(n, self.out_channels, h_out, w_out)  # (N, out, H_out, W_out)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, fan_in={self.fan_in}, "
            f"n_active={self.n_active}, bias={self.bias is not None}"
        )


# ---------------------------------------------------------------------------------------------------
# Attention: nn.MultiheadAttention with condensed projections.


def masked_dense_twin(module: nn.Module, dense_type: type[nn.Module] | None = None) -> nn.Module:
    """The dense twin of a condensed Linear/Conv2d (a new ``dense_type``, default its own dense type),
    zero outside its ``weight_mask`` buffer; the bias Parameter is shared."""
    dense = module.to_dense()
    if dense_type is not None and type(dense) is not dense_type:
        converted = dense_type(dense.in_features, dense.out_features, bias=dense.bias is not None, device="meta")
        converted.weight = dense.weight
        converted.bias = dense.bias
        dense = converted
    if module.bias is not None:
        dense.bias = module.bias
    dense.weight.requires_grad_(module.values.requires_grad)
    dense.register_buffer("weight_mask", module.dense_mask().view_as(dense.weight), persistent=False)
    return dense


def _condensed_projection(linear: nn.Linear, mask: torch.Tensor, name: str) -> CondensedLinear:
    """An attention projection condensed under ``mask``, sharing the original bias Parameter."""
    condensed = CondensedLinear.from_dense(linear, mask, name=name)
    if linear.bias is not None:
        condensed.bias = linear.bias
    return condensed


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask: a bool mask (True = not allowed) becomes 0 / -inf, a float mask is kept."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class CondensedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose two projections are modules, so that each can be condensed.

    ``in_proj`` maps ``E -> 3E`` (the rows of ``in_proj_weight``: q, then k, then v) and ``out_proj``
    ``E -> E``. Each is a :class:`CondensedLinear` when its tensor is sparse with constant fan-in,
    else an ``nn.Linear`` holding the original Parameters. :func:`condense` uses it for inference and
    :class:`srigl.compact.CompactSRigL` (as ``CompactMultiheadAttention``) for compact training. ``forward`` computes what
    ``nn.MultiheadAttention.forward`` computes, with the same arguments: batch-first or not,
    unbatched inputs, ``key_padding_mask`` and ``attn_mask`` (bool or float), ``need_weights``,
    ``average_attn_weights``, ``is_causal``. Self-attention (``query is key is value``) projects
    once; otherwise each input is projected by the whole ``in_proj`` and its third is kept.

    Only attentions with ``kdim == vdim == embed_dim``, no ``bias_k``/``bias_v`` and no
    ``add_zero_attn`` are converted (see :func:`_why_not_compact`).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = False,
                 in_proj: nn.Module | None = None, out_proj: nn.Module | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise InvalidConfigError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        # None: the projections are added later with add_module (a model loaded from a file).
        if in_proj is not None:
            self.in_proj = in_proj
        if out_proj is not None:
            self.out_proj = out_proj

    @classmethod
    def from_masked(
        cls,
        mha: nn.MultiheadAttention,
        masks: Mapping[str, torch.Tensor],
        name: str = "attn",
        condense_projection: Callable[[nn.Linear, torch.Tensor, str], nn.Module] | None = None,
    ) -> "CondensedMultiheadAttention":
        """Convert ``mha``; ``masks`` maps ``"in_proj_weight"`` and/or ``"out_proj.weight"`` to masks.

        Both projections keep the original bias Parameters; a projection without a mask keeps its
        original weight Parameter too.

        Args:
            mha: the attention; ``kdim == vdim == embed_dim``, no ``bias_k``/``bias_v``, no
                ``add_zero_attn``.
            masks: constant fan-in masks shaped like the projections' weights.
            name: the attention's module name, for error messages.
            condense_projection: ``(linear, mask, tensor name) -> module``; by default
                :meth:`CondensedLinear.from_dense` sharing the original bias Parameter.
        """
        condense_projection = condense_projection or _condensed_projection
        embed_dim = mha.embed_dim
        # A Linear view of in_proj_weight: created on the meta device, then given the real Parameters.
        in_linear = nn.Linear(embed_dim, 3 * embed_dim, bias=mha.in_proj_bias is not None, device="meta")
        in_linear.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            in_linear.bias = mha.in_proj_bias
        in_proj, out_proj = in_linear, mha.out_proj
        if "in_proj_weight" in masks:
            in_proj = condense_projection(in_linear, masks["in_proj_weight"], f"{name}.in_proj_weight")
        if "out_proj.weight" in masks:
            out_proj = condense_projection(mha.out_proj, masks["out_proj.weight"], f"{name}.out_proj.weight")
        return cls(embed_dim, mha.num_heads, mha.dropout, mha.batch_first, in_proj, out_proj)

    def to_dense(self) -> tuple[nn.MultiheadAttention, dict[str, torch.Tensor]]:
        """The equivalent ``nn.MultiheadAttention`` (biases and dense weights shared) and the masks
        of its compact projections, by local name (``"in_proj_weight"``, ``"out_proj.weight"``)."""
        in_proj, out_proj = self.in_proj, self.out_proj
        reference = in_proj.values if isinstance(in_proj, CondensedLinear) else in_proj.weight
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=in_proj.bias is not None,
            batch_first=self.batch_first, device="meta", dtype=reference.dtype,
        )
        masks: dict[str, torch.Tensor] = {}
        if isinstance(in_proj, CondensedLinear):
            mha.in_proj_weight = nn.Parameter(in_proj.dense_weight(), requires_grad=in_proj.values.requires_grad)
            masks["in_proj_weight"] = in_proj.dense_mask()
        else:
            mha.in_proj_weight = in_proj.weight
        if in_proj.bias is not None:
            mha.in_proj_bias = in_proj.bias
        if isinstance(out_proj, CondensedLinear):
            mha.out_proj = masked_dense_twin(out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
            masks["out_proj.weight"] = mha.out_proj.weight_mask
        else:
            mha.out_proj = out_proj
        if "in_proj_weight" in masks:
            mha.register_buffer("in_proj_weight_mask", masks["in_proj_weight"], persistent=False)
        return mha, masks

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
        """As ``nn.MultiheadAttention.forward``: ``(output, weights or None)``."""
        if is_causal and attn_mask is None:
            raise InvalidConfigError("is_causal is a hint that attn_mask is causal: pass attn_mask too")
        batched = query.dim() == 3

        def batch_first(t: torch.Tensor) -> torch.Tensor:  # -> (B, L, E)
            if not batched:
                return t.unsqueeze(0)
            return t if self.batch_first else t.transpose(0, 1)

        embed_dim, heads, head_dim = self.embed_dim, self.num_heads, self.head_dim
        if query is key and key is value:
            q, k, v = self.in_proj(batch_first(query)).chunk(3, dim=-1)  # (B, L, 3E) -> 3 x (B, L, E)
        else:
            q = self.in_proj(batch_first(query))[..., :embed_dim]  # (B, L, E)
            projected_key = self.in_proj(batch_first(key))  # (B, S, 3E)
            k = projected_key[..., embed_dim : 2 * embed_dim]
            v = (projected_key if key is value else self.in_proj(batch_first(value)))[..., 2 * embed_dim :]
        batch, length, source = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)  # (B, H, S, hd)
        v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)  # (B, H, S, hd)

        # As nn.MultiheadAttention: is_causal replaces the mask only when nothing else must be merged in.
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None
        if attn_mask is not None and not causal:
            mask = _float_mask(attn_mask, q.dtype)
            # (L, S) or (1, L, S) -> (1, 1, L, S); (B * H, L, S) -> (B, H, L, S)
            mask = mask.reshape(1, 1, length, source) if mask.dim() == 2 or mask.shape[0] == 1 else \
                mask.reshape(batch, heads, length, source)
        if key_padding_mask is not None:
            padding = _float_mask(key_padding_mask, q.dtype).reshape(batch, 1, 1, source)  # (B, 1, 1, S)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, L, S)
            weights = (scores if mask is None else scores + mask).softmax(dim=-1)
            out = F.dropout(weights, dropout) @ v if dropout > 0 else weights @ v  # (B, H, L, hd)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (B, L, S)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, embed_dim))  # (B, H, L, hd) -> (B, L, E)
        if not batched:
            out = out.squeeze(0)  # (L, E)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)
        return out, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )



# ---------------------------------------------------------------------------------------------------
# condense(model): masks -> removal of ablated neurons across layers -> condensed layers -> report.


def _fqn(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _collect_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """``{param FQN: mask}`` from ``masks``, else the ``<param>_mask`` buffers, else ``weight != 0``."""
    params = dict(model.named_parameters())
    found: dict[str, torch.Tensor] = {}
    if masks is not None:
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise MaskError(f"masks name {len(unknown)} tensors the model does not have: {unknown[:5]}")
        found.update(masks)
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            fqn = _fqn(module_name, param_name)
            buffered = module._buffers.get(f"{param_name}_mask")
            if fqn not in found and buffered is not None:
                found[fqn] = buffered
    notes = []
    if masks is not None:
        source = "masks"
    elif found:
        source = "buffers"
    else:
        source = "weight != 0"
        notes.append(
            "no masks given and no <param>_mask buffers found: each condensable layer's mask is taken as "
            "weight != 0 (an active weight that is exactly 0 counts as pruned)"
        )
        for module_name, module in model.named_modules():
            if type(module) in CONDENSERS:
                found[_fqn(module_name, "weight")] = module.weight.detach() != 0
    for fqn, mask in found.items():
        _check_mask(params[fqn], mask, fqn)
    return found, source, notes


@dataclasses.dataclass
class _Layer:
    """A module of a registered type, its mask (None: not sparse) and what condense decides for it."""

    name: str
    module: nn.Module
    mask: torch.Tensor | None
    fan_in: int | None = None  # constant fan-in when it will be condensed
    reason: str | None = None  # why it stays dense
    removed: int = 0  # ablated neurons removed together with the next layer's inputs
    padded: int = 0  # zero weights added to keep its fan-in constant after inputs were removed
    kept_ablated_reason: str | None = None


def _plan(name: str, module: nn.Module, mask: torch.Tensor | None) -> _Layer:
    layer = _Layer(name, module, mask)
    if mask is None:
        layer.reason = "no mask: the layer is not sparse"
        return layer
    try:
        fan_in = constant_fan_in(mask, _fqn(name, "weight"))
    except NotConstantFanInError as error:
        layer.reason = f"not constant fan-in ({error})"
        return layer
    if fan_in == mask[0].numel():
        layer.reason = "every active neuron keeps its whole fan-in: a dense layer is faster"
        return layer
    layer.fan_in = fan_in
    return layer


# Channel-wise modules through which a channel that is the same constant for every sample (and
# pixel) stays a constant, in eval mode. Elementwise ones map the constant; the others pass it on.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
)
_ELEMENTWISE_FUNCTIONS = (torch.relu, F.relu, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.leaky_relu, F.hardswish)
_ELEMENTWISE_METHODS = ("relu", "sigmoid", "tanh")
_IDENTITY_ON_CONSTANTS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
# Max pooling pads with -inf and adaptive pooling has no padding, so a constant plane stays constant.
_SPATIAL_POOLS = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclasses.dataclass
class _Chain:
    """``producer -> transparent steps -> consumer`` where only the consumer reads the producer."""

    producer: str
    consumer: str
    steps: list  # fx nodes between them, in order
    flattened: bool  # a flatten(1) turns conv channels into Linear inputs


def _flatten_start(node: torch.fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """``start_dim`` when ``node`` flattens dims ``start_dim..-1``, else None."""
    if node.op == "call_module" and type(modules[node.target]) is nn.Flatten:
        flatten = modules[node.target]
        return flatten.start_dim if flatten.end_dim == -1 else None
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method" and node.target == "flatten"):
        positional = node.args[1:]  # torch.flatten(input, start_dim=0, end_dim=-1)
        start = node.kwargs.get("start_dim", positional[0] if positional else 0)
        end = node.kwargs.get("end_dim", positional[1] if len(positional) > 1 else -1)
        return start if end == -1 else None
    return None


def _find_chain(node: torch.fx.Node, modules, calls: dict[str, int], layers: dict[str, _Layer]) -> _Chain | str:
    """The chain from producer ``node`` to the layer reading it, or a reason why there is none."""
    producer = modules[node.target]
    is_conv = type(producer) is nn.Conv2d
    steps: list[torch.fx.Node] = []
    flattened = False
    current = node
    while True:
        if len(current.users) != 1:
            return f"{current.name} feeds {len(current.users)} operations"
        (user,) = current.users
        if user.op == "output":
            return "it is a model output"
        other_args = [*user.args[1:], *user.kwargs.values()]
        if not user.args or user.args[0] is not current or any(isinstance(a, torch.fx.Node) for a in other_args):
            return f"its output reaches {user.name}, which is not a channel-wise step"
        module = modules.get(user.target) if user.op == "call_module" else None
        # Layers and BatchNorms get sliced, so they must serve this chain alone; a stateless
        # step (a shared MaxPool, say) may be called anywhere else too.
        sliced = user.target in layers or type(module) in (nn.BatchNorm1d, nn.BatchNorm2d)
        if module is not None and sliced and calls[user.target] != 1:
            return f"{user.target} is called {calls[user.target]} times"
        if user.op == "call_module" and user.target in layers:
            expected = (nn.Linear,) if (flattened or not is_conv) else (nn.Conv2d,)
            if type(module) not in expected or getattr(module, "groups", 1) != 1:
                return f"{user.target} ({type(module).__name__}) cannot drop the matching inputs"
            return _Chain(node.target, user.target, steps, flattened)
        start = _flatten_start(user, modules)
        if start is not None:
            if not is_conv or flattened or start != 1:
                return f"{user.name} is a flatten that does not map channels to features"
            flattened = True
        elif module is not None and type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            wanted = nn.BatchNorm2d if is_conv else nn.BatchNorm1d
            if type(module) is not wanted or flattened or module.running_mean is None:
                return f"{user.target} is not a per-channel affine map of this output in eval mode"
        elif module is not None and type(module) in _SPATIAL_POOLS:
            if not is_conv or flattened:
                return f"{user.target} pools something other than conv channels"
        elif not (
            (module is not None and type(module) in _ELEMENTWISE_MODULES + _IDENTITY_ON_CONSTANTS)
            or (user.op == "call_function" and user.target in _ELEMENTWISE_FUNCTIONS)
            or (user.op == "call_method" and user.target in _ELEMENTWISE_METHODS)
        ):
            return f"its output reaches {user.name}, which is not a channel-wise step"
        steps.append(user)
        current = user


def _constants(chain: _Chain, removed: torch.Tensor, modules) -> torch.Tensor:
    """What each removed (ablated) neuron feeds the consumer: its bias through the chain, ``(n_removed,)``."""
    producer = modules[chain.producer]
    weight = producer.weight
    bias = producer.bias[removed] if producer.bias is not None else weight.new_zeros(removed.numel())
    value = bias.detach().unsqueeze(0)  # (1, n_removed): one sample, one channel per removed neuron
    for node in chain.steps:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            stats = [t[removed] if t is not None else None for t in (module.running_mean, module.running_var, module.weight, module.bias)]
            value = F.batch_norm(value, *stats, training=False, eps=module.eps)
        elif module is not None and type(module) in _ELEMENTWISE_MODULES:
            value = module(value)
        elif node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            value = node.target(value, *node.args[1:], **node.kwargs)
        elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            value = getattr(value, node.target)()
        # Identity, dropout (eval), max/adaptive pooling and flatten keep a constant channel as is.
    return value.squeeze(0)


def _keep_rows(module: nn.Module, layer: _Layer | None, keep: torch.Tensor) -> None:
    """Drop the output neurons (Linear/Conv2d) or channels (BatchNorm) where ``keep`` is False."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(module, name, None)
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(tensor[keep].clone(), requires_grad=tensor.requires_grad))
            elif isinstance(tensor, torch.Tensor):
                setattr(module, name, tensor[keep].clone())
    n_kept = int(keep.sum())
    for size in ("out_features", "out_channels", "num_features"):
        if hasattr(module, size):
            setattr(module, size, n_kept)
    if layer is not None and layer.mask is not None:
        layer.mask = layer.mask[keep]
        _refresh_mask_buffer(module, layer.mask)


def _refresh_mask_buffer(module: nn.Module, mask: torch.Tensor) -> None:
    # A layer left dense keeps its (non-persistent) mask buffer, which must match the sliced weight.
    if isinstance(module._buffers.get("weight_mask"), torch.Tensor):
        module.weight_mask = mask


def _drop_inputs(consumer: nn.Module, layer: _Layer, keep_cols: torch.Tensor, fold: torch.Tensor) -> None:
    """Drop the consumer's inputs where ``keep_cols`` is False after adding ``fold`` to its bias."""
    with torch.no_grad():
        if bool(fold.any()):
            if consumer.bias is None:
                consumer.bias = nn.Parameter(fold.clone())
            else:
                consumer.bias.add_(fold)
        consumer.weight = nn.Parameter(consumer.weight[:, keep_cols].clone(), requires_grad=consumer.weight.requires_grad)
    n_kept = int(keep_cols.sum())
    if type(consumer) is nn.Linear:
        consumer.in_features = n_kept
    else:
        consumer.in_channels = n_kept
    if layer.mask is None:
        return
    mask = layer.mask
    was_active = mask.reshape(mask.shape[0], -1).any(dim=1)  # (out,)
    mask = mask[:, keep_cols]
    if layer.fan_in is not None:
        # Rows that lost active inputs get zero weights at their first inactive positions, so the
        # layer keeps one fan-in (and stays condensable). The weights there are exactly zero.
        mask_2d = mask.reshape(mask.shape[0], -1).clone()  # (out, in_flat)
        target = min(layer.fan_in, mask_2d.shape[1])
        layer.fan_in = target
        missing = (target - mask_2d.sum(dim=1)).clamp(min=0) * was_active  # (out,)
        inactive_rank = (~mask_2d).cumsum(dim=1)  # (out, in_flat): 1, 2, ... over inactive positions
        padding = ~mask_2d & (inactive_rank <= missing.unsqueeze(1))
        layer.padded += int(padding.sum())
        mask = (mask_2d | padding).view_as(mask)
    layer.mask = mask
    _refresh_mask_buffer(consumer, mask)


def _remove_ablated(model: nn.Module, layers: dict[str, _Layer], report: dict[str, Any]) -> None:
    """Remove ablated neurons of every producer whose output only reaches the next layer."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # any tracing failure just means: no removal
        report["notes"].append(f"torch.fx could not trace the model ({type(error).__name__}: {error}); no neuron removed")
        return
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        layer = layers.get(node.target) if node.op == "call_module" else None
        if layer is None or layer.mask is None:
            continue
        ablated = ~layer.mask.reshape(layer.mask.shape[0], -1).any(dim=1)  # (out,)
        if not bool(ablated.any()):
            continue
        producer = layer.module
        if calls[node.target] != 1 or getattr(producer, "groups", 1) != 1:
            layer.kept_ablated_reason = "the layer is called more than once or is a grouped convolution"
            continue
        chain = _find_chain(node, modules, calls, layers)
        if isinstance(chain, str):
            layer.kept_ablated_reason = chain
            continue
        consumer = layers[chain.consumer]
        removed = ablated.nonzero().squeeze(1)  # (n_ablated,)
        constants = _constants(chain, removed, modules)  # (n_ablated,)
        removable = torch.isfinite(constants)
        zero_padded = type(consumer.module) is nn.Conv2d and consumer.module.padding_mode == "zeros" and any(
            _pad_amounts(consumer.module.padding, consumer.module.kernel_size, consumer.module.dilation)
        )
        if zero_padded:
            # Zero padding reads 0 where the constant channel would read its constant, so only
            # channels whose constant is exactly 0 can go without changing border outputs.
            removable &= constants == 0
        removed, constants = removed[removable], constants[removable]
        if removed.numel() < int(ablated.sum()):
            layer.kept_ablated_reason = (
                f"{int(ablated.sum()) - removed.numel()} ablated neurons output a nonzero constant into "
                f"zero-padded {chain.consumer}, whose borders would change"
            )
        if removed.numel() == 0:
            continue
        weight = consumer.module.weight.detach()
        if consumer.mask is not None:
            weight = weight * consumer.mask
        n_producer = producer.weight.shape[0]
        if chain.flattened:
            # flatten(1) lays channel c out as inputs c*H*W ... (c+1)*H*W - 1.
            weight = weight.reshape(weight.shape[0], n_producer, -1)  # (out, C, H*W)
        per_neuron = weight[:, removed].reshape(weight.shape[0], removed.numel(), -1).sum(-1)  # (out, n_removed)
        fold = per_neuron @ constants.to(per_neuron.dtype)  # (out,)
        keep = torch.ones(n_producer, dtype=torch.bool, device=removed.device)
        keep[removed] = False
        keep_cols = keep.repeat_interleave(weight.shape[2]) if chain.flattened else keep
        _drop_inputs(consumer.module, consumer, keep_cols, fold)
        _keep_rows(producer, layer, keep)
        for step in chain.steps:
            if step.op == "call_module" and type(modules[step.target]) in (nn.BatchNorm1d, nn.BatchNorm2d):
                _keep_rows(modules[step.target], None, keep)
        layer.removed = removed.numel()
        report["removals"].append(
            {
                "producer": chain.producer,
                "consumer": chain.consumer,
                "through": [step.target if step.op == "call_module" else step.name for step in chain.steps],
                "neurons": removed.numel(),
                "folded_into_bias": bool(fold.any()),
            }
        )


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def condense(
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None = None,
    *,
    remove_ablated: bool = True,
    inplace: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Turn a trained constant fan-in model into condensed layers that compute the same outputs.

    Steps: find each layer's mask; where an ablated neuron's output only reaches the next layer
    (through channel-wise steps: activations, dropout, BatchNorm, max/adaptive pooling, flatten),
    remove it and the next layer's matching inputs, folding the constant it still emitted
    (``act(bias)``) into the next layer's bias; then swap every constant fan-in layer of a
    registered type (:data:`CONDENSERS`) for its condensed twin, and every ``nn.MultiheadAttention``
    with a constant fan-in projection for a :class:`CondensedMultiheadAttention` (its ablated q/k/v
    and output rows are kept: they fix the head layout and feed the residual stream). Layers that
    are not sparse, not constant fan-in, or of other types stay dense, as do attentions with
    kdim/vdim, bias_k or inside ``nn.Transformer*Layer`` (whose fast path reads raw tensors); the
    report says why. Outputs equal the masked dense model's in eval mode, up to float rounding.

    Args:
        model: the trained model; its parameters are exactly zero outside their masks.
        masks: ``{param FQN: bool mask}`` (e.g. ``"features.0.weight"``). If None, the
            ``<param>_mask`` buffers the sparsifier registers are used; a model with neither is
            read as ``mask = weight != 0`` (noted in the report).
        remove_ablated: remove ablated neurons across layers where the graph (``torch.fx``) allows.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        ``(condensed_model, report)``. ``report["layers"]`` maps each module name to ``kind``,
        ``reason`` (dense layers), ``shape_before``/``shape_after``, ``fan_in``, ``active_neurons``,
        ``ablated_neurons`` (still present), ``removed_neurons``, ``padded_weights``,
        ``params_before``/``params_after``; ``report["removals"]`` lists each cross-layer removal.

    Raises:
        MaskError: a mask names an unknown tensor, has the wrong shape or dtype, or the weight is
            nonzero outside it.
    """
    condensed_model = model if inplace else copy.deepcopy(model)
    masks_by_param, source, notes = _collect_masks(condensed_model, masks)
    report: dict[str, Any] = {
        "mask_source": source,
        "notes": notes,
        "params_before": _n_params(condensed_model),
        "layers": {},
        "removals": [],
    }
    layers: dict[str, _Layer] = {}
    before: dict[str, tuple[list[int], int]] = {}
    attentions: dict[str, tuple[nn.MultiheadAttention, dict[str, _Layer]]] = {}
    parents = {name: module for name, module in condensed_model.named_modules()}
    for name, module in condensed_model.named_modules():
        owned = [p for p, _ in module.named_parameters(recurse=False) if _fqn(name, p) in masks_by_param]
        if name.rpartition(".")[0] in attentions:
            continue  # an out_proj: planned, converted and reported with its attention
        if isinstance(module, nn.MultiheadAttention) and (owned or _fqn(name, "out_proj.weight") in masks_by_param):
            parent = parents.get(name.rpartition(".")[0]) if name else None
            why = why_attention_not_condensable(module, parent)
            plans = {} if why else _plan_attention(name, module, masks_by_param)
            if plans and any(plan.fan_in is not None for plan in plans.values()):
                attentions[name] = (module, plans)
                continue
            if not why:
                why = "; ".join(f"{local}: {plan.reason}" for local, plan in plans.items())
            report["layers"][name] = {
                "kind": "dense",
                "reason": why,
                "params_before": _n_params(module),
                "params_after": _n_params(module),
            }
            continue
        if type(module) in CONDENSERS:
            layers[name] = _plan(name, module, masks_by_param.get(_fqn(name, "weight")))
            before[name] = (list(module.weight.shape), _n_params(module))
        elif owned:
            kind = "nn.MultiheadAttention" if isinstance(module, nn.MultiheadAttention) else type(module).__name__
            report["layers"][name] = {
                "kind": "dense",
                "reason": f"no condenser for {kind} (masked tensors {owned} stay dense and zero outside their masks)",
                "params_before": _n_params(module),
                "params_after": _n_params(module),
            }
    if remove_ablated:
        _remove_ablated(condensed_model, layers, report)
    for name, layer in layers.items():
        module = layer.module
        if layer.fan_in is not None:
            module = CONDENSERS[type(module)].from_dense(module, layer.mask, name=_fqn(name, "weight"))
            if name:
                condensed_model.set_submodule(name, module)
            else:
                condensed_model = module
        n_ablated = int((~layer.mask.reshape(layer.mask.shape[0], -1).any(dim=1)).sum()) if layer.mask is not None else 0
        shape_before, params_before = before[name]
        entry = {
            "kind": type(module).__name__ if layer.fan_in is not None else "dense",
            "shape_before": shape_before,
            "shape_after": list(layer.module.weight.shape),
            "fan_in": layer.fan_in,
            "active_neurons": layer.module.weight.shape[0] - n_ablated,
            "ablated_neurons": n_ablated,
            "removed_neurons": layer.removed,
            "padded_weights": layer.padded,
            "params_before": params_before,
            "params_after": _n_params(module),
        }
        if layer.reason is not None:
            entry["reason"] = layer.reason
        if n_ablated and layer.kept_ablated_reason is not None:
            entry["ablated_kept_because"] = layer.kept_ablated_reason
        report["layers"][name] = entry
    for name, (mha, plans) in attentions.items():
        params_before = _n_params(mha)
        masks = {local: plan.mask for local, plan in plans.items() if plan.fan_in is not None}
        attention = CondensedMultiheadAttention.from_masked(mha, masks, name)
        condensed_model.set_submodule(name, attention)
        report["layers"][name] = {
            "kind": "CondensedMultiheadAttention",
            "params_before": params_before,
            "params_after": _n_params(attention),
        }
        for local, plan in plans.items():
            child = "in_proj" if local == "in_proj_weight" else "out_proj"
            projection = attention.get_submodule(child)
            if plan.fan_in is None:
                report["layers"][f"{name}.{child}"] = {"kind": "dense", "reason": plan.reason}
                continue
            n_ablated = int((~plan.mask.any(dim=1)).sum())
            report["layers"][f"{name}.{child}"] = {
                "kind": "CondensedLinear",
                "shape_before": list(plan.mask.shape),
                "shape_after": list(plan.mask.shape),
                "fan_in": plan.fan_in,
                "active_neurons": plan.mask.shape[0] - n_ablated,
                "ablated_neurons": n_ablated,
                "removed_neurons": 0,
                "padded_weights": 0,
                "params_after": _n_params(projection),
                # q/k/v rows set the head layout and out_proj rows feed the residual stream.
                **({"ablated_kept_because": "attention projections keep their width"} if n_ablated else {}),
            }
    report["params_after"] = _n_params(condensed_model)
    return condensed_model, report


def why_attention_not_condensable(mha: nn.MultiheadAttention, parent: nn.Module | None) -> str | None:
    """Why ``mha`` (child of ``parent``) cannot become a :class:`CondensedMultiheadAttention`, or None.

    Used by :func:`condense` and by compact training (:mod:`srigl.compact`) alike.
    """
    if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
        return "MultiheadAttention with kdim/vdim != embed_dim, bias_k/bias_v or add_zero_attn"
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return f"MultiheadAttention inside {type(parent).__name__}, whose fast path reads its raw tensors"
    if parent is None:
        return "the root module cannot be swapped"
    return None


def _plan_attention(name: str, mha: nn.MultiheadAttention, masks_by_param: dict[str, torch.Tensor]) -> dict[str, _Layer]:
    """The plan of each masked projection (``"in_proj_weight"``, ``"out_proj.weight"``) of ``mha``."""
    plans = {}
    for local, weight in (("in_proj_weight", mha.in_proj_weight), ("out_proj.weight", mha.out_proj.weight)):
        mask = masks_by_param.get(_fqn(name, local))
        if mask is None:
            continue
        # _plan reads the weight's name and mask only; the module is the attention itself.
        plan = _plan(_fqn(name, local).removesuffix(".weight"), mha, mask)
        if plan.fan_in is not None:
            _check_mask(weight, mask, _fqn(name, local))
        plans[local] = plan
    return plans
