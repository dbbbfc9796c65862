// Online softmax over key blocks with fp32 running max and sum, base-2 exponentials and the scale
// folded into one FFMA per element. Shared by the forward kernels of every architecture; the
// backward recomputes probabilities from the lse this produces (p = exp2(s * scale_log2 -
// lse * log2(e))).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include <cute/tensor.hpp>

#include "flash_jax/common/fragment.cuh"

namespace flash_jax {

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// State for kRows accumulator rows owned by one thread; each row is shared by kThreadsPerRow
// consecutive lanes (4 for mma.sync / wgmma accumulators). row_sum stays a per-thread partial sum
// until finalize() (one shuffle reduction per row per tile saved).
template <int kRows, int kThreadsPerRow = 4>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];

  // Call before the first tile: max -inf, sum 0 (the first update's rescale then multiplies the
  // still-zero output by exp2(-inf) = 0).
  __device__ void init() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // scores: (kRows, N) view of one key tile's raw scores (masked entries -inf). On return it holds
  // the unnormalised probabilities exp2((s - max) * scale_log2) under the updated running max,
  // and acc_o's rows (view (kRows, D)) are rescaled to that max. A row whose running max is
  // still -inf uses 0 as its max, so it yields p = 0, never NaN.
  template <typename ScoresRowCol, typename AccRowCol>
  __device__ void update(ScoresRowCol& scores, AccRowCol& acc_o, float scale_log2) {
    float correction[kRows];
    update_scores(scores, scale_log2, correction);
    rescale(acc_o, correction);
  }

  // update() in two halves, for kernels whose product into acc_o is still in flight while the
  // next tile's probabilities are computed (sm90): the scores half touches no output, and
  // correction[r] is what acc_o's row r must then be multiplied by.
  template <typename ScoresRowCol>
  __device__ void update_scores(ScoresRowCol& scores, float scale_log2,
                                float (&correction)[kRows]) {
    static_assert(decltype(cute::size<0>(scores))::value == kRows, "row count mismatch");
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < cute::size<1>(scores); ++c) tile_max = fmaxf(tile_max, scores(r, c));
      tile_max = lanes_max<kThreadsPerRow>(tile_max);
      float previous_max = row_max[r];
      float new_max = fmaxf(previous_max, tile_max);
      row_max[r] = new_max;
      float max_scaled = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      correction[r] = fast_exp2(previous_max * scale_log2 - max_scaled);
      float tile_sum = 0.f;
#pragma unroll
      for (int c = 0; c < cute::size<1>(scores); ++c) {
        float p = fast_exp2(scores(r, c) * scale_log2 - max_scaled);
        scores(r, c) = p;
        tile_sum += p;
      }
      row_sum[r] = row_sum[r] * correction[r] + tile_sum;
    }
  }

  template <typename AccRowCol>
  __device__ void rescale(AccRowCol& acc_o, const float (&correction)[kRows]) const {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < cute::size<1>(acc_o); ++c) acc_o(r, c) *= correction[r];
    }
  }

  // Normalises acc_o's rows and returns each row's natural-log lse = max * scale + log(sum).
  // A row that saw no key (sum 0) gets output 0 and lse -inf.
  template <typename AccRowCol>
  __device__ void finalize(AccRowCol& acc_o, float scale, float (&lse)[kRows]) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float sum = lanes_sum<kThreadsPerRow>(row_sum[r]);
      bool empty = sum == 0.f;
      float inv_sum = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? -INFINITY : row_max[r] * scale + __logf(sum);
#pragma unroll
      for (int c = 0; c < cute::size<1>(acc_o); ++c) acc_o(r, c) *= inv_sum;
    }
  }
};

}  // namespace flash_jax
