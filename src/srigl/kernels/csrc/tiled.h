// Larger batches, transposed layout: x tiles transposed into per-thread buffers so every (o, j) is
// an axpy of a contiguous row, cache-blocked over the inputs (forward and backward).

#pragma once

#include "vec.h"

namespace srigl_fanin {
namespace {

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

// S is the storage type of the operands (T = compute_t<S> is the tile's).
template <typename T, typename S = T>
Tiling choose_tiling(int64_t batch, int64_t in_features, int64_t threads, int64_t max_width) {
  // Small batches: one narrow tile (4 or 8 floats) instead of a 16-float tile mostly of
  // padding. The per-entry cost is the same, but the tile is 4x or 2x smaller (48 or 96 KiB for
  // 3072 inputs), so the random row reads hit L1 instead of L2. Not the 8-float tile for bf16
  // operands: measured, it ran ~1.4x slower than the float one on the same layer while the full
  // 16-float tile ran faster than either (results/bf16_kernel.md); the cause is not understood.
  if (max_width <= 0) {
    if (16 < kVecBytes && batch <= Vec<T, 16>::kLanes) return {Vec<T, 16>::kLanes, 1, 16};
    if (32 < kVecBytes && batch <= Vec<T, 32>::kLanes && !std::is_same_v<S, bf16>) return {Vec<T, 32>::kLanes, 1, 32};
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
// NaNs). width is a multiple of the lanes. src may be stored as bf16 (S), widened on load.
template <typename T, int B, typename S>
void transpose_in(const S* src, int64_t cols, int64_t row0, int64_t rows, int64_t width, T* dst) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  for (int64_t r0 = 0; r0 < width; r0 += L) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(L, rows - r0));
    const S* s = src + (row0 + r0) * cols;
    int64_t c0 = 0;
    for (; c0 + L <= cols; c0 += L) {
      V r[L];
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) r[q] = q < valid ? load_as<T, B>(s + q * cols + c0) : V{};
      transpose_block<T, B>(r);
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) store<T, B>(dst + (c0 + q) * width + r0, r[q]);
    }
    for (int64_t c = c0; c < cols; ++c) {  // fewer than L columns left
      for (int64_t q = 0; q < L; ++q) dst[c * width + r0 + q] = q < valid ? T(s[q * cols + c]) : T(0);
    }
  }
}

// dst[(row0 + r) * dst_ld + c] = src[c * width + r] for r < rows, c < cols: the transpose of a
// (cols, width) tile back into rows of a row-major matrix (dst may point into the middle of a row),
// rounded to dst's storage type S.
template <typename T, int B, typename S>
void transpose_out(const T* src, int64_t cols, int64_t row0, int64_t rows, int64_t width, S* dst, int64_t dst_ld) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += L) {
    const int64_t valid = std::min<int64_t>(L, rows - r0);
    S* d = dst + (row0 + r0) * dst_ld;
    int64_t c0 = 0;
    for (; c0 + L <= cols; c0 += L) {
      V r[L];
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) r[q] = load<T, B>(src + (c0 + q) * width + r0);
      transpose_block<T, B>(r);
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) {
        if (q < valid) store_as<T, B>(d + q * dst_ld + c0, r[q]);
      }
    }
    for (int64_t c = c0; c < cols; ++c) {
      for (int64_t q = 0; q < valid; ++q) d[q * dst_ld + c] = S(src[c * width + r0 + q]);
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

// acc (NV vectors, one row of a result tile) += sum_{j in [j0, j1)} w[j] * xt[idx[j], :] (w stored as
// S: a bf16 weight is widened once, then multiplies NV vectors).
template <typename T, typename I, int B, int NV, typename S>
inline void accumulate_rows(T* acc_row, const T* xt, int64_t width, const I* idx, const S* w, int64_t j0,
                            int64_t j1) {
  if constexpr (!std::is_same_v<S, T>) {
    // Widened a block at a time with vector shifts: widening each weight as it is broadcast (load,
    // shift, move, broadcast) costs about as much as a narrow tile's whole multiply-add, and made
    // bf16 slower than float at batches 3-16 (results/bf16_kernel.md).
    constexpr int64_t kBlock = 256;
    constexpr int WL = Vec<T>::kLanes;
    alignas(64) T wide[kBlock];
    for (int64_t jb = j0; jb < j1; jb += kBlock) {
      const int64_t n = std::min(kBlock, j1 - jb);
      int64_t q = 0;
      for (; q + WL <= n; q += WL) store<T>(wide + q, load_as<T, kVecBytes>(w + jb + q));
      for (; q < n; ++q) wide[q] = T(w[jb + q]);
      accumulate_rows<T, I, B, NV, T>(acc_row, xt, width, idx + jb, wide, 0, n);
    }
    return;
  }
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
      const T wj = T(w[j + p]);
#pragma GCC unroll 8
      for (int n = 0; n < NV; ++n) acc[p][n] += load<T, B>(row + n * L) * wj;
    }
  }
  for (; j < j1; ++j) {
    const T* row = xt + static_cast<int64_t>(idx[j]) * width;
    const T wj = T(w[j]);
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
// costs about as much per entry as a narrow tile's multiply-add (small batches ran much slower).
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
template <typename T, typename I, int B, int NV, typename S>
void forward_tile(const T* xt, int64_t width, int64_t in_features, int64_t chunk, const S* values,
                  const I* indices, int64_t k, const S* bias, int64_t o0, int64_t o1, T* yt, int64_t* cursor) {
  using V = typename Vec<T, B>::type;
  constexpr int L = Vec<T, B>::kLanes;
  for (int64_t o = o0; o < o1; ++o) {
    const V init = V{} + (bias ? T(bias[o]) : T(0));
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
      accumulate_rows<T, I, B, NV, S>(yt + (o - o0) * width, xt, width, idx, values + o * k, j0, j1);
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

// y = x @ W.T + bias through transposed tiles. S is the storage type of x, values, bias and y; the
// tiles and accumulators are compute_t<S> (float for bf16: x is widened as it is transposed in, and
// results are rounded once as they are transposed out).
template <typename S, typename I>
void forward_transposed(const S* x, const S* values, const I* indices, const S* bias, S* y, int64_t batch,
                        int64_t in_features, int64_t out_features, int64_t k, int64_t max_width,
                        int64_t chunk_rows) {
  using T = compute_t<S>;
  const int64_t threads = at::get_num_threads();
  const Tiling tiling = choose_tiling<T, S>(batch, in_features, threads, max_width);
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
        forward_tile<T, I, B, decltype(shape)::kVecs, S>(xt, width, in_features, chunk, values, indices, k, bias, o0,
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
  // (a separate grad_y.sum(0) re-reads all of grad_y).
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

}  // namespace
}  // namespace srigl_fanin
