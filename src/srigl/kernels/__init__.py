"""The constant fan-in product, the one operation a condensed SRigL layer needs.

A constant fan-in layer keeps exactly ``k`` incoming weights per output neuron, stored as
``values`` (out_features, k) and ``indices`` (out_features, k) into the input features::

    y[..., o] = sum_j values[o, j] * x[..., indices[o, j]]  (+ bias[o])

:func:`fanin_matmul` computes it, differentiably in ``x``, ``values`` and ``bias``, on one of
three backends (:data:`BACKENDS`):

* ``"cpp"``: a C++ kernel compiled on first use (see :mod:`srigl.kernels.cpu`), for CPU
  float32/float64. Gather layout for tiny batches, cache-tiled transposed layout otherwise.
  Modules that own their weights can also keep a repacked copy in the *window layout*
  (:func:`window_layout`, AVX-512 and float32 only), which is faster for small batches.
* ``"triton"``: Triton kernels (:mod:`srigl.kernels.triton_kernels`) for CUDA tensors, when
  triton can be imported.
* ``"torch"``: pure torch (:mod:`srigl.kernels.reference`), everywhere else and whenever
  ``SRIGL_DISABLE_EXTENSION=1`` is set (read once per device and dtype; see
  :func:`reset_backend_cache`). The choice is silent; :func:`backend_name` says which
  one a device gets and :func:`srigl.kernels.cpu.load_error` why the C++ build failed.

Duplicate indices within a row are allowed and mean what the formula says: the products add
up, exactly as in the dense matrix built by :func:`fanin_to_dense` (``scatter_add_``); each
duplicate entry gets its own gradient. Any order of indices within a row is exact; sorted rows
are ~10 % faster in the C++ backward at larger batches (its cache blocking walks the inputs in
order), so a condensing step may as well sort them once.

Under ``torch.compile`` (``fullgraph=True`` included) both functions trace without graph breaks:
the C++ operators have fake implementations (:mod:`srigl.kernels.cpu`), the backend is picked
once at trace time, and :class:`_FanInProduct` is traced into the forward and backward graphs.
What a compiled graph does not do is the data-dependent range check of ``indices`` (and of
``rows``): reading their values is a graph break, and re-scanning them on every call would
cost as much as a batch-1 product. A compiled graph relies on indices validated before they
reach it, by :func:`check_indices` or by one eager call; condensing
(``srigl.condensed.condense_tensor``) produces valid ones by construction.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
from torch.autograd.function import once_differentiable

from srigl.errors import SriglError
from srigl.kernels import cpu, reference
from srigl.kernels.reference import fanin_to_dense

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FanInOperandError",
    "IndexOutOfRangeError",
    "backend_name",
    "check_indices",
    "cpu_extension_available",
    "fanin_matmul",
    "fanin_matmul_rows",
    "fanin_to_dense",
    "index_dtype_for",
    "place_active_rows",
    "reset_backend_cache",
    "cpu_inference_ops",
    "validate_indices_once",
    "window_layout",
    "window_steps",
    "WINDOW_MAX_BATCH",
]

#: Backend names accepted by ``fanin_matmul(..., backend=...)``.
BACKENDS = ("cpp", "triton", "torch")

#: Setting this environment variable to ``1`` forces the pure-torch backend on every device.
DISABLE_ENV = "SRIGL_DISABLE_EXTENSION"

_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
_CPP_DTYPES = (torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class FanInOperandError(SriglError, ValueError):
    """Operands of the constant fan-in product with mismatched shapes, dtypes or devices."""


class IndexOutOfRangeError(FanInOperandError):
    """An index outside ``[0, in_features)``."""


class BackendUnavailableError(SriglError, RuntimeError):
    """An explicitly requested backend cannot run these operands here."""


def index_dtype_for(in_features: int) -> torch.dtype:
    """The smallest index dtype that can address ``in_features`` inputs.

    int16 halves the index traffic of the kernels against int32, so it is preferred whenever
    the largest index, ``in_features - 1``, fits: up to 32768 inputs.

    Raises:
        FanInOperandError: ``in_features`` is negative.
    """
    if in_features < 0:
        raise FanInOperandError(f"in_features must be >= 0, got {in_features}")
    for dtype in (torch.int16, torch.int32):
        if in_features - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def check_indices(indices: torch.Tensor, in_features: int) -> None:
    """Validates a constant fan-in index matrix against the layer's input width.

    One vectorised min/max (a device sync on CUDA). Duplicates within a row are allowed.

    Args:
        indices: (out_features, k) int16/int32/int64.
        in_features: number of input features the indices address.

    Raises:
        FanInOperandError: wrong dtype or number of dimensions.
        IndexOutOfRangeError: an index is negative or >= in_features; the message gives the
            first offending (row, position, value).
    """
    if indices.dtype not in _INDEX_DTYPES:
        raise FanInOperandError(f"indices must be int16, int32 or int64, got {indices.dtype}")
    if indices.dim() != 2:
        raise FanInOperandError(f"indices must be (out_features, k), got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    low, high = torch.aminmax(indices)
    low, high = int(low), int(high)
    if low < 0 or high >= in_features:
        row, position = ((indices < 0) | (indices >= in_features)).nonzero()[0].tolist()
        raise IndexOutOfRangeError(
            f"indices must lie in [0, {in_features}); found min {low} and max {high}, "
            f"first offender indices[{row}, {position}] = {int(indices[row, position])}"
        )


# id(indices) -> (weak reference, version, data pointer, max index + 1): a tensor validated once
# is not re-scanned on every call (that scan would cost as much as the batch-1 product), unless
# it was modified in place (version) or its storage was swapped (data pointer).
_validated: dict[int, tuple[weakref.ref, int, int, int]] = {}


def validate_indices_once(indices: torch.Tensor, in_features: int) -> None:
    """:func:`check_indices`, skipped when this tensor was validated before and is unchanged since
    (same storage, no in-place change).

    Raises:
        FanInOperandError, IndexOutOfRangeError: as :func:`check_indices`.
    """
    key = id(indices)
    try:
        version = indices._version
    except RuntimeError:  # inference tensors have no version counter: validate every time
        check_indices(indices, in_features)
        return
    entry = _validated.get(key)
    if (
        entry is not None
        and entry[0]() is indices
        and entry[1] == version
        and entry[2] == indices.data_ptr()
        and entry[3] <= in_features
    ):
        return
    check_indices(indices, in_features)
    bound = int(indices.max()) + 1 if indices.numel() else 0
    _validated[key] = (weakref.ref(indices, lambda _, key=key: _validated.pop(key, None)), version,
                       indices.data_ptr(), bound)


def _check_operands(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None
) -> torch.Size:
    """Shape, dtype and device checks on metadata only (no data is read; ~0.8 us on the hot path).

    Returns values' shape, (out_features, k), for the caller: every ``.shape`` read builds a new
    torch.Size (~0.1 us).
    """
    shape, dtype = values.shape, x.dtype
    if len(shape) != 2 or indices.shape != shape:
        raise FanInOperandError(
            f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be (out_features, k)"
        )
    if x.dim() < 1:
        raise FanInOperandError("x must have at least one dimension (..., in_features)")
    if values.dtype is not dtype or not dtype.is_floating_point:
        raise FanInOperandError(f"x ({x.dtype}) and values ({values.dtype}) must share one floating dtype")
    if indices.dtype not in _INDEX_DTYPES:
        raise FanInOperandError(f"indices must be int16, int32 or int64, got {indices.dtype}")
    # (shape[0],), not shape[:1]: slicing a torch.Size builds another one (~0.1 us on the hot path).
    if bias is not None and (bias.shape != (shape[0],) or bias.dtype is not dtype):
        raise FanInOperandError(
            f"bias must be ({values.shape[0]},) of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    # All on the CPU is the common case and is_cpu is cheap; reading .device builds a
    # torch.device object (~0.25 us each), so only the other cases compare devices.
    if x.is_cpu and values.is_cpu and indices.is_cpu and (bias is None or bias.is_cpu):
        return shape
    device = x.device
    if bias is not None and bias.device != device:
        raise FanInOperandError(f"bias is on {bias.device} but x is on {device}")
    if values.device != device or indices.device != device:
        raise FanInOperandError(f"x, values and indices must share one device, got {device}, "
                                f"{values.device}, {indices.device}")
    return shape


def _extensions_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") == "1"


def _triton_available() -> bool:
    from srigl.kernels import triton_kernels  # lazy: it imports triton only when asked

    return triton_kernels.available()


def cpu_extension_available() -> bool:
    """True when the C++ CPU kernel is built and loaded; builds it on the first call.

    False when ``SRIGL_DISABLE_EXTENSION=1`` or the build failed (``cpu.load_error()`` says why).
    """
    return not _extensions_disabled() and cpu.available()


def backend_name(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The backend :func:`fanin_matmul` picks for tensors of this device and dtype.

    May trigger the one-time C++ build (CPU) or the triton import (CUDA).
    """
    return _auto_backend(torch.device(device).type, dtype)


def _auto_backend(device_type: str, dtype: torch.dtype) -> str:
    if _extensions_disabled():
        return "torch"
    if device_type == "cpu":
        return "cpp" if dtype in _CPP_DTYPES and cpu.available() else "torch"
    if device_type == "cuda" and dtype in _TRITON_DTYPES and _triton_available():
        return "triton"
    return "torch"


# (device type, dtype) -> backend name picked for them; filled on first use, so the environment
# variable and the one-time C++ build are consulted once rather than on every call (together
# they cost more than a batch-1 product's dispatch should). reset_backend_cache() empties it.
_backend_cache: dict[tuple[str, torch.dtype], str] = {}


def reset_backend_cache() -> None:
    """Forgets the backend chosen per device and dtype, so the next call re-reads the environment.

    :func:`fanin_matmul` reads ``SRIGL_DISABLE_EXTENSION`` the first time it sees a device and
    dtype; call this after changing the variable in a running process. Graphs compiled by
    ``torch.compile`` are guarded on the choice and are retraced on their next call.
    """
    _backend_cache.clear()


def _cached_backend(device_type: str, dtype: torch.dtype) -> str:
    """The automatic backend for ``(device_type, dtype)``, chosen once and kept in the cache."""
    name = _backend_cache.get((device_type, dtype))
    if name is None:
        name = _backend_cache[device_type, dtype] = _auto_backend(device_type, dtype)
    return name


def _resolve_backend(requested: str | None, x: torch.Tensor) -> str:
    if requested is None:
        return _cached_backend("cpu" if x.is_cpu else x.device.type, x.dtype)
    return _check_requested(requested, x.device, x.dtype)


def _check_requested(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """``requested`` if that backend can run tensors of this device and dtype; raises otherwise."""
    if requested not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
    if requested == "cpp":
        if device.type != "cpu" or dtype not in _CPP_DTYPES:
            raise BackendUnavailableError(f"backend 'cpp' runs CPU float32/float64, got {device} {dtype}")
        if not cpu.available():
            raise BackendUnavailableError(f"backend 'cpp' failed to build: {cpu.load_error()}")
    if requested == "triton":
        if device.type != "cuda" or dtype not in _TRITON_DTYPES:
            raise BackendUnavailableError(f"backend 'triton' runs CUDA floating tensors, got {device} {dtype}")
        if not _triton_available():
            raise BackendUnavailableError("backend 'triton' needs the triton package, which is not importable")
    return requested


def _constant_under_compile(fn):
    """Marks ``fn`` the way ``torch.compiler.assume_constant_result`` does, without its import.

    Dynamo then calls ``fn`` while tracing (its arguments must be constants there: strings,
    dtypes, devices) and records the result as a constant instead of tracing the body. The
    public decorator imports ``torch._dynamo`` (~0.8 s), which ``import srigl`` must not pay
    for code that may never be compiled; tests/test_compile.py checks that both set the same
    marker.
    """
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def _prepare_backend(requested: str | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Under ``torch.compile``: resolves the backend outside the traced code.

    The first resolution may build the C++ kernel (a compiler run, file locks) or import triton,
    none of which dynamo can trace; run here, at trace time, it leaves only cache reads for the
    traced :func:`_traced_backend`. A requested backend that cannot run raises here, as in eager.
    """
    if requested is not None:
        _check_requested(requested, device, dtype)
    else:
        _cached_backend(device.type, dtype)
    return True


def _traced_backend(requested: str | None, x: torch.Tensor) -> str:
    """:func:`_resolve_backend` for code being traced by ``torch.compile``."""
    _prepare_backend(requested, x.device, x.dtype)
    # Read in traced code, so dynamo guards on the entry: after reset_backend_cache() (and a
    # changed SRIGL_DISABLE_EXTENSION) the next call retraces instead of reusing the old backend.
    return requested if requested is not None else _backend_cache[x.device.type, x.dtype]


def _module(name: str):
    if name == "cpp":
        return cpu
    if name == "triton":
        from srigl.kernels import triton_kernels

        return triton_kernels
    return reference


class _FanInProduct(torch.autograd.Function):
    """Autograd for the 2-D product; leading batch dims are flattened by :func:`fanin_matmul`."""

    @staticmethod
    def forward(ctx, x, values, indices, bias, backend):
        ctx.backend = backend
        ctx.save_for_backward(x, values, indices)
        return _module(backend).forward(x, values, indices, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, values, indices = ctx.saved_tensors
        need_x, need_values, _, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_values = grad_bias = None
        if ctx.backend == "cpp" and (need_x or need_values):
            # The kernel sums the bias gradient from the grad_y tiles it transposes anyway.
            grad_x, grad_values, grad_bias = cpu.backward_with_bias(
                grad_y.contiguous(), x, values, indices, need_x, need_values, need_bias
            )
            return grad_x, grad_values, None, grad_bias, None
        if need_x or need_values:
            grad_x, grad_values = _module(ctx.backend).backward(
                grad_y.contiguous(), x, values, indices, need_x, need_values
            )
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_values, None, grad_bias, None


def fanin_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The constant fan-in product ``y[..., o] = sum_j values[o, j] * x[..., indices[o, j]] + bias[o]``.

    Equal to ``x @ fanin_to_dense(values, indices, in_features).T + bias``. Differentiable
    w.r.t. x, values and bias (once; no double backward); indices get no gradient.

    Args:
        x: (..., in_features) floating tensor.
        values: (out_features, k), x's dtype.
        indices: (out_features, k) int16/int32/int64 in ``[0, in_features)``; see
            :func:`index_dtype_for`. Validated on first use and again only after an in-place
            change; not inside ``torch.compile`` graphs (see the module docstring). Duplicates
            within a row add up.
        bias: optional (out_features,), x's dtype.
        backend: ``"cpp"``, ``"triton"`` or ``"torch"`` to force one (errors if it cannot run);
            None picks the fastest available (:func:`backend_name`).

    Returns:
        (..., out_features), x's dtype.

    Raises:
        FanInOperandError: mismatched shapes, dtypes or devices.
        IndexOutOfRangeError: an index outside ``[0, in_features)``.
        BackendUnavailableError: the requested backend cannot run these operands.
    """
    # Every microsecond here shows at batch 1 (the 90 %-sparse 3072 -> 768 product takes ~25 us),
    # so the common case, 2-D inference on the CPU, reads each attribute once and goes straight
    # to the compiled operator; the checks stay (they only read metadata).
    shape = _check_operands(x, values, indices, bias)  # (out, k)
    in_features = x.shape[-1]
    if _is_dynamo_compiling():  # a traced graph reads no index values; see the module docstring
        name = _traced_backend(backend, x)
    else:
        validate_indices_once(indices, in_features)
        name = _resolve_backend(backend, x)
    flat = x.dim() != 2
    # (batch, in); 2-D inputs skip the reshape
    x2d = (x.reshape(math.prod(x.shape[:-1]), in_features) if flat else x).contiguous()
    values_c = values.contiguous()
    indices_c = indices.contiguous()
    bias_c = None if bias is None else bias.contiguous()
    if torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    ):
        y2d = _FanInProduct.apply(x2d, values_c, indices_c, bias_c, name)
    elif name == "cpp" and indices_c.dtype is not torch.int64:
        # No autograd node and no wrapper: straight to the compiled operator.
        y2d = _cpp_forward()(x2d, values_c, indices_c, bias_c, _GATHER_MAX_BATCH, 0, 0)
    else:
        y2d = _module(name).forward(x2d, values_c, indices_c, bias_c)  # no autograd node: lower overhead
    return y2d.reshape(*x.shape[:-1], shape[0]) if flat else y2d  # (..., out)


_cpp_forward = cpu.forward_op
# True only while dynamo traces (torch.compile, strict torch.export), where it is a constant, so
# traced code takes the compile branches; in eager it returns False for ~20 ns, the cheapest such
# test (torch.compiler.is_compiling() costs ~50 ns: it also asks torch.jit.is_scripting()).
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_GATHER_MAX_BATCH = cpu.FORWARD_GATHER_MAX_BATCH


def fanin_matmul_rows(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    rows: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`fanin_matmul` for a layer whose ablated neurons were dropped from ``values``.

    ``y[..., rows[i]] = sum_j values[i, j] * x[..., indices[i, j]] + bias[rows[i]]``; every other
    column ``o`` (an ablated neuron) is ``bias[o]``, or 0 without a bias. Equal to
    ``fanin_matmul`` of the full-size layer whose ablated rows have no weights. On the C++
    backend without autograd the scatter happens inside the kernel (at batch 1 the separate
    index_select/index_copy cost about a quarter of a 90 %-sparse 3072 -> 768 product).

    Args:
        x, values, indices, backend: as :func:`fanin_matmul`; values/indices have ``n_active`` rows.
        rows: (n_active,) int64, the output column of each row of ``values``, in ``[0, out_features)``.
        out_features: width of the output, ablated neurons included.
        bias: optional (out_features,), full size.

    Raises:
        FanInOperandError: mismatched shapes, dtypes or devices, or rows out of range (the
            range is not checked inside ``torch.compile`` graphs, like the indices').
    """
    n_active = _check_operands(x, values, indices, None)[0]
    if rows.dtype is not torch.int64 or rows.shape != (n_active,):
        raise FanInOperandError(f"rows must be int64 of shape ({n_active},), got {rows.dtype} {tuple(rows.shape)}")
    if out_features < n_active:
        raise FanInOperandError(f"out_features ({out_features}) is smaller than the {n_active} active rows")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype is not x.dtype):
        raise FanInOperandError(
            f"bias must be ({out_features},) of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if x.is_cpu:
        same_device = rows.is_cpu and (bias is None or bias.is_cpu)
    else:
        same_device = rows.device == x.device and (bias is None or bias.device == x.device)
    if not same_device:
        raise FanInOperandError(f"rows and bias must be on x's device ({x.device})")
    in_features = x.shape[-1]
    compiling = _is_dynamo_compiling()
    if compiling:  # a traced graph reads no index or row values; see the module docstring
        name = _traced_backend(backend, x)
    else:
        validate_indices_once(indices, in_features)
        name = _resolve_backend(backend, x)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad and name == "cpp" and indices.dtype is not torch.int64:
        flat = x.dim() != 2
        x2d = (x.reshape(math.prod(x.shape[:-1]), in_features) if flat else x).contiguous()  # (batch, in)
        try:
            y2d = _cpp_forward_rows()(
                x2d, values.contiguous(), indices.contiguous(), None if bias is None else bias.contiguous(),
                rows.contiguous(), out_features, _GATHER_MAX_BATCH, 0, 0,
            )
        except RuntimeError as error:
            if "srigl_fanin: rows[" not in str(error):  # the one check left to the kernel
                raise
            raise FanInOperandError(str(error).splitlines()[0].removeprefix("srigl_fanin: ")) from None
        return y2d.reshape(*x.shape[:-1], out_features) if flat else y2d  # (..., out_features)
    if not compiling and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_features):
        raise FanInOperandError(f"rows must lie in [0, {out_features}), got [{int(rows.min())}, {int(rows.max())}]")
    return place_active_rows(
        lambda x, values, indices, bias: fanin_matmul(x, values, indices, bias, backend=backend),
        x, values, indices, rows, out_features, bias,
    )


def place_active_rows(product, x, values, indices, rows, out_features, bias):
    """``y (..., out_features)``: ``product(x, values, indices, bias[rows])`` in columns ``rows``,
    every other column its bias (or 0), in plain aten ops.

    The general route of :func:`fanin_matmul_rows` (with ``product`` = :func:`fanin_matmul`), and
    of exporting a condensed layer (with a gather -> multiply -> sum product).
    """
    if values.shape[0] == 0:  # every neuron ablated
        shape = (*x.shape[:-1], out_features)
        return x.new_zeros(shape) if bias is None else bias.expand(shape).contiguous()
    if bias is None:
        active = product(x, values, indices, None)  # (..., n_active)
        return x.new_zeros(*x.shape[:-1], out_features).index_copy_(-1, rows, active)  # (..., out)
    active = product(x, values, indices, bias.index_select(0, rows))  # (..., n_active)
    return bias.expand(*x.shape[:-1], out_features).index_copy(-1, rows, active)  # (..., out), a new tensor


_cpp_forward_rows = cpu.forward_rows_op

#: (padding bound, batch bound) pairs, densest first: a window-packed layer whose steps hold at
#: most ``padding`` x its nonzeros (``16 * steps / nnz``) runs batches up to ``batch`` in that
#: layout; above the last bound it is not kept at all. Measured operator against operator on
#: 3072 -> 768 (691 rows, 2 threads, AVX-512 Xeon), gather/tiled time over window time at batch
#: 1 / 2 / 4 / 8 / 16 / 32 / 64 / 128 / 256 / 2048:
#:   padding 1.29 (80 % sparse): 2.04 2.47 2.03 1.69 1.72 1.46 1.47 1.50 1.39 1.31
#:   padding 1.55 (90 %):        1.60 2.10 1.58 1.43 1.41 1.22 1.29 1.22 0.91 0.82
#:   padding 1.97 (95 %):        1.42 1.59 1.24 1.08 1.07 1.01 1.01 0.92 0.57
#:   padding 2.43 (~97 %):       1.23 1.48 1.07 0.89 0.88
#:   padding 3.04 (~98 %):       1.09 1.31 0.96 0.81
#:   padding 4.01 (99 %):        0.99 1.12 0.93 0.67 (no gain worth a second copy of the layer)
#: The padding grows with sparsity because fewer of a row's nonzeros share each 32-input window.
#: Batches stop at 64 even for the densest layers: narrow layers favour the tiled route at large
#: batches (its transposed x tile then sits in L1). The 16 condensed layers of the trained vit-tiny
#: (128 inputs, padding 1.03-1.64) take 0.22 ms in the window layout against 0.26 ms at 64 rows,
#: but 0.80 against 0.57 ms at 400 rows.
_WINDOW_BATCH_BY_PADDING = ((1.75, 64), (2.2, 16), (2.7, 4), (3.5, 2))
#: The largest batch any window-packed layer runs in the window layout.
WINDOW_MAX_BATCH = _WINDOW_BATCH_BY_PADDING[0][1]


def window_steps(packed: torch.Tensor) -> int:
    """The number of steps in a window-layout buffer (``WindowHeader.steps`` in ``cpu.cpp``); each
    step holds 16 lanes, so ``16 * steps / nonzeros`` is the layout's padding."""
    return int(packed[32:40].view(torch.int64))


def window_layout(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int] | None:
    """The layer repacked for the C++ kernel's window layout, and the largest batch it serves.

    The window layout (see ``cpu.cpp``) groups output rows by 16 and schedules their nonzeros into
    steps that read one 32-float window of x each; it needs no gather instructions, so at batch 1
    it is ~1.6x faster than the gather layout at 90 % sparsity (and 1.2-2x faster up to batch 64).
    It is a second copy of the layer (1.15x / 1.4x / 1.75x the bytes of values + int16 indices at
    80 / 90 / 95 % sparsity), built in a few milliseconds: meant to be built once and cached by a
    module that owns the weights (as :class:`srigl.condensed.CondensedLinear` does), then run with
    ``cpu.window_ops()[1]``.

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

    For modules that own their operands (``srigl.condensed``): they call the operators directly
    in inference (~2 us less per call than :func:`fanin_matmul` at batch 1), after checking what
    only the input can get wrong, and having validated their indices with
    :func:`validate_indices_once`. None when the automatic backend for ``("cpu", dtype)`` is not
    the C++ kernel (disabled, failed to build, or an unsupported dtype).
    """
    return (_cpp_forward(), _cpp_forward_rows()) if _cached_backend("cpu", dtype) == "cpp" else None


