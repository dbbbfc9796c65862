"""benchmarks/plot.py on a small synthetic result file: every figure is written.

matplotlib is an optional dependency (the "bench" extra), which CI does not install.
"""

import itertools
import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="benchmarks/plot.py needs matplotlib (pip install "
                    "'.[bench]')")

PLOT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "plot.py"


def _record(suite, impl, seq, causal, mode, variant, status="ok", head_dim=64, batch=2, heads=2):
  record = dict(suite=suite, dtype="bfloat16", head_dim=head_dim, seq=seq, batch=batch,
                heads=heads, impl=impl, causal=causal, mode=mode, variant=variant, status=status)
  if status == "ok":
    # Made-up numbers shaped like the real ones: standard attention slower, its memory quadratic.
    slower = {"flash_jax": 1.0, "cudnn": 0.8, "xla": 3.0}[impl]
    record.update(ms=slower * seq / 100, tflops=100 / slower,
                  temp_mib=seq * seq / 1000 if impl == "xla" else seq / 100)
  else:
    record["error"] = f"{status} for the test"
  return record


def _results():
  """Grid and seed points as a --quick CPU run would record them, with failures of each kind."""
  seqs = (128, 256, 512)
  records = []
  for head_dim, causal, mode, seq, impl in itertools.product((64, 128), (False, True),
                                                             ("fwd", "fwd+bwd"), seqs,
                                                             ("flash_jax", "cudnn", "xla")):
    status = "ok"
    if impl == "cudnn":
      status = "unsupported"  # no cuDNN on CPU
    elif impl == "xla" and seq == seqs[-1] and mode == "fwd+bwd":
      status = "oom"
    elif impl == "flash_jax" and (head_dim, causal, seq) == (128, True, seqs[0]):
      status = "error"
    records.append(_record("grid", impl, seq, causal, mode, "none", status, head_dim=head_dim,
                           batch=1024 // seq, heads=256 // head_dim))
  for variant, seq, impl in itertools.product(("none", "padding", "dropout"), seqs,
                                              ("flash_jax", "xla")):
    # jax.nn.dot_product_attention has no dropout: plot.py compares with xla's plain attention.
    status = "unsupported" if impl == "xla" and variant == "dropout" else "ok"
    records.append(_record("seed", impl, seq, False, "fwd+bwd", variant, status))
  return records


def test_plot_writes_every_figure(tmp_path):
  environment = dict(date="2026-01-01T00:00:00+00:00", platform="cpu", device="cpu",
                     device_count=1, driver=None, jax="0.0.0", jaxlib="0.0.0", cudnn=None)
  results = tmp_path / "results.json"
  results.write_text(json.dumps(dict(environment=environment, settings={}, results=_results())))
  out = tmp_path / "figures"
  run = subprocess.run([sys.executable, str(PLOT), str(results), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr
  names = ("grid_speedup_bfloat16.png", "grid_tflops_bfloat16.png", "seed_speedup.png",
           "seed_memory.png")
  assert sorted(p.name for p in out.iterdir()) == sorted(names)
  for name in names:
    data = (out / name).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name
  assert run.stdout.split() == [str(out / name) for name in names]


def test_plot_without_data_fails(tmp_path):
  results = tmp_path / "results.json"
  results.write_text(json.dumps(dict(environment={}, settings={}, results=[])))
  run = subprocess.run([sys.executable, str(PLOT), str(results), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 1 and "no figure" in run.stderr
