"""nvcc as Bazel actions: one object per .cu (compiled in parallel, cached by Bazel), archived
into a static library. Flags follow setup.py's NVCC_FLAGS."""

load("@flash_jax_deps//:config.bzl", "CUDA_ARCHS", "CUTLASS_INCLUDE")

NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-DNDEBUG",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-Xptxas=--warn-on-spills",
    "-Xcompiler",
    "-fPIC",
    "-Xcompiler",
    "-fvisibility=hidden",
]

def _gencode_flags(archs):
    flags = ["-gencode=arch=compute_%s,code=sm_%s" % (a, a) for a in archs]

    # PTX of the highest architecture lets newer GPUs JIT-compile the kernels.
    highest = archs[0]
    for a in archs:
        if int(a.rstrip("af")) > int(highest.rstrip("af")):
            highest = a
    return flags + ["-gencode=arch=compute_%s,code=compute_%s" % (highest, highest)]

def _builds_sm90(archs):
    return len([a for a in archs if a.rstrip("af") == "90"]) > 0

def cuda_static_library(name, srcs, hdrs, include_dir, deps = []):
    """Compiles each of srcs with nvcc and archives the objects as lib<name>.a; `name` is a
    cc_library of that archive and `deps` (e.g. the CUDA runtime it calls).

    As setup.py: sources named *_sm90_* (wgmma) build for sm_90a alone and only when CUDA_ARCHS
    includes 90; dispatch.cu is then told (FLASH_JAX_SM90_KERNELS) that they are linked."""
    common = NVCC_FLAGS + ["-I" + include_dir, "-isystem=" + CUTLASS_INCLUDE]
    sm90 = _builds_sm90(CUDA_ARCHS)
    objects = []
    for src in srcs:
        if "_sm90_" in src:
            if not sm90:
                continue
            flags = " ".join(common + ["-gencode=arch=compute_90a,code=sm_90a"])
        elif src.endswith("/dispatch.cu") and sm90:
            flags = " ".join(common + _gencode_flags(CUDA_ARCHS) + ["-DFLASH_JAX_SM90_KERNELS"])
        else:
            flags = " ".join(common + _gencode_flags(CUDA_ARCHS))
        # One target per source, named after it (//:kernels_fwd_bf16_hdim64), to build one alone.
        stem = src.split("/")[-1].replace(".cu", "")
        obj = "%s_objs/%s.o" % (name, stem)
        native.genrule(
            name = name + "_" + stem,
            srcs = [src] + hdrs,
            outs = [obj],
            tools = ["@flash_jax_deps//:nvcc"],
            cmd = "$(location @flash_jax_deps//:nvcc) %s -c $(location %s) -o $@" % (flags, src),
            message = "nvcc " + src,
        )
        objects.append(obj)
    native.genrule(
        name = name + "_archive",
        srcs = objects,
        outs = ["lib%s.a" % name],
        cmd = "rm -f $@ && ar rcs $@ $(SRCS)",
    )
    native.cc_import(
        name = name + "_import",
        static_library = "lib%s.a" % name,
    )

    # A library rather than the bare import, so the linker sees the archive before `deps`.
    native.cc_library(
        name = name,
        deps = [name + "_import"] + deps,
    )
