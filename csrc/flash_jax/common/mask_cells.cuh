// The 16 x 16 cell summary of a dense mask that the extras kernels read to skip empty tiles and
// to leave full ones untested (params.h: mask_tiles). Launched by dispatch.cu before the
// attention kernels of a call with a mask; reads the mask once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "flash_jax/params.h"

namespace flash_jax {

// Whether every byte of `word` is non-zero (the classic zero-byte test, exact).
__device__ __forceinline__ bool all_bytes_nonzero(uint32_t word) {
  return ((word - 0x01010101u) & ~word & 0x80808080u) == 0;
}

// 16 x 16 cell summary of a dense mask [planes, rows, cols] (kMaskCellAny | kMaskCellAll per
// cell). A warp per row of 32 cells: on each mask row a lane reads its cell's 16 bytes, so the
// warp reads 512 contiguous bytes (kVector: one 16-byte load per lane, which needs cols % 16 == 0
// and an aligned mask; else byte loads of the same span), and a lane's 16 rows are in flight
// together. One thread per cell reading its 256 bytes one at a time, the previous form, cost
// ~0.7 ms per call for a 16k x 16k mask on the H200 (what the half-empty mask's ratios to no mask,
// fwd 0.66 and fwd+bwd 0.57, leave over half; benchmarks/NOTES.md, session 8).
constexpr int kMaskCellsThreads = 256;
constexpr int kMaskCellsPerWarp = 32;

template <bool kVector>
__global__ void __launch_bounds__(kMaskCellsThreads) mask_cells_kernel(
    const uint8_t* mask, int64_t planes, int rows, int cols, uint8_t* cells) {
  const int cell_rows = (rows + kMaskCell - 1) / kMaskCell;
  const int cell_cols = (cols + kMaskCell - 1) / kMaskCell;
  const int warps_per_row = (cell_cols + kMaskCellsPerWarp - 1) / kMaskCellsPerWarp;
  const int64_t warp = (int64_t(blockIdx.x) * kMaskCellsThreads + threadIdx.x) / 32;
  if (warp >= planes * cell_rows * warps_per_row) return;
  const int cell_col = static_cast<int>(warp % warps_per_row) * kMaskCellsPerWarp + threadIdx.x % 32;
  const int cell_row = static_cast<int>((warp / warps_per_row) % cell_rows);
  const int64_t plane = warp / (int64_t(warps_per_row) * cell_rows);
  if (cell_col >= cell_cols) return;
  const int row_begin = cell_row * kMaskCell;
  const int col_begin = cell_col * kMaskCell;
  const int col_end = min(col_begin + kMaskCell, cols);
  const uint8_t* base = mask + (plane * rows + row_begin) * cols + col_begin;
  bool any = false, all = true;
  if constexpr (kVector) {
    uint4 words[kMaskCell];
#pragma unroll
    for (int r = 0; r < kMaskCell; ++r) {
      words[r] = row_begin + r < rows ? __ldg(reinterpret_cast<const uint4*>(base + int64_t(r) * cols))
                                      : make_uint4(0x01010101u, 0x01010101u, 0x01010101u, 0x01010101u);
    }
#pragma unroll
    for (int r = 0; r < kMaskCell; ++r) {
      const uint32_t w[4] = {words[r].x, words[r].y, words[r].z, words[r].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        any = any || (row_begin + r < rows && w[j] != 0);
        all = all && all_bytes_nonzero(w[j]);
      }
    }
  } else {
    for (int r = 0; r < kMaskCell && row_begin + r < rows; ++r) {
      uint8_t entries[kMaskCell];
#pragma unroll
      for (int c = 0; c < kMaskCell; ++c) {
        entries[c] = col_begin + c < col_end ? __ldg(base + int64_t(r) * cols + c) : uint8_t{1};
      }
#pragma unroll
      for (int c = 0; c < kMaskCell; ++c) {
        any = any || (col_begin + c < col_end && entries[c] != 0);
        all = all && entries[c] != 0;
      }
    }
  }
  cells[(plane * cell_rows + cell_row) * cell_cols + cell_col] =
      (any ? kMaskCellAny : 0) | (all ? kMaskCellAll : 0);
}

inline std::string launch_mask_cells(const AttentionParams& p, cudaStream_t stream) {
  const int64_t planes = int64_t(p.mask_batch) * p.mask_heads;
  const int64_t cell_rows = (p.mask_rows + kMaskCell - 1) / kMaskCell;
  const int64_t cell_cols = (p.mask_cols + kMaskCell - 1) / kMaskCell;
  const int64_t warps = planes * cell_rows * ((cell_cols + kMaskCellsPerWarp - 1) / kMaskCellsPerWarp);
  const int64_t blocks = (warps * 32 + kMaskCellsThreads - 1) / kMaskCellsThreads;
  if (blocks == 0) return "";
  if (blocks > 0x7fffffff) return "flash_jax: mask too large for its cell summary";
  const bool vector = p.mask_cols % kMaskCell == 0 && reinterpret_cast<uintptr_t>(p.mask) % 16 == 0;
  auto kernel = vector ? mask_cells_kernel<true> : mask_cells_kernel<false>;
  kernel<<<static_cast<unsigned>(blocks), kMaskCellsThreads, 0, stream>>>(
      p.mask, planes, p.mask_rows, p.mask_cols, p.mask_tiles);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return std::string("flash_jax mask summary: ") + cudaGetErrorString(error);
  return "";
}

}  // namespace flash_jax
