// Constant fan-in product on the CPU: y[b, o] = sum_j values[o, j] * x[b, indices[o, j]] (+ bias[o]).
//
// Compiled on first use by srigl/kernels/cpu.py (torch.utils.cpp_extension.load) and registered as
// the torch operators srigl_fanin::forward, forward_rows and backward (autograd lives in Python),
// plus pack_windows and forward_windows for the window layout (window.h). One translation unit:
// this file holds the entry points and the registration and includes one header per route
// (vec.h: SIMD helpers; gather.h; tiled.h; checks.h: argument checks; window.h), and the condensed
// conv2d operators srigl_fanin::conv_forward and conv_backward (conv.h) and the inference-only
// conv_pixels (conv_pixels.h: output pixels as vector lanes, for small batches and no autograd).
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
// batches; see window.h for the layout.
//
// bfloat16 (forward only): values, x, bias and y in bf16, products accumulated in float and rounded
// once per output. The gather layout uses vdpbf16ps where the CPU has AVX-512-BF16 (chosen at run
// time, gather.h) and otherwise widens to float and runs the float gather; the transposed layout
// widens x as it transposes it in and rounds as it transposes the results out. The backward of a
// bf16 layer runs this kernel's float32 backward on widened copies (cpu.py), so it is refused here.
//
// Parallelism uses at::parallel_for, i.e. torch's own OpenMP pool, so torch.set_num_threads()
// applies and no second OpenMP runtime is started. Work is split into a fixed number of chunks
// (the thread count) with per-chunk scratch, so results do not depend on thread scheduling.

#include "checks.h"
#include "gather.h"
#include "conv.h"
#include "conv_pixels.h"
#include "tiled.h"
#include "vec.h"
#include "window.h"

namespace srigl_fanin {
namespace {

// ---------------------------------------------------------------------------------------------
// Operator entry points.
// ---------------------------------------------------------------------------------------------

// y (batch, out_full) from the active columns a (batch, n_active): column rows[o] of y is a's column
// o, every other column the bias (or 0), which is what an ablated neuron outputs. One pass over y,
// parallel over batch rows.
template <typename T>
void scatter_columns(const T* ap, const int64_t* rp, const T* b, T* yp, int64_t batch, int64_t n_active,
                     int64_t out_full) {
  at::parallel_for(0, batch, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, out_full)), [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      fill_ablated(yp + r * out_full, b, out_full);
      for (int64_t o = 0; o < n_active; ++o) yp[r * out_full + rp[o]] = ap[r * n_active + o];
    }
  });
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
    check_index_range<I>(indices.data_ptr<I>(), indices.numel(), in_features);
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
    check_index_range<I>(indices.data_ptr<I>(), indices.numel(), in_features);
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
    scatter_columns<T>(ap, rp, b, yp, batch, n_active, out_full);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                        const at::Tensor& values, const at::Tensor& indices,
                                                        bool need_grad_x, bool need_grad_values, bool need_grad_bias,
                                                        int64_t gather_max_batch, int64_t max_width,
                                                        int64_t chunk_rows) {
  check_operands(x, values, indices);
  TORCH_CHECK(x.scalar_type() != at::kBFloat16,
              "srigl_fanin: the backward takes float32 or float64 (bf16 layers run it on float32 copies)");
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
  // per-chunk scratch), so it gets uninitialised memory: zero-filling a large grad_x is a
  // visible share of a compact training step (results/kernel_tuning.md). The gather route accumulates into them.
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
    if constexpr (!std::is_same_v<T, bf16>) {  // bf16 is refused above
      T* gx = need_grad_x ? grad_x.data_ptr<T>() : nullptr;
      T* gv = need_grad_values ? grad_values.data_ptr<T>() : nullptr;
      T* gb = need_grad_bias ? grad_bias.data_ptr<T>() : nullptr;
      check_index_range<I>(indices.data_ptr<I>(), indices.numel(), in_features);
      if (batch <= gather_max_batch) {
        backward_gather<T, I>(grad_y.data_ptr<T>(), x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(), gx,
                              gv, gb, batch, in_features, out_features, k);
      } else {
        backward_transposed<T, I>(grad_y.data_ptr<T>(), x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(),
                                  gx, gv, gb, batch, in_features, out_features, k, max_width, chunk_rows);
      }
    }
  });
  return {grad_x, grad_values, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// Condensed conv2d (conv.h): zero padding (left, right, top, bottom) applied on the fly; groups
// handled by the channel offset of each row.
// ---------------------------------------------------------------------------------------------

ConvShape conv_shape(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& rows,
                     int64_t out_channels, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "srigl_fanin: conv x must be 4-D (N, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(values.dim() == 2 && indices.sizes() == values.sizes(), "srigl_fanin: values ", values.sizes(),
              " and indices ", indices.sizes(), " must both be (n_active, k)");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "srigl_fanin: x is ", x.scalar_type(), " but values are ",
              values.scalar_type());
  TORCH_CHECK(x.scalar_type() != at::kBFloat16, "srigl_fanin: the conv kernel takes float32 or float64, not bfloat16");
  TORCH_CHECK(x.is_contiguous() && values.is_contiguous() && indices.is_contiguous(),
              "srigl_fanin: x, values and indices must be contiguous");
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu(),
              "srigl_fanin: CPU kernel got a tensor on another device");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && dilation.size() == 2,
              "srigl_fanin: kernel, stride and dilation must be pairs");
  TORCH_CHECK(padding.size() == 4 && padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0,
              "srigl_fanin: padding must be 4 non-negative amounts (left, right, top, bottom)");
  ConvShape s{};
  s.batch = x.size(0);
  s.channels = x.size(1);
  s.h = x.size(2);
  s.w = x.size(3);
  s.pad_left = padding[0];
  s.pad_top = padding[2];
  s.hp = s.h + padding[2] + padding[3];
  s.wp = s.w + padding[0] + padding[1];
  s.out_channels = out_channels;
  s.n_active = values.size(0);
  s.k = values.size(1);
  s.kh = kernel[0];
  s.kw = kernel[1];
  s.sh = stride[0];
  s.sw = stride[1];
  s.dh = dilation[0];
  s.dw = dilation[1];
  s.groups = groups;
  TORCH_CHECK(s.kh > 0 && s.kw > 0 && s.sh > 0 && s.sw > 0 && s.dh > 0 && s.dw > 0 && groups > 0,
              "srigl_fanin: kernel, stride, dilation and groups must be positive");
  TORCH_CHECK(s.channels % groups == 0 && out_channels % groups == 0, "srigl_fanin: channels ", s.channels,
              " and out_channels ", out_channels, " must divide by groups ", groups);
  TORCH_CHECK(s.hp >= s.dh * (s.kh - 1) + 1 && s.wp >= s.dw * (s.kw - 1) + 1, "srigl_fanin: padded input ", s.hp,
              "x", s.wp, " is smaller than the dilated kernel");
  s.ho = (s.hp - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  s.wo = (s.wp - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  checked_rows(rows, s.n_active, out_channels);
  return s;
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                        const at::Tensor& rows, int64_t out_channels, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t max_tile) {
  const ConvShape s = conv_shape(x, values, indices, rows, out_channels, kernel, stride, padding, dilation, groups);
  // Only inactive channels need zeros; the kernel writes every element of the active ones.
  at::Tensor y = s.n_active == out_channels ? at::empty({s.batch, out_channels, s.ho, s.wo}, x.options())
                                            : at::zeros({s.batch, out_channels, s.ho, s.wo}, x.options());
  if (s.batch == 0 || s.n_active == 0 || s.ho * s.wo == 0) return s.k == 0 ? y.zero_() : y;
  dispatch(x.scalar_type(), indices.scalar_type(), [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    if constexpr (!std::is_same_v<T, bf16>) {  // bf16 is refused in conv_shape
      check_index_range<I>(indices.data_ptr<I>(), indices.numel(), s.channels_per_group() * s.kh * s.kw);
      const ConvTaps taps = conv_taps<I>(indices.data_ptr<I>(), rows.data_ptr<int64_t>(), s);
      conv_dispatch_width<T>(s, max_tile, [&](auto nv) {
        conv_run<T, decltype(nv)::value>(s, taps, x.data_ptr<T>(), values.data_ptr<T>(), rows.data_ptr<int64_t>(),
                                         y.data_ptr<T>(), nullptr, nullptr, nullptr);
      });
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const at::Tensor& values, const at::Tensor& indices,
                                                 const at::Tensor& rows, int64_t out_channels, at::IntArrayRef kernel,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups, bool need_grad_x,
                                                 bool need_grad_values, int64_t max_tile) {
  const ConvShape s = conv_shape(x, values, indices, rows, out_channels, kernel, stride, padding, dilation, groups);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == s.batch && grad_y.size(1) == out_channels &&
                  grad_y.size(2) == s.ho && grad_y.size(3) == s.wo && grad_y.is_contiguous() &&
                  grad_y.scalar_type() == x.scalar_type(),
              "srigl_fanin: grad_y must be a contiguous (", s.batch, ", ", out_channels, ", ", s.ho, ", ", s.wo,
              ") tensor of x's dtype");
  at::Tensor grad_x, grad_values;
  const bool empty = s.batch == 0 || s.n_active == 0 || s.k == 0 || s.ho * s.wo == 0 || s.h * s.w == 0;
  // The kernel writes every element of grad_x (each input row once) and of grad_values.
  if (need_grad_x) grad_x = empty ? at::zeros_like(x) : at::empty_like(x);
  if (need_grad_values) grad_values = empty ? at::zeros_like(values) : at::empty_like(values);
  if (empty || (!need_grad_x && !need_grad_values)) return {grad_x, grad_values};
  dispatch(x.scalar_type(), indices.scalar_type(), [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    if constexpr (!std::is_same_v<T, bf16>) {  // bf16 is refused in conv_shape
      check_index_range<I>(indices.data_ptr<I>(), indices.numel(), s.channels_per_group() * s.kh * s.kw);
      const ConvTaps taps = conv_taps<I>(indices.data_ptr<I>(), rows.data_ptr<int64_t>(), s);
      conv_dispatch_width<T>(s, max_tile, [&](auto nv) {
        conv_run<T, decltype(nv)::value>(s, taps, x.data_ptr<T>(), values.data_ptr<T>(), rows.data_ptr<int64_t>(),
                                         nullptr, grad_y.data_ptr<T>(), need_grad_x ? grad_x.data_ptr<T>() : nullptr,
                                         need_grad_values ? grad_values.data_ptr<T>() : nullptr);
      });
    }
  });
  return {grad_x, grad_values};
}

// Inference: output pixels as the vector lanes (conv_pixels.h), bias fused; the weights' own layout.
at::Tensor conv_pixels(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& rows,
                       const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvShape s = conv_shape(x, values, indices, rows, out_channels, kernel, stride, padding, dilation, groups);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device().is_cpu(),
                "srigl_fanin: bias must be a contiguous (", out_channels, ",) CPU tensor of x's dtype");
  }
  at::Tensor y = at::empty({s.batch, out_channels, s.ho, s.wo}, x.options());
  if (s.batch == 0 || s.ho * s.wo == 0) return y;
  dispatch(x.scalar_type(), indices.scalar_type(), [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    if constexpr (!std::is_same_v<T, bf16>) {  // bf16 is refused in conv_shape
      check_index_range<I>(indices.data_ptr<I>(), indices.numel(), s.channels_per_group() * s.kh * s.kw);
      conv_pixels_dispatch<T, I>(s, x.data_ptr<T>(), values.data_ptr<T>(), indices.data_ptr<I>(), rows.data_ptr<int64_t>(),
                                 has_bias ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>());
    }
  });
  return y;
}

// The layer's active rows as a dense (n_active, in_features) matrix: row o holds values[o, j] at
// column indices[o, j] (duplicates add up) and zeros elsewhere. For inference routes that hand the
// product to a dense GEMM where the rows are dense enough for it to win (srigl/kernels/inference.py);
// one pass over the layer, parallel over rows, no int64 copy of the indices.
at::Tensor densify(const at::Tensor& values, const at::Tensor& indices, int64_t in_features) {
  TORCH_CHECK(values.dim() == 2 && indices.sizes() == values.sizes(), "srigl_fanin: values ", values.sizes(),
              " and indices ", indices.sizes(), " must both be (n_active, k)");
  TORCH_CHECK(values.is_contiguous() && indices.is_contiguous() && values.device().is_cpu() &&
                  indices.device().is_cpu(),
              "srigl_fanin: values and indices must be contiguous CPU tensors");
  TORCH_CHECK(in_features >= 0, "srigl_fanin: in_features must be >= 0, got ", in_features);
  const int64_t n = values.size(0);
  const int64_t k = values.size(1);
  at::Tensor dense = at::empty({n, in_features}, values.options());
  if (n == 0 || in_features == 0) return dense;
  dispatch(values.scalar_type(), indices.scalar_type(), [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    check_index_range<I>(indices.data_ptr<I>(), indices.numel(), in_features);
    const T* vp = values.data_ptr<T>();
    const I* ip = indices.data_ptr<I>();
    T* dp = dense.data_ptr<T>();
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / in_features), [=](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        T* row = dp + o * in_features;
        std::fill(row, row + in_features, T(0));
        const T* v = vp + o * k;
        const I* idx = ip + o * k;
        if constexpr (std::is_same_v<T, bf16>) {  // bf16 has no +=: add in float, round once per add
          for (int64_t j = 0; j < k; ++j) row[idx[j]] = T(float(row[idx[j]]) + float(v[j]));
        } else {
          for (int64_t j = 0; j < k; ++j) row[idx[j]] += v[j];
        }
      }
    });
  });
  return dense;
}

// y (batch, out_full) from the product over a layer's active rows, a (batch, n_active): see
// scatter_columns. The dense route's counterpart of what forward_rows does inside the kernels.
at::Tensor place_columns(const at::Tensor& active, const at::Tensor& rows, const std::optional<at::Tensor>& bias,
                         int64_t out_full) {
  TORCH_CHECK(active.dim() == 2 && active.is_contiguous() && active.device().is_cpu(),
              "srigl_fanin: active must be a contiguous 2-D CPU tensor");
  const int64_t batch = active.size(0);
  const int64_t n_active = active.size(1);
  const int64_t* rp = checked_rows(rows, n_active, out_full);
  const bool has_bias = check_bias(bias, out_full, active.scalar_type());
  at::Tensor y = at::empty({batch, out_full}, active.options());
  if (batch == 0 || out_full == 0) return y;
  dispatch(active.scalar_type(), at::kInt, [&](auto t, auto) {
    using T = decltype(t);
    scatter_columns<T>(active.data_ptr<T>(), rp, has_bias ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>(), batch,
                       n_active, out_full);
  });
  return y;
}

// The route of bf16 products: mode 1 forces the portable one, 0 lets the CPU decide, anything else
// only asks. Returns "avx512_bf16" or "portable", the route in effect afterwards.
std::string bf16_route(int64_t mode) {
  if (mode == 0 || mode == 1) bf16_force_portable.store(mode == 1, std::memory_order_relaxed);
  return bf16_route_name();
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
  m.def("densify(Tensor values, Tensor indices, int in_features) -> Tensor");
  m.def("place_columns(Tensor active, Tensor rows, Tensor? bias, int out_full) -> Tensor");
  m.def("forward_windows(Tensor x, Tensor packed, Tensor? bias, Tensor? rows, int out_full) -> Tensor");
  m.def(
      "conv_forward(Tensor x, Tensor values, Tensor indices, Tensor rows, int out_channels, int[] kernel, "
      "int[] stride, int[] padding, int[] dilation, int groups, int max_tile) -> Tensor");
  m.def(
      "conv_backward(Tensor grad_y, Tensor x, Tensor values, Tensor indices, Tensor rows, int out_channels, "
      "int[] kernel, int[] stride, int[] padding, int[] dilation, int groups, bool need_grad_x, "
      "bool need_grad_values, "
      "int max_tile) "
      "-> (Tensor, Tensor)");
  m.def(
      "conv_pixels(Tensor x, Tensor values, Tensor indices, Tensor rows, Tensor? bias, int out_channels, "
      "int[] kernel, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  // No tensor arguments, so no dispatch key: a catch-all kernel, registered with the schema.
  m.def("bf16_route(int mode) -> str", &srigl_fanin::bf16_route);
}

TORCH_LIBRARY_IMPL(srigl_fanin, CPU, m) {
  m.impl("forward", &srigl_fanin::forward);
  m.impl("forward_rows", &srigl_fanin::forward_rows);
  m.impl("backward", &srigl_fanin::backward);
  m.impl("pack_windows", &srigl_fanin::pack_windows);
  m.impl("densify", &srigl_fanin::densify);
  m.impl("place_columns", &srigl_fanin::place_columns);
  m.impl("forward_windows", &srigl_fanin::forward_windows);
  m.impl("conv_forward", &srigl_fanin::conv_forward);
  m.impl("conv_backward", &srigl_fanin::conv_backward);
  m.impl("conv_pixels", &srigl_fanin::conv_pixels);
}
