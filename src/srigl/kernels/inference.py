"""Inference of a condensed linear layer on the CPU: the compiled operators called directly.

A module that owns its weights (:class:`srigl.condensed.CondensedLinear`) hands its tensors to
:func:`condensed_linear_inference` when autograd is off. At batch 1 the product is dominated by
per-call overhead, so this path checks only what the input can get wrong and calls the compiled
operators with no wrapper (anything unexpected returns None: the caller takes the general
:func:`srigl.kernels.fanin_matmul` path, which names the problem). Small batches run on a repacked
copy of the layer in the *window layout* (:func:`window_layout`, AVX-512 float32 builds only), kept
in a :class:`WindowCache` that the module owns and that follows every change of the weights.
Large batches of a layer whose active rows are dense (what neuron ablation leaves) run as a GEMM
over the rows densified for the call (:mod:`srigl.kernels.dense_route`).
Measurements behind the constants here: ``results/kernel_tuning.md``.
"""

from __future__ import annotations

import weakref

import torch

from srigl.kernels import cpu
from srigl.kernels.checks import validate_indices_once
from srigl.kernels import dense_route as dense_routes
from srigl.kernels.dense_route import dense_route, dense_route_pays
from srigl.kernels.dispatch import _GATHER_MAX_BATCH, _cached_backend, _cpp_forward, _cpp_forward_rows, _is_dynamo_compiling

__all__ = [
    "DENSE_CACHE_MIN_DENSITY",
    "WINDOW_MAX_BATCH",
    "WindowCache",
    "condensed_linear_inference",
    "cpu_inference_ops",
    "window_layout",
    "window_steps",
]

#: (padding bound, batch bound) pairs, densest first: a window-packed layer whose steps hold at
#: most ``padding`` x its nonzeros (``16 * steps / nnz``) runs batches up to ``batch`` in that
#: layout; above the last bound it is not kept at all. The padding grows with sparsity because
#: fewer of a row's nonzeros share each 32-input window, and the window layout's lead over the
#: gather/tiled operators shrinks with it (the measured ratios are in results/kernel_tuning.md).
#: Batches stop at 64 even for the densest layers: narrow layers favour the tiled route at large
#: batches (its transposed x tile then sits in L1).
_WINDOW_BATCH_BY_PADDING = ((1.75, 64), (2.2, 16), (2.7, 4), (3.5, 2))
#: The largest batch any window-packed layer runs in the window layout.
WINDOW_MAX_BATCH = _WINDOW_BATCH_BY_PADDING[0][1]


def window_steps(packed: torch.Tensor) -> int:
    """The number of steps in a window-layout buffer (``WindowHeader.steps`` in ``csrc/window.h``); each
    step holds 16 lanes, so ``16 * steps / nonzeros`` is the layout's padding."""
    return int(packed[32:40].view(torch.int64))


def window_layout(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int] | None:
    """The layer repacked for the C++ kernel's window layout, and the largest batch it serves.

    The window layout (see ``csrc/window.h``) groups output rows by 16 and schedules their nonzeros
    into steps that read one 32-float window of x each; it needs no gather instructions, so it beats
    the gather layout at small batches. It is a second copy of the layer, larger than values + int16
    indices by its padding (more so the sparser the layer), built in a few milliseconds: meant to be
    built once and cached by a module that owns the weights (:class:`WindowCache`), then run with
    ``cpu.window_ops()[1]``. Measured speed and size ratios: ``results/kernel_tuning.md``.

    Args:
        values: (rows, k) float32 CPU tensor.
        indices: (rows, k) int16/int32 CPU tensor, valid for ``in_features`` (checked).
        in_features: width of x.

    Returns:
        ``(packed, max_batch)``: the uint8 buffer and the largest batch for which it beats the
        other routes (from its padding, :data:`_WINDOW_BATCH_BY_PADDING`); or None when the layout
        is unavailable here (the C++ backend is off or failed to build, or was not built for
        AVX-512; another dtype or device; int64 indices; ``in_features < 32``), the layer is empty,
        or it is so sparse that the layout pads too much to win (padding above the last bound).

    Raises:
        RuntimeError: an index outside ``[0, in_features)`` (the packing checks every index).
    """
    usable = values.dtype is torch.float32 and values.is_cpu and _cached_backend("cpu", values.dtype) == "cpp"
    ops = cpu.window_ops() if usable else None
    if ops is None or indices.dtype not in (torch.int16, torch.int32) or not indices.is_cpu or in_features < 32:
        return None
    nnz = values.numel()
    if nnz == 0:
        return None
    packed = ops[0](values.contiguous(), indices.contiguous(), in_features)
    padding = 16 * window_steps(packed) / nnz
    max_batch = next((batch for bound, batch in _WINDOW_BATCH_BY_PADDING if padding <= bound), 0)
    return (packed, max_batch) if max_batch > 0 else None


def cpu_inference_ops(dtype: torch.dtype) -> tuple[object, object] | None:
    """The compiled ``(forward, forward_rows)`` operators when CPU tensors of ``dtype`` run on them.

    :func:`condensed_linear_inference` calls them directly (no :func:`srigl.kernels.fanin_matmul`
    wrapper), after checking what only the input can get wrong and validating the indices with
    :func:`~srigl.kernels.checks.validate_indices_once`. None when the automatic backend for
    ``("cpu", dtype)`` is not the C++ kernel (disabled, failed to build, or an unsupported dtype).
    """
    return (_cpp_forward(), _cpp_forward_rows()) if _cached_backend("cpu", dtype) == "cpp" else None


#: The fan-in density from which :class:`WindowCache` keeps a layer's densified active rows
#: for the dense route: at density >= 0.4 the block (4 bytes per entry / density) is at most 1.7x
#: the condensed layer it copies (4-byte values + 2-byte indices per nonzero). Sparser rows on the
#: dense route (bf16, large batches) are densified per call instead.
DENSE_CACHE_MIN_DENSITY = 0.4


class WindowCache:
    """One layer's inference copies of its weights, rebuilt whenever the weights change: the window
    layout (:func:`window_layout`) for small batches, and the densified active rows for the dense
    route (:mod:`srigl.kernels.dense_route`) at large ones.

    The cache is keyed on the identity, storage and version counter of ``values`` and ``indices``, so
    any change to the weights (an optimizer step, ``load_state_dict``, a new Parameter, ``.data``
    swapped for a new tensor) rebuilds them on their next use. Tensors without a version counter (created
    under ``torch.inference_mode``) cannot be tracked and are not cached. It holds weak references,
    which cannot be pickled: an owning module leaves it out of its pickled state.

    Attributes:
        key: ``(weakref(values), weakref(indices), (values.data_ptr(), values._version,
            indices.data_ptr(), indices._version))`` of the cached tensors, or None before the first use.
        layout: ``(packed, max_batch, forward_windows)`` for those tensors, or None where the layout
            is unavailable, does not pay, or was not asked for yet.
        dense: the ``(n_active, in_features)`` densified rows, or None where not built (yet).
    """

    __slots__ = ("key", "layout", "dense", "_packed")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.layout: tuple[torch.Tensor, int, object] | None = None
        self.dense: torch.Tensor | None = None
        self._packed = False

    def _sync(self, values: torch.Tensor, indices: torch.Tensor) -> bool:
        """Forgets the copies if the weights changed since they were made; False when untrackable."""
        try:
            state = (values.data_ptr(), values._version, indices.data_ptr(), indices._version)
        except RuntimeError:  # inference tensors have no version counter
            return False
        key = self.key
        # Identity through weak references as well: a freed tensor's address may be reused by a new
        # one whose version counter also starts at 0.
        if key is None or key[0]() is not values or key[1]() is not indices or key[2] != state:
            self.key = (weakref.ref(values), weakref.ref(indices), state)
            self.layout, self.dense, self._packed = None, None, False
        return True

    def get(self, values: torch.Tensor, indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int, object] | None:
        """``(packed, max_batch, forward_windows)`` for these weights, packed on first use; or None."""
        if not self._sync(values, indices):
            return None
        if not self._packed:
            layout = window_layout(values, indices, in_features)
            self.layout = None if layout is None else (*layout, cpu.window_ops()[1])
            self._packed = True
        return self.layout

    def dense_rows(self, values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor | None:
        """The densified ``(n_active, in_features)`` rows, built on first use; None where they are not
        kept (rows sparser than :data:`DENSE_CACHE_MIN_DENSITY`, a block over
        :data:`srigl.kernels.dense_route.MAX_BLOCK_BYTES`, or untrackable weights)."""
        if in_features <= 0 or values.shape[1] < DENSE_CACHE_MIN_DENSITY * in_features:
            return None
        if values.shape[0] * in_features * values.element_size() > dense_routes.MAX_BLOCK_BYTES:
            return None
        if not self._sync(values, indices):
            return None
        if self.dense is None:
            self.dense = cpu.densify_op()(values, indices, in_features)  # range-checks every index
        return self.dense


def condensed_linear_inference(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    in_features: int,
    out_features: int,
    windows: WindowCache | None,
) -> torch.Tensor | None:
    """``y (..., out_features)`` of a condensed linear layer straight from the compiled operators, or
    None to take the general path.

    For a module that owns ``values``, ``indices``, ``bias`` and ``rows`` (so only ``x`` is checked
    here) and calls this with autograd off. Anything unexpected (another device or dtype, a
    non-contiguous operand, a traced graph, int64 indices) returns None, and the general path
    names the problem.

    Args:
        x: (..., in_features).
        values: (n_active, k).
        indices: (n_active, k) int16/int32.
        bias: (out_features,) or None.
        rows: (n_active,) int64 output column of each row when neurons were ablated, else None.
        in_features: the width the indices address.
        out_features: width of the output, ablated neurons included.
        windows: the module's window-layout cache, or None not to use the window layout.
    """
    if not (x.is_cpu and x.dtype is values.dtype and x.shape[-1] == in_features and x.is_contiguous()) or (
        _is_dynamo_compiling() or indices.dtype is torch.int64 or x.dim() < 2
    ):
        return None
    x2d = x if x.dim() == 2 else x.view(-1, in_features)  # (batch, in): contiguous, so a view
    batch = x2d.shape[0]
    try:
        # No index validation on this route: packing checks every index, and the cache is
        # rebuilt whenever the indices change.
        layout = windows.get(values, indices, in_features) if windows is not None and batch <= WINDOW_MAX_BATCH else None
        if layout is not None and batch <= layout[1]:
            y = layout[2](x2d, layout[0], bias, rows, out_features)
        elif dense_route_pays(batch, values.shape[1], in_features, values.dtype):
            if cpu_inference_ops(values.dtype) is None or not values.is_cpu:
                return None
            weight = windows.dense_rows(values, indices, in_features) if windows is not None else None
            y = dense_route(x2d, values, indices, bias, rows, in_features, out_features, weight)
        else:
            ops = cpu_inference_ops(values.dtype)
            if ops is None or not values.is_cpu:
                return None
            validate_indices_once(indices, in_features)
            if rows is None:
                y = ops[0](x2d, values, indices, bias, _GATHER_MAX_BATCH, 0, 0)
            else:
                y = ops[1](x2d, values, indices, bias, rows, out_features, _GATHER_MAX_BATCH, 0, 0)
    except RuntimeError:  # e.g. operands made non-contiguous from outside: let the general path say
        return None
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)  # (..., out)
