// Small batches, gather layout: one output row at a time, a dot product of values[o, :] with
// x[b, indices[o, :]] through hardware gathers (forward and backward; bf16 forward only).

#pragma once

#include <atomic>
#include <string>

#include "vec.h"

// The AVX-512-BF16 dot product (vdpbf16ps) is compiled into every AVX-512 build through a target
// attribute rather than a -mavx512bf16 flag, and chosen at run time from CPUID: AVX-512 parts
// without it (Skylake-X, Ice Lake) load the same cached binary and take the portable route.
#if defined(__AVX512F__) && defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 11 : __GNUC__ >= 10)
#define SRIGL_BF16_DOT 1
#include <cpuid.h>
#else
#define SRIGL_BF16_DOT 0
#endif

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
//
// w may be stored as bf16 (S), x is then float: the portable bf16 route widens x once per call and
// each value as it is loaded (a shift), and runs this same float gather and FMA.
template <typename T, typename I, typename S = T>
inline T gather_dot(const T* x, const S* w, const I* idx, int64_t k) {
  int64_t j = 0;
  T s = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float> && (std::is_same_v<I, int16_t> || std::is_same_v<I, int32_t>)) {
    // Two accumulators: one gather+FMA chain would otherwise wait on the FMA latency.
    __m256 acc0 = _mm256_setzero_ps();
    __m256 acc1 = _mm256_setzero_ps();
    const auto weights = [w](int64_t at) { return reinterpret_cast<__m256>(load_as<float, 32>(w + at)); };
    for (; j + 16 <= k; j += 16) {
      acc0 = _mm256_fmadd_ps(weights(j), _mm256_i32gather_ps(x, index_lanes(idx + j), 4), acc0);
      acc1 = _mm256_fmadd_ps(weights(j + 8), _mm256_i32gather_ps(x, index_lanes(idx + j + 8), 4), acc1);
    }
    if (j + 8 <= k) {
      acc0 = _mm256_fmadd_ps(weights(j), _mm256_i32gather_ps(x, index_lanes(idx + j), 4), acc0);
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
    s0 += T(w[j]) * x[idx[j]];
    s1 += T(w[j + 1]) * x[idx[j + 1]];
    s2 += T(w[j + 2]) * x[idx[j + 2]];
    s3 += T(w[j + 3]) * x[idx[j + 3]];
  }
  for (; j < k; ++j) s0 += T(w[j]) * x[idx[j]];
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

// ---------------------------------------------------------------------------------------------
// bf16 values and x: two routes with float accumulation, one result rounding per output.
// ---------------------------------------------------------------------------------------------

// Which bf16 dot product forward_gather uses: false lets the CPU decide (AVX-512-BF16 where CPUID
// reports it), true forces the portable route (so tests can compare both on one machine).
std::atomic<bool> bf16_force_portable{false};

#if SRIGL_BF16_DOT
inline bool cpu_has_avx512_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  // CPUID leaf 7, sub-leaf 1, EAX bit 5: AVX512_BF16. The OS saves the AVX-512 state: torch
  // checked that before it reported the AVX512 capability this build was made for.
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1u);
}
#endif

// Whether bf16 products use vdpbf16ps now.
inline bool use_avx512_bf16() {
#if SRIGL_BF16_DOT
  static const bool has_bf16 = cpu_has_avx512_bf16();
  return has_bf16 && !bf16_force_portable.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// "avx512_bf16" or "portable": the route bf16 products take now.
inline std::string bf16_route_name() { return use_avx512_bf16() ? "avx512_bf16" : "portable"; }

#if SRIGL_BF16_DOT
// acc += the products of 16 consecutive entries: vdpbf16ps multiplies bf16 pairs and adds both
// products to one float lane, so lane l takes entries 2l and 2l + 1. The values are already in
// that order in memory; x is gathered as 32-bit words at byte offset 2 * index (x[index] in the
// low half, junk above), even entries into the low and odd ones into the high halves of a pair.
template <typename I>
__attribute__((target("avx512bf16"))) inline __m256 dot16_bf16(const int* x_words, const bf16* w, const I* idx,
                                                                 __m256 acc) {
  __m256i even, odd;
  if constexpr (std::is_same_v<I, int16_t>) {
    // 16 int16 indices: the pair (2l, 2l + 1) is 32-bit lane l (indices are >= 0, checked).
    const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
    even = _mm256_and_si256(pair, _mm256_set1_epi32(0xFFFF));
    odd = _mm256_srli_epi32(pair, 16);
  } else {
    // 16 int32 indices: the pair is 64-bit lane l; narrowing keeps the low (even) half.
    const __m512i pair = _mm512_loadu_si512(idx);
    even = _mm512_cvtepi64_epi32(pair);
    odd = _mm512_cvtepi64_epi32(_mm512_srli_epi64(pair, 32));
  }
  const __m256i lo = _mm256_i32gather_epi32(x_words, even, 2);
  const __m256i hi = _mm256_i32gather_epi32(x_words, odd, 2);
  const __m256i x_pairs = _mm256_blend_epi16(lo, _mm256_slli_epi32(hi, 16), 0xAA);  // odd 16-bit halves from hi
  const __m256i w_pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm256_dpbf16_ps(acc, (__m256bh)x_pairs, (__m256bh)w_pairs);
}

// Rows [o0, o1) of the gather forward with vdpbf16ps. x_pad is x (batch, in_features) followed by
// one zero element, so the 32-bit gather of the last input stays inside the buffer.
template <typename I>
__attribute__((target("avx512bf16"))) void gather_rows_avx512_bf16(
    const bf16* x_pad, const bf16* values, const I* indices, const bf16* bias, bf16* y, int64_t batch,
    int64_t in_features, int64_t k, const int64_t* rows, int64_t ld, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t col = rows ? rows[o] : o;
    const float b_o = bias ? float(bias[col]) : 0.0f;
    const bf16* w = values + o * k;
    const I* idx = indices + o * k;
    for (int64_t b = 0; b < batch; ++b) {
      const bf16* xb = x_pad + b * in_features;
      const int* x_words = reinterpret_cast<const int*>(xb);
      // Two accumulators, as in gather_dot: the gathers of one chain overlap the other's dot.
      __m256 acc0 = _mm256_setzero_ps();
      __m256 acc1 = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 32 <= k; j += 32) {
        acc0 = dot16_bf16(x_words, w + j, idx + j, acc0);
        acc1 = dot16_bf16(x_words, w + j + 16, idx + j + 16, acc1);
      }
      if (j + 16 <= k) {
        acc0 = dot16_bf16(x_words, w + j, idx + j, acc0);
        j += 16;
      }
      const __m256 acc = _mm256_add_ps(acc0, acc1);
      __m128 quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));  // 8 -> 4 lanes
      quad = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));                                   // 4 -> 2
      float s = _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)));                      // 2 -> 1
      for (; j < k; ++j) s += float(w[j]) * float(xb[idx[j]]);
      y[b * ld + col] = bf16(s + b_o);
    }
  }
}
#endif

// forward_gather for bf16 operands. Either route first copies x (a few KiB at the batches this
// layout serves): padded for the vdpbf16ps gathers, or widened to float for the portable one.
template <typename I>
void forward_gather_bf16(const bf16* x, const bf16* values, const I* indices, const bf16* bias, bf16* y,
                         int64_t batch, int64_t in_features, int64_t out_features, int64_t k, const int64_t* rows,
                         int64_t ld) {
  const int64_t n = batch * in_features;
  const int64_t grain = rows_grain(k, batch);
#if SRIGL_BF16_DOT
  if (use_avx512_bf16()) {
    std::vector<bf16> x_pad(n + 1, bf16(0.0f));
    std::memcpy(x_pad.data(), x, n * sizeof(bf16));
    at::parallel_for(0, out_features, grain, [=, xp = x_pad.data()](int64_t o0, int64_t o1) {
      gather_rows_avx512_bf16<I>(xp, values, indices, bias, y, batch, in_features, k, rows, ld, o0, o1);
    });
    return;
  }
#endif
  std::vector<float> x_wide(n);
  for (int64_t i = 0; i < n; ++i) x_wide[i] = float(x[i]);
  at::parallel_for(0, out_features, grain, [=, xw = x_wide.data()](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t col = rows ? rows[o] : o;
      const float b_o = bias ? float(bias[col]) : 0.0f;
      for (int64_t b = 0; b < batch; ++b) {
        y[b * ld + col] = bf16(gather_dot<float, I, bf16>(xw + b * in_features, values + o * k, indices + o * k, k) + b_o);
      }
    }
  });
}

// forward_gather for float and double operands.
template <typename T, typename I>
void forward_gather_native(const T* x, const T* values, const I* indices, const T* bias, T* y,
                           int64_t batch, int64_t in_features, int64_t out_features, int64_t k,
                           const int64_t* rows, int64_t ld) {
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

// y[b, rows[o]] = bias[rows[o]] + dot(values[o], x[b, indices[o]]) for the active rows o (rows ==
// nullptr: rows[o] = o); y has ld columns. Columns that are no row's are left to the caller.
template <typename T, typename I>
void forward_gather(const T* x, const T* values, const I* indices, const T* bias, T* y,
                    int64_t batch, int64_t in_features, int64_t out_features, int64_t k,
                    const int64_t* rows = nullptr, int64_t ld = -1) {
  if (ld < 0) ld = out_features;
  if constexpr (std::is_same_v<T, bf16>) {
    forward_gather_bf16<I>(x, values, indices, bias, y, batch, in_features, out_features, k, rows, ld);
  } else {
    forward_gather_native<T, I>(x, values, indices, bias, y, batch, in_features, out_features, k, rows, ld);
  }
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
