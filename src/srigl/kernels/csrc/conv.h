// Condensed conv2d with implicit im2col: y[n, rows[o], p] = sum_j values[o, j] * x[n, c, p*s + off]
// where indices[o, j] encodes (c, a, b) of the weight's own (C/groups, kh, kw) order, for an input
// x already padded by the caller. Forward, grad_x and grad_values, without an unfolded tensor.
//
// Layout: batch-innermost tiles. A tile of W = NV vector widths of batch entries (W <= 64) of x is
// transposed into xt (C, Hp, Wp, W), so that every weight (o, j) at every output pixel is one
// multiply-add of NV contiguous vectors, with the NV accumulators of an output pixel held in
// registers across the whole fan-in (the same idea as tiled.h's transposed layout, with the
// kernel's spatial shift folded into a precomputed offset per (o, j)). Batch lanes past the batch
// are zero in every transposed buffer, so they add nothing.
//
// Loop order (why): the three passes walk output rows oh outermost, so the part of xt (or of the
// transposed grad_y) that one row of work reads is the kh input rows below it, for every channel —
// C * kh * Wp * W elements, about L2-sized for ResNet layers at W = 64 — instead of the whole tile.
//
// * forward: parallel over (oh, o); each (o, oh) row is written once, through a (Wo, W) buffer
//   transposed into y. Inactive output channels are zeroed.
// * grad_values: the same walk; per-chunk private (n_active, k) accumulators (chunks = threads, a
//   fixed split, reduced in a fixed order so results do not depend on scheduling).
// * grad_x: the gather form, parallel over (ih, c), so each input row is written once and no
//   atomics or private copies of grad_x are needed: the entries (o, j) reading channel c are listed
//   per channel and stride class (a CSC view of the indices built per call, see ConvColumns). The
//   transposed grad_y has zero halo columns, so an entry whose output column falls outside
//   [0, Wo) reads zeros instead of needing a branch.

#pragma once

#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include "gather.h"  // reduce_chunks
#include "vec.h"

namespace srigl_fanin {
namespace {

constexpr int64_t kConvMaxTile = 64;  // batch entries per tile (W); larger batches take several tiles

struct ConvShape {
  int64_t batch, channels, h, w;      // x as given
  int64_t pad_top, pad_left, hp, wp;  // zero padding applied on the fly; padded size
  int64_t out_channels, n_active, k;
  int64_t kh, kw, sh, sw, dh, dw, groups;
  int64_t ho, wo;
  int64_t channels_per_group() const { return channels / groups; }
  int64_t outs_per_group() const { return out_channels / groups; }
};

// Per (o, j): the input channel and the kernel tap's (row, column) shift in input pixels.
struct ConvTaps {
  std::vector<int64_t> channel, row_shift, col_shift;
};

template <typename I>
ConvTaps conv_taps(const I* indices, const int64_t* rows, const ConvShape& s) {
  ConvTaps t;
  const int64_t n = s.n_active * s.k;
  t.channel.resize(n);
  t.row_shift.resize(n);
  t.col_shift.resize(n);
  // One decode per fan-in position instead of three divisions per weight.
  const int64_t taps = s.kh * s.kw;
  const int64_t fan_in = s.channels_per_group() * taps;
  std::vector<int64_t> decoded(3 * fan_in);  // (fan_in, 3): channel in group, row shift, column shift
  for (int64_t idx = 0; idx < fan_in; ++idx) {
    decoded[3 * idx] = idx / taps;
    decoded[3 * idx + 1] = idx % taps / s.kw * s.dh;
    decoded[3 * idx + 2] = idx % s.kw * s.dw;
  }
  at::parallel_for(0, s.n_active, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t base = rows[o] / s.outs_per_group() * s.channels_per_group();
      for (int64_t e = o * s.k; e < (o + 1) * s.k; ++e) {
        const int64_t* d = decoded.data() + 3 * static_cast<int64_t>(indices[e]);
        t.channel[e] = base + d[0];
        t.row_shift[e] = d[1];
        t.col_shift[e] = d[2];
      }
    }
  });
  return t;
}

// xt (C, Hp, Wp, W) <- x[n0 : n0 + nb] (N, C, H, W) zero-padded; lanes nb..W zero. Padding here,
// in the transposition every pass makes anyway, spares the caller an F.pad copy of x (and its
// backward a slice copy of grad_x).
template <typename T>
void conv_transpose_in(const T* x, T* xt, const ConvShape& s, int64_t n0, int64_t nb, int64_t width) {
  const int64_t plane = s.h * s.w;
  at::parallel_for(0, s.channels * s.hp, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = c * Hp + ih: one padded input row
      T* dst = xt + r * s.wp * width;  // (Wp, W)
      const int64_t c = r / s.hp;
      const int64_t ih = r % s.hp - s.pad_top;  // row of x
      const bool padding_row = ih < 0 || ih >= s.h;
      if (nb < width || padding_row || s.wp != s.w) std::memset(dst, 0, s.wp * width * sizeof(T));
      if (padding_row) continue;
      dst += s.pad_left * width;
      for (int64_t b = 0; b < nb; ++b) {
        const T* src = x + ((n0 + b) * s.channels + c) * plane + ih * s.w;
        for (int64_t iw = 0; iw < s.w; ++iw) dst[iw * width + b] = src[iw];
      }
    }
  });
}

// Fixed split of [0, total) into `chunks` ranges (the same for a given thread count).
inline std::pair<int64_t, int64_t> chunk_range(int64_t total, int64_t chunks, int64_t c) {
  return {total * c / chunks, total * (c + 1) / chunks};
}

// Output pixels per register block: OWB * NV accumulators, which with the loaded vectors must fit
// the register file (32 vector registers with AVX-512, 16 otherwise). Blocking neighbouring
// output columns gives OWB * NV independent multiply-add chains per fan-in entry (one chain per
// vector would wait on the FMA latency) and reads OWB neighbouring positions of the same xt row.
template <int NV>
constexpr int conv_block() {
  constexpr int regs = kVecBytes == 64 ? 24 : 12;
  return std::max(1, std::min(8, regs / NV));
}

// Calls body(first, std::integral_constant<int, U>) over the columns [0, n) in blocks of U = OWB
// while they fit, then 4, 2 and 1 (narrow layers, such as ResNet's last stage at 4 columns, would
// otherwise compute mostly padding).
template <int OWB, typename F>
inline void for_column_blocks(int64_t n, F&& body) {
  int64_t c = 0;
  for (; c + OWB <= n; c += OWB) body(c, std::integral_constant<int, OWB>{});
  if constexpr (OWB > 4) {
    if (c + 4 <= n) {
      body(c, std::integral_constant<int, 4>{});
      c += 4;
    }
  }
  if constexpr (OWB > 2) {
    if (c + 2 <= n) {
      body(c, std::integral_constant<int, 2>{});
      c += 2;
    }
  }
  if constexpr (OWB > 1) {
    if (c + 1 <= n) body(c, std::integral_constant<int, 1>{});
  }
}

template <typename T, int NV>
void conv_forward_tile(const T* xt, const T* values, const int64_t* offsets, const int64_t* rows, T* y,
                       const ConvShape& s, int64_t n0, int64_t nb) {
  using V = Vec<T>;
  constexpr int64_t L = V::kLanes;
  constexpr int64_t W = NV * L;
  constexpr int OWB = conv_block<NV>();
  const int64_t k = s.k;
  const int64_t row_step = s.sh * s.wp * W;  // xt elements between output rows
  const int64_t col_step = s.sw * W;
  const int64_t out_plane = s.ho * s.wo;
  at::parallel_for(0, s.ho * s.n_active, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> buffer(s.wo * W);  // (Wo, W): one output row, batch innermost
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t oh = i / s.n_active;
      const int64_t o = i % s.n_active;
      const T* w = values + o * k;
      const int64_t* off = offsets + o * k;
      for_column_blocks<OWB>(s.wo, [&](int64_t ow, auto block) {
        constexpr int U = decltype(block)::value;
        const T* base = xt + oh * row_step + ow * col_step;
        typename V::type acc[U][NV];
        for (int u = 0; u < U; ++u)
          for (int v = 0; v < NV; ++v) acc[u][v] = typename V::type{};
        for (int64_t j = 0; j < k; ++j) {
          const T* src = base + off[j];
          const T wj = w[j];
          for (int u = 0; u < U; ++u)
            for (int v = 0; v < NV; ++v) acc[u][v] += wj * load<T>(src + u * col_step + v * L);
        }
        for (int u = 0; u < U; ++u)
          for (int v = 0; v < NV; ++v) store<T>(buffer.data() + (ow + u) * W + v * L, acc[u][v]);
      });
      T* dst = y + (n0 * s.out_channels + rows[o]) * out_plane + oh * s.wo;
      for (int64_t b = 0; b < nb; ++b) {
        T* d = dst + b * s.out_channels * out_plane;
        for (int64_t ow = 0; ow < s.wo; ++ow) d[ow] = buffer[ow * W + b];
      }
    }
  });
}

// gyt (n_active, Ho, Wg, W) <- grad_y[n0 : n0 + nb, rows[o]], the output row shifted right by `halo`
// columns; halo columns and lanes past nb zero.
template <typename T>
void conv_transpose_grad(const T* grad_y, T* gyt, const int64_t* rows, const ConvShape& s, int64_t n0, int64_t nb,
                         int64_t width, int64_t halo, int64_t wg) {
  const int64_t out_plane = s.ho * s.wo;
  at::parallel_for(0, s.n_active * s.ho, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = o * Ho + oh
      const int64_t o = r / s.ho;
      const int64_t oh = r % s.ho;
      T* dst = gyt + r * wg * width;  // (Wg, W)
      std::memset(dst, 0, wg * width * sizeof(T));
      for (int64_t b = 0; b < nb; ++b) {
        const T* src = grad_y + ((n0 + b) * s.out_channels + rows[o]) * out_plane + oh * s.wo;
        for (int64_t ow = 0; ow < s.wo; ++ow) dst[(ow + halo) * width + b] = src[ow];
      }
    }
  });
}

// scratch[c, o * k + j] += sum over this tile of gyt[o, oh, ow] . xt[shifted]: chunk c of a fixed
// split of the (oh, o) rows.
template <typename T, int NV>
void conv_grad_values_tile(const T* xt, const T* gyt, const int64_t* offsets, T* scratch, int64_t chunks,
                           const ConvShape& s, int64_t halo, int64_t wg) {
  using V = Vec<T>;
  constexpr int64_t L = V::kLanes;
  constexpr int64_t W = NV * L;
  const int64_t k = s.k;
  const int64_t row_step = s.sh * s.wp * W;
  const int64_t col_step = s.sw * W;
  const int64_t total = s.ho * s.n_active;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* gv = scratch + c * s.n_active * k;
      const auto [i0, i1] = chunk_range(total, chunks, c);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t oh = i / s.n_active;
        const int64_t o = i % s.n_active;
        const T* g = gyt + ((o * s.ho + oh) * wg + halo) * W;  // (Wo, W), contiguous
        const int64_t* off = offsets + o * k;
        for (int64_t j = 0; j < k; ++j) {
          const T* src = xt + oh * row_step + off[j];
          // Two sets of accumulators (even and odd columns): independent chains, as in the forward.
          typename V::type acc[2][NV];
          for (int u = 0; u < 2; ++u)
            for (int v = 0; v < NV; ++v) acc[u][v] = typename V::type{};
          int64_t ow = 0;
          for (; ow + 2 <= s.wo; ow += 2) {
            for (int u = 0; u < 2; ++u)
              for (int v = 0; v < NV; ++v)
                acc[u][v] += load<T>(g + (ow + u) * W + v * L) * load<T>(src + (ow + u) * col_step + v * L);
          }
          for (; ow < s.wo; ++ow) {
            for (int v = 0; v < NV; ++v) acc[0][v] += load<T>(g + ow * W + v * L) * load<T>(src + ow * col_step + v * L);
          }
          for (int v = 0; v < NV; ++v) acc[0][v] += acc[1][v];
          for (int v = 1; v < NV; ++v) acc[0][0] += acc[0][v];
          gv[o * k + j] += horizontal_sum<T>(acc[0][0]);
        }
      }
    }
  });
}

// The CSC view grad_x gathers through: the weights (o, j) grouped by (input channel c, row class
// row_shift mod sh, column class col_shift mod sw), sorted by row_q = row_shift / sh within a group.
// For input row ih (qh = ih / sh), an entry's output row is oh = qh - row_q, valid for row_q in
// (qh - Ho, qh]: a contiguous run of the sorted group, found by binary search, so the per-row
// work is two searches per group instead of a pass over the channel's entries.
template <typename T>
struct ConvColumns {
  std::vector<int64_t> start;   // (C * sh * sw + 1,) group boundaries
  std::vector<int64_t> row_q;   // per entry, ascending within a group
  std::vector<int64_t> offset;  // gyt offset of (o, oh = -row_q, halo + col 0 - col_q); add qh * wg * W
  std::vector<T> value;
};

template <typename T>
ConvColumns<T> conv_columns(const ConvTaps& taps, const T* values, const ConvShape& s, int64_t halo, int64_t wg,
                            int64_t width) {
  const int64_t n = s.n_active * s.k;
  const int64_t classes = s.sh * s.sw;
  const int64_t groups = s.channels * classes;
  const int64_t row_qs = (s.kh - 1) * s.dh / s.sh + 1;  // distinct row_q values
  // One stable counting sort on (group, row_q): groups in order, row_q ascending within each.
  std::vector<int64_t> key(n);
  std::vector<int64_t> bucket(groups * row_qs + 1, 0);
  for (int64_t e = 0; e < n; ++e) {
    const int64_t group = taps.channel[e] * classes + taps.row_shift[e] % s.sh * s.sw + taps.col_shift[e] % s.sw;
    key[e] = group * row_qs + taps.row_shift[e] / s.sh;
    ++bucket[key[e] + 1];
  }
  for (int64_t b = 0; b + 1 < static_cast<int64_t>(bucket.size()); ++b) bucket[b + 1] += bucket[b];
  ConvColumns<T> cols;
  cols.start.resize(groups + 1);
  for (int64_t g = 0; g <= groups; ++g) cols.start[g] = bucket[g * row_qs];
  cols.row_q.resize(n);
  cols.offset.resize(n);
  cols.value.resize(n);
  for (int64_t o = 0, e = 0; o < s.n_active; ++o) {
    for (int64_t j = 0; j < s.k; ++j, ++e) {
      const int64_t i = bucket[key[e]]++;
      cols.row_q[i] = taps.row_shift[e] / s.sh;
      cols.offset[i] = ((o * s.ho - cols.row_q[i]) * wg + halo - taps.col_shift[e] / s.sw) * width;
      cols.value[i] = values[e];
    }
  }
  return cols;
}

// grad_x[n0 : n0 + nb] (N, C, Hp, Wp) <- sum over (o, j) reading it of values[o, j] * grad_y[...]
template <typename T, int NV>
void conv_grad_x_tile(const T* gyt, const ConvColumns<T>& cols, T* grad_x, const ConvShape& s, int64_t n0,
                      int64_t nb, int64_t wg) {
  using V = Vec<T>;
  constexpr int64_t L = V::kLanes;
  constexpr int64_t W = NV * L;
  constexpr int OWB = conv_block<NV>();
  const int64_t plane = s.h * s.w;
  // Only rows and columns of x: the padding's gradient is not wanted.
  at::parallel_for(0, s.h * s.channels, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> buffer(s.wp * W);  // (Wp, W): one padded input row
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t ih = i / s.channels + s.pad_top;  // padded row
      const int64_t c = i % s.channels;
      const int64_t qh = ih / s.sh;
      const int64_t rh = ih % s.sh;
      for (int64_t r = 0; r < s.sw; ++r) {
        const int64_t g = (c * s.sh + rh) * s.sw + r;
        const int64_t* q_begin = cols.row_q.data() + cols.start[g];
        const int64_t* q_end = cols.row_q.data() + cols.start[g + 1];
        const int64_t lo = std::upper_bound(q_begin, q_end, qh - s.ho) - cols.row_q.data();
        const int64_t hi = std::upper_bound(q_begin, q_end, qh) - cols.row_q.data();
        const T* row = gyt + qh * wg * W;
        // Columns of class r are iw = qw * sw + r, taken in blocks of consecutive qw; only x's own
        // columns [pad_left, pad_left + W) are computed.
        const int64_t qw_first = (s.pad_left - r + s.sw - 1) / s.sw;
        const int64_t qw_end = (s.pad_left + s.w - 1 - r) / s.sw + 1;
        if (s.pad_left + s.w - 1 < r) continue;
        for_column_blocks<OWB>(qw_end - qw_first, [&](int64_t q, auto block) {
          constexpr int U = decltype(block)::value;
          const int64_t qw = qw_first + q;
          const T* base = row + qw * W;
          typename V::type acc[U][NV];
          for (int u = 0; u < U; ++u)
            for (int v = 0; v < NV; ++v) acc[u][v] = typename V::type{};
          for (int64_t e = lo; e < hi; ++e) {
            const T* src = base + cols.offset[e];
            const T value = cols.value[e];
            for (int u = 0; u < U; ++u)
              for (int v = 0; v < NV; ++v) acc[u][v] += value * load<T>(src + u * W + v * L);
          }
          for (int u = 0; u < U; ++u)
            for (int v = 0; v < NV; ++v) store<T>(buffer.data() + ((qw + u) * s.sw + r) * W + v * L, acc[u][v]);
        });
      }
      T* dst = grad_x + (n0 * s.channels + c) * plane + (ih - s.pad_top) * s.w;
      const T* src = buffer.data() + s.pad_left * W;
      for (int64_t b = 0; b < nb; ++b) {
        T* d = dst + b * s.channels * plane;
        for (int64_t iw = 0; iw < s.w; ++iw) d[iw] = src[iw * W + b];
      }
    }
  });
}

// The whole operator for one (T, NV): loops over batch tiles.
template <typename T, int NV>
void conv_run(const ConvShape& s, const ConvTaps& taps, const T* x, const T* values, const int64_t* rows, T* y,
              const T* grad_y, T* grad_x, T* grad_values) {
  constexpr int64_t W = NV * Vec<T>::kLanes;
  const int64_t n_entries = s.n_active * s.k;
  // Offsets of each tap in xt: channel plane, shifted row, shifted column.
  std::vector<int64_t> offsets(n_entries);
  for (int64_t e = 0; e < n_entries; ++e) {
    offsets[e] = ((taps.channel[e] * s.hp + taps.row_shift[e]) * s.wp + taps.col_shift[e]) * W;
  }
  const bool backward = grad_y != nullptr;
  const bool need_x = backward && grad_x != nullptr;
  const bool need_values = backward && grad_values != nullptr;
  // gyt halo: an entry's output column iw / sw - col_q ranges over [-max col_q, (Wp - 1) / sw].
  int64_t halo = 0;
  for (int64_t e = 0; need_x && e < n_entries; ++e) halo = std::max(halo, taps.col_shift[e] / s.sw);
  // Columns: the halo, then room for every output column and for grad_x's last read.
  const int64_t wg = halo + std::max(s.wo, (s.wp - 1) / s.sw + 1);
  ConvColumns<T> cols;
  if (need_x) cols = conv_columns<T>(taps, values, s, halo, wg, W);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s.ho * s.n_active));
  std::vector<T> scratch;
  if (need_values) scratch.assign(chunks * n_entries, T(0));
  const bool need_xt = !backward || need_values;
  std::vector<T> xt(need_xt ? s.channels * s.hp * s.wp * W : 0);
  std::vector<T> gyt(backward ? s.n_active * s.ho * wg * W : 0);
  for (int64_t n0 = 0; n0 < s.batch; n0 += W) {
    const int64_t nb = std::min<int64_t>(W, s.batch - n0);
    if (need_xt) conv_transpose_in<T>(x, xt.data(), s, n0, nb, W);
    if (!backward) {
      conv_forward_tile<T, NV>(xt.data(), values, offsets.data(), rows, y, s, n0, nb);
      continue;
    }
    conv_transpose_grad<T>(grad_y, gyt.data(), rows, s, n0, nb, W, halo, wg);
    if (need_values) conv_grad_values_tile<T, NV>(xt.data(), gyt.data(), offsets.data(), scratch.data(), chunks, s, halo, wg);
    if (need_x) conv_grad_x_tile<T, NV>(gyt.data(), cols, grad_x, s, n0, nb, wg);
  }
  if (need_values) reduce_chunks(scratch.data(), chunks, n_entries, grad_values);
}

// Target footprint of the xt rows one output row reads (C * kh input rows of Wp * W elements): it
// is re-read by every output channel, so it must stay in L2 with room to spare. This budget gives
// W = 32 floats on ResNet-18's layers, which beat 16 and 64 there (a 2 MiB-L2 part; the tile-width
// table of results/compact_conv.md).
constexpr int64_t kConvRowsBytes = 1280 << 10;

// Vectors per tile: the fewest that cover the batch, up to kConvMaxTile entries and the L2 budget
// above (at least one vector); max_tile > 0 replaces the budget by that many batch entries (a
// tuning knob, still at most kConvMaxTile).
template <typename T, typename F>
void conv_dispatch_width(const ConvShape& s, int64_t max_tile, F&& f) {
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t rows_bytes = s.channels * s.kh * s.wp * L * static_cast<int64_t>(sizeof(T));  // per vector
  int64_t cap = max_tile > 0 ? max_tile / L : kConvRowsBytes / std::max<int64_t>(1, rows_bytes);
  cap = std::min<int64_t>(kConvMaxTile / L, std::max<int64_t>(1, cap));
  const int64_t need = std::min(cap, ceil_div(s.batch, L));
  if (need <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (need <= 3) {
    f(std::integral_constant<int, 2>{});
  } else if (need <= 7 || 8 * L > kConvMaxTile) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

}  // namespace
}  // namespace srigl_fanin
