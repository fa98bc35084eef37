"""Ranking metrics of extreme multi-label classification: precision@k and nDCG@k, as the Extreme
Classification Repository defines them, from scores or from top-k label ids, against CSR labels.

For a point with true label set ``y`` and predicted ranking ``r_1, r_2, ...`` (best first)::

    P@k    = |{r_1..r_k} ∩ y| / k
    DCG@k  = sum_{j=1..k} [r_j ∈ y] / log2(j + 1)
    nDCG@k = DCG@k / IDCG@k,   IDCG@k = sum_{j=1..min(k, |y|)} 1 / log2(j + 1)

A point with no true label scores 0 on both (its IDCG is 0; counting it as 0 rather than
skipping it keeps the mean over the same points for every metric). Ties between scores are broken
by ``torch.topk``, which is not specified: give distinct scores when the order matters.

Nothing here builds a dense ``(B, L)`` target: membership of ``r_j`` in ``y`` is a sorted-key
lookup on ``row * L + label``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from srigl.errors import SriglError

DEFAULT_KS = (1, 3, 5)


class XMCMetricInputError(SriglError, ValueError):
    """Scores, top-k ids and labels whose shapes or sizes do not fit together."""


def top_k_labels(scores: Tensor, k: int) -> Tensor:
    """``(B, k)`` int64: the ``k`` highest-scoring label ids of each row of ``(B, L)`` ``scores``, best first."""
    if scores.dim() != 2 or not 1 <= k <= scores.shape[1]:
        raise XMCMetricInputError(f"scores of shape {tuple(scores.shape)} need to be (B, L) with L >= k = {k}")
    return torch.topk(scores, k, dim=1, sorted=True).indices


def hits(top_k: Tensor, label_indptr: Tensor, label_indices: Tensor, n_labels: int) -> Tensor:
    """``(B, K)`` bool: whether the ``j``-th predicted label of row ``b`` is one of its true labels.

    Args:
        top_k: ``(B, K)`` predicted label ids, best first.
        label_indptr: ``(B + 1,)`` CSR row pointer of the true labels (starting at 0).
        label_indices: ``(nnz,)`` true label ids.
        n_labels: ``L``; keys are ``row * L + label``, which must fit in int64.
    """
    n_rows = top_k.shape[0]
    if label_indptr.numel() != n_rows + 1:
        raise XMCMetricInputError(f"{n_rows} ranked rows but a label indptr of {label_indptr.numel()} (needs {n_rows + 1})")
    device = top_k.device
    label_indptr, label_indices = label_indptr.to(device), label_indices.to(device)
    lengths = label_indptr[1:] - label_indptr[:-1]  # (B,)
    row_of = torch.repeat_interleave(torch.arange(n_rows, device=device), lengths)  # (nnz,)
    true_keys = row_of * n_labels + label_indices[int(label_indptr[0]):int(label_indptr[-1])].long()  # (nnz,)
    rows = torch.arange(n_rows, device=device)[:, None]  # (B, 1)
    return torch.isin(rows * n_labels + top_k.long(), true_keys)  # (B, K)


def _discounts(k: int, device: torch.device) -> Tensor:
    """``(k,)`` float64: ``1 / log2(j + 1)`` for ranks ``j = 1..k``."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=device))


def per_point_metrics(
    top_k: Tensor, label_indptr: Tensor, label_indices: Tensor, n_labels: int, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Tensor]:
    """``{"P@k": (B,), "nDCG@k": (B,)}`` float64 for each ``k`` in ``ks``, from ranked label ids.

    Args:
        top_k: ``(B, K)`` int64 predicted label ids, best first, ``K >= max(ks)``.
        label_indptr, label_indices: the true labels of the ``B`` rows in CSR form.
        n_labels: ``L``.
        ks: the cut-offs.

    Returns:
        Per-point values, so batches can be concatenated or summed before averaging.
    """
    if top_k.dim() != 2 or top_k.shape[1] < max(ks):
        raise XMCMetricInputError(f"top-k ids of shape {tuple(top_k.shape)} need (B, K) with K >= max(ks) = {max(ks)}")
    hit = hits(top_k, label_indptr, label_indices, n_labels).double()  # (B, K)
    n_true = (label_indptr[1:] - label_indptr[:-1]).to(top_k.device)  # (B,)
    discount = _discounts(max(ks), top_k.device)  # (K,)
    ideal = torch.cat([discount.new_zeros(1), discount.cumsum(0)])  # (K + 1,): ideal[m] = IDCG of m hits
    out: dict[str, Tensor] = {}
    for k in ks:
        out[f"P@{k}"] = hit[:, :k].sum(1) / k
        dcg = (hit[:, :k] * discount[:k]).sum(1)  # (B,)
        idcg = ideal[n_true.clamp(max=k)]  # (B,)
        # A non-zero IDCG is at least 1 (the first discount); a zero one has DCG 0 too, so clamping
        # at 1 scores a point without labels 0 instead of 0/0.
        out[f"nDCG@{k}"] = dcg / idcg.clamp(min=1.0)
    return out


def xmc_metrics(
    scores_or_top_k: Tensor, label_indptr: Tensor, label_indices: Tensor, n_labels: int, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean P@k and nDCG@k over a batch.

    Args:
        scores_or_top_k: ``(B, L)`` float scores (logits), or ``(B, K)`` integer label ids already
            ranked (best first); told apart by dtype.
        label_indptr, label_indices: the true labels in CSR form.
        n_labels: ``L``.
        ks: the cut-offs (default 1, 3, 5).

    Returns:
        ``{"P@1": ..., "P@3": ..., "P@5": ..., "nDCG@1": ..., ...}`` as plain floats.
    """
    if scores_or_top_k.is_floating_point():
        if scores_or_top_k.shape[-1] != n_labels:
            raise XMCMetricInputError(f"scores of shape {tuple(scores_or_top_k.shape)} for {n_labels} labels")
        top_k = top_k_labels(scores_or_top_k, max(ks))
    else:
        top_k = scores_or_top_k
    values = per_point_metrics(top_k, label_indptr, label_indices, n_labels, ks)
    names = [f"P@{k}" for k in ks] + [f"nDCG@{k}" for k in ks]
    return {name: float(values[name].mean()) if len(top_k) else 0.0 for name in names}
