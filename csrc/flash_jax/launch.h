// Launchers of the instantiated kernels, one specialisation per (Element, head-dim bucket).
// Declared here for dispatch.cu; defined in flash_jax/sm80/{fwd,bwd}_launch.cuh and explicitly
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

}  // namespace flash_jax
