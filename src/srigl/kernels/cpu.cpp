// Constant fan-in product on the CPU: y[b, o] = sum_j values[o, j] * x[b, indices[o, j]] (+ bias[o]).
//
// Compiled on first use by srigl/kernels/cpu.py (torch.utils.cpp_extension.load) and registered as
// the torch operators srigl_fanin::forward, forward_rows and backward (autograd lives in Python),
// plus pack_windows and forward_windows for the window layout below.
//
// Two layouts for the operands as stored (values, indices), chosen by batch size:
//
// * gather (batch <= gather_max_batch): one output row at a time, a dot product of values[o, :]
//   with x[b, indices[o, :]]. Hardware gathers (AVX2) fetch 8 x entries per instruction;
//   int16 indices halve the index stream. Parallel over output rows.
// * transposed (larger batches): a batch tile of x is transposed (SIMD 16x16 blocks) into a
//   per-thread buffer xT (in_features, width) so that x[b0:b0+width, i] is one contiguous row.
//   Each (o, j) is then an axpy of a contiguous row into `width` accumulators held in vector
//   registers, with no gather at all. `width` (<= 128 floats) is chosen so the tile stays in L2;
//   when it is large, the inputs are walked in chunks (cursor per output row) so the rows in use
//   stay in the nearest caches. Results leave through a (out, width) tile and a SIMD transpose.
//   The backward uses the same tiles: grad_values is a dot product per (o, j) (reduced 16 at a
//   time), grad_x a scatter into a per-tile xT-shaped accumulator. Parallel over tiles (and over
//   output rows when there are fewer tiles than threads).
//
// A third, the window layout (AVX-512 builds only), is a repacked copy of the layer that a module
// owning the weights builds once and caches: rows in panels of 16 lanes, nonzeros scheduled into
// 32-input windows read with a permute instead of gathers. It is the fastest route for small
// batches; see its section for the layout and the numbers.
//
// Parallelism uses at::parallel_for, i.e. torch's own OpenMP pool, so torch.set_num_threads()
// applies and no second OpenMP runtime is started. Work is split into a fixed number of chunks
// (the thread count) with per-chunk scratch, so results do not depend on thread scheduling.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace srigl_fanin {
namespace {

// Width of one SIMD register for the ISA this file is compiled for (the flags come from cpu.py).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
// At most 8 accumulator registers per output row: with the partial sums, the broadcast value and
// the loaded row this stays well inside 16 (AVX2) or 32 (AVX-512) architectural registers.
constexpr int kMaxVecsPerTile = 8;
// Target footprint of one transposed x tile (in_features * width elements): it is re-read for
// every output row, so it must stay in the per-core L2 (>= 1 MiB on current x86 server parts).
constexpr int64_t kTileBytes = 1 << 20;
// Target footprint of one chunk of xt rows walked by all output rows before moving on. Measured
// on 3072 -> 768, batch 128-256 (chunk_rows knob): L1-sized chunks (16 KiB) lose to the
// per-chunk accumulator round trip; 64 KiB chunks win by ~10 % in the forward and ~25 % in the
// backward (whose grad_x rows are read-modify-written) over no chunking.
constexpr int64_t kChunkBytes = 64 << 10;

template <typename T>
struct IntOf;
template <>
struct IntOf<float> {
  using type = int32_t;
};
template <>
struct IntOf<double> {
  using type = int64_t;
};

// B-byte vectors of T. B is the ISA's full width except for the narrow tiles of small batches
// (16 or 32 bytes), whose transposed x tile is then small enough to live in L1.
template <typename T, int B = kVecBytes>
struct Vec {
  // GCC/Clang vector extensions: portable SIMD lowered to whatever ISA the flags enable.
  typedef T type __attribute__((vector_size(B)));
  typedef T unaligned __attribute__((vector_size(B), aligned(alignof(T)), may_alias));
  typedef typename IntOf<T>::type mask __attribute__((vector_size(B)));  // shuffle selectors
  static constexpr int kLanes = B / static_cast<int>(sizeof(T));
};

template <typename T, int B = kVecBytes>
inline typename Vec<T, B>::type load(const T* p) {
  return *reinterpret_cast<const typename Vec<T, B>::unaligned*>(p);
}

template <typename T, int B = kVecBytes>
inline void store(T* p, typename Vec<T, B>::type v) {
  *reinterpret_cast<typename Vec<T, B>::unaligned*>(p) = v;
}

template <typename T, int B = kVecBytes>
inline T horizontal_sum(typename Vec<T, B>::type v) {
#if defined(__AVX512F__)
  if constexpr (B == 64) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
    } else {
      return _mm512_reduce_add_pd(reinterpret_cast<__m512d>(v));
    }
  }
#endif
  T s = 0;
  for (int l = 0; l < Vec<T, B>::kLanes; ++l) s += v[l];
  return s;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

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
// (Xeon, 3072 -> 768 at 90 %, one thread) a 16-wide gather costs more than two 8-wide ones:
// 46.7 us per product with 16-wide against 43.1 us with 8-wide. Scalar loads were 69 us.
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
  // the row loop (~4 % of a batch-1 product at 3072 -> 768).
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

// ---------------------------------------------------------------------------------------------
// Larger batches: transposed layout.
// ---------------------------------------------------------------------------------------------

// float64 exists for gradient checks, not speed: its tiles use 1, 2, 4 or 8 vectors only, which
// roughly halves the kernel instantiations (and the first-use build time) at the price of some
// padding.
template <typename T>
constexpr bool kPowerOfTwoTiles = std::is_same_v<T, double>;

// Columns of a tile holding `rows` batch rows in `bytes`-wide vectors (padding included).
template <typename T>
int64_t padded_width(int64_t rows, int bytes) {
  const int64_t lanes = bytes / static_cast<int64_t>(sizeof(T));
  int64_t vecs = ceil_div(rows, lanes);
  if constexpr (kPowerOfTwoTiles<T>) {
    int64_t pow2 = 1;
    while (pow2 < vecs) pow2 *= 2;
    vecs = pow2;
  }
  return vecs * lanes;
}

struct Tiling {
  int64_t width;  // columns per tile, a multiple of the vector lanes
  int64_t count;  // number of tiles covering the batch
  int bytes;      // vector width used for the tiles
};

template <typename T>
Tiling choose_tiling(int64_t batch, int64_t in_features, int64_t threads, int64_t max_width) {
  // Small batches: one narrow tile (4 or 8 floats) instead of a 16-float tile mostly of
  // padding. The per-entry cost is the same, but the tile is 4x or 2x smaller (48 or 96 KiB for
  // 3072 inputs), so the random row reads hit L1 instead of L2.
  if (max_width <= 0) {
    if (16 < kVecBytes && batch <= Vec<T, 16>::kLanes) return {Vec<T, 16>::kLanes, 1, 16};
    if (32 < kVecBytes && batch <= Vec<T, 32>::kLanes) return {Vec<T, 32>::kLanes, 1, 32};
  }
  constexpr int64_t lanes = Vec<T>::kLanes;
  if (max_width <= 0) {
    // Largest power-of-two multiple of the lanes whose tile fits kTileBytes.
    max_width = lanes;
    while (max_width * 2 <= lanes * kMaxVecsPerTile &&
           max_width * 2 * in_features * static_cast<int64_t>(sizeof(T)) <= kTileBytes) {
      max_width *= 2;
    }
  }
  max_width = std::clamp<int64_t>(round_up(max_width, lanes), lanes, lanes * kMaxVecsPerTile);
  int64_t count = ceil_div(batch, max_width);
  // Several tiles: make their number a multiple of the thread count so every thread gets the
  // same number of (slightly narrower) tiles, e.g. batch 384 on 2 threads -> 4 tiles of 96.
  if (count > 1) count = round_up(count, threads);
  const int64_t width = padded_width<T>(ceil_div(batch, count), kVecBytes);
  return {width, ceil_div(batch, width), kVecBytes};
}

// Transposes the L x L block held in r (one row per register), in place: log2(L) stages, each
// exchanging one bit between the row and the column index with two-source shuffles
// (vpermt2ps on AVX-512). Entry (i, l) with bit h of i clear and bit h of l set swaps with entry
// (i | h, l & ~h).
template <typename T, int B, int H, bool High, int... lane>
constexpr typename Vec<T, B>::mask exchange_mask(std::integer_sequence<int, lane...>) {
  constexpr int L = Vec<T, B>::kLanes;
  // Lanes 0..L-1 select from the first operand, L..2L-1 from the second.
  return typename Vec<T, B>::mask{(High ? ((lane & H) ? L + lane : lane + H) : ((lane & H) ? L + lane - H : lane))...};
}

template <typename T, int B, int H = Vec<T, B>::kLanes / 2>
inline void transpose_block(typename Vec<T, B>::type* r) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  constexpr typename Vec<T, B>::mask lo = exchange_mask<T, B, H, false>(std::make_integer_sequence<int, L>{});
  constexpr typename Vec<T, B>::mask hi = exchange_mask<T, B, H, true>(std::make_integer_sequence<int, L>{});
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) {
    if (i & H) continue;
    const V a = r[i];
    const V b = r[i + H];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + H] = __builtin_shuffle(a, b, hi);
  }
  if constexpr (H > 1) transpose_block<T, B, H / 2>(r);
}

// Lane selectors for one stage of reduce_lanes: within each block of 2H lanes, the first H lanes
// come from the first operand and the last H from the second; `upper` picks the upper half of
// the corresponding source block.
template <typename T, int B, int H, bool Upper, int... lane>
constexpr typename Vec<T, B>::mask fold_mask(std::integer_sequence<int, lane...>) {
  constexpr int L = Vec<T, B>::kLanes;
  return typename Vec<T, B>::mask{(((lane / H) % 2) * L + (lane / (2 * H)) * 2 * H + (Upper ? H : 0) + lane % H)...};
}

// d[0..2H) -> d[0] with d[0][l] = sum of all lanes of the input d[l] (for H = L/2: L vectors in,
// their L horizontal sums out, in one vector). Each stage halves the vectors and the lanes per
// sum with two shuffles and an add per pair: ~3 operations per input vector in total, against
// ~8 for a separate horizontal sum of each.
template <typename T, int B, int H = Vec<T, B>::kLanes / 2>
inline void reduce_lanes(typename Vec<T, B>::type* d) {
  constexpr int L = Vec<T, B>::kLanes;
  constexpr typename Vec<T, B>::mask lower = fold_mask<T, B, H, false>(std::make_integer_sequence<int, L>{});
  constexpr typename Vec<T, B>::mask upper = fold_mask<T, B, H, true>(std::make_integer_sequence<int, L>{});
#pragma GCC unroll 16
  for (int i = 0; i < H; ++i) d[i] = __builtin_shuffle(d[i], d[i + H], lower) + __builtin_shuffle(d[i], d[i + H], upper);
  if constexpr (H > 1) reduce_lanes<T, B, H / 2>(d);
}

// dst (cols, width) <- transpose of rows [row0, row0 + rows) of src, a row-major (*, cols)
// matrix; columns rows..width-1 of dst are zeroed (they are computed on, so they must not hold
// NaNs). width is a multiple of the lanes.
template <typename T, int B>
void transpose_in(const T* src, int64_t cols, int64_t row0, int64_t rows, int64_t width, T* dst) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  for (int64_t r0 = 0; r0 < width; r0 += L) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(L, rows - r0));
    const T* s = src + (row0 + r0) * cols;
    int64_t c0 = 0;
    for (; c0 + L <= cols; c0 += L) {
      V r[L];
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) r[q] = q < valid ? load<T, B>(s + q * cols + c0) : V{};
      transpose_block<T, B>(r);
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) store<T, B>(dst + (c0 + q) * width + r0, r[q]);
    }
    for (int64_t c = c0; c < cols; ++c) {  // fewer than L columns left
      for (int64_t q = 0; q < L; ++q) dst[c * width + r0 + q] = q < valid ? s[q * cols + c] : T(0);
    }
  }
}

// dst[(row0 + r) * dst_ld + c] = src[c * width + r] for r < rows, c < cols: the transpose of a
// (cols, width) tile back into rows of a row-major matrix (dst may point into the middle of a row).
template <typename T, int B>
void transpose_out(const T* src, int64_t cols, int64_t row0, int64_t rows, int64_t width, T* dst, int64_t dst_ld) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += L) {
    const int64_t valid = std::min<int64_t>(L, rows - r0);
    T* d = dst + (row0 + r0) * dst_ld;
    int64_t c0 = 0;
    for (; c0 + L <= cols; c0 += L) {
      V r[L];
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) r[q] = load<T, B>(src + (c0 + q) * width + r0);
      transpose_block<T, B>(r);
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) {
        if (q < valid) store<T, B>(d + q * dst_ld + c0, r[q]);
      }
    }
    for (int64_t c = c0; c < cols; ++c) {
      for (int64_t q = 0; q < valid; ++q) d[q * dst_ld + c] = src[c * width + r0 + q];
    }
  }
}

// Per-thread scratch that survives between calls: torch's pool threads are long-lived, and a
// fresh megabyte-sized allocation per call would cost page faults comparable to the kernel.
// Contents are unspecified on return; callers overwrite what they read.
template <typename T, int Slot>
T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// acc (NV vectors, one row of a result tile) += sum_{j in [j0, j1)} w[j] * xt[idx[j], :].
template <typename T, typename I, int B, int NV>
inline void accumulate_rows(T* acc_row, const T* xt, int64_t width, const I* idx, const T* w, int64_t j0,
                            int64_t j1) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  // Independent partial sums: an FMA waits ~4 cycles for its accumulator, so narrow tiles need
  // several chains in flight (about 8 vectors in total) to keep both FMA ports busy.
  constexpr int P = NV >= 8 ? 1 : (NV >= 4 ? 2 : 4 / NV);
  V acc[P][NV];
#pragma GCC unroll 8
  for (int n = 0; n < NV; ++n) acc[0][n] = load<T, B>(acc_row + n * L);
#pragma GCC unroll 8
  for (int p = 1; p < P; ++p) {
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) acc[p][n] = V{};
  }
  int64_t j = j0;
  for (; j + P <= j1; j += P) {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const T* row = xt + static_cast<int64_t>(idx[j + p]) * width;
      const T wj = w[j + p];
#pragma GCC unroll 8
      for (int n = 0; n < NV; ++n) acc[p][n] += load<T, B>(row + n * L) * wj;
    }
  }
  for (; j < j1; ++j) {
    const T* row = xt + static_cast<int64_t>(idx[j]) * width;
    const T wj = w[j];
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) acc[0][n] += load<T, B>(row + n * L) * wj;
  }
#pragma GCC unroll 8
  for (int p = 1; p < P; ++p) {
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) acc[0][n] += acc[p][n];
  }
#pragma GCC unroll 8
  for (int n = 0; n < NV; ++n) store<T, B>(acc_row + n * L, acc[0][n]);
}

// End of the run of entries [j0, end) of one index row that falls in the input chunk ending at
// c1. The last (often the only) chunk takes every remaining entry without scanning: the scan
// costs about as much per entry as a narrow tile's multiply-add (batch 3-8 ran 1.5-2x slower).
template <typename I>
inline int64_t chunk_end(const I* idx, int64_t j0, int64_t k, int64_t c1, int64_t in_features) {
  if (c1 >= in_features) return k;
  int64_t j1 = j0;
  while (j1 < k && idx[j1] < c1) ++j1;
  return j1;
}

// Output rows [o0, o1) for one tile: yt[o - o0, :] = bias[o] + sum_j values[o, j] * xt[indices[o, j], :].
//
// Cache blocking: a random row of xt (in_features, width) comes from L2, at ~16 multiply-adds
// per 64-byte line. So the input features are walked in chunks of `chunk` rows (kChunkBytes),
// and every output row takes the entries whose index falls in the current chunk
// (a cursor per output row marks where it stopped), with its accumulators round-tripping
// through yt once per chunk instead of once per entry. Sorted index rows give each chunk a
// contiguous run; unsorted rows are still exact (an entry is taken in the first chunk whose
// end exceeds its index and every xt row is addressable), just less cache-friendly.
template <typename T, typename I, int B, int NV>
void forward_tile(const T* xt, int64_t width, int64_t in_features, int64_t chunk, const T* values,
                  const I* indices, int64_t k, const T* bias, int64_t o0, int64_t o1, T* yt, int64_t* cursor) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  for (int64_t o = o0; o < o1; ++o) {
    const V init = V{} + (bias ? bias[o] : T(0));
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) store<T, B>(yt + (o - o0) * width + n * L, init);
    cursor[o - o0] = 0;
  }
  for (int64_t c1 = std::min(in_features, chunk);; c1 = std::min(in_features, c1 + chunk)) {
    for (int64_t o = o0; o < o1; ++o) {
      const I* idx = indices + o * k;
      const int64_t j0 = cursor[o - o0];
      const int64_t j1 = chunk_end(idx, j0, k, c1, in_features);
      if (j1 == j0) continue;
      accumulate_rows<T, I, B, NV>(yt + (o - o0) * width, xt, width, idx, values + o * k, j0, j1);
      cursor[o - o0] = j1;
    }
    if (c1 >= in_features) break;
  }
}

// Entries [j0, j1) of one output row for one tile of the backward, g = gyt[o, :] (NV vectors):
//   gv[j]            += <g, xt[idx[j], :]>      (if gv)
//   gxt[idx[j], :]   += w[j] * g                (if gxt)
template <typename T, typename I, int B, int NV>
inline void backward_entries(const T* xt, T* gxt, int64_t width, const typename Vec<T, B>::type* g, const I* idx,
                             const T* w, int64_t j0, int64_t j1, T* gv) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  // <g, row> as one vector of partial sums (two FMA chains), and the scatter into gxt.
  auto entry = [&](int64_t j) {
    const int64_t r = static_cast<int64_t>(idx[j]) * width;
    V d0 = V{}, d1 = V{};
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) {
      if (gv != nullptr) {
        if (n % 2 == 0) d0 += g[n] * load<T, B>(xt + r + n * L);
        else d1 += g[n] * load<T, B>(xt + r + n * L);
      }
      if (gxt != nullptr) store<T, B>(gxt + r + n * L, load<T, B>(gxt + r + n * L) + g[n] * w[j]);
    }
    return d0 + d1;
  };
  int64_t j = j0;
  if (gv != nullptr) {
    // L entries at a time: their L dot-product vectors are reduced together (reduce_lanes).
    for (; j + L <= j1; j += L) {
      V d[L];
      // Not unrolled: the entries are independent anyway, and unrolling L copies of `entry` for
      // every tile width, index type and dtype would double the extension's build time.
#pragma GCC unroll 1
      for (int q = 0; q < L; ++q) d[q] = entry(j + q);
      reduce_lanes<T, B>(d);
      store<T, B>(gv + j, load<T, B>(gv + j) + d[0]);
    }
    for (; j < j1; ++j) gv[j] += horizontal_sum<T, B>(entry(j));
  } else {
    for (; j < j1; ++j) entry(j);
  }
}

// Output rows [o0, o1) for one tile of the backward (gv: (out, k) accumulator, may be null;
// gxt: (in, width) accumulator, may be null). Same input-chunk cache blocking as forward_tile:
// the scattered gxt rows are read-modify-written, so keeping the current chunk of xt and gxt
// rows hot matters even more here.
template <typename T, typename I, int B, int NV>
void backward_tile(const T* xt, const T* gyt, T* gxt, int64_t width, int64_t in_features, int64_t chunk,
                   const T* values, const I* indices, int64_t k, int64_t o0, int64_t o1, T* gv, int64_t* cursor) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  std::fill(cursor, cursor + (o1 - o0), int64_t(0));
  for (int64_t c1 = std::min(in_features, chunk);; c1 = std::min(in_features, c1 + chunk)) {
    for (int64_t o = o0; o < o1; ++o) {
      const I* idx = indices + o * k;
      const int64_t j0 = cursor[o - o0];
      const int64_t j1 = chunk_end(idx, j0, k, c1, in_features);
      if (j1 == j0) continue;
      V g[NV];
#pragma GCC unroll 8
      for (int n = 0; n < NV; ++n) g[n] = load<T, B>(gyt + o * width + n * L);
      backward_entries<T, I, B, NV>(xt, gxt, width, g, idx, values + o * k, j0, j1, gv == nullptr ? nullptr : gv + o * k);
      cursor[o - o0] = j1;
    }
    if (c1 >= in_features) break;
  }
}

template <int B, int NV>
struct TileShape {
  static constexpr int kBytes = B;  // vector width
  static constexpr int kVecs = NV;  // vectors per tile row
};

// Runs f(TileShape<B, NV>{}) for a tile of `width` elements of T built from `bytes`-wide vectors:
// one narrow vector (16 or 32 bytes) or 1..kMaxVecsPerTile full ones.
template <typename T, typename F>
void with_tile(int bytes, int64_t width, F&& f) {
  if (bytes == 16 && 16 < kVecBytes) return f(TileShape<16, 1>{});
  if (bytes == 32 && 32 < kVecBytes) return f(TileShape<32, 1>{});
  const int64_t vecs = width / Vec<T>::kLanes;
  if (vecs == 1) return f(TileShape<kVecBytes, 1>{});
  if (vecs == 2) return f(TileShape<kVecBytes, 2>{});
  if (vecs == 4) return f(TileShape<kVecBytes, 4>{});
  if (vecs == 8) return f(TileShape<kVecBytes, 8>{});
  if constexpr (!kPowerOfTwoTiles<T>) {
    if (vecs == 3) return f(TileShape<kVecBytes, 3>{});
    if (vecs == 5) return f(TileShape<kVecBytes, 5>{});
    if (vecs == 6) return f(TileShape<kVecBytes, 6>{});
    if (vecs == 7) return f(TileShape<kVecBytes, 7>{});
  }
  TORCH_CHECK(false, "srigl_fanin: tile of ", width, " columns is not a supported shape");
}


// Input rows per cache chunk (see forward_tile): kChunkBytes of xt, or the whole input when the
// tile is small or the rows too sparse for the per-chunk accumulator round trip to pay off.
template <typename T>
int64_t choose_chunk(int64_t width, int64_t in_features, int64_t k, int64_t chunk_rows) {
  if (chunk_rows > 0) return chunk_rows;
  // A tile this small stays in L2 whole; chunking would only add cursor bookkeeping.
  if (in_features * width * static_cast<int64_t>(sizeof(T)) <= 4 * kChunkBytes) return in_features;
  const int64_t rows = std::max<int64_t>(1, kChunkBytes / (width * static_cast<int64_t>(sizeof(T))));
  // Expected entries of one output row per chunk: k * rows / in_features. Below ~8 the
  // accumulator load/store per chunk costs more than the cache hits save.
  return k * rows >= 8 * in_features ? rows : in_features;
}

inline int64_t gcd(int64_t a, int64_t b) { return b == 0 ? a : gcd(b, a % b); }

template <typename T, typename I>
void forward_transposed(const T* x, const T* values, const I* indices, const T* bias, T* y, int64_t batch,
                        int64_t in_features, int64_t out_features, int64_t k, int64_t max_width,
                        int64_t chunk_rows) {
  const int64_t threads = at::get_num_threads();
  const Tiling tiling = choose_tiling<T>(batch, in_features, threads, max_width);
  // Fewer tiles than threads: also split the output rows, so that tiles * blocks is a multiple of
  // the thread count and every thread gets equal work.
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>(1, out_features), threads / gcd(tiling.count, threads));
  const int64_t tasks = tiling.count * blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    T* xt = thread_scratch<T, 0>(in_features * tiling.width);  // (in_features, width)
    T* yt = thread_scratch<T, 1>(out_features * tiling.width);  // (out_features, width)
    int64_t* cursor = thread_scratch<int64_t, 0>(out_features);
    int64_t loaded_tile = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / blocks;
      const int64_t block = t % blocks;
      const int64_t b0 = tile * tiling.width;
      const int64_t rows = std::min(tiling.width, batch - b0);
      // The last tile may be narrower than tiling.width.
      const int64_t width = padded_width<T>(rows, tiling.bytes);
      const int64_t o0 = out_features * block / blocks;
      const int64_t o1 = out_features * (block + 1) / blocks;
      const int64_t chunk = choose_chunk<T>(width, in_features, k, chunk_rows);
      with_tile<T>(tiling.bytes, width, [&](auto shape) {
        constexpr int B = decltype(shape)::kBytes;
        if (tile != loaded_tile) {
          transpose_in<T, B>(x, in_features, b0, rows, width, xt);
          loaded_tile = tile;
        }
        forward_tile<T, I, B, decltype(shape)::kVecs>(xt, width, in_features, chunk, values, indices, k, bias, o0,
                                                      o1, yt, cursor);
        // Results go through the (out, width) tile and a SIMD transpose: writing y[b, o]
        // directly would touch `width` cache lines per output row.
        transpose_out<T, B>(yt, o1 - o0, b0, rows, width, y + o0, out_features);
      });
    }
  });
}

template <typename T, typename I>
void backward_transposed(const T* grad_y, const T* x, const T* values, const I* indices, T* grad_x, T* grad_values,
                         T* grad_bias, int64_t batch, int64_t in_features, int64_t out_features, int64_t k,
                         int64_t max_width, int64_t chunk_rows) {
  const int64_t threads = at::get_num_threads();
  const Tiling tiling = choose_tiling<T>(batch, in_features, threads, max_width);
  // Tile-parallel when there are at least as many tiles as threads: each chunk owns whole tiles,
  // so its grad_x rows are private; grad_values gets one private (out, k) accumulator per chunk.
  // Otherwise output-parallel: each chunk owns output rows (so grad_values rows are private) and
  // scatters grad_x into a private (batch, in) buffer; both are reduced afterwards.
  const bool tile_parallel = tiling.count >= threads;
  const int64_t chunks = tile_parallel ? std::min(threads, tiling.count) : std::min<int64_t>(threads, std::max<int64_t>(1, out_features));
  const int64_t nk = out_features * k;
  const int64_t nx = batch * in_features;
  std::vector<T> gv_scratch;  // (chunks, out, k), tile-parallel only
  std::vector<T> gx_scratch;  // (chunks, batch, in), output-parallel only
  if (grad_values != nullptr) {
    if (tile_parallel && chunks > 1) gv_scratch.assign(chunks * nk, T(0));
    else std::fill(grad_values, grad_values + nk, T(0));
  }
  if (grad_x != nullptr && !tile_parallel && chunks > 1) gx_scratch.assign(chunks * nx, T(0));
  // grad_bias is the column sum of grad_y, taken from the transposed tiles while they are in cache
  // (a separate grad_y.sum(0) re-reads all of grad_y: ~4 % of a vit-tiny compact step).
  std::vector<T> gb_scratch;  // (chunks, out), tile-parallel only
  if (grad_bias != nullptr) {
    if (tile_parallel && chunks > 1) gb_scratch.assign(chunks * out_features, T(0));
    else std::fill(grad_bias, grad_bias + out_features, T(0));
  }

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    T* xt = grad_values != nullptr ? thread_scratch<T, 0>(in_features * tiling.width) : nullptr;  // (in, width)
    T* gyt = thread_scratch<T, 1>(out_features * tiling.width);                                    // (out, width)
    T* gxt = grad_x != nullptr ? thread_scratch<T, 2>(in_features * tiling.width) : nullptr;       // (in, width)
    int64_t* cursor = thread_scratch<int64_t, 0>(out_features);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t tile0 = tile_parallel ? tiling.count * c / chunks : 0;
      const int64_t tile1 = tile_parallel ? tiling.count * (c + 1) / chunks : tiling.count;
      const int64_t o0 = tile_parallel ? 0 : out_features * c / chunks;
      const int64_t o1 = tile_parallel ? out_features : out_features * (c + 1) / chunks;
      T* gv = grad_values == nullptr ? nullptr : (gv_scratch.empty() ? grad_values : gv_scratch.data() + c * nk);
      T* gx = grad_x == nullptr ? nullptr : (gx_scratch.empty() ? grad_x : gx_scratch.data() + c * nx);
      T* gb = grad_bias == nullptr ? nullptr : (gb_scratch.empty() ? grad_bias : gb_scratch.data() + c * out_features);
      for (int64_t tile = tile0; tile < tile1; ++tile) {
        const int64_t b0 = tile * tiling.width;
        const int64_t rows = std::min(tiling.width, batch - b0);
        const int64_t width = padded_width<T>(rows, tiling.bytes);
        const int64_t chunk = choose_chunk<T>(width, in_features, k, chunk_rows);
        with_tile<T>(tiling.bytes, width, [&](auto shape) {
          constexpr int B = decltype(shape)::kBytes;
          if (xt != nullptr) transpose_in<T, B>(x, in_features, b0, rows, width, xt);
          transpose_in<T, B>(grad_y, out_features, b0, rows, width, gyt);
          if (gb != nullptr) {  // the padding columns of gyt are zero
            using V = typename Vec<T, B>::type;
            constexpr int L = Vec<T, B>::kLanes;
            for (int64_t o = o0; o < o1; ++o) {
              V acc{};
              for (int64_t q = 0; q < width; q += L) acc += load<T, B>(gyt + o * width + q);
              gb[o] += horizontal_sum<T, B>(acc);
            }
          }
          if (gxt != nullptr) std::fill(gxt, gxt + in_features * width, T(0));
          backward_tile<T, I, B, decltype(shape)::kVecs>(xt, gyt, gxt, width, in_features, chunk, values, indices, k,
                                                         o0, o1, gv, cursor);
          // Each tile is visited once per chunk, and the chunk owns these rows of gx: plain store.
          if (gx != nullptr) transpose_out<T, B>(gxt, in_features, b0, rows, width, gx, in_features);
        });
      }
    }
  });

  if (!gv_scratch.empty()) reduce_chunks(gv_scratch.data(), chunks, nk, grad_values);
  if (!gb_scratch.empty()) reduce_chunks(gb_scratch.data(), chunks, out_features, grad_bias);
  if (!gx_scratch.empty()) reduce_chunks(gx_scratch.data(), chunks, nx, grad_x);
}

// ---------------------------------------------------------------------------------------------
// Operator entry points.
// ---------------------------------------------------------------------------------------------

// Calls f(T{}, I{}) for the (value dtype, index dtype) pair.
template <typename F>
void dispatch(at::ScalarType dtype, at::ScalarType index_dtype, F&& f) {
  auto with_index = [&](auto t) {
    switch (index_dtype) {
      // int64 is narrowed to int32 by cpu.py: a third index type would cost build time only.
      case at::kShort: f(t, int16_t{}); break;
      case at::kInt: f(t, int32_t{}); break;
      default: TORCH_CHECK(false, "srigl_fanin: indices must be int16 or int32, got ", index_dtype);
    }
  };
  switch (dtype) {
    case at::kFloat: with_index(float{}); break;
    case at::kDouble: with_index(double{}); break;
    default: TORCH_CHECK(false, "srigl_fanin: values must be float32 or float64, got ", dtype);
  }
}

void check_operands(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices) {
  TORCH_CHECK(x.dim() == 2, "srigl_fanin: x must be 2-D (batch, in_features), got ", x.dim(), " dims");
  TORCH_CHECK(values.dim() == 2 && indices.sizes() == values.sizes(), "srigl_fanin: values ", values.sizes(),
              " and indices ", indices.sizes(), " must both be (out_features, k)");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "srigl_fanin: x is ", x.scalar_type(), " but values are ",
              values.scalar_type());
  TORCH_CHECK(x.is_contiguous() && values.is_contiguous() && indices.is_contiguous(),
              "srigl_fanin: x, values and indices must be contiguous");
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu(),
              "srigl_fanin: CPU kernel got a tensor on another device");
}

// Checks the optional bias of an operator that writes `n` columns of dtype `dtype`; true when given.
bool check_bias(const std::optional<at::Tensor>& bias, int64_t n, at::ScalarType dtype) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() && bias->scalar_type() == dtype &&
                    bias->device().is_cpu(),
                "srigl_fanin: bias must be a contiguous (", n, ",) tensor of x's dtype");
  }
  return has_bias;
}

// The output column of each of `n` computed rows, checked: a contiguous int64 (n,) CPU tensor with
// every entry in [0, out_full) (a few hundred compares: cheap next to the product).
const int64_t* checked_rows(const at::Tensor& rows, int64_t n, int64_t out_full) {
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == n && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                  rows.device().is_cpu(),
              "srigl_fanin: rows must be a contiguous int64 (", n, ",) tensor");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t o = 0; o < n; ++o) {
    TORCH_CHECK(rp[o] >= 0 && rp[o] < out_full, "srigl_fanin: rows[", o, "] = ", rp[o], " is outside [0, ", out_full,
                ")");
  }
  return rp;
}

// One output row (out_full columns) as ablated neurons leave it: their bias, or 0.
template <typename T>
inline void fill_ablated(T* y_row, const T* bias, int64_t out_full) {
  if (bias != nullptr) {
    std::memcpy(y_row, bias, out_full * sizeof(T));
  } else {
    std::memset(y_row, 0, out_full * sizeof(T));
  }
}

// ---------------------------------------------------------------------------------------------
// Small batches on AVX-512: the window layout, a per-layer repacking built once (pack_windows)
// and cached by the module that owns the weights.
// ---------------------------------------------------------------------------------------------
//
// Why another layout: at batch 1 the gather layout is bound by the gather instructions
// themselves (~1.6 ns per 8-wide vgatherdps per core on the Xeon measured, the same with every
// index inside one cache line of x). Here output rows are grouped into panels of 16, one row per
// vector lane, and each panel's nonzeros are scheduled into *steps*: in a step every lane takes at
// most one of its nonzeros whose input index lies in a common window x[w, w + 32), w a multiple of
// 16 (so the two 16-float window loads never split a cache line). A two-source permute
// (vpermt2ps) picks each lane's x entry out of the window held in two registers, and one FMA adds
// it to the lane's row: no gather instruction and no horizontal sum (the 16 accumulator lanes are
// the 16 outputs). A lane with no nonzero in the window is padding: value 0 and masked off.
//
// Scheduling is greedy: w is the smallest next input index of any lane, rounded down to 16, and
// every lane whose next nonzero lies below w + 32 takes it. At 90 % sparsity on 3072 inputs that
// is ~1.55 steps per 16 nonzeros, ~86 bytes per step: 7.6 bytes per nonzero against 6 for the
// fp32 + int16 layout, traded for one permute instead of 2/16 of a gather per nonzero.
//
// Buffer (one uint8 tensor, sections 64-byte aligned, offsets in the header):
//   header       WindowHeader
//   panel_start  int64[panels + 1]   first step of each panel; each panel's steps are a multiple of 4
//   offsets      int32[steps]        window start w of each step
//   masks        uint16[steps]       bit l: lane l has a nonzero in this step
//   lanes        uint32[steps / 4][16] local indices (0..31) of 4 consecutive steps, step t of the
//                                    group in byte t of each lane: one load serves 4 steps, a shift
//                                    by 8t selects step t (vpermt2ps reads only the low 5 bits)
//   values       float[steps][16]

constexpr int kPanelRows = 16;      // rows per panel: the lanes of one 512-bit float vector
constexpr int kWindow = 32;         // input window of a step: the 32 floats of two registers
constexpr int kWindowAlign = 16;    // window starts are multiples of this: whole cache lines
constexpr int kStepsPerGroup = 4;   // steps sharing one 64-byte load of local indices
constexpr int kWindowBatchTile = 8; // batch rows computed together (accumulators in registers)
constexpr int64_t kWindowMagic = 0x5352474C57494E31;  // "SRGLWIN1": marks a pack_windows buffer

struct WindowHeader {
  int64_t magic;
  int64_t in_features;
  int64_t rows;
  int64_t panels;
  int64_t steps;
  int64_t panel_start, offsets, masks, lanes, values;  // byte offsets of the sections
};

struct WindowStep {
  int32_t offset;
  uint16_t mask;
  uint8_t lane_index[kPanelRows];
  float value[kPanelRows];
};

// The greedy schedule of one panel (rows r0 .. r0 + n - 1), padded to a multiple of 4 steps.
template <typename I>
std::vector<WindowStep> schedule_panel(const float* values, const I* indices, int64_t k, int64_t r0, int n,
                                       int64_t in_features) {
  // Each lane's nonzeros sorted by input index.
  std::vector<std::pair<int64_t, float>> entries[kPanelRows];
  for (int l = 0; l < n; ++l) {
    auto& e = entries[l];
    e.resize(k);
    for (int64_t j = 0; j < k; ++j) e[j] = {static_cast<int64_t>(indices[(r0 + l) * k + j]), values[(r0 + l) * k + j]};
    std::sort(e.begin(), e.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  }
  std::vector<WindowStep> steps;
  int64_t next[kPanelRows] = {};
  while (true) {
    int64_t w = in_features;
    for (int l = 0; l < n; ++l) {
      if (next[l] < k) w = std::min(w, entries[l][next[l]].first);
    }
    if (w == in_features) break;  // every lane done
    // Rounding down keeps the smallest index inside [w, w + 16), so every step makes progress;
    // the clamp keeps both window loads inside x (then that index is < in_features = w + 32).
    w = std::min(w / kWindowAlign * kWindowAlign, in_features - kWindow);
    WindowStep step{static_cast<int32_t>(w), 0, {}, {}};
    for (int l = 0; l < n; ++l) {
      if (next[l] < k && entries[l][next[l]].first < w + kWindow) {
        step.lane_index[l] = static_cast<uint8_t>(entries[l][next[l]].first - w);
        step.value[l] = entries[l][next[l]].second;
        step.mask |= static_cast<uint16_t>(1u << l);
        ++next[l];
      }
    }
    steps.push_back(step);
  }
  // Padding steps (nothing to add) fill the last group of 4; window 0 is inside x.
  while (steps.size() % kStepsPerGroup != 0) steps.push_back(WindowStep{0, 0, {}, {}});
  return steps;
}

inline int64_t align64(int64_t bytes) { return round_up(bytes, 64); }

const WindowHeader& window_header(const at::Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous() &&
                  packed.device().is_cpu() && packed.numel() >= static_cast<int64_t>(sizeof(WindowHeader)),
              "srigl_fanin: packed must be the contiguous uint8 CPU tensor pack_windows returns");
  const auto& h = *reinterpret_cast<const WindowHeader*>(packed.data_ptr<uint8_t>());
  TORCH_CHECK(h.magic == kWindowMagic && h.values + h.steps * kPanelRows * 4 == packed.numel(),
              "srigl_fanin: packed is not a buffer from pack_windows (bad header or size)");
  return h;
}

at::Tensor pack_windows(const at::Tensor& values, const at::Tensor& indices, int64_t in_features) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "srigl_fanin: pack_windows takes float32 values, got ",
              values.scalar_type());
  TORCH_CHECK(values.dim() == 2 && indices.sizes() == values.sizes() && values.is_contiguous() &&
                  indices.is_contiguous() && values.device().is_cpu() && indices.device().is_cpu(),
              "srigl_fanin: values ", values.sizes(), " and indices ", indices.sizes(),
              " must both be contiguous (rows, k) CPU tensors");
  TORCH_CHECK(in_features >= kWindow, "srigl_fanin: the window layout needs in_features >= ", kWindow, ", got ",
              in_features);
  const int64_t rows = values.size(0);
  const int64_t k = values.size(1);
  const int64_t panels = ceil_div(rows, kPanelRows);
  std::vector<std::vector<WindowStep>> schedules(panels);
  dispatch(at::kFloat, indices.scalar_type(), [&](auto, auto i) {
    using I = decltype(i);
    const float* v = values.data_ptr<float>();
    const I* idx = indices.data_ptr<I>();
    for (int64_t j = 0; j < rows * k; ++j) {  // the caller validated them once; this is the kernel's own guard
      TORCH_CHECK(idx[j] >= 0 && idx[j] < in_features, "srigl_fanin: index ", static_cast<int64_t>(idx[j]),
                  " is outside [0, ", in_features, ")");
    }
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int n = static_cast<int>(std::min<int64_t>(kPanelRows, rows - p * kPanelRows));
        schedules[p] = schedule_panel<I>(v, idx, k, p * kPanelRows, n, in_features);
      }
    });
  });
  std::vector<int64_t> start(panels + 1, 0);
  for (int64_t p = 0; p < panels; ++p) start[p + 1] = start[p] + static_cast<int64_t>(schedules[p].size());
  const int64_t steps = start[panels];
  WindowHeader h{kWindowMagic, in_features, rows, panels, steps, 0, 0, 0, 0, 0};
  h.panel_start = align64(sizeof(WindowHeader));
  h.offsets = align64(h.panel_start + (panels + 1) * 8);
  h.masks = align64(h.offsets + steps * 4);
  h.lanes = align64(h.masks + steps * 2);
  h.values = align64(h.lanes + steps * kPanelRows);  // 4 steps x 16 lanes x 1 byte = 64 bytes a group
  at::Tensor packed = at::zeros({h.values + steps * kPanelRows * 4}, values.options().dtype(at::kByte));
  uint8_t* base = packed.data_ptr<uint8_t>();
  std::memcpy(base, &h, sizeof(h));
  std::memcpy(base + h.panel_start, start.data(), (panels + 1) * 8);
  auto* offsets = reinterpret_cast<int32_t*>(base + h.offsets);
  auto* masks = reinterpret_cast<uint16_t*>(base + h.masks);
  uint8_t* lanes = base + h.lanes;
  auto* vals = reinterpret_cast<float*>(base + h.values);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t t = 0; t < static_cast<int64_t>(schedules[p].size()); ++t) {
        const WindowStep& step = schedules[p][t];
        const int64_t s = start[p] + t;
        offsets[s] = step.offset;
        masks[s] = step.mask;
        for (int l = 0; l < kPanelRows; ++l) {
          // Group s / 4, lane l, byte s % 4 (start[p] is a multiple of 4, so groups do not straddle panels).
          lanes[(s / kStepsPerGroup) * 64 + l * 4 + s % kStepsPerGroup] = step.lane_index[l];
          vals[s * kPanelRows + l] = step.value[l];
        }
      }
    }
  });
  return packed;
}

#if defined(__AVX512F__)
// True when no element of x[0, n) is NaN or infinite. Decides whether padding lanes need masking:
// a padding lane multiplies its zero value by some x in the window, which is only 0 when finite.
inline bool all_finite(const float* x, int64_t n) {
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) bad |= _mm512_fpclass_ps_mask(_mm512_loadu_ps(x + i), 0x99);  // NaN, +-inf
  if (i < n) bad |= _mm512_mask_fpclass_ps_mask(static_cast<__mmask16>((1u << (n - i)) - 1),
                                                 _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (n - i)) - 1), x + i), 0x99);
  return bad == 0;
}

// acc[b] = the 16 row sums of panel steps [s0, s1) for batch rows x + b * ldx, b < B.
template <int B, bool Masked>
inline void window_panel(const WindowHeader& h, const uint8_t* base, const float* x, int64_t ldx, int64_t s0,
                         int64_t s1, __m512* acc) {
  // B >= 4 batch rows are enough independent FMA chains; fewer get extra accumulators (U per row)
  // so that the 4-cycle FMA latency does not serialise the steps.
  constexpr int U = B >= 4 ? 1 : 4 / B;
  const auto* offsets = reinterpret_cast<const int32_t*>(base + h.offsets);
  const auto* masks = reinterpret_cast<const __mmask16*>(base + h.masks);
  const auto* lanes = reinterpret_cast<const int32_t*>(base + h.lanes);
  const auto* vals = reinterpret_cast<const float*>(base + h.values);
  __m512 part[U][B];
  for (int u = 0; u < U; ++u) {
    for (int b = 0; b < B; ++b) part[u][b] = _mm512_setzero_ps();
  }
  for (int64_t s = s0; s < s1; s += kStepsPerGroup) {
    const __m512i group = _mm512_loadu_si512(lanes + s * kPanelRows / kStepsPerGroup);
#pragma GCC unroll 4
    for (int t = 0; t < kStepsPerGroup; ++t) {
      const __m512i lane_index = t == 0 ? group : _mm512_srli_epi32(group, 8 * t);
      const float* window = x + offsets[s + t];
      const __m512 w = _mm512_loadu_ps(vals + (s + t) * kPanelRows);
      // The mask comes from memory only when needed: a padding lane of finite x adds 0 * x = 0.
      const __mmask16 m = Masked ? masks[s + t] : static_cast<__mmask16>(0xFFFF);
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
        const float* xb = window + b * ldx;
        const __m512 picked = Masked ? _mm512_maskz_permutex2var_ps(m, _mm512_loadu_ps(xb), lane_index, _mm512_loadu_ps(xb + 16))
                                     : _mm512_permutex2var_ps(_mm512_loadu_ps(xb), lane_index, _mm512_loadu_ps(xb + 16));
        part[t % U][b] = _mm512_fmadd_ps(w, picked, part[t % U][b]);
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    acc[b] = part[0][b];
    for (int u = 1; u < U; ++u) acc[b] = _mm512_add_ps(acc[b], part[u][b]);
  }
}

template <bool Masked>
void window_tile(int bt, const WindowHeader& h, const uint8_t* base, const float* x, int64_t ldx, int64_t s0,
                 int64_t s1, __m512* acc) {
  switch (bt) {
    case 1: window_panel<1, Masked>(h, base, x, ldx, s0, s1, acc); break;
    case 2: window_panel<2, Masked>(h, base, x, ldx, s0, s1, acc); break;
    case 3: window_panel<3, Masked>(h, base, x, ldx, s0, s1, acc); break;
    case 4: window_panel<4, Masked>(h, base, x, ldx, s0, s1, acc); break;
    case 5: window_panel<5, Masked>(h, base, x, ldx, s0, s1, acc); break;
    case 6: window_panel<6, Masked>(h, base, x, ldx, s0, s1, acc); break;
    case 7: window_panel<7, Masked>(h, base, x, ldx, s0, s1, acc); break;
    default: window_panel<8, Masked>(h, base, x, ldx, s0, s1, acc); break;
  }
}
#endif  // __AVX512F__

// y[b, col(r)] = bias[col(r)] + sum of row r's products, col(r) = rows ? rows[r] : r; y has out_full
// columns and, with rows, every column no row maps to holds its bias (or 0).
at::Tensor forward_windows(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& rows, int64_t out_full) {
#if !defined(__AVX512F__)
  TORCH_CHECK(false, "srigl_fanin: forward_windows needs a build with AVX-512");
#else
  const WindowHeader& h = window_header(packed);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "srigl_fanin: x must be a contiguous float32 (batch, in_features) CPU tensor");
  TORCH_CHECK(x.size(1) == h.in_features, "srigl_fanin: x has ", x.size(1), " features, the packed layer ",
              h.in_features);
  const bool has_rows = rows.has_value() && rows->defined();
  const int64_t* rp = has_rows ? checked_rows(*rows, h.rows, out_full) : nullptr;
  TORCH_CHECK(has_rows || out_full == h.rows, "srigl_fanin: out_full (", out_full,
              ") must equal the packed rows (", h.rows, ") without rows");
  const bool has_bias = check_bias(bias, out_full, at::kFloat);
  const int64_t batch = x.size(0);
  const int64_t in_features = h.in_features;
  at::Tensor y = at::empty({batch, out_full}, x.options());
  if (batch == 0 || out_full == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (has_rows && out_full > h.rows) {  // columns of ablated neurons: their bias (or 0)
    for (int64_t b = 0; b < batch; ++b) fill_ablated(yp + b * out_full, bp, out_full);
  }
  const bool masked = !all_finite(xp, batch * in_features);
  const uint8_t* base = packed.data_ptr<uint8_t>();
  const auto* start = reinterpret_cast<const int64_t*>(base + h.panel_start);
  // ~16k multiply-adds per chunk at least, as rows_grain.
  const int64_t per_panel = std::max<int64_t>(1, h.steps / std::max<int64_t>(1, h.panels) * kPanelRows * batch);
  at::parallel_for(0, h.panels, std::max<int64_t>(1, 16384 / per_panel), [&](int64_t p0, int64_t p1) {
    __m512 acc[kWindowBatchTile];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * kPanelRows;
      const int n = static_cast<int>(std::min<int64_t>(kPanelRows, h.rows - r0));
      const auto lane_mask = static_cast<__mmask16>((1u << n) - 1);
      for (int64_t b0 = 0; b0 < batch; b0 += kWindowBatchTile) {
        const int bt = static_cast<int>(std::min<int64_t>(kWindowBatchTile, batch - b0));
        if (masked) {
          window_tile<true>(bt, h, base, xp + b0 * in_features, in_features, start[p], start[p + 1], acc);
        } else {
          window_tile<false>(bt, h, base, xp + b0 * in_features, in_features, start[p], start[p + 1], acc);
        }
        for (int b = 0; b < bt; ++b) {
          float* yb = yp + (b0 + b) * out_full;
          if (!has_rows) {
            __m512 sum = acc[b];
            if (bp != nullptr) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lane_mask, bp + r0));
            _mm512_mask_storeu_ps(yb + r0, lane_mask, sum);
          } else {
            alignas(64) float sums[kPanelRows];
            _mm512_store_ps(sums, acc[b]);
            for (int l = 0; l < n; ++l) {
              const int64_t col = rp[r0 + l];
              yb[col] = sums[l] + (bp != nullptr ? bp[col] : 0.0f);
            }
          }
        }
      }
    }
  });
  return y;
#endif
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                   const std::optional<at::Tensor>& bias, int64_t gather_max_batch, int64_t max_width,
                   int64_t chunk_rows) {
  check_operands(x, values, indices);
  const int64_t batch = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t out_features = values.size(0);
  const int64_t k = values.size(1);
  const bool has_bias = check_bias(bias, out_features, x.scalar_type());
  at::Tensor y = at::empty({batch, out_features}, x.options());
  if (batch == 0 || out_features == 0) return y;
  dispatch(x.scalar_type(), indices.scalar_type(), [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    const T* b = has_bias ? bias->data_ptr<T>() : nullptr;
    if (batch <= gather_max_batch) {
      forward_gather<T, I>(x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(), b, y.data_ptr<T>(), batch,
                           in_features, out_features, k);
    } else {
      forward_transposed<T, I>(x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(), b, y.data_ptr<T>(),
                               batch, in_features, out_features, k, max_width, chunk_rows);
    }
  });
  return y;
}

// The product of a layer whose ablated neurons were dropped from values/indices: active row o
// lands in column rows[o] of y (batch, out_full), and every other column holds its bias (or 0),
// which is what the neuron outputs. One pass instead of the compute-then-index_copy of Python.
at::Tensor forward_rows(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                        const std::optional<at::Tensor>& bias, const at::Tensor& rows, int64_t out_full,
                        int64_t gather_max_batch, int64_t max_width, int64_t chunk_rows) {
  check_operands(x, values, indices);
  const int64_t batch = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t n_active = values.size(0);
  const int64_t k = values.size(1);
  const int64_t* rp = checked_rows(rows, n_active, out_full);
  const bool has_bias = check_bias(bias, out_full, x.scalar_type());
  at::Tensor y = at::empty({batch, out_full}, x.options());
  if (batch == 0 || out_full == 0) return y;
  dispatch(x.scalar_type(), indices.scalar_type(), [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    const T* b = has_bias ? bias->data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    // Every column first gets what an ablated neuron outputs; the active ones are overwritten.
    auto fill = [=](int64_t r) { fill_ablated(yp + r * out_full, b, out_full); };
    if (n_active == 0 || batch <= gather_max_batch) {
      for (int64_t r = 0; r < batch; ++r) fill(r);
    }
    if (n_active == 0) return;
    if (batch <= gather_max_batch) {
      forward_gather<T, I>(x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(), b, yp, batch, in_features,
                           n_active, k, rp, out_full);
      return;
    }
    // Larger batches: the tiled kernel writes contiguous (batch, n_active) results, which are then
    // scattered. The active bias goes into the product, as in forward(), so results are identical.
    std::vector<T> active_bias;
    if (b != nullptr) {
      active_bias.resize(n_active);
      for (int64_t o = 0; o < n_active; ++o) active_bias[o] = b[rp[o]];
    }
    at::Tensor active = at::empty({batch, n_active}, x.options());
    T* ap = active.data_ptr<T>();
    forward_transposed<T, I>(x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(),
                             b != nullptr ? active_bias.data() : nullptr, ap, batch, in_features, n_active, k,
                             max_width, chunk_rows);
    at::parallel_for(0, batch, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n_active)), [=](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        fill(r);
        for (int64_t o = 0; o < n_active; ++o) yp[r * out_full + rp[o]] = ap[r * n_active + o];
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                        const at::Tensor& values, const at::Tensor& indices,
                                                        bool need_grad_x, bool need_grad_values, bool need_grad_bias,
                                                        int64_t gather_max_batch, int64_t max_width,
                                                        int64_t chunk_rows) {
  check_operands(x, values, indices);
  const int64_t batch = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t out_features = values.size(0);
  const int64_t k = values.size(1);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == batch && grad_y.size(1) == out_features &&
                  grad_y.is_contiguous() && grad_y.scalar_type() == x.scalar_type(),
              "srigl_fanin: grad_y must be a contiguous (", batch, ", ", out_features, ") tensor of x's dtype");
  // Undefined tensors come back to Python as None.
  at::Tensor grad_x, grad_values, grad_bias;
  // The tiled route writes every element of both gradients (tile transposes, or the reduction of
  // per-chunk scratch), so it gets uninitialised memory: zero-filling an (8320, 768) grad_x costs
  // ~1 ms, about 5 % of a vit-tiny compact step. The gather route accumulates into them.
  const bool tiled = batch > gather_max_batch && out_features > 0 && k > 0;
  const auto make = [&](at::IntArrayRef size, const at::TensorOptions& options) {
    return tiled ? at::empty(size, options) : at::zeros(size, options);
  };
  if (need_grad_x) grad_x = make({batch, in_features}, x.options());
  if (need_grad_values) grad_values = make({out_features, k}, values.options());
  if (need_grad_bias) grad_bias = at::empty({out_features}, x.options());  // always written below
  if (batch == 0 || out_features == 0 || k == 0 || (!need_grad_x && !need_grad_values)) {
    // The bias gradient does not depend on the weights: a column sum (zero for an empty batch).
    if (need_grad_bias) grad_bias = grad_y.sum(0);
    return {grad_x, grad_values, grad_bias};
  }
  dispatch(x.scalar_type(), indices.scalar_type(), [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    T* gx = need_grad_x ? grad_x.data_ptr<T>() : nullptr;
    T* gv = need_grad_values ? grad_values.data_ptr<T>() : nullptr;
    T* gb = need_grad_bias ? grad_bias.data_ptr<T>() : nullptr;
    if (batch <= gather_max_batch) {
      backward_gather<T, I>(grad_y.data_ptr<T>(), x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(), gx,
                            gv, gb, batch, in_features, out_features, k);
    } else {
      backward_transposed<T, I>(grad_y.data_ptr<T>(), x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(),
                                gx, gv, gb, batch, in_features, out_features, k, max_width, chunk_rows);
    }
  });
  return {grad_x, grad_values, grad_bias};
}

}  // namespace
}  // namespace srigl_fanin

TORCH_LIBRARY(srigl_fanin, m) {
  m.def(
      "forward(Tensor x, Tensor values, Tensor indices, Tensor? bias, int gather_max_batch, int max_width, "
      "int chunk_rows) -> Tensor");
  m.def(
      "forward_rows(Tensor x, Tensor values, Tensor indices, Tensor? bias, Tensor rows, int out_full, "
      "int gather_max_batch, int max_width, int chunk_rows) -> Tensor");
  m.def(
      "backward(Tensor grad_y, Tensor x, Tensor values, Tensor indices, bool need_grad_x, bool need_grad_values, "
      "bool need_grad_bias, int gather_max_batch, int max_width, int chunk_rows) -> (Tensor, Tensor, Tensor)");
  m.def("pack_windows(Tensor values, Tensor indices, int in_features) -> Tensor");
  m.def("forward_windows(Tensor x, Tensor packed, Tensor? bias, Tensor? rows, int out_full) -> Tensor");
}

TORCH_LIBRARY_IMPL(srigl_fanin, CPU, m) {
  m.impl("forward", &srigl_fanin::forward);
  m.impl("forward_rows", &srigl_fanin::forward_rows);
  m.impl("backward", &srigl_fanin::backward);
  m.impl("pack_windows", &srigl_fanin::pack_windows);
  m.impl("forward_windows", &srigl_fanin::forward_windows);
}
