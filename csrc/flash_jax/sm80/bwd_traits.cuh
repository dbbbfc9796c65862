// Tile shapes, shared-memory layouts and copy/MMA types of the sm80 backward kernels
// (mma.sync m16n8k16, ldmatrix, cp.async). Compiled for sm_80 and sm_90; the tile choice per
// head-dim bucket is in BwdConfig below, each with its reason.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace flash_jax {
namespace bwd {

using namespace cute;

// kBlockM query rows x kBlockN keys per tile, 8 warps. The three products of the main loop get
// their own warp arrangement (kWarpsM* warps along the first dimension, the rest along the
// second) because their output shapes differ:
//   S = Q K^T and dP = dO V^T   [kBlockM, kBlockN]
//   dV += P^T dO, dK += dS^T Q  [kBlockN, kHeadDim]
//   dQ  = dS K                  [kBlockM, kHeadDim]
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarpsMForSdP,
          int kWarpsNForDkDv, int kWarpsMForDq>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;

  // Each warp covers 16 columns per step of its second dimension (two n8 atoms), so one
  // ldmatrix.x4 feeds the B operand of two MMAs.
  template <int kWarpsM>
  using WarpTiledMma =
      TiledMMA<MmaAtom, Layout<Shape<Int<kWarpsM>, Int<kNWarps / kWarpsM>, _1>>,
               Tile<Int<16 * kWarpsM>, Int<16 * (kNWarps / kWarpsM)>, _16>>;
  using TiledMmaSdP = WarpTiledMma<kWarpsMForSdP>;
  // S and dP of the kAll extras variant (dropout): the N mode is permuted so that each warp's n8
  // atoms pair up in 16 consecutive keys (logical column a + 8 w + 8 W r, atom column a, warp w
  // of W, repeat r, is key a + 16 w + 8 r for r < 2) instead of lying 8 W keys apart. The thread
  // then holds the 2 x 4 entries of one dropout draw (rows {R, R + 8} x keys {2t, 2t + 1, 2t + 8,
  // 2t + 9} of a 16-key span, flash_jax/_dropout.py): one Philox call per two atoms, as in the
  // forward. Not used by the other variants: ptxas gives the permuted layout more registers
  // (sm_90, d128: the plain dK/dV/dQ kernel spills 56 instead of 44 bytes, the visibility
  // variant 104 instead of none).
  static constexpr int kWarpsNForSdP = kNWarps / kWarpsMForSdP;
  using TiledMmaSdPPairedKeys = TiledMMA<
      MmaAtom, Layout<Shape<Int<kWarpsMForSdP>, Int<kWarpsNForSdP>, _1>>,
      Tile<Int<16 * kWarpsMForSdP>,
           Layout<Shape<_8, Int<kWarpsNForSdP>, _2>, Stride<_1, _16, _8>>, _16>>;
  using TiledMmaDkDv = WarpTiledMma<kWarpsNForDkDv>;
  using TiledMmaDq = WarpTiledMma<kWarpsMForDq>;

  static_assert(kBlockM % (16 * kWarpsMForSdP) == 0, "S tile rows vs warps");
  static_assert(kBlockN % (16 * (kNWarps / kWarpsMForSdP)) == 0, "S tile cols vs warps");
  static_assert(kBlockN % (16 * kWarpsNForDkDv) == 0, "dK/dV tile rows vs warps");
  static_assert(kHeadDim % (16 * (kNWarps / kWarpsNForDkDv)) == 0, "dK/dV tile cols vs warps");
  static_assert(kBlockM % (16 * kWarpsMForDq) == 0, "dQ tile rows vs warps");
  static_assert(kHeadDim % (16 * (kNWarps / kWarpsMForDq)) == 0, "dQ tile cols vs warps");

  // Rows of kHeadDim elements are stored in 8-row atoms 64 (or 32) elements wide, XOR-swizzled by
  // 16-byte chunk so that ldmatrix (8 rows x 16 bytes, plain or transposed) and the 16-byte
  // cp.async stores are free of bank conflicts.
  static constexpr int kRowAtom = kHeadDim % 64 == 0 ? 64 : 32;
  using SmemAtom = decltype(composition(
      Swizzle<kRowAtom == 64 ? 3 : 2, 3, 3>{},
      Layout<Shape<_8, Int<kRowAtom>>, Stride<Int<kRowAtom>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // Transposed views (the B operands of dK/dV and dQ read Q, dO and K along the sequence). The
  // non-swizzled portions only give fragment shapes to partition_fragment_*.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutQtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutQt{}));
  using SmemLayoutKVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutKVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutKVt{}));

  // P and dS tiles [kBlockM, kBlockN], written from the S/dP accumulators and read back plain (dQ)
  // and transposed (dV, dK).
  static constexpr int kRowAtomPdS = kBlockN % 64 == 0 ? 64 : 32;
  using SmemAtomPdS = decltype(composition(
      Swizzle<kRowAtomPdS == 64 ? 3 : 2, 3, 3>{},
      Layout<Shape<_8, Int<kRowAtomPdS>>, Stride<Int<kRowAtomPdS>, _1>>{}));
  using SmemLayoutPdS = decltype(tile_to_shape(SmemAtomPdS{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutPdSt = decltype(composition(
      SmemLayoutPdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutPdStNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutPdSt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  // Accumulator fragments (pairs of adjacent columns) to shared memory: 32-bit stores.
  using SmemCopyAtomAccum = Copy_Atom<DefaultCopy, Element>;

  // Global <-> shared: 16-byte vectors, a row of kRowAtom elements per kRowAtom / 8 threads.
  static constexpr int kGmemThreadsPerRow = kRowAtom / 8;
  using GmemThreadLayout =
      Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
             Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemTiledCopyAsync = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThreadLayout{},
      Layout<Shape<_1, _8>>{}));
  using GmemTiledCopyVector = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{}, GmemThreadLayout{},
      Layout<Shape<_1, _8>>{}));

  static constexpr int kQTileElems = kBlockM * kHeadDim;
  static constexpr int kKVTileElems = kBlockN * kHeadDim;
  static constexpr int kPdSTileElems = kBlockM * kBlockN;

  // dK/dV kernel: Q and dO double-buffered (the next query block streams in during the five
  // products of the current one), K, V, P, dS single. The dK/dV epilogue reuses the Q and dO
  // buffers, hence 2 * kBlockM >= kBlockN.
  // Plus lse and D of the query block, double-buffered with Q and dO.
  static constexpr int kSmemBytesDkDv =
      (4 * kQTileElems + 2 * kKVTileElems + 2 * kPdSTileElems) * int(sizeof(Element)) +
      4 * kBlockM * int(sizeof(float));
  static_assert(2 * kBlockM >= kBlockN, "dK/dV staging reuses the Q and dO stages");
  // Deterministic dQ kernel: Q, dO and dS single, K and V double-buffered.
  static constexpr int kSmemBytesDq =
      (2 * kQTileElems + 4 * kKVTileElems + kPdSTileElems) * int(sizeof(Element));
};

// Tile choice per head-dim bucket. All use 8 warps and one CTA per SM: the dK and dV accumulators
// of a key block stay in registers for the whole query loop (kBlockN * kHeadDim * 2 floats over
// 256 threads), which with the S/dP/dQ accumulators fills the 255-register budget at the larger
// tiles. Shared memory (H100: 227 KB per CTA) is no constraint below head dim 256.
template <typename Element, int kHeadDim>
struct BwdConfig;

// Small heads: the products are short along head_dim, so large 128 x 128 tiles amortise the
// per-tile softmax work and the dQ atomics (16 dK/dV + 64 S/dP registers a thread). 112 KB smem.
template <typename Element>
struct BwdConfig<Element, 32> {
  using Traits = BwdTraits<Element, 32, 128, 128, 4, 4, 4>;
};
// 64 x 128: dK, dV 32 + 32, S, dP 32 + 32, dQ 16 registers a thread, no spill. The query block
// size does not change the number of dQ reductions (one per query row, head-dim column and key
// block), only the per-block overhead; 128 x 128 (FlashAttention-2's choice, 255 registers and
// ~100 B of spill) measured 3% slower on H100 (benchmarks/NOTES.md). 128 KB smem.
template <typename Element>
struct BwdConfig<Element, 64> {
  using Traits = BwdTraits<Element, 64, 64, 128, 2, 4, 4>;
};
// 64 x 128: dK, dV 48 + 48 registers; dQ warps 4 x 2 because 96 is not a multiple of 64.
// 128 KB smem.
template <typename Element>
struct BwdConfig<Element, 96> {
  using Traits = BwdTraits<Element, 96, 64, 128, 2, 4, 4>;
};
// 64 x 128: dK, dV 64 + 64, S, dP 32 + 32, dQ 32 registers a thread; 128-key blocks halve the
// number of times Q and dO stream through shared memory compared with 64. 160 KB smem.
template <typename Element>
struct BwdConfig<Element, 128> {
  using Traits = BwdTraits<Element, 128, 64, 128, 2, 4, 2>;
};
// 64 x 64: dK, dV 48 + 48 and dQ 48 registers a thread already; a 128-key block would not fit
// in registers. 160 KB smem.
template <typename Element>
struct BwdConfig<Element, 192> {
  using Traits = BwdTraits<Element, 192, 64, 64, 4, 2, 2>;
};
// 64 x 64: dK, dV 64 + 64, dQ 64 registers a thread. 208 KB smem (Hopper only: A100 has 163 KB).
template <typename Element>
struct BwdConfig<Element, 256> {
  using Traits = BwdTraits<Element, 256, 64, 64, 4, 2, 2>;
};

}  // namespace bwd
}  // namespace flash_jax
