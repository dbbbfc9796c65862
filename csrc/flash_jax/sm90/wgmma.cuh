// Helpers of the Hopper (sm_90a) kernels: issuing a warpgroup MMA (wgmma) tile product as one
// batch, the accumulator's (rows, cols) view and its reuse as a register A operand, and their
// global -> shared tile copy.
//
// A wgmma accumulator of a 64 x N atom gives each thread the layout ((2, 2, N / 8), MMA_M, MMA_N):
// (column pair, row half, 8-column group). Inside a warp this is the m16n8 layout of mma.sync
// repeated along N, so four consecutive lanes share a row, as OnlineSoftmax expects.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

namespace flash_jax {
namespace sm90 {

// wgmma reads shared memory through the async proxy; what cp.async (generic proxy) wrote must be
// made visible to it by this fence (then a barrier) before the product that reads it is issued.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Keeps the compiler from moving register reads or writes of `fragment` across this point (the
// registers of an in-flight wgmma belong to the tensor cores until its wait).
template <typename Fragment>
__device__ __forceinline__ void fence_fragment(Fragment& fragment) {
  cute::warpgroup_fence_operand(fragment);
}

// acc (+)= A B over all k-slices as one committed wgmma batch. kZeroInit: the first slice
// overwrites acc instead of adding. kWait >= 0: waits until at most kWait batches of this
// warpgroup are in flight; -1 returns at once (wait later with warpgroup_wait, then
// fence_fragment the accumulator before reading it).
template <bool kZeroInit, int kWait, typename TiledMma, typename FragA, typename FragB,
          typename Acc>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& tiled_mma, FragA& frag_a,
                                               const FragB& frag_b, Acc& acc) {
  constexpr bool kRegisterA =
      !std::is_base_of_v<cute::GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>;
  if constexpr (kRegisterA) fence_fragment(frag_a);
  fence_fragment(acc);
  cute::warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = cute::GMMA::ScaleOut::Zero;
#pragma unroll
  for (int k = 0; k < cute::size<2>(frag_a); ++k) {
    cute::gemm(tiled_mma, frag_a(cute::_, cute::_, k), frag_b(cute::_, cute::_, k), acc);
    tiled_mma.accumulate_ = cute::GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
  if constexpr (kWait >= 0) {
    cute::warpgroup_wait<kWait>();
    fence_fragment(acc);
    if constexpr (kRegisterA) fence_fragment(frag_a);
  }
}

// Global -> shared tiles of rows of 64-element segments: 16-byte cp.async, eight threads per
// segment (coalesced 128-byte segments), kThreads threads per CTA; zero-filling (see
// sm80::load_tile).
template <typename Element, int kThreads>
struct CpAsyncRowsCopy {
  static constexpr int kElemsPerVector = 16 / sizeof(Element);
  static constexpr int kThreadsPerRow = 64 / kElemsPerVector;
  using TiledCopy = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{},
      cute::Layout<cute::Shape<cute::Int<kThreads / kThreadsPerRow>, cute::Int<kThreadsPerRow>>,
                   cute::Stride<cute::Int<kThreadsPerRow>, cute::_1>>{},
      cute::Layout<cute::Shape<cute::_1, cute::Int<kElemsPerVector>>>{}));
};

// ((2, 2, V), MMA_M, MMA_N) -> ((2, MMA_M), (2, V, MMA_N)): rows (row half, MMA_M) by columns.
template <typename Layout>
__host__ __device__ constexpr auto accum_rowcol_layout(Layout accum_layout) {
  static_assert(decltype(cute::rank(accum_layout))::value == 3, "expected (MMA, MMA_M, MMA_N)");
  static_assert(decltype(cute::rank(cute::get<0>(accum_layout)))::value == 3,
                "expected a wgmma accumulator ((2, 2, V), MMA_M, MMA_N)");
  return cute::make_layout(
      cute::make_layout(cute::get<0, 1>(accum_layout), cute::get<1>(accum_layout)),
      cute::make_layout(cute::get<0, 0>(accum_layout), cute::get<0, 2>(accum_layout),
                        cute::get<2>(accum_layout)));
}

// Accumulator ((2, 2, N / 8), MMA_M, MMA_N) of a 16-bit product -> the register A operand
// ((2, 2, 2), MMA_M, (N / 16, MMA_N)) of the next one, whose k-slices are 16 columns: two
// 8-column groups of the accumulator are one k-slice, so P goes from the scores product into
// the P V product without leaving registers.
template <typename Layout>
__host__ __device__ constexpr auto accum_as_operand_a_layout(Layout accum_layout) {
  static_assert(decltype(cute::size<0, 2>(accum_layout))::value % 2 == 0,
                "N must be a multiple of 16");
  auto groups = cute::logical_divide(cute::get<0, 2>(accum_layout), cute::Tile<cute::_2>{});
  return cute::make_layout(
      cute::make_layout(cute::get<0, 0>(accum_layout), cute::get<0, 1>(accum_layout),
                        cute::get<0, 0>(groups)),
      cute::get<1>(accum_layout),
      cute::coalesce(cute::make_layout(cute::get<0, 1>(groups), cute::get<2>(accum_layout))));
}

}  // namespace sm90
}  // namespace flash_jax
