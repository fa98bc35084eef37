// SIMD building blocks shared by every route: register width for the ISA this build targets (the
// flags come from cpu.py), tile and cache-chunk footprints, Vec<T, B> load/store/horizontal sum,
// and the bfloat16 storage type (widened to float on load, rounded back on store).

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
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
// Target footprint of one chunk of xt rows walked by all output rows before moving on: L1-sized
// chunks (16 KiB) lose to the per-chunk accumulator round trip; 64 KiB chunks beat no chunking,
// the backward most (its grad_x rows are read-modify-written). Figures: results/kernel_tuning.md.
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

// ---------------------------------------------------------------------------------------------
// bfloat16 storage: values, x, bias and y may be bf16; every route computes and accumulates in
// float (a bf16 accumulator would lose the low bits of a k-term sum), widening on load and
// rounding to nearest even once per output element.
// ---------------------------------------------------------------------------------------------

using bf16 = c10::BFloat16;

// The type a route computes in for operands stored as S.
template <typename S>
struct Compute {
  using type = S;
};
template <>
struct Compute<bf16> {
  using type = float;
};
template <typename S>
using compute_t = typename Compute<S>::type;

// The bits of B / 4 bf16 values (Half) and of as many floats (Word), as vectors. Declared at class
// scope: GCC does not treat a vector typedef with a dependent size inside a function template as
// a vector.
template <int B>
struct Bf16Bits {
  typedef uint16_t Half __attribute__((vector_size(B / 2), aligned(2), may_alias));
  typedef uint32_t Word __attribute__((vector_size(B)));
};

// One B-byte vector of T from kLanes elements stored as S (S == T, or bf16 widened to float: the
// 16 bits of a bf16 are the high half of the float with the same value, so widening is a shift).
template <typename T, int B, typename S>
inline typename Vec<T, B>::type load_as(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return load<T, B>(p);
  } else {
    static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>, "only bf16 -> float widening");
    using Half = typename Bf16Bits<B>::Half;
    using Word = typename Bf16Bits<B>::Word;
    const Word bits = __builtin_convertvector(*reinterpret_cast<const Half*>(p), Word) << 16;
    return (typename Vec<T, B>::type)bits;  // same-size vector cast: a bit copy
  }
}

// Stores one vector of T as kLanes elements of S; float -> bf16 rounds to nearest even and keeps
// NaN a (quiet) NaN, the rounding of c10::BFloat16's constructor, so vector and scalar tails agree.
template <typename T, int B, typename S>
inline void store_as(S* p, typename Vec<T, B>::type v) {
  if constexpr (std::is_same_v<S, T>) {
    store<T, B>(p, v);
  } else {
    static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>, "only float -> bf16 rounding");
    using Half = typename Bf16Bits<B>::Half;
    using Word = typename Bf16Bits<B>::Word;
    const Word bits = (Word)v;
    const Word rounded = bits + (0x7FFFu + ((bits >> 16) & 1u));
    const Word nan = Word{} + 0x7FC00000u;
    const Word out = ((bits & 0x7FFFFFFFu) > 0x7F800000u) ? nan : rounded;
    *reinterpret_cast<Half*>(p) = __builtin_convertvector(out >> 16, Half);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace
}  // namespace srigl_fanin
