// Register-fragment helpers for the mma.sync m16n8k16 accumulator layout (sm80 forward and
// backward): views of an accumulator as (rows, cols) per thread, reuse of an accumulator as the A
// operand of the next product, fragment type conversion and reductions across the threads that
// share a row.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

namespace flash_jax {

// Accumulator layout ((2, 2), MMA_M, MMA_N) of SM80 m16n8 MMAs -> ((2, MMA_M), (2, MMA_N)):
// mode 0 walks the thread's rows (row r and r + 8 of each 16-row tile), mode 1 its columns.
template <typename Layout>
__host__ __device__ constexpr auto accum_rowcol_layout(Layout accum_layout) {
  static_assert(decltype(cute::rank(accum_layout))::value == 3, "expected (MMA, MMA_M, MMA_N)");
  static_assert(decltype(cute::size<0>(accum_layout))::value == 4, "expected an m16n8 accumulator");
  auto split = cute::logical_divide(accum_layout, cute::Shape<cute::_2>{});
  return cute::make_layout(cute::make_layout(cute::get<0, 1>(split), cute::get<1>(split)),
                           cute::make_layout(cute::get<0, 0>(split), cute::get<2>(split)));
}

template <typename Tensor>
__device__ auto accum_rowcol(Tensor&& accum) {
  return cute::make_tensor(accum.data(), accum_rowcol_layout(accum.layout()));
}

// Accumulator layout ((2, 2), MMA_M, MMA_N) of an m16n8k16 product -> the A-operand layout
// ((2, 2, 2), MMA_M, MMA_N / 2) of the next m16n8k16 product: two n8 accumulator tiles hold
// exactly the values one thread supplies for a k16 slice of A (this is why P never leaves
// registers between the two products of attention).
template <typename Layout>
__host__ __device__ constexpr auto accum_as_operand_a_layout(Layout accum_layout) {
  static_assert(decltype(cute::size<0>(accum_layout))::value == 4, "expected an m16n8 accumulator");
  static_assert(decltype(cute::size<2>(accum_layout))::value % 2 == 0, "MMA_N must be even");
  auto split = cute::logical_divide(accum_layout, cute::Shape<cute::X, cute::X, cute::_2>{});
  return cute::make_layout(cute::make_layout(cute::get<0>(split), cute::get<2, 0>(split)),
                           cute::get<1>(split), cute::get<2, 1>(split));
}

// dst = convert(src) element-wise, packed (two floats per cvt for 16-bit targets).
template <typename SrcTensor, typename DstTensor>
__device__ void convert_fragment(const SrcTensor& src, DstTensor& dst) {
  using From = typename std::remove_cv_t<std::remove_reference_t<SrcTensor>>::value_type;
  using To = typename std::remove_cv_t<std::remove_reference_t<DstTensor>>::value_type;
  constexpr int kNumel = decltype(cute::size(src))::value;
  static_assert(kNumel == decltype(cute::size(dst))::value, "fragment sizes differ");
  cutlass::NumericArrayConverter<To, From, kNumel> converter;
  *reinterpret_cast<cutlass::Array<To, kNumel>*>(dst.data()) =
      converter(*reinterpret_cast<const cutlass::Array<From, kNumel>*>(src.data()));
}

// Reduction over the kWidth consecutive lanes that hold one accumulator row (4 for mma.sync and
// wgmma accumulators). Every participating lane gets the result.
template <int kWidth>
__device__ __forceinline__ float lanes_max(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

template <int kWidth>
__device__ __forceinline__ float lanes_sum(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

}  // namespace flash_jax
