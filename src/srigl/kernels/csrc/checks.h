// Operator argument checks and the (value dtype, index dtype) dispatch shared by every entry point.

#pragma once

#include <limits>

#include "vec.h"

namespace srigl_fanin {
namespace {

// ---------------------------------------------------------------------------------------------
// Operator entry points.
// ---------------------------------------------------------------------------------------------

// Calls f(T{}, I{}) for the (value dtype, index dtype) pair; T is the storage type (bf16 for
// bfloat16, which the routes widen to float: see compute_t in vec.h).
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
    case at::kBFloat16: with_index(bf16{}); break;
    default: TORCH_CHECK(false, "srigl_fanin: values must be float32, float64 or bfloat16, got ", dtype);
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

// Every index of the (n,) index array lies in [0, in_features): one branch-free pass that the
// compiler vectorises (compare and OR, no gather), so a product never reads outside x whatever was
// written into the indices since Python last validated them (a write through `.data` or a numpy
// view changes neither the tensor's version counter nor its storage, which that cache keys on).
// At batch 1 it costs a few percent of the gather product (results/kernel_tuning.md).
template <typename I>
void check_index_range(const I* indices, int64_t n, int64_t in_features) {
  // Compared in the indices' own width (32 int16 lanes per AVX-512 compare): as unsigned, a negative
  // index is larger than any limit, so one compare covers both ends.
  using U = std::make_unsigned_t<I>;
  const U limit = static_cast<U>(std::min<int64_t>(in_features, int64_t{std::numeric_limits<I>::max()} + 1));
  U bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= static_cast<U>(static_cast<U>(indices[j]) >= limit);
  TORCH_CHECK(bad == 0, "srigl_fanin: indices out of range: some index is outside [0, ", in_features,
              ") (changed in place after validation?)");
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

}  // namespace
}  // namespace srigl_fanin
