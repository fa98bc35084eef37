// Small batches, gather layout: one output row at a time, a dot product of values[o, :] with
// x[b, indices[o, :]] through hardware gathers (forward and backward).

#pragma once

#include "vec.h"

namespace srigl_fanin {
namespace {

// ---------------------------------------------------------------------------------------------
// Small batch: gather layout.
// ---------------------------------------------------------------------------------------------

// Eight int16/int32 indices as the 32-bit lanes a gather takes.
#if defined(__AVX2__)
template <typename I>
inline __m256i index_lanes(const I* idx) {
  if constexpr (std::is_same_v<I, int16_t>) {
    return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  }
}
#endif

// sum_j w[j] * x[idx[j]] for one output row.
//
// Why 8-wide (AVX2) gathers even when AVX-512 is available: the gathers are the bottleneck
// (x is a few KiB in L1, values and indices stream from L2), and on the AVX-512 parts measured
// a 16-wide gather costs more than two 8-wide ones, and scalar loads more than either (figures in
// results/kernel_tuning.md).
template <typename T, typename I>
inline T gather_dot(const T* x, const T* w, const I* idx, int64_t k) {
  int64_t j = 0;
  T s = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<I, int16_t> || std::is_same_v<I, int32_t>)) {
    // Two accumulators: one gather+FMA chain would otherwise wait on the FMA latency.
    __m256 acc0 = _mm256_setzero_ps();
    __m256 acc1 = _mm256_setzero_ps();
    for (; j + 16 <= k; j += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_i32gather_ps(x, index_lanes(idx + j), 4), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_i32gather_ps(x, index_lanes(idx + j + 8), 4), acc1);
    }
    if (j + 8 <= k) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_i32gather_ps(x, index_lanes(idx + j), 4), acc0);
      j += 8;
    }
    const __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));  // 8 -> 4 lanes
    quad = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));                                   // 4 -> 2
    s = _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)));                            // 2 -> 1
  }
#endif
  // Scalar tail (and the whole row for dtypes/ISAs without a gather path): four partial sums
  // keep four independent load->FMA chains in flight.
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; j + 4 <= k; j += 4) {
    s0 += w[j] * x[idx[j]];
    s1 += w[j + 1] * x[idx[j + 1]];
    s2 += w[j + 2] * x[idx[j + 2]];
    s3 += w[j + 3] * x[idx[j + 3]];
  }
  for (; j < k; ++j) s0 += w[j] * x[idx[j]];
  return s + ((s0 + s1) + (s2 + s3));
}

// dst[j] += g * x[idx[j]] for j < k (the gather half of the small-batch backward).
template <typename T, typename I>
inline void gather_axpy(T* dst, T g, const T* x, const I* idx, int64_t k) {
  int64_t j = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<I, int16_t> || std::is_same_v<I, int32_t>)) {
    const __m256 gv = _mm256_set1_ps(g);
    for (; j + 8 <= k; j += 8) {
      _mm256_storeu_ps(dst + j, _mm256_fmadd_ps(gv, _mm256_i32gather_ps(x, index_lanes(idx + j), 4), _mm256_loadu_ps(dst + j)));
    }
  }
#endif
  for (; j < k; ++j) dst[j] += g * x[idx[j]];
}

// out[i] = sum over c of scratch[c * n + i]: per-chunk private accumulators reduced in a fixed
// order (so results do not depend on thread scheduling).
template <typename T>
void reduce_chunks(const T* scratch, int64_t chunks, int64_t n, T* out) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += scratch[c * n + i];
      out[i] = s;
    }
  });
}

// Grain for at::parallel_for over output rows: forking costs a few microseconds, so each thread
// gets at least ~16k multiply-adds.
inline int64_t rows_grain(int64_t k, int64_t batch) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * batch));
}

// y[b, rows[o]] = bias[rows[o]] + dot(values[o], x[b, indices[o]]) for the active rows o (rows ==
// nullptr: rows[o] = o); y has ld columns. Columns that are no row's are left to the caller.
template <typename T, typename I>
void forward_gather(const T* x, const T* values, const I* indices, const T* bias, T* y,
                    int64_t batch, int64_t in_features, int64_t out_features, int64_t k,
                    const int64_t* rows = nullptr, int64_t ld = -1) {
  if (ld < 0) ld = out_features;
  // Captured by value: with references every operand would be reloaded through the closure in
  // the row loop (a measurable share of a batch-1 product).
  at::parallel_for(0, out_features, rows_grain(k, batch), [=](int64_t o0, int64_t o1) {
    if (batch == 1 && rows == nullptr) {  // the common case, without the batch loop around each row
      for (int64_t o = o0; o < o1; ++o) y[o] = gather_dot(x, values + o * k, indices + o * k, k) + (bias ? bias[o] : T(0));
      return;
    }
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t col = rows ? rows[o] : o;
      const T b_o = bias ? bias[col] : T(0);
      for (int64_t b = 0; b < batch; ++b) {
        y[b * ld + col] = gather_dot(x + b * in_features, values + o * k, indices + o * k, k) + b_o;
      }
    }
  });
}

// grad_values[o, j] = sum_b grad_y[b, o] * x[b, idx[o, j]]  (a gather, like the forward).
// grad_x[b, idx[o, j]] += values[o, j] * grad_y[b, o]         (a scatter: chunk-private buffers).
template <typename T, typename I>
void backward_gather(const T* grad_y, const T* x, const T* values, const I* indices, T* grad_x,
                     T* grad_values, T* grad_bias, int64_t batch, int64_t in_features, int64_t out_features,
                     int64_t k) {
  if (grad_bias != nullptr) {  // a handful of rows: a plain column sum
    for (int64_t o = 0; o < out_features; ++o) {
      T s = 0;
      for (int64_t b = 0; b < batch; ++b) s += grad_y[b * out_features + o];
      grad_bias[o] = s;
    }
  }
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, out_features));
  // (chunks, batch, in_features): chunk c scatters only into its own slice; summed afterwards.
  std::vector<T> scratch;
  if (grad_x != nullptr && chunks > 1) scratch.assign(chunks * batch * in_features, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o0 = out_features * c / chunks;
      const int64_t o1 = out_features * (c + 1) / chunks;
      T* gx = grad_x == nullptr ? nullptr : (chunks > 1 ? scratch.data() + c * batch * in_features : grad_x);
      for (int64_t o = o0; o < o1; ++o) {
        const I* idx = indices + o * k;
        const T* w = values + o * k;
        if (grad_values != nullptr) {  // zeroed by the caller
          for (int64_t b = 0; b < batch; ++b) {
            gather_axpy(grad_values + o * k, grad_y[b * out_features + o], x + b * in_features, idx, k);
          }
        }
        if (grad_x != nullptr) {
          for (int64_t b = 0; b < batch; ++b) {
            const T g = grad_y[b * out_features + o];
            T* gxb = gx + b * in_features;
            for (int64_t j = 0; j < k; ++j) gxb[idx[j]] += w[j] * g;
          }
        }
      }
    }
  });
  if (grad_x != nullptr && chunks > 1) reduce_chunks(scratch.data(), chunks, batch * in_features, grad_x);
}

}  // namespace
}  // namespace srigl_fanin
