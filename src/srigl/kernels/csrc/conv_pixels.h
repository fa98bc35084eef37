// Condensed conv2d for inference with output pixels as the vector lanes, NCHW in and NCHW out:
// y[n, rows[o], oh, ow] = bias + sum_j values[o, j] * x_pad[n, c, oh * sh + a * dh, ow * sw + b * dw]
// where indices[o, j] encodes (c, a, b) of the weight's own (C / groups, kh, kw) order.
//
// Why pixel lanes (and not conv.h's batch lanes): conv.h transposes a tile of up to 64 images so
// that each weight is one multiply-add of whole vectors of images; at batch 1 that wastes 15 of
// every 16 lanes, and it costs a transposition of x and of y per call. Here one output channel's
// plane is the vector: for a fixed tap (c, a, b) the inputs of consecutive output pixels of a row
// are consecutive in memory (stride 1), so each weight is a multiply-add of contiguous vectors of
// x into the output plane, whatever the batch, and y is written in place in NCHW.
//
// Flattened rows: the output plane is computed as Ho rows of W' columns, W' >= Wo the width of the
// plane read (the padded width for a 3x3 conv), so a tap is a single offset into a flat (H', W')
// plane and a vector may run across row ends; columns Wo..W' of each row are garbage and are not
// stored. Small late-stage planes (7x7) then fill vectors instead of padding each 7-wide row.
//
// Reading the input: an unpadded stride-1 conv one kernel column wide (1x1) reads x itself, its
// plane's last vector loaded with a lane mask so nothing past x is read. Otherwise x is copied once
// per call into a zero-padded buffer split into stride phases: phase (pr, pc) of a channel holds
// the padded pixels (r * sh + pr, q * sw + pc), so a stride-2 tap also reads contiguous pixels.
// Only phases some tap reads are made (a 1x1 stride-2 conv keeps one: a subsample).
//
// Loop order (why): work items (image, block of output pixel vectors, R output channels), the
// channels fastest, so one thread runs every output channel over the same block of input pixels,
// which stays in L1/L2 while the weights stream past; the block's R x U accumulators stay in
// registers across the whole fan-in. The offset of every weight in the input is computed once per
// call (int32 where an image allows), from one decode per fan-in position.
//
// What bounds it: layers with few weights per filter by writing the output, the others by loads of
// x from L2 (every weight reads its own stretch of input, so no load is shared between weights).

#pragma once

#include "conv.h"  // ConvShape, for_column_blocks
#include "vec.h"

namespace srigl_fanin {
namespace {

struct PixelPlan {
  bool direct;                  // reads x itself (stride 1, no padding, one kernel column)
  int64_t plane_h, plane_w;     // H', W' of one (channel, phase) plane
  int64_t phases;               // materialised phase planes per channel
  std::vector<int64_t> phase;   // (sh * sw,) compact phase of (pr, pc), or -1 if no tap reads it
  int64_t plane;                // elements between (channel, phase) planes
  int64_t image;                // elements per image in the buffer read
};

inline PixelPlan pixel_plan(const ConvShape& s, int64_t lanes) {
  PixelPlan p;
  // A kernel wider than one column would read past the end of x in the garbage columns.
  p.direct = s.sh == 1 && s.sw == 1 && s.kw == 1 && s.hp == s.h && s.wp == s.w;
  p.phase.assign(s.sh * s.sw, -1);
  std::vector<bool> row_used(s.sh, false), col_used(s.sw, false);
  for (int64_t a = 0; a < s.kh; ++a) row_used[a * s.dh % s.sh] = true;
  for (int64_t b = 0; b < s.kw; ++b) col_used[b * s.dw % s.sw] = true;
  p.phases = 0;
  for (int64_t pr = 0; pr < s.sh; ++pr)
    for (int64_t pc = 0; pc < s.sw; ++pc)
      if (row_used[pr] && col_used[pc]) p.phase[pr * s.sw + pc] = p.phases++;
  if (p.direct) {
    p.plane_h = s.h;
    p.plane_w = s.w;
  } else {
    // Rows and columns any output pixel's taps reach: Ho + the largest row shift in phase rows.
    p.plane_h = s.ho + (s.kh - 1) * s.dh / s.sh;
    p.plane_w = s.wo + (s.kw - 1) * s.dw / s.sw;
  }
  // Copied planes start on a vector boundary (a 1x1 stride-2 conv's loads then never straddle
  // two cache lines).
  p.plane = p.direct ? s.h * s.w : round_up(p.plane_h * p.plane_w, lanes);
  p.image = s.channels * p.phases * p.plane;
  return p;
}

// xp (N, C, phases, H', W') <- x (N, C, H, W): zero-padded and split into stride phases; planes
// p.plane elements apart.
template <typename T>
void pixel_prepare(const T* x, T* xp, const ConvShape& s, const PixelPlan& p) {
  const int64_t planes = s.batch * s.channels * p.phases;
  at::parallel_for(0, planes * p.plane_h, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> compact_r(p.phases), compact_c(p.phases);  // (pr, pc) of each compact phase
    for (int64_t pr = 0; pr < s.sh; ++pr)
      for (int64_t pc = 0; pc < s.sw; ++pc)
        if (p.phase[pr * s.sw + pc] >= 0) {
          compact_r[p.phase[pr * s.sw + pc]] = pr;
          compact_c[p.phase[pr * s.sw + pc]] = pc;
        }
    for (int64_t r = r0; r < r1; ++r) {  // r = ((n * C + c) * phases + ph) * H' + row
      const int64_t row = r % p.plane_h;
      const int64_t ph = r / p.plane_h % p.phases;
      const int64_t nc = r / p.plane_h / p.phases;  // n * C + c
      T* dst = xp + r / p.plane_h * p.plane + row * p.plane_w;
      if (row == p.plane_h - 1) {  // the plane's padding up to a whole vector
        std::memset(dst + p.plane_w, 0, (p.plane - p.plane_h * p.plane_w) * sizeof(T));
      }
      const int64_t ih = row * s.sh + compact_r[ph] - s.pad_top;
      if (ih < 0 || ih >= s.h) {
        std::memset(dst, 0, p.plane_w * sizeof(T));
        continue;
      }
      const T* src = x + (nc * s.h + ih) * s.w;
      const int64_t col0 = compact_c[ph] - s.pad_left;  // input column of dst[0]
      for (int64_t q = 0; q < p.plane_w; ++q) {
        const int64_t iw = q * s.sw + col0;
        dst[q] = iw >= 0 && iw < s.w ? src[iw] : T(0);
      }
    }
  });
}

// Lanes [0, n) of p (0 < n < lanes), the others zero; reads nothing at or past p + n (the end of x).
template <typename T>
inline typename Vec<T>::type load_first(const T* p, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    return (typename Vec<T>::type)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  } else {
    return (typename Vec<T>::type)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
  }
#else
  typename Vec<T>::type v{};
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
#endif
}

// Input footprint a block of pixels should keep within (L1d is 48 KiB on recent x86 server cores).
constexpr int64_t kPixelL1Bytes = 32 << 10;

// One call's operands and the product's inner loops, for R output channels x UB vectors of pixels
// per register block (see conv_pixels_run).
template <typename T, typename O>
struct PixelJob {
  using V = Vec<T>;
  static constexpr int64_t L = V::kLanes;
  const ConvShape& s;
  const PixelPlan& p;
  const T* src;      // the buffer read: x, or its padded phase copy
  const T* values;   // (n_active, k)
  const O* offsets;  // (n_active, k): each weight's offset in one image of src
  const int64_t* rows;
  const T* bias;
  T* y;
  int64_t count = 0;    // flat positions per output plane, garbage columns included
  int64_t vectors = 0;  // vectors covering them
  int64_t tail = 0;     // lanes of the last vector, when it is partial and must not read past x's end

  // Channels o0 .. o0 + RH over vectors [v_first, v_first + nv) of image n.
  template <int RH, int UB>
  void channels(int64_t n, int64_t o0, int64_t v_first, int64_t nv, T (*buffer)[UB * L]) const {
    const int64_t k = s.k;
    const int64_t q0 = v_first * L;
    const int64_t valid = std::min(count - q0, nv * L);  // positions of this block inside the plane
    const bool last = v_first + nv == vectors;
    const bool dense_rows = p.plane_w == s.wo;  // no garbage columns: the flat plane is y's own
    const int64_t out_plane = s.ho * s.wo;
    const T* in = src + n * p.image + q0;
    const T* w[RH];
    const O* off[RH];
    T* out[RH];
    T b0[RH];
    for (int r = 0; r < RH; ++r) {
      w[r] = values + (o0 + r) * k;
      off[r] = offsets + (o0 + r) * k;
      out[r] = y + (n * s.out_channels + rows[o0 + r]) * out_plane;
      b0[r] = bias != nullptr ? bias[rows[o0 + r]] : T(0);
    }
    for_column_blocks<UB>(nv, [&](int64_t v, auto width) {
      constexpr int U = decltype(width)::value;
      const bool partial = last && tail != 0 && v + U == nv;  // the last vector of x's plane
      typename V::type acc[RH][U];
      for (int r = 0; r < RH; ++r)
        for (int u = 0; u < U; ++u) acc[r][u] = typename V::type{} + b0[r];
      const T* at_block = in + v * L;
      if (!partial) {
        for (int64_t j = 0; j < k; ++j) {
          for (int r = 0; r < RH; ++r) {
            const T* from = at_block + off[r][j];
            const T wj = w[r][j];
            for (int u = 0; u < U; ++u) acc[r][u] += wj * load<T>(from + u * L);
          }
        }
      } else {
        for (int64_t j = 0; j < k; ++j) {
          for (int r = 0; r < RH; ++r) {
            const T* from = at_block + off[r][j];
            const T wj = w[r][j];
            for (int u = 0; u < U - 1; ++u) acc[r][u] += wj * load<T>(from + u * L);
            acc[r][U - 1] += wj * load_first<T>(from + (U - 1) * L, tail);
          }
        }
      }
      for (int r = 0; r < RH; ++r) {
        for (int u = 0; u < U; ++u) {
          const int64_t q = (v + u) * L;  // within the block
          if (dense_rows && q + L <= valid) {
            store<T>(out[r] + q0 + q, acc[r][u]);
          } else {
            store<T>(buffer[r] + q, acc[r][u]);
          }
        }
      }
    });
    for (int r = 0; r < RH; ++r) {
      if (dense_rows) {
        const int64_t full = valid / L * L;  // stored in place above
        if (full < valid) std::memcpy(out[r] + q0 + full, buffer[r] + full, (valid - full) * sizeof(T));
        continue;
      }
      // Row segments of the block, garbage columns (ow >= Wo) left out.
      for (int64_t q = q0; q < q0 + valid;) {
        const int64_t oh = q / p.plane_w, ow = q % p.plane_w;
        const int64_t len = std::min(q0 + valid - q, p.plane_w - ow);
        if (ow < s.wo) std::memcpy(out[r] + oh * s.wo + ow, buffer[r] + (q - q0), std::min(len, s.wo - ow) * sizeof(T));
        q += len;
      }
    }
  }

  // Items (image, block of UB vectors, R output channels), the channels fastest: a thread runs
  // every output channel over one block of pixels before the next, so the block's input stays in
  // its caches; R channels at a time give R * U independent multiply-add chains per fan-in step.
  template <int R, int UB>
  void run() const {
    const int64_t blocks = ceil_div(vectors, UB);
    const int64_t groups = ceil_div(s.n_active, R);
    at::parallel_for(0, s.batch * blocks * groups, 1, [&](int64_t i0, int64_t i1) {
      alignas(64) T buffer[R][UB * L];
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o0 = i % groups * R;
        const int64_t block = i / groups % blocks;
        const int64_t n = i / groups / blocks;
        const int64_t v_first = block * UB;
        const int64_t nv = std::min<int64_t>(UB, vectors - v_first);
        if (o0 + R <= s.n_active) {
          channels<R, UB>(n, o0, v_first, nv, buffer);
        } else {
          for (int64_t o = o0; o < s.n_active; ++o) channels<1, UB>(n, o, v_first, nv, buffer);
        }
      }
    });
  }
};

template <typename T, typename I, typename O>
void conv_pixels_run(const ConvShape& s, const T* x, const T* values, const I* indices, const int64_t* rows,
                     const T* bias, T* y) {
  using V = Vec<T>;
  constexpr int64_t L = V::kLanes;
  const PixelPlan p = pixel_plan(s, Vec<T>::kLanes);
  // The buffer read, with zero slack past the end: a block's last vector may run past the plane's
  // last output pixel (by < L) and a tap shifts it by up to a row (< W').
  at::Tensor prepared;  // an ATen buffer: 64-byte aligned, so that planes start on a vector
  const T* src = x;
  if (!p.direct) {
    const int64_t size = s.batch * p.image;
    prepared = at::empty({size + p.plane_w + L}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* buffer = prepared.data_ptr<T>();
    std::memset(buffer + size, 0, (p.plane_w + L) * sizeof(T));
    pixel_prepare<T>(x, buffer, s, p);
    src = buffer;
  }
  // Offset of each weight (o, j) in one image of the buffer: its group's first channel plus the
  // offset of its fan-in position (c, a, b), decoded once per position.
  const int64_t taps = s.kh * s.kw;
  const int64_t fan_in = s.channels_per_group() * taps;
  const int64_t plane = p.plane;
  std::vector<int64_t> lut(fan_in);
  for (int64_t idx = 0; idx < fan_in; ++idx) {
    const int64_t c = idx / taps, a = idx % taps / s.kw * s.dh, b = idx % s.kw * s.dw;
    lut[idx] = (c * p.phases + p.phase[a % s.sh * s.sw + b % s.sw]) * plane + a / s.sh * p.plane_w + b / s.sw;
  }
  const int64_t group_stride = s.channels_per_group() * p.phases * plane;
  const int64_t k = s.k;
  std::vector<O> offsets(s.n_active * k);
  at::parallel_for(0, s.n_active, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t base = rows[o] / s.outs_per_group() * group_stride;
      for (int64_t e = o * k; e < (o + 1) * k; ++e) offsets[e] = static_cast<O>(base + lut[indices[e]]);
    }
  });
  PixelJob<T, O> job{s, p, src, values, offsets.data(), rows, bias, y};
  job.count = s.ho * p.plane_w;
  job.vectors = ceil_div(job.count, job.L);
  job.tail = p.direct ? job.count % job.L : 0;
  // Vectors of pixels per block: the block's input (every channel, plus the rows a kernel taller
  // than 1 reaches) should stay in L1 while all output channels run over it, so the more channels,
  // the narrower the block, and the more output channels share the registers instead (up to 16
  // accumulators with AVX-512, 8 with the 16 registers of AVX2); a plane of at most 4 vectors
  // (ResNet's last stage) takes 4 channels at a time, for enough independent chains. On
  // ResNet-50's layers the measured differences between these shapes were within the noise of a
  // shared machine; the choice only avoids the clearly worse ones (one vector per channel, or
  // 8-wide blocks of many channels).
  const int64_t column_bytes = s.channels * p.phases * static_cast<int64_t>(sizeof(T));  // one pixel, all channels
  const int64_t reach = (s.kh - 1) * s.dh / s.sh * p.plane_w;  // extra pixels a tap's row shift reads
  auto fits = [&](int64_t ub) { return column_bytes * (ub * job.L + reach) <= kPixelL1Bytes; };
  constexpr int kAcc = kVecBytes == 64 ? 16 : 8;
  if (fits(8) && job.vectors > 4) {
    job.template run<1, 8>();
  } else if (fits(4)) {
    job.template run<kAcc / 8, 4>();
  } else {
    job.template run<kAcc / 4, 4>();
  }
  if (s.n_active < s.out_channels) {  // ablated channels output their bias (or 0)
    const int64_t out_plane = s.ho * s.wo;
    std::vector<bool> active(s.out_channels, false);
    for (int64_t o = 0; o < s.n_active; ++o) active[rows[o]] = true;
    at::parallel_for(0, s.batch * s.out_channels, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % s.out_channels;
        if (!active[c]) std::fill(y + r * out_plane, y + (r + 1) * out_plane, bias != nullptr ? bias[c] : T(0));
      }
    });
  }
}

// conv_pixels_run with int32 offsets where one image of the buffer allows (half the table's bytes).
template <typename T, typename I>
void conv_pixels_dispatch(const ConvShape& s, const T* x, const T* values, const I* indices, const int64_t* rows,
                          const T* bias, T* y) {
  const PixelPlan p = pixel_plan(s, Vec<T>::kLanes);
  if (p.image + p.plane_w + Vec<T>::kLanes < (int64_t{1} << 31)) {
    conv_pixels_run<T, I, int32_t>(s, x, values, indices, rows, bias, y);
  } else {
    conv_pixels_run<T, I, int64_t>(s, x, values, indices, rows, bias, y);
  }
}

}  // namespace
}  // namespace srigl_fanin
