import os

# Sharding tests need several devices; on CPU they are forced host devices, which must be set
# before JAX initialises its backends (this file is imported before any test module).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# Under pytest-xdist (README: `-n 2`) several processes may share one GPU: each allocates as it
# goes instead of taking XLA's default 75% of the device up front.
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--full-grid", action="store_true", default=False,
                   help="run every point of the parameter grids instead of a fixed-seed sample")


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU with flash_jax's CUDA kernels")
  if config.getoption("--full-grid"):
    os.environ["FLASH_JAX_FULL_GRID"] = "1"
