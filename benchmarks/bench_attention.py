"""Attention benchmark: flash_jax beside jax.nn.dot_product_attention ("xla", "cudnn").

All implementations run in one process on the same random inputs. Two suites (DESIGN.md §7):

  grid   b * s = 16384 tokens, hidden 2048 (h = 2048 / d), s = 512 .. 16384, d in {64, 128},
         causal and not, bfloat16 and float16; modes fwd, bwd, fwd+bwd; TFLOP/s as FlashAttention
         counts them (forward 4 * b * s * s * h * d, halved when causal; bwd 2.5x, fwd+bwd 3.5x).
  seed   batch 8, 12 heads, d 64, s = 128 .. 4096, bfloat16, fwd+bwd: time and compiled temp
         memory, plain, with a key padding mask and with dropout (recorded as unsupported where an
         implementation lacks the feature).

Timing: the compiled function, warm-up calls, then the median over repetitions of the wall time
of a batch of calls closed by block_until_ready, divided by the batch size. Memory: temp bytes of
jit(...).lower(...).compile().memory_analysis(). A failing point is recorded ("oom",
"unsupported", "error") and the run goes on. Results go to JSON with the GPU, driver, jax, jaxlib
and cuDNN versions and the date; markdown tables are printed at the end.

  python benchmarks/bench_attention.py                       # everything (GPU)
  python benchmarks/bench_attention.py --suites grid --dims 128 --modes fwd+bwd --causal false
  python benchmarks/bench_attention.py --quick               # tiny sizes: a smoke run, CPU too
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import pathlib
import re
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp

import flash_jax
from flash_jax import _cuda

IMPLS = ("flash_jax", "cudnn", "xla")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
VARIANTS = ("none", "padding", "dropout")
DROPOUT_RATE = 0.1
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}


class Unsupported(Exception):
  """An implementation lacks the feature a point asks for."""


# --- settings --------------------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  csv = lambda cast: (lambda text: [cast(x) for x in text.split(",") if x])
  boolean = {"true": True, "false": False}
  parser.add_argument("--suites", type=csv(str), default=["grid", "seed"],
                      help="comma-separated: grid, seed (default both)")
  parser.add_argument("--impls", type=csv(str), default=list(IMPLS), help=",".join(IMPLS))
  parser.add_argument("--modes", type=csv(str), default=list(MODES),
                      help="grid modes: " + ",".join(MODES))
  parser.add_argument("--dims", type=csv(int), default=None, help="grid head dims (64,128)")
  parser.add_argument("--seqs", type=csv(int), default=None,
                      help="sequence lengths (grid 512..16384, seed 128..4096)")
  parser.add_argument("--causal", type=csv(lambda x: boolean[x.lower()]), default=[False, True],
                      help="grid: true,false")
  parser.add_argument("--dtypes", type=csv(str), default=None,
                      help="grid dtypes: bfloat16,float16 (default both; bfloat16 with --quick)")
  parser.add_argument("--variants", type=csv(str), default=list(VARIANTS),
                      help="seed variants: " + ",".join(VARIANTS))
  parser.add_argument("--tokens", type=int, default=16384, help="grid batch * seq")
  parser.add_argument("--hidden", type=int, default=2048, help="grid heads * head_dim")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--reps", type=int, default=5, help="repetitions; the median is reported")
  parser.add_argument("--iters", type=int, default=20, help="calls per repetition")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes and few repetitions: a smoke run (works on CPU)")
  parser.add_argument("--output", type=pathlib.Path, default=None,
                      help="JSON file (default benchmarks/results/attention_<gpu>_<time>.json; "
                           "none with --quick)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  if args.dtypes is None:
    args.dtypes = ["bfloat16"] if args.quick else ["bfloat16", "float16"]
  for name, allowed in (("impls", IMPLS), ("modes", MODES), ("suites", ("grid", "seed")),
                        ("variants", VARIANTS), ("dtypes", ("bfloat16", "float16", "float32"))):
    bad = [x for x in getattr(args, name) if x not in allowed]
    if bad:
      parser.error(f"--{name}: unknown {bad}, expected some of {', '.join(allowed)}")
  if args.quick:
    args.tokens, args.hidden = 512, 128
    args.dims = args.dims or [64]
    args.seqs = args.seqs or [128, 256]
    args.warmup, args.reps, args.iters = 1, 2, 2
  return args


def grid_points(args):
  seqs = args.seqs or [512, 1024, 2048, 4096, 8192, 16384]
  for dtype in args.dtypes:
    for head_dim in args.dims or [64, 128]:
      for seq in seqs:
        batch, heads = max(1, args.tokens // seq), max(1, args.hidden // head_dim)
        yield dict(suite="grid", dtype=dtype, head_dim=head_dim, seq=seq, batch=batch,
                   heads=heads)


def seed_points(args):
  if args.quick:
    batch, heads, seqs = 2, 2, args.seqs
  else:
    batch, heads, seqs = 8, 12, args.seqs or [128, 256, 512, 1024, 2048, 4096]
  for seq in seqs:
    yield dict(suite="seed", dtype="bfloat16", head_dim=64, seq=seq, batch=batch, heads=heads)


# --- the functions measured --------------------------------------------------------------------


def attention_fn(impl, causal, variant):
  """fn(q, k, v, extras) -> out, where extras holds the arrays a variant needs."""
  if impl == "flash_jax":
    def fn(q, k, v, extras):
      kwargs = {}
      if variant == "padding":
        kwargs["kv_lengths"] = extras["kv_lengths"]
      elif variant == "dropout":
        kwargs.update(dropout_rate=DROPOUT_RATE, dropout_rng=extras["rng"])
      return flash_jax.attention(q, k, v, causal=causal, **kwargs)
    return fn
  if variant == "dropout":
    raise Unsupported("jax.nn.dot_product_attention has no dropout")
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise Unsupported(f"cudnn needs an NVIDIA GPU, JAX runs on {jax.default_backend()}")

  def fn(q, k, v, extras):
    lengths = extras["kv_lengths"] if variant == "padding" else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl,
                                        key_value_seq_lengths=lengths)
  return fn


def timed_function(mode, fn, q, k, v, dout, extras):
  """(function, arguments) whose compiled execution is the measured work."""
  if mode == "fwd":
    return fn, (q, k, v, extras)

  def forward_backward(q, k, v, dout, extras):
    _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, extras), q, k, v)
    return vjp(dout)

  if mode == "fwd+bwd":
    return forward_backward, (q, k, v, dout, extras)
  # bwd: the forward runs once here; its vjp (residuals included) is an argument of the timed
  # function, so only the backward is measured.
  _, vjp = jax.jit(lambda q, k, v, extras: jax.vjp(lambda q, k, v: fn(q, k, v, extras),
                                                   q, k, v))(q, k, v, extras)
  return (lambda vjp, dout: vjp(dout)), (vjp, dout)


def measure(function, arguments, warmup, reps, iters):
  compiled = jax.jit(function).lower(*arguments).compile()
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  for _ in range(warmup):
    jax.block_until_ready(compiled(*arguments))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):
      result = compiled(*arguments)
    jax.block_until_ready(result)
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times), temp_bytes


def flops(point, causal, mode):
  forward = 4 * point["batch"] * point["seq"] ** 2 * point["heads"] * point["head_dim"]
  return forward * (0.5 if causal else 1.0) * FLOP_FACTOR[mode]


def classify(error: BaseException) -> tuple[str, str]:
  message = f"{type(error).__name__}: {error}".strip()
  first_line = message.splitlines()[0][:300]
  if isinstance(error, (Unsupported, NotImplementedError)):
    return "unsupported", first_line
  if re.search(r"RESOURCE_EXHAUSTED|out of memory|OOM", message, re.IGNORECASE):
    return "oom", first_line
  return "error", first_line


def make_inputs(point, seed=0):
  dtype = jnp.dtype(point["dtype"])
  b, s, h, d = point["batch"], point["seq"], point["heads"], point["head_dim"]
  keys = jax.random.split(jax.random.key(seed), 6)
  q, k, v, dout = (jax.random.normal(key, (b, s, h, d), jnp.float32).astype(dtype)
                   for key in keys[:4])
  # Padding variant: every sequence keeps between half and all of its keys.
  kv_lengths = jax.random.randint(keys[4], (b,), s // 2, s + 1, dtype=jnp.int32)
  extras = {"kv_lengths": kv_lengths, "rng": keys[5]}
  return jax.block_until_ready((q, k, v, dout, extras))


def run_point(point, impl, causal, mode, variant, inputs, args):
  record = dict(point, impl=impl, causal=causal, mode=mode, variant=variant)
  try:
    fn = attention_fn(impl, causal, variant)
    function, arguments = timed_function(mode, fn, *inputs)
    seconds, temp_bytes = measure(function, arguments, args.warmup, args.reps, args.iters)
  except Exception as error:  # pylint: disable=broad-except  # one point must not end the run
    status, message = classify(error)
    record.update(status=status, error=message)
    if status == "error":
      record["traceback"] = traceback.format_exc(limit=8)
    return record
  record.update(status="ok", ms=seconds * 1e3,
                tflops=flops(point, causal, mode) / seconds / 1e12,
                temp_mib=None if temp_bytes is None else temp_bytes / 2**20)
  return record


# --- environment ---------------------------------------------------------------------------------


def cudnn_version() -> str | None:
  """cudnnGetVersion() of the cuDNN library the GPU backend loaded into this process."""
  for name in ("libcudnn.so.9", "libcudnn.so"):
    try:
      version = ctypes.CDLL(name).cudnnGetVersion()
    except (OSError, AttributeError):
      continue
    return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
  return None


def driver_version() -> str | None:
  try:
    result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.splitlines()[0].strip()
  except (OSError, subprocess.SubprocessError, IndexError):
    pass
  try:
    text = pathlib.Path("/proc/driver/nvidia/version").read_text()
  except OSError:
    return None
  match = re.search(r"Kernel Module\s+(\S+)", text)
  return match[1] if match else None


def environment():
  import jaxlib  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      platform=device.platform, device=device.device_kind, device_count=jax.device_count(),
      driver=driver_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
      cudnn=cudnn_version(), python=sys.version.split()[0], flash_jax=flash_jax.__version__,
      flash_jax_kernels=_cuda.kernels_available(),
  )


# --- progress and report -------------------------------------------------------------------------


def progress_bar(total, disabled):
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return _SimpleProgress(total, disabled)
  return tqdm(total=total, disable=disabled, file=sys.stderr, dynamic_ncols=True)


class _SimpleProgress:
  """A one-line progress display for when tqdm is not installed."""

  def __init__(self, total, disabled):
    self.total, self.done, self.disabled, self.start = total, 0, disabled, time.time()
    self.description = ""

  def set_description(self, text):
    self.description = text

  def update(self, count=1):
    self.done += count
    if not self.disabled:
      elapsed = time.time() - self.start
      print(f"\r[{self.done}/{self.total}] {elapsed:6.0f}s {self.description:<60}", end="",
            file=sys.stderr, flush=True)

  def close(self):
    if not self.disabled:
      print(file=sys.stderr)


def _cell(record, key, digits):
  if record is None:
    return ""
  if record["status"] != "ok":
    return {"unsupported": "unsup"}.get(record["status"], record["status"])
  value = record[key]
  if value is None:
    return "n/a"
  if value >= 100:
    return f"{value:.0f}"
  # Tiny values (smoke runs on CPU) keep three significant digits instead of rounding to 0.
  return f"{value:.{digits}f}" if value >= 10 ** -digits else f"{value:.3g}"


def _ratio_rows(by_impl, seqs, key):
  rows = []
  ours = by_impl.get("flash_jax", {})
  for peer in ("cudnn", "xla"):
    if peer not in by_impl:
      continue
    cells = []
    for seq in seqs:
      a, b = ours.get(seq), by_impl[peer].get(seq)
      ok = a and b and a["status"] == b["status"] == "ok" and a[key] and b[key]
      cells.append(f"{a[key] / b[key]:.2f}x" if ok else "")
    if any(cells):
      rows.append(f"| flash_jax / {peer} | " + " | ".join(cells) + " |")
  return rows


def markdown(records, impls):
  lines = []
  grid = [r for r in records if r["suite"] == "grid"]
  tables = sorted({(r["dtype"], r["head_dim"], r["causal"], r["mode"]) for r in grid},
                  key=lambda t: (t[0], -t[1], t[2], MODES.index(t[3])))
  for dtype, head_dim, causal, mode in tables:
    rows = [r for r in grid if (r["dtype"], r["head_dim"], r["causal"], r["mode"]) ==
            (dtype, head_dim, causal, mode)]
    seqs = sorted({r["seq"] for r in rows})
    by_impl = {impl: {r["seq"]: r for r in rows if r["impl"] == impl} for impl in impls}
    lines += [f"{dtype} d={head_dim} causal={causal} {MODE_TITLES[mode]} TFLOP/s", "",
              "| impl | " + " | ".join(map(str, seqs)) + " |",
              "|---|" + "---|" * len(seqs)]
    for impl in impls:
      lines.append(f"| {impl} | " + " | ".join(_cell(by_impl[impl].get(s), "tflops", 0)
                                              for s in seqs) + " |")
    lines += _ratio_rows(by_impl, seqs, "tflops")
    lines.append("")
  seed = [r for r in records if r["suite"] == "seed"]
  if seed:
    first = seed[0]
    seqs = sorted({r["seq"] for r in seed})
    lines += [f"Seed configuration (batch {first['batch']}, {first['heads']} heads, head dim "
              f"{first['head_dim']}, {first['dtype']}), forward+backward", "",
              "| impl | variant | metric | " + " | ".join(map(str, seqs)) + " |",
              "|---|---|---|" + "---|" * len(seqs)]
    for variant in VARIANTS:
      for impl in impls:
        by_seq = {r["seq"]: r for r in seed if r["impl"] == impl and r["variant"] == variant}
        if not by_seq:
          continue
        for metric, key, digits in (("ms", "ms", 3), ("compiled temp MiB", "temp_mib", 1)):
          lines.append(f"| {impl} | {variant} | {metric} | " +
                       " | ".join(_cell(by_seq.get(s), key, digits) for s in seqs) + " |")
    lines.append("")
  failures = [r for r in records if r["status"] == "error"]
  if failures:
    lines += ["Errors:", ""] + [
        f"- {r['suite']} {r['impl']} {r['mode']} {r['dtype']} d={r['head_dim']} s={r['seq']} "
        f"causal={r['causal']} {r['variant']}: {r['error']}" for r in failures]
  return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  env = environment()
  on_gpu = env["platform"] == "gpu"
  if not on_gpu and not args.quick:
    print(f"bench_attention: no GPU (JAX runs on {env['platform']}); the benchmark needs an "
          "NVIDIA GPU. Use --quick for a smoke run on this machine.", file=sys.stderr)
    return 2
  if on_gpu and not env["flash_jax_kernels"] and "flash_jax" in args.impls:
    print("bench_attention: flash_jax was installed without its CUDA kernels; its points are "
          "recorded as unsupported. Build them with FLASH_JAX_BUILD_CUDA=1 pip install .",
          file=sys.stderr)
  if not on_gpu:
    print(f"bench_attention: smoke run on {env['platform']}: cudnn is unavailable and flash_jax "
          "runs its blockwise JAX implementation; the numbers say nothing about GPU speed.",
          file=sys.stderr)
  print("environment: " + json.dumps(env), file=sys.stderr)

  work = []  # (point, causal, mode, variant)
  if "grid" in args.suites:
    work += [(p, c, m, "none") for p in grid_points(args) for c in args.causal for m in args.modes]
  if "seed" in args.suites:
    work += [(p, False, "fwd+bwd", v) for p in seed_points(args) for v in args.variants]
  records = []
  bar = progress_bar(len(work) * len(args.impls), args.no_progress)
  inputs_key, inputs = None, None
  for point, causal, mode, variant in work:
    key = tuple(sorted(point.items()))
    if key != inputs_key:  # one set of inputs per shape, shared by every implementation
      inputs = None  # free the previous shape's arrays first
      inputs_key, inputs = key, make_inputs(point)
    for impl in args.impls:
      bar.set_description(f"{point['suite']} {impl} {mode} {point['dtype']} d{point['head_dim']} "
                          f"s{point['seq']}{' causal' if causal else ''} {variant}")
      records.append(run_point(point, impl, causal, mode, variant, inputs, args))
      bar.update(1)
  bar.close()

  report = markdown(records, args.impls)
  print(f"\n{env['device']} ({env['platform']}), driver {env['driver']}, jax {env['jax']}, "
        f"jaxlib {env['jaxlib']}, cuDNN {env['cudnn']}, {env['date']}\n")
  print(report)
  output = args.output
  if output is None and not args.quick:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = pathlib.Path(__file__).resolve().parent / "results" / f"attention_{slug}_{stamp}.json"
  if output is not None:
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("output",)}
    output.write_text(json.dumps(dict(environment=env, settings=settings, results=records),
                                 indent=1, default=str))
    print(f"\nresults written to {output}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
