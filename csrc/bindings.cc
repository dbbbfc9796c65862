// Python module flash_jax._flash_jax_cuda: hands the FFI handlers to Python as capsules, which
// flash_jax/_cuda.py registers with XLA. Nothing else crosses this boundary: buffers and
// attributes reach the handlers through XLA, never through Python.
#include <pybind11/pybind11.h>

#include <type_traits>

#include "ffi/attention_ffi.h"

namespace py = pybind11;

namespace {

// jax.ffi.register_ffi_target accepts a capsule holding the handler's function pointer.
template <typename Handler>
py::capsule encapsulate(Handler* handler) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Handler, XLA_FFI_CallFrame*>,
                "an XLA FFI handler takes an XLA_FFI_CallFrame*");
  return py::capsule(reinterpret_cast<void*>(handler));
}

}  // namespace

PYBIND11_MODULE(_flash_jax_cuda, module) {
  module.doc() = "flash_jax CUDA kernels as XLA FFI handlers";
  module.def("registrations", []() {
    py::dict targets;
    targets["flash_jax_attention_fwd_cuda"] = encapsulate(FlashJaxAttentionFwdCuda);
    targets["flash_jax_attention_bwd_cuda"] = encapsulate(FlashJaxAttentionBwdCuda);
    return targets;
  }, "Maps each custom-call target name to a capsule of its XLA FFI handler.");
}
