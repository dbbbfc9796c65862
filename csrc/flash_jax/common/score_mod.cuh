// Score modifiers applied between q.k and the softmax, shared by forward and backward.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

namespace flash_jax {

__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Softcap: the logit softmax_scale * q.k becomes softcap * tanh(softmax_scale * q.k / softcap).
// Applied to raw q.k scores as  t = tanh(q.k * (softmax_scale / softcap));  the softmax then uses
// softcap as its scale (exp2 scale softcap * log2(e), lse scale softcap), so the multiply by
// softcap is folded into the exponent's FFMA. The backward recomputes the same t and needs
// d logit / d(q.k) = softmax_scale * (1 - t * t).
struct Softcap {
  float pre_tanh_scale;  // softmax_scale / softcap

  __host__ __device__ static Softcap make(float softmax_scale, float softcap) {
    return Softcap{softmax_scale / softcap};
  }

  template <typename ScoreTensor>
  __device__ void apply(ScoreTensor& scores) const {
#pragma unroll
    for (int i = 0; i < cute::size(scores); ++i) {
      scores(i) = fast_tanh(scores(i) * pre_tanh_scale);
    }
  }
};

// Scales the softmax works in once score modifiers are folded in: logits = scores * `scale`,
// exponentials are exp2(scores * scale_log2 - max * scale_log2).
struct SoftmaxScales {
  float scale;
  float scale_log2;

  __host__ __device__ static SoftmaxScales make(float softmax_scale, float softcap) {
    constexpr float kLog2e = 1.4426950408889634f;
    float scale = softcap > 0.f ? softcap : softmax_scale;
    return SoftmaxScales{scale, scale * kLog2e};
  }
};

}  // namespace flash_jax
