import os

import pytest


def pytest_addoption(parser):
  parser.addoption("--full-grid", action="store_true", default=False,
                   help="run every point of the parameter grids instead of a fixed-seed sample")


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU with flash_jax's CUDA kernels")
  if config.getoption("--full-grid"):
    os.environ["FLASH_JAX_FULL_GRID"] = "1"
