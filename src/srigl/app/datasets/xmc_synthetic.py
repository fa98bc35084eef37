"""A synthetic extreme multi-label data set for benchmarks and CI: Zipf-distributed label
frequencies and a feature -> label structure a model can learn, at any label count (Amazon-670K's
670,091 included) without any dense ``L x F`` or ``N x L`` array.

The model of the data:

* Label ``r`` (0-based) has popularity ``p(r) ∝ (r + 1) ** -zipf_exponent``: label 0 is the most
  frequent, and the frequency of the ``r``-th most frequent label falls like ``rank ** -a``.
* Each point draws ``k ~ Uniform{1..max_labels}`` labels from ``p`` without repeats.
* Each label has a sparse *prototype*: ``prototype_nnz`` feature ids and weights in ``[0.5, 1.5)``.
  The prototype is a hash of ``(seed, label, slot)`` (splitmix64), not a stored table, so only the
  labels a point actually uses are ever materialised: memory is ``O(N * nnz + L)`` (the ``L``
  being the Zipf CDF, 8 bytes a label).
* A point's features are its labels' prototypes, each entry kept with probability ``keep_prob``
  and scaled by ``U[0.5, 1.5)``, plus ``noise_nnz`` uniformly random features of weight
  ``U[0, noise_scale)``; entries that collide are summed and the row is L2-normalised, as tf-idf
  bag-of-words rows in the repository are.

Everything is a function of ``seed``: the same arguments give bit-identical data sets.
"""

from __future__ import annotations

import numpy as np
import torch

from srigl.app.datasets.xmc import SparseRows, XMCDataset
from srigl.errors import InvalidConfigError

# Amazon-670K's label count, the size the constant fan-in output layer of issue #16 targets.
AMAZON_670K_LABELS = 670_091

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A stateless 64-bit hash (the splitmix64 finaliser), elementwise on a uint64 array."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _unit_float(bits: np.ndarray) -> np.ndarray:
    """The top 53 bits of a uint64 as a float64 in ``[0, 1)``."""
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def label_prototypes(labels: np.ndarray, n_features: int, prototype_nnz: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sparse feature prototypes of ``labels``, computed from a hash (nothing stored per label).

    Args:
        labels: ``(M,)`` int64 label ids.
        n_features: ``F``; prototype feature ids lie in ``[0, F)``.
        prototype_nnz: entries per prototype (a feature id may repeat when ``F`` is small).
        seed: the data set's seed.

    Returns:
        ``(feature_ids, weights)``, both ``(M, prototype_nnz)``: int64 and float64 in ``[0.5, 1.5)``.
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        slot = np.arange(prototype_nnz, dtype=np.uint64)  # (nnz,)
        key = labels.astype(np.uint64)[:, None] * np.uint64(prototype_nnz) + slot  # (M, nnz)
        key = key ^ _splitmix64(np.full(1, seed, dtype=np.uint64))
        bits = _splitmix64(key)  # (M, nnz)
        feature_ids = (bits % np.uint64(n_features)).astype(np.int64)
        weights = 0.5 + _unit_float(_splitmix64(bits))
    return feature_ids, weights


def zipf_cdf(n_labels: int, exponent: float) -> np.ndarray:
    """``(L,)`` float64: the cumulative distribution of ``p(r) ∝ (r + 1) ** -exponent``."""
    cdf = np.cumsum(np.arange(1, n_labels + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    return cdf


def _draw_label_sets(rng: np.random.Generator, cdf: np.ndarray, n_points: int, max_labels: int) -> SparseRows:
    """Each point's label set: ``k ~ U{1..max_labels}`` distinct Zipf draws, sorted ascending."""
    n_labels = len(cdf)
    counts = rng.integers(1, max_labels + 1, size=n_points)  # (N,)
    draws = np.searchsorted(cdf, rng.random((n_points, max_labels)), side="right")  # (N, max_labels)
    draws = np.minimum(draws, n_labels - 1)  # guards u that rounds to cdf[-1] == 1.0
    used = np.arange(max_labels)[None, :] < counts[:, None]  # (N, max_labels)
    # Redraw repeats within a row until every row's labels are distinct: sort each row with unused
    # slots last (as L), then any used slot equal to its left neighbour is a repeat.
    for _ in range(1000):
        draws = np.where(used, draws, n_labels)
        draws.sort(axis=1)
        repeat = np.zeros_like(used)
        repeat[:, 1:] = (draws[:, 1:] == draws[:, :-1]) & (draws[:, 1:] < n_labels)
        if not repeat.any():
            break
        fresh = np.searchsorted(cdf, rng.random(int(repeat.sum())), side="right")
        draws[repeat] = np.minimum(fresh, n_labels - 1)
        used = draws < n_labels
    else:  # pragma: no cover - needs a distribution concentrated on fewer labels than max_labels
        raise InvalidConfigError(f"could not draw {max_labels} distinct labels out of {n_labels}")
    indptr = np.zeros(n_points + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return SparseRows(torch.from_numpy(indptr), torch.from_numpy(draws[used].astype(np.int64)), None, n_labels)


def make_synthetic_xmc(
    n_points: int,
    n_features: int,
    n_labels: int,
    *,
    zipf_exponent: float = 1.0,
    max_labels: int = 5,
    prototype_nnz: int = 8,
    keep_prob: float = 0.75,
    noise_nnz: int = 4,
    noise_scale: float = 0.3,
    seed: int = 0,
) -> XMCDataset:
    """A synthetic XMC data set; see the module docstring for the model.

    Args:
        n_points: ``N``.
        n_features: ``F``.
        n_labels: ``L`` (670,091 for an Amazon-670K-sized output space).
        zipf_exponent: ``a`` in ``p(rank) ∝ rank ** -a``.
        max_labels: each point has ``1..max_labels`` distinct labels.
        prototype_nnz: feature entries per label prototype.
        keep_prob: probability that a prototype entry shows up in a point.
        noise_nnz: random features added to every point.
        noise_scale: the largest weight of a noise feature (prototype entries weigh 0.25 to 2.25).
        seed: everything is a function of it.

    Returns:
        An :class:`XMCDataset` with L2-normalised float32 features, indices sorted within rows.

    Raises:
        InvalidConfigError: A size below 1, ``max_labels > n_labels``, or a probability outside [0, 1].
    """
    if min(n_points, n_features, n_labels, max_labels, prototype_nnz) < 1 or noise_nnz < 0:
        raise InvalidConfigError(
            f"sizes must be >= 1 (noise_nnz >= 0): n_points={n_points} n_features={n_features} n_labels={n_labels} "
            f"max_labels={max_labels} prototype_nnz={prototype_nnz} noise_nnz={noise_nnz}"
        )
    if max_labels > n_labels:
        raise InvalidConfigError(f"max_labels={max_labels} distinct labels per point, but only {n_labels} labels")
    if not 0.0 <= keep_prob <= 1.0 or zipf_exponent < 0 or noise_scale < 0:
        raise InvalidConfigError(
            f"keep_prob={keep_prob} must lie in [0, 1], zipf_exponent={zipf_exponent} and noise_scale={noise_scale} >= 0"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    labels = _draw_label_sets(rng, zipf_cdf(n_labels, zipf_exponent), n_points, max_labels)

    # Prototype entries of every (point, label) pair, flattened: M = nnz(labels).
    label_ids = labels.indices.numpy()  # (M,)
    point_of_label = np.repeat(np.arange(n_points), np.diff(labels.indptr.numpy()))  # (M,)
    proto_ids, proto_weights = label_prototypes(label_ids, n_features, prototype_nnz, seed)  # (M, nnz) each
    kept = rng.random(proto_ids.shape) < keep_prob  # (M, nnz)
    proto_weights = proto_weights * rng.uniform(0.5, 1.5, size=proto_ids.shape)
    rows = [np.broadcast_to(point_of_label[:, None], proto_ids.shape)[kept]]
    cols = [proto_ids[kept]]
    vals = [proto_weights[kept]]
    if noise_nnz:
        rows.append(np.repeat(np.arange(n_points), noise_nnz))  # (N * noise_nnz,)
        cols.append(rng.integers(0, n_features, size=n_points * noise_nnz))
        vals.append(rng.uniform(0.0, noise_scale, size=n_points * noise_nnz))
    row, col, val = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    # Coalesce: one entry per (row, col), colliding weights summed; np.unique sorts by key, which
    # is row-major, so the result is already CSR-ordered with ascending columns.
    key, where = np.unique(row.astype(np.int64) * n_features + col, return_inverse=True)
    val = np.bincount(where, weights=val, minlength=len(key))  # (nnz,)
    row, col = key // n_features, key % n_features
    norms = np.sqrt(np.bincount(row, weights=val * val, minlength=n_points))  # (N,)
    val = val / norms[row]
    indptr = np.zeros(n_points + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n_points), out=indptr[1:])
    features = SparseRows(torch.from_numpy(indptr), torch.from_numpy(col), torch.from_numpy(val.astype(np.float32)), n_features)
    return XMCDataset(features, labels)
