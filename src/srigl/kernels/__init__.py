"""The constant fan-in product, the one operation a condensed SRigL layer needs.

A constant fan-in layer keeps exactly ``k`` incoming weights per output neuron, stored as
``values`` (out_features, k) and ``indices`` (out_features, k) into the input features::

    y[..., o] = sum_j values[o, j] * x[..., indices[o, j]]  (+ bias[o])

:func:`fanin_matmul` computes it, differentiably in ``x``, ``values`` and ``bias``, on one of
three backends (:data:`BACKENDS`):

* ``"cpp"``: a C++ kernel compiled on first use (see :mod:`srigl.kernels.cpu`), for CPU
  float32/float64 and bfloat16 (float accumulation; the bf16 backward runs the float32 one on
  widened copies). Gather layout for tiny batches, cache-tiled transposed layout otherwise.
  Modules that own their weights can also keep a repacked copy in the *window layout*
  (:mod:`srigl.kernels.inference`, AVX-512 and float32 only), which is faster for small batches.
* ``"triton"``: Triton kernels (:mod:`srigl.kernels.triton_kernels`) for CUDA tensors, when
  triton can be imported.
* ``"torch"``: pure torch (:mod:`srigl.kernels.reference`), everywhere else and whenever
  ``SRIGL_DISABLE_EXTENSION=1`` is set (read once per device and dtype; see
  :func:`reset_backend_cache`). The choice is silent; :func:`backend_name` says which
  one a device gets and :func:`srigl.kernels.cpu.load_error` why the C++ build failed.

Duplicate indices within a row are allowed and mean what the formula says: the products add
up, exactly as in the dense matrix built by :func:`fanin_to_dense` (``scatter_add_``); each
duplicate entry gets its own gradient. Any order of indices within a row is exact; sorted rows
are faster in the C++ backward at larger batches (its cache blocking walks the inputs in order),
so a condensing step may as well sort them once.

Under ``torch.compile`` (``fullgraph=True`` included) both functions trace without graph breaks:
the C++ operators have fake implementations (:mod:`srigl.kernels.cpu`), the backend is picked
once at trace time, and the autograd Function (:mod:`srigl.kernels.dispatch`) is traced into the forward and backward graphs.
What a compiled graph does not do is the data-dependent range check of ``indices`` (and of
``rows``): reading their values is a graph break, and re-scanning them on every call would
cost as much as a batch-1 product. A compiled graph relies on indices validated before they
reach it, by :func:`check_indices` or by one eager call; condensing
(``srigl.condensed.condense_tensor``) produces valid ones by construction.

Modules: :mod:`~srigl.kernels.checks` (operand and index validation), :mod:`~srigl.kernels.dispatch`
(backend choice and autograd), :mod:`~srigl.kernels.inference` (the CPU no-grad fast path of a
condensed layer), :mod:`~srigl.kernels.reference` (pure torch), :mod:`~srigl.kernels.cpu` (the C++
build, sources in ``csrc/``) and :mod:`~srigl.kernels.triton_kernels` (CUDA).
"""

from __future__ import annotations

from srigl.kernels.checks import FanInOperandError, IndexOutOfRangeError, check_indices, index_dtype_for
from srigl.kernels.dispatch import (
    BACKENDS,
    DISABLE_ENV,
    BackendUnavailableError,
    backend_name,
    cpu_extension_available,
    fanin_matmul,
    fanin_matmul_rows,
    reset_backend_cache,
)
from srigl.kernels.reference import fanin_to_dense

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DISABLE_ENV",
    "FanInOperandError",
    "IndexOutOfRangeError",
    "backend_name",
    "check_indices",
    "cpu_extension_available",
    "fanin_matmul",
    "fanin_matmul_rows",
    "fanin_to_dense",
    "index_dtype_for",
    "reset_backend_cache",
]
