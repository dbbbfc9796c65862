// The 16 x 16 cell summary of a dense mask that the extras kernels read to skip empty tiles and
// to leave full ones untested (params.h: mask_tiles). Launched by dispatch.cu before the
// attention kernels of a call with a mask; reads the mask once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "flash_jax/params.h"

namespace flash_jax {

// 16 x 16 cell summary of a dense mask [batch, heads, rows, cols] (kMaskCellAny | kMaskCellAll
// per cell). One thread per cell.
static __global__ void mask_cells_kernel(const uint8_t* mask, int64_t planes, int rows, int cols,
                                  uint8_t* cells) {
  const int cell_rows = (rows + kMaskCell - 1) / kMaskCell;
  const int cell_cols = (cols + kMaskCell - 1) / kMaskCell;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= planes * cell_rows * cell_cols) return;
  const int cell_col = static_cast<int>(index % cell_cols);
  const int cell_row = static_cast<int>((index / cell_cols) % cell_rows);
  const int64_t plane = index / (int64_t(cell_cols) * cell_rows);
  const uint8_t* base = mask + plane * rows * cols;
  const int row_end = min((cell_row + 1) * kMaskCell, rows);
  const int col_end = min((cell_col + 1) * kMaskCell, cols);
  bool any = false, all = true;
  for (int row = cell_row * kMaskCell; row < row_end; ++row) {
    for (int col = cell_col * kMaskCell; col < col_end; ++col) {
      const bool keep = __ldg(base + int64_t(row) * cols + col) != 0;
      any = any || keep;
      all = all && keep;
    }
  }
  cells[index] = (any ? kMaskCellAny : 0) | (all ? kMaskCellAll : 0);
}

inline std::string launch_mask_cells(const AttentionParams& p, cudaStream_t stream) {
  const int64_t planes = int64_t(p.mask_batch) * p.mask_heads;
  const int64_t cells = planes * ((p.mask_rows + kMaskCell - 1) / kMaskCell) *
                        ((p.mask_cols + kMaskCell - 1) / kMaskCell);
  constexpr int kThreads = 256;
  const int64_t blocks = (cells + kThreads - 1) / kThreads;
  if (blocks == 0) return "";
  if (blocks > 0x7fffffff) return "flash_jax: mask too large for its cell summary";
  mask_cells_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      p.mask, planes, p.mask_rows, p.mask_cols, p.mask_tiles);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return std::string("flash_jax mask summary: ") + cudaGetErrorString(error);
  return "";
}

}  // namespace flash_jax
