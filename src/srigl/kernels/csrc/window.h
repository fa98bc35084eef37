// Small batches on AVX-512: the window layout (pack_windows builds it, forward_windows runs it).

#pragma once

#include "checks.h"
#include "vec.h"

namespace srigl_fanin {
namespace {

// ---------------------------------------------------------------------------------------------
// Small batches on AVX-512: the window layout, a per-layer repacking built once (pack_windows)
// and cached by the module that owns the weights.
// ---------------------------------------------------------------------------------------------
//
// Why another layout: at batch 1 the gather layout is bound by the gather instructions
// themselves (they cost the same with every index inside one cache line of x; figures in
// results/kernel_tuning.md). Here output rows are grouped into panels of 16, one row per
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

}  // namespace
}  // namespace srigl_fanin
