import os

# Sharding tests need several devices; on CPU they are forced host devices, which must be set
# before JAX initialises its backends (this file is imported before any test module).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--full-grid", action="store_true", default=False,
                   help="run every point of the parameter grids instead of a fixed-seed sample")


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU with flash_jax's CUDA kernels")
  if config.getoption("--full-grid"):
    os.environ["FLASH_JAX_FULL_GRID"] = "1"


# Features whose CUDA kernels are still being written (masks, bias, ALiBi, dropout, positions):
# on a GPU their tests end in the NotImplementedError that flash_jax/_cuda.py raises at lowering,
# which is the promised behaviour until then. Any other failure still fails, and a test that
# starts passing shows as XPASS.
_GPU_PENDING_FILES = ("test_masks.py", "test_dropout.py", "test_varlen.py",
                      "test_dot_product_attention.py", "test_flax.py")


def pytest_collection_modifyitems(config, items):
  pending = pytest.mark.xfail(raises=NotImplementedError, strict=False,
                              reason="the CUDA kernels do not support this operand yet")
  for item in items:
    if item.get_closest_marker("gpu") and item.path.name in _GPU_PENDING_FILES:
      item.add_marker(pending)
