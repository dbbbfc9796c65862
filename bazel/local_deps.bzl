"""The build's inputs from outside the repository, found on this machine (no download).

  jax / jaxlib      XLA FFI headers, jax.ffi.include_dir()
  pybind11          headers, pybind11.get_include()
  Python            headers of the interpreter (PYTHON_BIN_PATH, else python3 on PATH)
  nvidia-cutlass    CUTLASS/CuTe headers, cutlass_library/source/include (pip, pinned in
                    pyproject.toml)
  CUDA toolkit      nvcc, headers and the static runtime (CUDA_HOME, else nvcc on PATH)

The same sources setup.py uses, so both builds compile against the same headers.
"""

_FIND_PYTHON_DEPS = """
import importlib.util, pathlib, sysconfig
import jax.ffi, pybind11
spec = importlib.util.find_spec("cutlass_library")
if spec is None:
  raise SystemExit("pip install nvidia-cutlass==4.2.0.0")
print(jax.ffi.include_dir())
print(pybind11.get_include())
print(sysconfig.get_paths()["include"])
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "source" / "include")
"""

_BUILD = """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "xla_ffi_headers",
    hdrs = glob(["jax_include/xla/ffi/api/*.h"]),
    includes = ["jax_include"],
)

cc_library(
    name = "pybind11",
    hdrs = glob(["pybind11_include/pybind11/**/*.h"]),
    includes = ["pybind11_include"],
    deps = [":python_headers"],
)

cc_library(
    name = "python_headers",
    hdrs = glob(["python_include/**/*.h"]),
    includes = ["python_include"],
)

cc_library(
    name = "cuda_headers",
    hdrs = glob(["cuda/include/**/*.h", "cuda/include/**/*.hpp"]),
    includes = ["cuda/include"],
)

cc_import(
    name = "cudart_static_lib",
    static_library = "cuda/lib64/libcudart_static.a",
)

cc_library(
    name = "cudart_static",
    linkopts = ["-ldl", "-lrt", "-lpthread"],
    deps = [":cudart_static_lib", ":cuda_headers"],
)

exports_files(["nvcc"])
"""

def _run(ctx, args, what):
    result = ctx.execute(args)
    if result.return_code != 0:
        fail("flash_jax: %s failed:\n%s%s" % (what, result.stdout, result.stderr))
    return result.stdout

def _flash_jax_local_deps_impl(ctx):
    python = ctx.os.environ.get("PYTHON_BIN_PATH") or ctx.which("python3")
    if not python:
        fail("flash_jax: no python3 on PATH; set PYTHON_BIN_PATH")
    lines = _run(ctx, [python, "-c", _FIND_PYTHON_DEPS], "finding jax, pybind11 and "
                 + "nvidia-cutlass with " + str(python)).strip().splitlines()
    jax_include, pybind11_include, python_include, cutlass_include = lines[-4:]

    cuda_home = ctx.os.environ.get("CUDA_HOME", "")
    nvcc = ctx.path(cuda_home + "/bin/nvcc") if cuda_home else ctx.which("nvcc")
    if not nvcc or not nvcc.exists:
        fail("flash_jax: nvcc not found; set CUDA_HOME")

    # nvcc may be a wrapper script outside the toolkit; its dry run names the toolkit's root.
    dry_run = ctx.execute([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"])
    top = ""
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = line[len("#$ TOP="):].strip()
    if not top:
        fail("flash_jax: cannot find the CUDA toolkit's root from " + str(nvcc))

    ctx.symlink(jax_include, "jax_include")
    ctx.symlink(pybind11_include, "pybind11_include")
    ctx.symlink(python_include, "python_include")
    ctx.symlink(top + "/include", "cuda/include")
    ctx.symlink(top + "/lib64", "cuda/lib64")
    ctx.symlink(nvcc, "nvcc")
    ctx.file("BUILD", _BUILD)

    archs = ctx.os.environ.get("FLASH_JAX_CUDA_ARCHS", "80;90").replace(",", ";")
    ctx.file("config.bzl", "\n".join([
        "# Written by bazel/local_deps.bzl.",
        "CUTLASS_INCLUDE = %r" % cutlass_include,
        "CUDA_ARCHS = %r" % [a.strip() for a in archs.split(";") if a.strip()],
        "",
    ]))

flash_jax_local_deps = repository_rule(
    implementation = _flash_jax_local_deps_impl,
    environ = ["PYTHON_BIN_PATH", "CUDA_HOME", "FLASH_JAX_CUDA_ARCHS", "PATH"],
    local = True,
)
