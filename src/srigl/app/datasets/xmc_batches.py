"""Mini-batches of an :class:`~srigl.app.datasets.xmc.XMCDataset` for training with binary
cross-entropy on logits, and that loss computed from CSR labels.

A batch carries its labels as CSR rows, never as a dense ``(N, L)`` matrix: with Amazon-670K's
``L = 670,091`` a dense float32 target is 2.7 MB *per point*. :func:`bce_with_logits_csr` gives
the same loss as ``F.binary_cross_entropy_with_logits(logits, multi_hot)`` from the ``(B, L)``
logits the model produces anyway, without a second ``(B, L)`` tensor;
:meth:`XMCBatch.multi_hot` builds the dense target when a caller wants it (small ``L``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from srigl.app.datasets.loading import epoch_seed
from srigl.app.datasets.xmc import SparseRows, XMCDataset, take_rows
from srigl.errors import InvalidConfigError


@dataclass(frozen=True, eq=False)
class XMCBatch:
    """One mini-batch of ``B`` points.

    Attributes:
        row_ids: ``(B,)`` int64 rows of the data set, in batch order.
        features: ``(B, F)`` float32, dense or a ``torch.sparse_csr_tensor``.
        labels: ``(B, L)`` binary :class:`SparseRows` (CSR, on the CPU).
    """

    row_ids: Tensor
    features: Tensor
    labels: SparseRows

    def multi_hot(self, device: torch.device | str | None = None) -> Tensor:
        """``(B, L)`` float32 dense 0/1 target (allocates ``4 * B * L`` bytes)."""
        n_rows = self.labels.n_rows
        target = torch.zeros(n_rows, self.labels.n_cols, dtype=torch.float32, device=device)
        row_of = torch.repeat_interleave(torch.arange(n_rows), self.labels.row_lengths())  # (nnz,)
        target[row_of.to(target.device), self.labels.indices.to(target.device)] = 1.0
        return target


def dense_rows(rows: SparseRows) -> Tensor:
    """``(n_rows, n_cols)`` float32 dense copy of ``rows`` (ones where a binary matrix has entries)."""
    out = torch.zeros(rows.n_rows, rows.n_cols, dtype=torch.float32)
    row_of = torch.repeat_interleave(torch.arange(rows.n_rows), rows.row_lengths())  # (nnz,)
    out[row_of, rows.indices] = 1.0 if rows.values is None else rows.values
    return out


def iterate_batches(
    dataset: XMCDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    sparse_features: bool = False,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[XMCBatch]:
    """The batches of one epoch, in an order that is a pure function of ``(seed, epoch)``.

    Args:
        dataset: the data set.
        batch_size: points per batch (the last batch is smaller unless ``drop_last``).
        shuffle: draw a fresh permutation per epoch; otherwise the stored order.
        seed, epoch: the permutation is seeded with ``epoch_seed(seed, epoch)``, as the image
            data sets' order is.
        sparse_features: yield features as a ``(B, F)`` sparse CSR tensor instead of dense; the
            dense batch costs ``4 * B * F`` bytes.
        drop_last: skip a final partial batch.
        start_batch: begin with this batch of the epoch (a resumed epoch skips the batches it
            trained; nothing is gathered for them).

    Yields:
        :class:`XMCBatch` on the CPU; move ``features`` to the device in the training loop.

    Raises:
        InvalidConfigError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size={batch_size} must be at least 1")
    n = len(dataset)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(start_batch * batch_size, stop, batch_size):
        row_ids = order[start:start + batch_size]  # (B,)
        features = take_rows(dataset.features, row_ids)
        yield XMCBatch(
            row_ids=row_ids,
            features=features.to_sparse_csr() if sparse_features else dense_rows(features),
            labels=take_rows(dataset.labels, row_ids),
        )


def bce_with_logits_csr(logits: Tensor, labels: SparseRows, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy of ``(B, L)`` logits against CSR labels, without a dense target.

    ``BCE(x, y) = softplus(x) - x * y`` elementwise, so the sum over the batch is
    ``softplus(logits).sum()`` minus the logits at the true labels. Equal (to float rounding) to
    ``F.binary_cross_entropy_with_logits(logits, multi_hot, reduction=reduction)``.

    Args:
        logits: ``(B, L)`` model outputs.
        labels: ``(B, L)`` binary :class:`SparseRows` for the same rows.
        reduction: ``"mean"`` (over all ``B * L`` entries) or ``"sum"``.
    """
    if logits.shape != (labels.n_rows, labels.n_cols):
        raise InvalidConfigError(f"logits of shape {tuple(logits.shape)} for labels of shape {(labels.n_rows, labels.n_cols)}")
    if reduction not in ("mean", "sum"):
        raise InvalidConfigError(f"reduction={reduction!r}; expected 'mean' or 'sum'")
    row_of = torch.repeat_interleave(torch.arange(labels.n_rows), labels.row_lengths()).to(logits.device)  # (nnz,)
    positive = logits[row_of, labels.indices.to(logits.device)]  # (nnz,)
    total = F.softplus(logits).sum() - positive.sum()
    return total / logits.numel() if reduction == "mean" else total
