"""Dispatch of the constant fan-in product to a backend, and its autograd.

* Backend choice: ``"cpp"`` (CPU float32/float64/bfloat16, when the C++ kernel builds), ``"triton"`` (CUDA,
  when triton imports), ``"torch"`` everywhere else or under ``SRIGL_DISABLE_EXTENSION=1``. The
  automatic choice is made once per (device type, dtype) and cached (:func:`reset_backend_cache`).
* Under ``torch.compile`` the choice is made at trace time by a function dynamo treats as a constant
  (:func:`_prepare_backend`), so traced code only reads the cache.
* :class:`_FanInProduct` is the autograd Function around a backend's forward and backward.
* :func:`fanin_matmul` and :func:`fanin_matmul_rows` are the two products built on them (re-exported
  by :mod:`srigl.kernels`); :func:`place_active_rows` is the plain-aten scatter of a layer's active
  rows into its full output.
"""

from __future__ import annotations

import math
import os

import torch
from torch.autograd.function import once_differentiable

from srigl.errors import SriglError
from srigl.kernels import cpu, reference
from srigl.kernels.checks import FanInOperandError, _check_operands, raise_index_error, validate_indices_once
from srigl.kernels.dense_route import dense_route, dense_route_pays

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DISABLE_ENV",
    "backend_name",
    "cpu_extension_available",
    "fanin_matmul",
    "fanin_matmul_rows",
    "place_active_rows",
    "reset_backend_cache",
]

#: Backend names accepted by ``fanin_matmul(..., backend=...)``.
BACKENDS = ("cpp", "triton", "torch")

#: Setting this environment variable to ``1`` forces the pure-torch backend on every device.
DISABLE_ENV = "SRIGL_DISABLE_EXTENSION"

_CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(SriglError, RuntimeError):
    """An explicitly requested backend cannot run these operands here."""


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
            raise BackendUnavailableError(f"backend 'cpp' runs CPU float32/float64/bfloat16, got {device} {dtype}")
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
    public decorator imports ``torch._dynamo`` (most of a second), which ``import srigl`` must not pay
    for code that may never be compiled; tests/kernels/test_compile.py checks that both set the same
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
            try:
                grad_x, grad_values, grad_bias = cpu.backward_with_bias(
                    grad_y.contiguous(), x, values, indices, need_x, need_values, need_bias
                )
            except RuntimeError as error:
                raise_index_error(error, indices, x.shape[1])
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
            change; not inside ``torch.compile`` graphs (see the module docstring). The C++
            backend also checks their range on every call, so a write the validation cache cannot
            see (through ``.data`` or numpy) is refused, not read. Duplicates within a row add up.
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
    # Every microsecond here shows at batch 1 (see results/condensed_linear.md), so the common
    # case, 2-D inference on the CPU, reads each attribute once and goes straight to the compiled
    # operator; the checks stay (they only read metadata).
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
    try:
        if torch.is_grad_enabled() and (
            x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
        ):
            y2d = _FanInProduct.apply(x2d, values_c, indices_c, bias_c, name)
        elif name == "cpp" and indices_c.dtype is not torch.int64:
            if dense_route_pays(x2d.shape[0], shape[1], in_features, x2d.dtype):
                y2d = dense_route(x2d, values_c, indices_c, bias_c, None, in_features, shape[0])
            else:  # no autograd node and no wrapper: straight to the compiled operator
                y2d = _cpp_forward()(x2d, values_c, indices_c, bias_c, _GATHER_MAX_BATCH, 0, 0)
        else:
            y2d = _module(name).forward(x2d, values_c, indices_c, bias_c)  # no autograd node: lower overhead
    except RuntimeError as error:  # the kernel's own range check (see checks.py)
        raise_index_error(error, indices, in_features)
    return y2d.reshape(*x.shape[:-1], shape[0]) if flat else y2d  # (..., out)


_cpp_forward = cpu.forward_op
# True only while dynamo traces (torch.compile, strict torch.export), where it is a constant, so
# traced code takes the compile branches; in eager it is the cheapest such test
# (torch.compiler.is_compiling() also asks torch.jit.is_scripting()).
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
    backend without autograd the scatter happens inside the kernel (separate
    index_select/index_copy calls would be a sizeable part of a batch-1 product).

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
        if dense_route_pays(x2d.shape[0], values.shape[1], in_features, x2d.dtype):
            if not compiling:
                _check_rows_range(rows, out_features)
            try:
                y2d = dense_route(x2d, values.contiguous(), indices.contiguous(),
                                  None if bias is None else bias.contiguous(), rows.contiguous(), in_features, out_features)
            except RuntimeError as error:  # densify's own range check
                raise_index_error(error, indices, in_features)
            return y2d.reshape(*x.shape[:-1], out_features) if flat else y2d  # (..., out_features)
        try:
            y2d = _cpp_forward_rows()(
                x2d, values.contiguous(), indices.contiguous(), None if bias is None else bias.contiguous(),
                rows.contiguous(), out_features, _GATHER_MAX_BATCH, 0, 0,
            )
        except RuntimeError as error:
            if "srigl_fanin: rows[" not in str(error):  # the row check is left to the kernel
                raise_index_error(error, indices, in_features)
            raise FanInOperandError(str(error).splitlines()[0].removeprefix("srigl_fanin: ")) from None
        return y2d.reshape(*x.shape[:-1], out_features) if flat else y2d  # (..., out_features)
    if not compiling:
        _check_rows_range(rows, out_features)
    return place_active_rows(
        lambda x, values, indices, bias: fanin_matmul(x, values, indices, bias, backend=backend),
        x, values, indices, rows, out_features, bias,
    )


def _check_rows_range(rows: torch.Tensor, out_features: int) -> None:
    """Raises FanInOperandError unless every entry of ``rows`` lies in ``[0, out_features)``."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_features):
        raise FanInOperandError(f"rows must lie in [0, {out_features}), got [{int(rows.min())}, {int(rows.max())}]")


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
