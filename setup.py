"""Build of flash_jax: a pure-Python package plus, when CUDA is built, one extension module.

The CUDA kernels (csrc/flash_jax/dispatch.cu and csrc/instantiations/*.cu) are compiled by nvcc
into a static library that includes no Python header, under build/kernels/<configuration>/, with
per-object dependency files so that only what changed is recompiled; several Python versions
share it. The thin pybind11 module flash_jax._flash_jax_cuda (csrc/bindings.cc and the FFI
handlers in csrc/ffi/) links that library, so editing the bindings or the handlers never
recompiles a kernel.

The CUDA runtime is linked dynamically (NEEDED libcudart.so.<major>), and the module's RUNPATH
finds it first in the pip package that JAX's CUDA plugin depends on (nvidia-cuda-runtime:
site-packages/nvidia/cu13/lib, next to site-packages/flash_jax/), then in /usr/local/cuda/lib64
and the toolkit the module was built with; see cudart_runpath(). The module needs nothing else
beyond the C and C++ runtimes.

Environment:
  FLASH_JAX_BUILD_CUDA   auto (default): build the kernels when nvcc is found and an NVIDIA
                         driver is present; 1: always (fails without nvcc); 0: never (pure Python).
  FLASH_JAX_CUDA_ARCHS   ";"- or ","-separated SM versions, default "80;90": a cubin for each and
                         PTX for newer GPUs (suffixes such as 90a are allowed); see
                         gencode_flags() for the sources compiled to PTX once. With 90 (or 90a)
                         the Hopper forward (instantiations/fwd_sm90_*.cu) is built for sm_90a.
  MAX_JOBS               parallel nvcc processes (default: the number of usable cores).
  FLASH_JAX_CCACHE       auto (default): prefix nvcc with ccache when ccache is on PATH; 0: never.
  CUDA_HOME / CUDA_PATH  the CUDA toolkit (default: nvcc on PATH, else /usr/local/cuda).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

KERNEL_SOURCES = sorted([CSRC / "flash_jax" / "dispatch.cu",
                         *(CSRC / "instantiations").glob("*.cu")])
DISPATCH_SOURCE = CSRC / "flash_jax" / "dispatch.cu"
# The Hopper kernels use wgmma, an sm_90a (architecture-specific) instruction: compiled for that
# target alone, and only when the architectures include 90; dispatch.cu then calls them.
SM90_SOURCE = re.compile(r"_sm90_")
SM90_DEFINE = "-DFLASH_JAX_SM90_KERNELS"
EXTENSION_SOURCES = [CSRC / "bindings.cc", CSRC / "ffi" / "attention_ffi.cc"]
# Headers the extension sources include from this repository; setuptools does not scan includes.
EXTENSION_DEPENDS = [CSRC / "ffi" / "attention_ffi.h", CSRC / "flash_jax" / "api.h",
                     CSRC / "flash_jax" / "params.h"]

NVCC_FLAGS = [
    "-std=c++17", "-O3", "-DNDEBUG", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
    "-Xptxas=--warn-on-spills", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
]
CXX_FLAGS = ["-std=c++17", "-O2", "-fvisibility=hidden"]


def _log(message: str) -> None:
  print(f"flash_jax build: {message}", file=sys.stderr, flush=True)


def _build_cuda_mode() -> str:
  mode = os.environ.get("FLASH_JAX_BUILD_CUDA", "auto").strip().lower()
  if mode not in ("auto", "0", "1"):
    raise ValueError(f"FLASH_JAX_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
  return mode


def find_nvcc() -> pathlib.Path | None:
  for variable in ("CUDA_HOME", "CUDA_PATH"):
    if os.environ.get(variable):
      candidate = pathlib.Path(os.environ[variable]) / "bin" / "nvcc"
      if candidate.is_file():
        return candidate
  on_path = shutil.which("nvcc")
  if on_path:
    return pathlib.Path(on_path)
  default = pathlib.Path("/usr/local/cuda/bin/nvcc")
  return default if default.is_file() else None


def cuda_toolkit(nvcc: pathlib.Path) -> pathlib.Path:
  """The toolkit's root (include/, lib64/). nvcc may be a wrapper script outside the toolkit,
  so ask it: its dry run prints the root as TOP."""
  result = subprocess.run([str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True)
  for line in (result.stdout + result.stderr).splitlines():
    if line.startswith("#$ TOP="):
      return pathlib.Path(line[len("#$ TOP="):].strip()).resolve()
  return nvcc.resolve().parent.parent


def _driver_present() -> bool:
  if pathlib.Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi"):
    return True
  try:
    ctypes.CDLL("libcuda.so.1")
  except OSError:
    return False
  return True


def cuda_archs() -> list[str]:
  text = os.environ.get("FLASH_JAX_CUDA_ARCHS", "80;90")
  archs = [a.strip() for a in re.split(r"[;,\s]+", text) if a.strip()]
  bad = [a for a in archs if not re.fullmatch(r"\d{2,3}[af]?", a)]
  if not archs or bad:
    raise ValueError(f"FLASH_JAX_CUDA_ARCHS must list SM versions such as '80;90' or '90a', "
                     f"got {text!r}")
  return archs


def _arch_number(arch: str) -> int:
  return int(re.match(r"\d+", arch).group())


def gencode_flags(archs: list[str], arch_specific: bool = True) -> list[str]:
  """nvcc's -gencode flags: a cubin for each of archs and PTX for newer GPUs to JIT-compile.

  A source whose device code does not test the architecture (arch_specific False) is compiled
  to PTX once, for the lowest plain architecture, and every plain cubin is assembled from that
  PTX: nvcc's front end (cicc) is ~75% of a kernel file's compile time and would otherwise run
  once per architecture for the same result (the forward's compute_80 and compute_90 PTX differ
  only in .target, and ptxas makes the same sm_90 SASS of both; benchmarks/NOTES.md, session 6).
  Suffixed architectures (90a, 100f) always get their own PTX.
  """
  highest = max(archs, key=_arch_number)
  plain = [a for a in archs if re.fullmatch(r"\d+", a)]
  if arch_specific or len(plain) < 2:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{highest},code=compute_{highest}"]
  shared = min(plain, key=_arch_number)
  flags = [f"-gencode=arch=compute_{shared},code=sm_{a}" for a in plain]
  flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a not in plain]
  ptx = shared if highest in plain else highest
  return flags + [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"]


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def builds_sm90(archs: list[str]) -> bool:
  return any(_arch_number(a) == 90 for a in archs)


def kernel_sources(archs: list[str]) -> list[pathlib.Path]:
  """The sources to compile for archs: all but the Hopper ones when 90 is not among them."""
  return [s for s in KERNEL_SOURCES if builds_sm90(archs) or not SM90_SOURCE.search(s.name)]


def source_flags(source: pathlib.Path, archs: list[str]) -> list[str]:
  """The per-source part of nvcc's flags: architectures, and the define that tells dispatch.cu
  that the Hopper kernels are linked."""
  if SM90_SOURCE.search(source.name):
    return ["-gencode=arch=compute_90a,code=sm_90a"]
  flags = gencode_flags(archs, tests_cuda_arch(source))
  if source == DISPATCH_SOURCE and builds_sm90(archs):
    flags.append(SM90_DEFINE)
  return flags


def tests_cuda_arch(source: pathlib.Path, seen: set[pathlib.Path] | None = None) -> bool:
  """Whether source or a repository header it includes (transitively) tests __CUDA_ARCH__.
  CUTLASS's headers test it too, for instructions that the sm80 kernels do not use."""
  seen = set() if seen is None else seen
  source = source.resolve()
  if source in seen:
    return False
  seen.add(source)
  text = source.read_text()
  if "__CUDA_ARCH__" in text:
    return True
  for name in _LOCAL_INCLUDE.findall(text):
    header = next((base / name for base in (source.parent, CSRC) if (base / name).is_file()),
                  None)
    if header is not None and tests_cuda_arch(header, seen):
      return True
  return False


def cutlass_include() -> pathlib.Path:
  # Located without importing cutlass_library (its import pulls in the Python DSL).
  spec = importlib.util.find_spec("cutlass_library")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("building the CUDA kernels needs the CUTLASS headers: "
                       "pip install nvidia-cutlass==4.2.0.0")
  include = pathlib.Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
  if not (include / "cute" / "tensor.hpp").is_file():
    raise RuntimeError(f"nvidia-cutlass has no C++ headers at {include}")
  return include


def jax_ffi_include() -> str:
  import jax.ffi  # pylint: disable=import-outside-toplevel
  return jax.ffi.include_dir()


def max_jobs() -> int:
  if os.environ.get("MAX_JOBS"):
    return max(1, int(os.environ["MAX_JOBS"]))
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _launcher() -> list[str]:
  setting = os.environ.get("FLASH_JAX_CCACHE", "auto").strip().lower()
  if setting not in ("auto", "0", "1"):
    raise ValueError(f"FLASH_JAX_CCACHE must be auto, 0 or 1, got {setting!r}")
  ccache = shutil.which("ccache")
  if setting == "1" and not ccache:
    raise RuntimeError("FLASH_JAX_CCACHE=1 but ccache is not on PATH")
  return [ccache] if ccache and setting != "0" else []


def _read_depfile(path: pathlib.Path) -> list[pathlib.Path]:
  """The prerequisites listed in a make-style dependency file written by nvcc -MD."""
  text = path.read_text().replace("\\\n", " ")
  _, _, prerequisites = text.partition(":")
  return [pathlib.Path(p) for p in shlex.split(prerequisites)]


def _up_to_date(obj: pathlib.Path, depfile: pathlib.Path) -> bool:
  """Whether obj is newer than its source and every repository header it includes.

  Headers outside the repository (CUDA, CUTLASS) are covered by the configuration key instead:
  pip's build isolation installs CUTLASS under a temporary path that changes on every build.
  """
  if not obj.exists() or not depfile.exists():
    return False
  built = obj.stat().st_mtime
  ours = [p for p in _read_depfile(depfile) if p.is_relative_to(ROOT)]
  try:
    return all(p.stat().st_mtime <= built for p in ours)
  except OSError:  # a prerequisite was removed
    return False


def _configuration_key(nvcc: pathlib.Path, flags: list[str]) -> str:
  """Identifies everything outside the repository's sources that objects depend on. The
  repository's location is part of it: dependency files name headers by absolute path."""
  version = subprocess.run([str(nvcc), "--version"], check=True, capture_output=True,
                           text=True).stdout
  cutlass = importlib.metadata.version("nvidia-cutlass")
  stable_flags = [f for f in flags if not f.startswith(("-I", "-isystem"))]
  text = "\n".join([str(ROOT), version, f"nvidia-cutlass {cutlass}", *stable_flags])
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def cuda_major_version(nvcc: pathlib.Path) -> int:
  version = subprocess.run([str(nvcc), "--version"], check=True, capture_output=True,
                           text=True).stdout
  match = re.search(r"release (\d+)\.(\d+)", version)
  if match is None:
    raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{version}")
  return int(match.group(1))


def find_cudart(cuda_home: pathlib.Path, major: int) -> pathlib.Path:
  """The toolkit's shared CUDA runtime to link against. Linking the file itself, not -lcudart,
  works also for toolkits that ship only the versioned name (the pip wheels' nvidia/cu13/lib);
  either way the module records the library's soname, libcudart.so.<major>."""
  directories = [cuda_home / "lib64", cuda_home / "lib",
                 *sorted((cuda_home / "targets").glob("*/lib"))]
  for name in ("libcudart.so", f"libcudart.so.{major}"):
    for directory in directories:
      if (directory / name).exists():
        return directory / name
  raise RuntimeError(f"no libcudart.so in the CUDA toolkit {cuda_home} "
                     f"(looked in {', '.join(map(str, directories))})")


def cudart_runpath(major: int, cudart: pathlib.Path) -> list[str]:
  """Where the installed module looks for libcudart.so.<major>, in order (LD_LIBRARY_PATH is
  searched before these, the system's default directories after them). The module lies at
  site-packages/flash_jax/, so $ORIGIN/.. is the site-packages it was installed into:
  - nvidia/cu<major>/lib: nvidia-cuda-runtime from CUDA 13 on, which jax[cuda13] installs
    (jax-cuda13-plugin[with-cuda] requires it); JAX's own plugin loads libcudart from there too.
  - nvidia/cuda_runtime/lib: the CUDA 12 wheels (nvidia-cuda-runtime-cu12), for builds with a
    CUDA 12 toolkit.
  - /usr/local/cuda/lib64 and the directory of the toolkit built with: system installs, and
    in-place builds in a checkout (flash_jax/ of the repository has no nvidia/ beside it).
  """
  entries = [f"$ORIGIN/../nvidia/cu{major}/lib", "$ORIGIN/../nvidia/cuda_runtime/lib",
             "/usr/local/cuda/lib64", str(cudart.parent)]
  return list(dict.fromkeys(entries))


def build_kernel_library(nvcc: pathlib.Path, build_root: pathlib.Path) -> pathlib.Path:
  """Compiles the kernels (only what changed) and archives them; returns the library's path."""
  archs = cuda_archs()
  flags = NVCC_FLAGS + [f"-I{CSRC}", f"-isystem={cutlass_include()}"]
  # One directory per configuration: switching archs, flags, toolkit or CUTLASS never mixes
  # objects.
  key = _configuration_key(nvcc, flags + gencode_flags(archs))
  out_dir = build_root / "kernels" / f"sm{'_'.join(archs)}-{key}"
  out_dir.mkdir(parents=True, exist_ok=True)
  launcher = _launcher()

  def compile_one(source: pathlib.Path):
    stem = source.relative_to(CSRC).with_suffix("").as_posix().replace("/", "__")
    obj, depfile = out_dir / f"{stem}.o", out_dir / f"{stem}.d"
    if _up_to_date(obj, depfile):
      return obj, False
    command = [*launcher, str(nvcc), *flags, *source_flags(source, archs),
               "-MD", "-MF", str(depfile), "-c", str(source), "-o", str(obj)]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if result.returncode != 0:
      raise RuntimeError(f"nvcc failed on {source.relative_to(ROOT)}:\n{shlex.join(command)}\n"
                         f"{result.stdout}{result.stderr}")
    # Register spills and other warnings are worth seeing.
    _log(f"compiled {source.relative_to(ROOT)} in {seconds:.0f} s" + (f":\n{result.stderr.strip()}"
                                                    if result.stderr.strip() else ""))
    return obj, True

  jobs = max_jobs()
  sources = kernel_sources(archs)
  _log(f"compiling {len(sources)} kernel sources for sm {', '.join(archs)} with "
       f"{jobs} parallel nvcc jobs into {out_dir.relative_to(build_root.parent)}")
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    results = list(pool.map(compile_one, sources))
  library = out_dir / "libflash_jax_kernels.a"
  objects = [obj for obj, _ in results]
  if any(rebuilt for _, rebuilt in results) or not library.exists():
    library.unlink(missing_ok=True)
    subprocess.run(["ar", "rcs", str(library), *map(str, objects)], check=True)
  _log(f"{sum(rebuilt for _, rebuilt in results)} of {len(results)} kernel objects rebuilt")
  return library


class BuildExtension(build_ext):
  """Builds the kernels library before compiling and linking the extension against it."""

  def build_extension(self, ext):
    nvcc = find_nvcc()
    if nvcc is None:
      raise RuntimeError("FLASH_JAX_BUILD_CUDA: nvcc not found (set CUDA_HOME)")
    library = build_kernel_library(nvcc, ROOT / "build")
    cuda_home = cuda_toolkit(nvcc)
    major = cuda_major_version(nvcc)
    cudart = find_cudart(cuda_home, major)
    runpath = cudart_runpath(major, cudart)
    ext.extra_objects = [str(library), str(cudart)]
    ext.include_dirs += [str(CSRC)]
    # The shared CUDA runtime, found through RUNPATH (not RPATH, so LD_LIBRARY_PATH can override
    # it); $ORIGIN reaches the linker unexpanded: setuptools runs it without a shell.
    ext.extra_link_args += ["-Wl,--enable-new-dtags", *(f"-Wl,-rpath,{p}" for p in runpath)]
    # -isystem: warnings inside the jaxlib and CUDA headers are not ours to fix.
    ext.extra_compile_args += ["-isystem", jax_ffi_include(), "-isystem",
                               str(cuda_home / "include")]
    ext.depends += [str(library)]
    super().build_extension(ext)


def extensions() -> list[Extension]:
  mode = _build_cuda_mode()
  if mode == "0":
    return []
  nvcc = find_nvcc()
  if mode == "auto":
    if nvcc is None or not _driver_present():
      _log("CUDA kernels skipped (FLASH_JAX_BUILD_CUDA=auto needs nvcc and an NVIDIA driver); "
           "installing the pure-Python package, which runs on CPU")
      return []
  elif nvcc is None:
    raise RuntimeError("FLASH_JAX_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
  import pybind11  # pylint: disable=import-outside-toplevel
  return [
      Extension(
          "flash_jax._flash_jax_cuda",
          sources=[str(p.relative_to(ROOT)) for p in EXTENSION_SOURCES],
          depends=[str(p.relative_to(ROOT)) for p in EXTENSION_DEPENDS],
          include_dirs=[pybind11.get_include()],
          extra_compile_args=list(CXX_FLAGS),
          language="c++",
      )
  ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
