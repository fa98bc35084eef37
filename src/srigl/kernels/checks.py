"""Operand checks of the constant fan-in product: shapes, dtypes, devices and index ranges.

Metadata checks (:func:`_check_operands`) read no data and run on every call. The index range check
(:func:`check_indices`) reads every index, which costs about as much as a batch-1 product, so
:func:`validate_indices_once` remembers which tensors passed and re-checks one only after an
in-place change or a storage swap.

That memory cannot see every write: one through ``tensor.data`` (a second tensor with its own
version counter) or through a numpy view changes neither the version nor the storage. So the
compiled kernel does not rely on it: every C++ product checks its indices' range itself in one
vectorised pass (``check_index_range`` in ``csrc/checks.h``; a few percent of a batch-1 gather product,
results/kernel_tuning.md) and fails with a RuntimeError that :func:`raise_index_error` turns into
:class:`IndexOutOfRangeError`. The window-layout copy a :class:`~srigl.condensed.CondensedLinear`
keeps for small batches was validated when it was packed and is never read out of range either,
but it does not see such a write and keeps computing with the old indices; change indices in place
on the buffer itself (``layer.indices.copy_(...)`` under ``torch.no_grad()``) to have it repacked.
"""

from __future__ import annotations

import weakref

import torch

from srigl.errors import SriglError

__all__ = [
    "FanInOperandError",
    "IndexOutOfRangeError",
    "check_indices",
    "index_dtype_for",
    "raise_index_error",
    "validate_indices_once",
]

_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


class FanInOperandError(SriglError, ValueError):
    """Operands of the constant fan-in product with mismatched shapes, dtypes or devices."""


class IndexOutOfRangeError(FanInOperandError):
    """An index outside ``[0, in_features)``."""


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


#: What the C++ kernel's own range check says (csrc/checks.h, check_index_range).
KERNEL_INDEX_ERROR = "srigl_fanin: indices out of range"


def raise_index_error(error: RuntimeError, indices: torch.Tensor, in_features: int) -> None:
    """Re-raises a backend's failure on an out-of-range index as :class:`IndexOutOfRangeError`.

    The C++ kernel's own range check (or torch's, on the reference backend) found an index that
    :func:`validate_indices_once` had let through, because it was written where no version counter
    sees it. The tensor is forgotten and checked again, which names the first offender; a failure
    for any other reason is re-raised unchanged.
    """
    _validated.pop(id(indices), None)
    check_indices(indices, in_features)  # raises when an index is out of range
    if KERNEL_INDEX_ERROR in str(error):
        raise IndexOutOfRangeError(str(error).splitlines()[0].removeprefix("srigl_fanin: ")) from None
    raise error


def _check_operands(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None
) -> torch.Size:
    """Shape, dtype and device checks on metadata only (no data is read: it runs on the hot path).

    Returns values' shape, (out_features, k), for the caller: every ``.shape`` read builds a new
    torch.Size.
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
    # (shape[0],), not shape[:1]: slicing a torch.Size builds another one, on the hot path.
    if bias is not None and (bias.shape != (shape[0],) or bias.dtype is not dtype):
        raise FanInOperandError(
            f"bias must be ({values.shape[0]},) of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    # All on the CPU is the common case and is_cpu is cheap; reading .device builds a
    # torch.device object each time, so only the other cases compare devices.
    if x.is_cpu and values.is_cpu and indices.is_cpu and (bias is None or bias.is_cpu):
        return shape
    device = x.device
    if bias is not None and bias.device != device:
        raise FanInOperandError(f"bias is on {bias.device} but x is on {device}")
    if values.device != device or indices.device != device:
        raise FanInOperandError(f"x, values and indices must share one device, got {device}, "
                                f"{values.device}, {indices.device}")
    return shape
