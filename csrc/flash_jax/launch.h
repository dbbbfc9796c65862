// Launchers of the instantiated kernels, one specialisation per (Element, head-dim bucket).
// Declared here for dispatch.cu; defined in flash_jax/sm{80,90}/*_launch.cuh and explicitly
// instantiated in csrc/instantiations/*.cu. Element is cutlass::half_t or cutlass::bfloat16_t.
// Each returns "" on success, else a message; none synchronises, allocates or aborts.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "flash_jax/params.h"

namespace flash_jax {

template <typename Element, int kHeadDim>
std::string launch_fwd(const FwdParams& params, cudaStream_t stream);

template <typename Element, int kHeadDim>
std::string launch_bwd(const BwdParams& params, cudaStream_t stream);

// The extras variants (positions, dense mask, bias, ALiBi, dropout: params.h), in their own
// translation units (csrc/instantiations/*_extras_*.cu) so that they compile in parallel with the
// plain ones. The forward launches everything; the backward only its main kernels, between the
// preprocessing and the dQ conversion of launch_bwd.
template <typename Element, int kHeadDim>
std::string launch_fwd_extras(const FwdParams& params, cudaStream_t stream);

template <typename Element, int kHeadDim>
std::string launch_bwd_extras_main(const BwdParams& params, int smem_limit, cudaStream_t stream);

// The Hopper forward (wgmma, sm_90a; csrc/instantiations/*_sm90_*.cu, built when the
// architectures include 90): plain attention at head dims 64 and 128 on compute capability 9.0.
template <typename Element, int kHeadDim>
std::string launch_fwd_sm90(const FwdParams& params, cudaStream_t stream);

// The Hopper backward: the sm80 sequence with a wgmma dK/dV (+ atomic dQ) kernel; plain
// attention at head dims 64 and 128, not deterministic, on compute capability 9.0.
template <typename Element, int kHeadDim>
std::string launch_bwd_sm90(const BwdParams& params, cudaStream_t stream);

}  // namespace flash_jax
