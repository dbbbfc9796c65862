"""Attention benchmark: flash_jax beside jax.nn.dot_product_attention ("xla", "cudnn").

All implementations run in one process on the same random inputs (DESIGN.md §7; the points of
long and memory, and xla at grid points with over 16 GiB of scores, run in fresh processes, on
the same seeded inputs). Suites:

  grid     b * s = 16384 tokens, hidden 2048 (h = 2048 / d), s = 512 .. 16384, d in {64, 128},
           causal and not, bfloat16 and float16; modes fwd, bwd, fwd+bwd.
  seed     batch 8, 12 heads, d 64, s = 128 .. 4096, bfloat16, fwd+bwd: time and compiled temp
           memory, plain, with a key padding mask, with dropout and with both.
  masks    bfloat16, batch 1, s 16384, 16 heads, d 128, fwd and fwd+bwd: (a) segment ids of one
           document against none, causal and not, also d 64 with 32 heads (target <= 10% more
           time); (b) 8 documents of 2048 tokens packed in one row with segment ids, against the
           same documents as a batch of 8 and against a dense block-diagonal mask in flash_jax,
           xla and cudnn (targets: >= 5x xla's speed, <= 1.15x the batch's time); (c) a dense
           mask with half of its 128 x 128 tiles empty against no mask (target <= 0.60 of the
           time), and a lower-triangular dense mask against causal=True (information).
  dropout  the grid's shapes at d 64 and 128, s = 1024 .. 16384, non-causal: flash_jax with
           dropout 0.1 against none, fwd and fwd+bwd (target <= 20% more time), and xla with
           dropout, fwd+bwd, for the speed-up.
  long     batch 1, 16 heads, d 128, s 32768 and 65536, causal and not, fwd+bwd: time, TFLOP/s,
           compiled temp and peak device memory.
  memory   the seed shape at s = 1024 .. 16384, fwd+bwd, flash_jax and xla: compiled temp and
           peak device memory (no timing).

TFLOP/s as FlashAttention counts them (forward 4 * b * s * s * h * d, bwd 2.5x, fwd+bwd 3.5x),
of the useful part of the score matrix: halved when causal, an eighth for 8 packed documents,
half for the half-empty mask. jax.nn.dot_product_attention has neither dropout nor segment ids:
"xla" with dropout is standard attention written out (standard_attention_with_dropout), cudnn
with dropout is recorded unsupported, and packed documents reach xla and cudnn as the dense mask.

Timing: the compiled function, warm-up calls, then the median over repetitions of the wall time
of a batch of calls closed by block_until_ready, divided by the batch size. grid and seed: 2
warm-up calls, 5 repetitions of 20 calls; masks, dropout and long: 2 warm-up calls (long: 1 after
the peak-memory call), 3 repetitions of at most 10 calls, fewer where they would last over 0.1 s
(one at s = 65536); --warmup, --reps and --iters override every suite.
Memory: temp bytes of jit(...).lower(...).compile().memory_analysis(); peak (long, memory): the
device's high-water mark memory_stats()["peak_bytes_in_use"] over one call, inputs and outputs
included. JAX cannot reset that mark, so each such point runs in a fresh process, and those run
before this process starts its GPU backend (which preallocates most of the memory). A call that
does not raise the mark left by compilation and input generation gets that mark as an upper bound
("<=" in the tables). CPU backends report no peak.

A failing point is recorded ("oom", "unsupported", "error") and the run goes on. Results go to
JSON with the GPU, driver, jax, jaxlib and cuDNN versions and the date; markdown tables, with the
targets and verdicts of the new suites, are printed at the end.

  python benchmarks/bench_attention.py                       # every suite (GPU)
  python benchmarks/bench_attention.py --suites grid --dims 128 --modes fwd+bwd --causal false
  python benchmarks/bench_attention.py --suites masks,dropout,long,memory,seed   # ~5 min, H100
  python benchmarks/bench_attention.py --quick               # tiny sizes: a smoke run, CPU too
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import datetime
import json
import math
import os
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
# Opt-in (--impls): flash_jax with the sm80 kernels on a Hopper GPU (FLASH_JAX_DISABLE_SM90), the
# comparison of the two forward kernels in one run.
EXTRA_IMPLS = ("flash_jax_sm80",)
SUITES = ("grid", "seed", "masks", "dropout", "long", "memory")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
VARIANTS = ("none", "padding", "dropout", "padding+dropout")  # the seed suite's
DROPOUT_RATE = 0.1
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
# masks suite: documents packed in one row, and the tile of the half-empty mask (a multiple of
# every kernel tile's sides, so that each kernel tile is wholly kept or wholly empty).
DOCUMENTS = 8
MASK_TILE = 128
SEGMENT_VARIANTS = ("one-document", "packed")
DENSE_MASK_VARIANTS = ("dense-packed", "half-empty", "dense-causal")
WORKER_TIMEOUT_S = 300


class Unsupported(Exception):
  """An implementation lacks the feature a point asks for."""


# One measurement per implementation in impls; isolated: each in a fresh process (peak memory).
Work = collections.namedtuple("Work", ("point", "causal", "mode", "variant", "impls", "isolated"))
# rep_seconds: a repetition holds fewer than iters calls where they would last longer than this,
# judged by the last warm-up call (long's first call is the one that measures peak memory).
Timing = collections.namedtuple("Timing", ("warmup", "reps", "iters", "rep_seconds"))
SUITE_TIMING = {
    "grid": Timing(2, 5, 20, None), "seed": Timing(2, 5, 20, None),
    "masks": Timing(2, 3, 10, 0.1), "dropout": Timing(2, 3, 10, 0.1),
    "long": Timing(1, 3, 10, 0.1), "memory": None,  # memory only: nothing timed
}
# Stage-1 forward+backward targets at s = 16384, d 128 (PERF_TARGETS.md), held at longer s too.
LONG_TARGET_TFLOPS = {False: 340, True: 330}


# --- settings --------------------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  csv = lambda cast: (lambda text: [cast(x) for x in text.split(",") if x])
  boolean = {"true": True, "false": False}
  parser.add_argument("--suites", type=csv(str), default=list(SUITES),
                      help="comma-separated: " + ",".join(SUITES) + " (default all)")
  parser.add_argument("--impls", type=csv(str), default=list(IMPLS),
                      help=",".join(IMPLS + EXTRA_IMPLS))
  parser.add_argument("--modes", type=csv(str), default=list(MODES),
                      help="grid modes: " + ",".join(MODES))
  parser.add_argument("--dims", type=csv(int), default=None,
                      help="grid and dropout head dims (64,128)")
  parser.add_argument("--seqs", type=csv(int), default=None,
                      help="sequence lengths of every suite but masks (grid 512..16384, seed "
                           "128..4096, dropout 1024..16384, long 32768,65536, memory 1024..16384)")
  parser.add_argument("--causal", type=csv(lambda x: boolean[x.lower()]), default=[False, True],
                      help="grid: true,false")
  parser.add_argument("--dtypes", type=csv(str), default=None,
                      help="grid dtypes: bfloat16,float16 (default both; bfloat16 with --quick)")
  parser.add_argument("--variants", type=csv(str), default=list(VARIANTS),
                      help="seed variants: " + ",".join(VARIANTS))
  parser.add_argument("--tokens", type=int, default=16384, help="grid and dropout batch * seq")
  parser.add_argument("--hidden", type=int, default=2048, help="grid and dropout heads * head_dim")
  parser.add_argument("--warmup", type=int, default=None,
                      help="warm-up calls (per suite: 2, or 1 for long)")
  parser.add_argument("--reps", type=int, default=None,
                      help="repetitions, the median is reported (per suite: 5 or 3)")
  parser.add_argument("--iters", type=int, default=None,
                      help="calls per repetition (per suite: 20, or up to 10 within 0.1 s)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes and few repetitions: a smoke run (works on CPU)")
  parser.add_argument("--output", type=pathlib.Path, default=None,
                      help="JSON file (default benchmarks/results/attention_<gpu>_<time>.json; "
                           "none with --quick)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # see run_isolated
  args = parser.parse_args(argv)
  if args.dtypes is None:
    args.dtypes = ["bfloat16"] if args.quick else ["bfloat16", "float16"]
  for name, allowed in (("impls", IMPLS + EXTRA_IMPLS), ("modes", MODES), ("suites", SUITES),
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


def suite_timing(suite, args):
  """The suite's Timing with the settings given on the command line, or None (not timed)."""
  timing = SUITE_TIMING[suite]
  if timing is None:
    return None
  given = {k: getattr(args, k) for k in ("warmup", "reps", "iters") if getattr(args, k) is not None}
  if "iters" in given:  # a call count asked for is kept whatever the calls last
    given["rep_seconds"] = None
  return timing._replace(**given)


def shape(suite, dtype, head_dim, seq, batch, heads):
  return dict(suite=suite, dtype=dtype, head_dim=head_dim, seq=seq, batch=batch, heads=heads)


def grid_points(args):
  seqs = args.seqs or [512, 1024, 2048, 4096, 8192, 16384]
  for dtype in args.dtypes:
    for head_dim in args.dims or [64, 128]:
      for seq in seqs:
        batch, heads = max(1, args.tokens // seq), max(1, args.hidden // head_dim)
        yield shape("grid", dtype, head_dim, seq, batch, heads)


def seed_points(args, suite="seed", default_seqs=(128, 256, 512, 1024, 2048, 4096)):
  batch, heads = (2, 2) if args.quick else (8, 12)
  for seq in args.seqs or default_seqs:
    yield shape(suite, "bfloat16", 64, seq, batch, heads)


# --- the work of each suite ----------------------------------------------------------------------


# Standard attention whose float32 score matrix exceeds this size runs in its own process: on an
# H200 (jax 0.11.2) xla at d64 s16384 fwd+bwd (32 GiB of scores) aborted the whole process in
# XLA's allocator instead of raising an out-of-memory error (benchmarks/NOTES.md, session 4).
XLA_ISOLATED_SCORE_BYTES = 16 * 2**30


def grid_work(args):
  works = []
  for point in grid_points(args):
    scores = 4 * point["batch"] * point["heads"] * point["seq"] ** 2
    alone = [i for i in args.impls if i == "xla" and scores > XLA_ISOLATED_SCORE_BYTES]
    together = [i for i in args.impls if i not in alone]
    for causal in args.causal:
      for mode in args.modes:
        works += [Work(point, causal, mode, "none", impls, isolated)
                  for impls, isolated in ((together, False), (alone, True)) if impls]
  return works


def seed_work(args):
  return [Work(p, False, "fwd+bwd", v, args.impls, False)
          for p in seed_points(args) for v in args.variants]


def masks_work(args):
  """Three shapes, each with its variants, in that order so that inputs are made once each."""
  seq, heads = (256, 2) if args.quick else (16384, 16)
  flash = [i for i in args.impls if i == "flash_jax"]
  one_row = shape("masks", "bfloat16", 128, seq, 1, heads)
  d64 = shape("masks", "bfloat16", 64, seq, 1, 2 * heads)  # hidden 2048 like the grid
  separate = shape("masks", "bfloat16", 128, seq // DOCUMENTS, DOCUMENTS, heads)
  cases = [(one_row, v, impls, causals) for v, impls, causals in (
      ("none", flash, (False, True)), ("one-document", flash, (False, True)),
      ("packed", flash, (False, True)), ("dense-packed", args.impls, (False, True)),
      ("half-empty", flash, (False,)), ("dense-causal", flash, (False,)))]
  cases += [(d64, v, flash, (False, True)) for v in ("none", "one-document")]
  cases.append((separate, "none", flash, (False, True)))
  return [Work(point, causal, mode, variant, impls, False)
          for point, variant, impls, causals in cases for causal in causals
          for mode in ("fwd", "fwd+bwd")]


def dropout_work(args):
  """Non-causal grid shapes; xla (standard attention) only in fwd+bwd, where the speed-up is."""
  seqs = args.seqs or [1024, 2048, 4096, 8192, 16384]
  both = [i for i in args.impls if i in ("flash_jax", "xla")]
  flash = [i for i in args.impls if i == "flash_jax"]
  work = []
  for head_dim in args.dims or [64, 128]:
    for seq in seqs:
      point = shape("dropout", "bfloat16", head_dim, seq, max(1, args.tokens // seq),
                    max(1, args.hidden // head_dim))
      for variant in ("none", "dropout"):
        work += [Work(point, False, "fwd", variant, flash, False),
                 Work(point, False, "fwd+bwd", variant, both, False)]
  return work


def long_work(args):
  heads = 2 if args.quick else 16
  return [Work(shape("long", "bfloat16", 128, seq, 1, heads), causal, "fwd+bwd", "none",
               args.impls, True)
          for seq in args.seqs or [32768, 65536] for causal in (False, True)]


def memory_work(args):
  impls = [i for i in args.impls if i in ("flash_jax", "xla")]
  return [Work(p, False, "fwd+bwd", "none", impls, True)
          for p in seed_points(args, "memory", (1024, 2048, 4096, 8192, 16384))]


SUITE_WORK = {"grid": grid_work, "seed": seed_work, "masks": masks_work, "dropout": dropout_work,
              "long": long_work, "memory": memory_work}


# --- the functions measured --------------------------------------------------------------------


def standard_attention_with_dropout(q, k, v, causal, kv_lengths, dropout_rng):
  """Standard attention, computed as jax.nn's "xla" implementation does, with dropout on the
  attention weights, which jax.nn.dot_product_attention lacks.

  This is the baseline of FlashAttention's dropout figures: scores, weights and dropout mask
  materialised as [b, h, s, s] arrays.
  """
  seq_q, seq_k = q.shape[1], k.shape[1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  keep = jnp.ones((1, 1, seq_q, seq_k), bool)
  if causal:
    keep = jnp.tril(keep)
  if kv_lengths is not None:
    keep = keep & (jnp.arange(seq_k) < kv_lengths[:, None, None, None])
  scores = jnp.where(keep, scores / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1)
  kept = jax.random.bernoulli(dropout_rng, 1 - DROPOUT_RATE, weights.shape)
  weights = jnp.where(kept, weights / (1 - DROPOUT_RATE), 0).astype(q.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def attention_fn(impl, causal, variant):
  """fn(q, k, v, extras) -> out; extras holds the arrays of the variant, named as flash_jax's
  arguments (make_extras)."""
  if impl in ("flash_jax", "flash_jax_sm80"):
    def fn(q, k, v, extras):
      rate = DROPOUT_RATE if "dropout_rng" in extras else 0.0
      return flash_jax.attention(q, k, v, causal=causal, dropout_rate=rate, **extras)
    return fn
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise Unsupported(f"cudnn needs an NVIDIA GPU, JAX runs on {jax.default_backend()}")
  if variant in SEGMENT_VARIANTS:
    raise Unsupported("jax.nn.dot_product_attention has no segment ids (dense-packed is the "
                      "equivalent dense mask)")
  if "dropout" in variant:
    if impl == "cudnn":
      raise Unsupported("jax.nn.dot_product_attention has no dropout")
    return lambda q, k, v, extras: standard_attention_with_dropout(
        q, k, v, causal, extras.get("kv_lengths"), extras["dropout_rng"])

  def fn(q, k, v, extras):
    return jax.nn.dot_product_attention(q, k, v, mask=extras.get("mask"), is_causal=causal,
                                        implementation=impl,
                                        key_value_seq_lengths=extras.get("kv_lengths"))
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


def time_calls(compiled, arguments, timing):
  """(median seconds per call, calls per repetition)."""
  call = None
  for _ in range(max(timing.warmup, 1 if timing.rep_seconds else 0)):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*arguments))
    call = time.perf_counter() - start
  iters = timing.iters
  if timing.rep_seconds:
    iters = max(1, min(iters, int(timing.rep_seconds / call)))
  times = []
  for _ in range(timing.reps):
    start = time.perf_counter()
    for _ in range(iters):
      result = compiled(*arguments)
    jax.block_until_ready(result)
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times), iters


def temp_mib(compiled):
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  return None if temp_bytes is None else temp_bytes / 2**20


def peak_memory(compiled, arguments):
  """{peak_mib, peak_is_bound}: the device's high-water mark after one call (module docstring);
  {peak_mib: None} where the backend keeps no statistics (CPU)."""
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return dict(peak_mib=None)
  before = stats["peak_bytes_in_use"]
  jax.block_until_ready(compiled(*arguments))
  after = device.memory_stats()["peak_bytes_in_use"]
  return dict(peak_mib=after / 2**20, peak_is_bound=after == before)


def useful_fraction(variant, causal):
  """The part of the score matrix that holds kept scores: what TFLOP/s count."""
  fraction = {"packed": 1 / DOCUMENTS, "dense-packed": 1 / DOCUMENTS, "half-empty": 0.5,
              "dense-causal": 0.5}.get(variant, 1.0)
  return fraction * (0.5 if causal else 1.0)


def flops(point, causal, mode, variant="none"):
  forward = 4 * point["batch"] * point["seq"] ** 2 * point["heads"] * point["head_dim"]
  return forward * useful_fraction(variant, causal) * FLOP_FACTOR[mode]


def classify(error: BaseException) -> tuple[str, str]:
  message = f"{type(error).__name__}: {error}".strip()
  first_line = message.splitlines()[0][:300]
  if isinstance(error, (Unsupported, NotImplementedError)):
    return "unsupported", first_line
  if re.search(r"RESOURCE_EXHAUSTED|out of memory|OOM", message, re.IGNORECASE):
    return "oom", first_line
  return "error", first_line


def input_keys(seed):
  return jax.random.split(jax.random.key(seed), 6)


def make_inputs(point, seed=0):
  dtype = jnp.dtype(point["dtype"])
  b, s, h, d = point["batch"], point["seq"], point["heads"], point["head_dim"]
  return jax.block_until_ready(tuple(
      jax.random.normal(key, (b, s, h, d), jnp.float32).astype(dtype)
      for key in input_keys(seed)[:4]))  # q, k, v, dout


def document_ids(batch, seq, documents):
  return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32) // (seq // documents), (batch, seq))


def dense_mask(variant, seq):
  """[1, 1, seq, seq] bool, True = keep."""
  rows, cols = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
  if variant == "dense-packed":
    keep = rows // (seq // DOCUMENTS) == cols // (seq // DOCUMENTS)
  elif variant == "half-empty":  # a checkerboard of tiles: every row keeps half of its keys
    keep = (rows // MASK_TILE + cols // MASK_TILE) % 2 == 0
  else:  # dense-causal
    keep = cols <= rows
  return keep[None, None]


def make_extras(variant, point, seed=0):
  """The arrays a variant adds, keyed by flash_jax.attention's argument names."""
  b, s = point["batch"], point["seq"]
  keys = input_keys(seed)
  extras = {}
  if "padding" in variant:  # every sequence keeps between half and all of its keys
    extras["kv_lengths"] = jax.random.randint(keys[4], (b,), s // 2, s + 1, dtype=jnp.int32)
  if "dropout" in variant:
    extras["dropout_rng"] = keys[5]
  if variant in SEGMENT_VARIANTS:
    ids = document_ids(b, s, 1 if variant == "one-document" else DOCUMENTS)
    extras.update(q_segment_ids=ids, kv_segment_ids=ids)
  if variant in DENSE_MASK_VARIANTS:
    extras["mask"] = dense_mask(variant, s)
  return jax.block_until_ready(extras)


def base_record(work, impl):
  return dict(work.point, impl=impl, causal=work.causal, mode=work.mode, variant=work.variant)


@contextlib.contextmanager
def kernel_choice(impl):
  """flash_jax_sm80: the kernel dispatch reads FLASH_JAX_DISABLE_SM90 on every call."""
  if impl != "flash_jax_sm80":
    yield
    return
  previous = os.environ.get("FLASH_JAX_DISABLE_SM90")
  os.environ["FLASH_JAX_DISABLE_SM90"] = "1"
  try:
    yield
  finally:
    if previous is None:
      del os.environ["FLASH_JAX_DISABLE_SM90"]
    else:
      os.environ["FLASH_JAX_DISABLE_SM90"] = previous


def run_point(work, impl, inputs, timing, peak):
  """One measurement; timing None: memory only; peak: also the device's peak memory."""
  with kernel_choice(impl):
    return _run_point(work, impl, inputs, timing, peak)


def _run_point(work, impl, inputs, timing, peak):
  record = base_record(work, impl)
  try:
    fn = attention_fn(impl, work.causal, work.variant)
    function, arguments = timed_function(work.mode, fn, *inputs)
    compiled = jax.jit(function).lower(*arguments).compile()
    record["temp_mib"] = temp_mib(compiled)
    if peak:
      record.update(peak_memory(compiled, arguments))
    if timing is not None:
      seconds, iters = time_calls(compiled, arguments, timing)
      record.update(ms=seconds * 1e3, iters=iters,
                    tflops=flops(work.point, work.causal, work.mode, work.variant) / seconds / 1e12)
  except Exception as error:  # pylint: disable=broad-except  # one point must not end the run
    status, message = classify(error)
    record.update(status=status, error=message)
    if status == "error":
      record["traceback"] = traceback.format_exc(limit=8)
    return record
  record["status"] = "ok"
  return record


# --- fresh processes for peak memory -------------------------------------------------------------


def run_isolated(work, impl, timing, quick):
  """run_point in a fresh process (this script with --worker): its record, or the failure."""
  request = json.dumps(dict(work=work._asdict(), impl=impl,
                            timing=timing and timing._asdict(), quick=quick))
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", request]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                            check=False)
  except subprocess.TimeoutExpired:
    return dict(base_record(work, impl), status="error",
                error=f"worker process still running after {WORKER_TIMEOUT_S} s")
  lines = result.stdout.strip().splitlines()
  if result.returncode == 0 and lines:
    try:
      return json.loads(lines[-1])
    except json.JSONDecodeError:
      pass  # something else printed last: reported below with the process's last words
  # The process died (an abort, or the kernel's OOM killer): its last words say why.
  tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
  status, message = classify(RuntimeError(f"worker exited with {result.returncode}: {tail}"))
  return dict(base_record(work, impl), status=status, error=message)


def worker(request_text):
  """--worker: one point of run_isolated, its record printed as the last line of stdout."""
  request = json.loads(request_text)
  work = Work(**request["work"])
  timing = request["timing"] and Timing(**request["timing"])
  if jax.default_backend() != "gpu" and not request["quick"]:
    record = dict(base_record(work, request["impl"]), status="unsupported",
                  error=f"full-size points need a GPU, JAX runs on {jax.default_backend()}")
  else:
    inputs = make_inputs(work.point) + (make_extras(work.variant, work.point),)
    record = run_point(work, request["impl"], inputs, timing, peak=True)
  print(json.dumps(record, default=str))
  return 0


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


def ok(record):
  return record is not None and record["status"] == "ok"


def _status(record):
  return "" if record is None else {"unsupported": "unsup"}.get(record["status"], record["status"])


def _number(value, digits):
  if value >= 100:
    return f"{value:.0f}"
  # Tiny values (smoke runs on CPU) keep three significant digits instead of rounding to 0.
  return f"{value:.{digits}f}" if value >= 10 ** -digits else f"{value:.3g}"


def _cell(record, key, digits):
  if record is None:
    return ""
  if record["status"] != "ok":
    return _status(record)
  value = record.get(key)
  if value is None:
    return "n/a"
  bound = "<=" if key == "peak_mib" and record.get("peak_is_bound") else ""
  return bound + _number(value, digits)


def _ratio_rows(by_impl, seqs, key):
  rows = []
  ours = by_impl.get("flash_jax", {})
  for peer in ("cudnn", "xla"):
    if peer not in by_impl:
      continue
    cells = []
    for seq in seqs:
      a, b = ours.get(seq), by_impl[peer].get(seq)
      ok_ = a and b and a["status"] == b["status"] == "ok" and a[key] and b[key]
      cells.append(f"{a[key] / b[key]:.2f}x" if ok_ else "")
    if any(cells):
      rows.append(f"| flash_jax / {peer} | " + " | ".join(cells) + " |")
  return rows


def pick(records, **fields):
  """The record with these field values, or None."""
  return next((r for r in records if all(r.get(k) == v for k, v in fields.items())), None)


def ratio(numerator, denominator, key="ms"):
  """numerator[key] / denominator[key], or None unless both ran."""
  if not (ok(numerator) and ok(denominator)) or not (numerator.get(key) and denominator.get(key)):
    return None
  return numerator[key] / denominator[key]


def judged(value, target, at_most):
  return "met" if (value <= target if at_most else value >= target) else "missed"


def verdict(value, target, at_most, *records):
  """'met' / 'missed', or what kept the value from being measured."""
  if value is not None:
    return judged(value, target, at_most)
  failed = [f"{r['impl']} {_status(r)}" for r in records if r is not None and not ok(r)]
  return "n/a" + (f" ({', '.join(failed)})" if failed else "")


def _times(value):
  return "" if value is None else f"{value:.2f}x"


def _overhead(value):
  return "" if value is None else f"{(value - 1) * 100:+.1f}%"


def table(title, header, rows):
  return [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(row) + " |" for row in rows] + [""]


def grid_report(records, impls):
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
  return lines


def seed_report(records, impls):
  seed = [r for r in records if r["suite"] == "seed"]
  if not seed:
    return []
  first = seed[0]
  seqs = sorted({r["seq"] for r in seed})
  rows = []
  for variant in VARIANTS:
    for impl in impls:
      by_seq = {r["seq"]: r for r in seed if r["impl"] == impl and r["variant"] == variant}
      if by_seq:
        rows += [[impl, variant, metric] + [_cell(by_seq.get(s), key, digits) for s in seqs]
                 for metric, key, digits in (("ms", "ms", 3), ("compiled temp MiB", "temp_mib", 1))]
    speedups = [_times(ratio(pick(seed, impl="xla", variant=variant, seq=s),
                             pick(seed, impl="flash_jax", variant=variant, seq=s))) for s in seqs]
    if any(speedups):
      rows.append(["xla / flash_jax", variant, "time"] + speedups)
  return table(f"Seed configuration (batch {first['batch']}, {first['heads']} heads, head dim "
               f"{first['head_dim']}, {first['dtype']}), forward+backward; xla with dropout is "
               "standard attention with dropout",
               ["impl", "variant", "metric"] + list(map(str, seqs)), rows)


def _config_text(point):
  return f"batch {point['batch']}, {point['heads']} heads, d {point['head_dim']}, {point['dtype']}"


def masks_segment_table(masks):
  plain = [r for r in masks if r["variant"] == "none" and r["batch"] == 1 and
           r["impl"] == "flash_jax"]
  if not plain:
    return []
  rows = []
  for r in sorted(plain, key=lambda r: (-r["head_dim"], r["causal"], r["mode"])):
    ids = pick(masks, **{k: r[k] for k in ("head_dim", "batch", "causal", "mode", "impl")},
               variant="one-document")
    value = ratio(ids, r)
    rows.append([str(r["head_dim"]), str(r["heads"]), str(r["causal"]), r["mode"],
                 _cell(r, "ms", 3), _cell(ids, "ms", 3), _overhead(value),
                 verdict(value, 1.10, True, r, ids)])
  return table(f"Masks (a): segment ids of one document vs none, flash_jax, batch 1, seq "
               f"{plain[0]['seq']}, bfloat16; target: overhead <= 10%",
               ["d", "heads", "causal", "mode", "no ids ms", "one-document ms", "overhead",
                "verdict"], rows)


def masks_packed_table(masks):
  rows = []
  for causal in (False, True):
    for mode in ("fwd", "fwd+bwd"):
      find = lambda **f: pick(masks, head_dim=128, causal=causal, mode=mode, **f)
      packed = find(variant="packed", impl="flash_jax")
      if packed is None:
        continue
      separate = find(variant="none", batch=DOCUMENTS, impl="flash_jax")
      dense = {impl: find(variant="dense-packed", impl=impl) for impl in IMPLS}
      speedup, versus_batch = ratio(dense["xla"], packed), ratio(packed, separate)
      xla_verdict = verdict(speedup, 5, False, packed, dense["xla"])
      if ok(packed) and dense["xla"] is not None and dense["xla"]["status"] == "oom":
        xla_verdict = "met (xla oom)"  # flash_jax runs what standard attention cannot
      rows.append([str(causal), mode, _cell(packed, "ms", 3), _cell(separate, "ms", 3)] +
                  [_cell(dense[impl], "ms", 3) for impl in IMPLS] +
                  [_times(speedup), xla_verdict, _times(versus_batch),
                   verdict(versus_batch, 1.15, True, packed, separate)])
  seq = masks[0]["seq"] if masks else 0
  return table(f"Masks (b): {DOCUMENTS} documents of {seq // DOCUMENTS} tokens packed in one row "
               "with segment ids vs the same documents as a batch vs a dense block-diagonal mask "
               "(d 128); targets: xla dense / packed >= 5x, packed / batch <= 1.15x",
               ["causal", "mode", "packed ms", "batch ms", "flash_jax dense ms", "cudnn dense ms",
                "xla dense ms", "xla / packed", "verdict", "packed / batch", "verdict"], rows)


def masks_sparse_table(masks):
  rows = []
  for variant, reference, label in (("half-empty", False, "half-empty vs no mask"),
                                    ("dense-causal", True, "lower-triangular vs causal=True")):
    for mode in ("fwd", "fwd+bwd"):
      masked = pick(masks, variant=variant, mode=mode, impl="flash_jax")
      base = pick(masks, variant="none", batch=1, head_dim=128, causal=reference, mode=mode,
                  impl="flash_jax")
      if masked is None:
        continue
      value = ratio(masked, base)
      judgement = verdict(value, 0.60, True, base, masked) if variant == "half-empty" else "info"
      rows.append([label, mode, _cell(base, "ms", 3), _cell(masked, "ms", 3), _times(value),
                   judgement])
  return table(f"Masks (c): dense masks, flash_jax, batch 1, d 128; half of the {MASK_TILE} x "
               f"{MASK_TILE} tiles empty; target: masked / unmasked <= 0.60",
               ["mask", "mode", "reference ms", "masked ms", "masked / reference", "verdict"],
               rows)


def masks_report(records):
  masks = [r for r in records if r["suite"] == "masks"]
  if not masks:
    return []
  return masks_segment_table(masks) + masks_packed_table(masks) + masks_sparse_table(masks)


def dropout_report(records):
  runs = [r for r in records if r["suite"] == "dropout"]
  plain = sorted((r for r in runs if r["variant"] == "none" and r["impl"] == "flash_jax"),
                 key=lambda r: (-r["head_dim"], MODES.index(r["mode"]), r["seq"]))
  rows = []
  for r in plain:
    find = lambda **f: pick(runs, head_dim=r["head_dim"], seq=r["seq"], mode=r["mode"], **f)
    dropped, xla = find(variant="dropout", impl="flash_jax"), find(variant="dropout", impl="xla")
    value = ratio(dropped, r)
    rows.append([str(r["head_dim"]), r["mode"], str(r["seq"]), str(r["batch"]), _cell(r, "ms", 3),
                 _cell(dropped, "ms", 3), _overhead(value), verdict(value, 1.20, True, r, dropped),
                 _cell(xla, "ms", 3), _times(ratio(xla, dropped))])
  if not rows:
    return []
  return table(f"Dropout {DROPOUT_RATE} vs none, non-causal, batch x seq = "
               f"{plain[0]['batch'] * plain[0]['seq']}, {plain[0]['dtype']}; target: flash_jax "
               "overhead <= 20%; xla with dropout = standard attention with dropout",
               ["d", "mode", "seq", "batch", "flash_jax ms", "flash_jax dropout ms", "overhead",
                "verdict", "xla dropout ms", "xla / flash_jax (dropout)"], rows)


def long_report(records):
  runs = sorted((r for r in records if r["suite"] == "long"),
                key=lambda r: (r["seq"], r["causal"], (IMPLS + EXTRA_IMPLS).index(r["impl"])))
  rows = []
  for r in runs:
    target = LONG_TARGET_TFLOPS[r["causal"]]
    judgement = ""
    if r["impl"] == "flash_jax":
      judgement = verdict(r.get("tflops") if ok(r) else None, target, False, r)
    rows.append([str(r["seq"]), str(r["causal"]), r["impl"], _cell(r, "ms", 3),
                 _cell(r, "tflops", 0), _number(r["temp_mib"], 1) if r.get("temp_mib") else "",
                 _cell(r, "peak_mib", 0), judgement])
  if not rows:
    return []
  return table(f"Long sequences, forward+backward, {_config_text(runs[0])}; target: flash_jax "
               "TFLOP/s >= the Stage-1 "
               f"s16384 figure ({LONG_TARGET_TFLOPS[False]}, causal {LONG_TARGET_TFLOPS[True]}); "
               "temp: compiled, also where the run failed; peak: one call in a fresh process, "
               "inputs included",
               ["seq", "causal", "impl", "ms", "TFLOP/s", "compiled temp MiB", "peak MiB",
                "verdict"], rows)


def memory_report(records):
  runs = [r for r in records if r["suite"] == "memory"]
  rows = []
  for seq in sorted({r["seq"] for r in runs}):
    ours, theirs = pick(runs, seq=seq, impl="flash_jax"), pick(runs, seq=seq, impl="xla")
    temp_share, peak_gain = ratio(ours, theirs, "temp_mib"), ratio(theirs, ours, "peak_mib")
    temp_verdict = verdict(temp_share, 0.02, True, ours, theirs) if seq == 4096 else ""
    claim = {2048: 10, 4096: 20}.get(seq)
    peak_verdict = verdict(peak_gain, claim, False, ours, theirs) if claim else ""
    rows.append([str(seq), _cell(ours, "temp_mib", 1), _cell(theirs, "temp_mib", 1),
                 "" if temp_share is None else f"{temp_share:.2%}", temp_verdict,
                 _cell(ours, "peak_mib", 0), _cell(theirs, "peak_mib", 0), _times(peak_gain),
                 peak_verdict])
  if not rows:
    return []
  return table(f"Memory of forward+backward vs sequence length ({_config_text(runs[0])}); "
               "peak: one call in a fresh process, inputs included; targets: flash_jax compiled "
               "temp <= 2% of xla's at 4096 (PERF_TARGETS), xla / flash_jax peak >= 10x at 2048 "
               "and >= 20x at 4096 (seed)",
               ["seq", "flash_jax temp MiB", "xla temp MiB", "flash_jax / xla temp", "verdict",
                "flash_jax peak MiB", "xla peak MiB", "xla / flash_jax peak", "verdict"], rows)


def markdown(records, impls):
  lines = (grid_report(records, impls) + seed_report(records, impls) + masks_report(records) +
           dropout_report(records) + long_report(records) + memory_report(records))
  failures = [r for r in records if r["status"] == "error"]
  if failures:
    lines += ["Errors:", ""] + [
        f"- {r['suite']} {r['impl']} {r['mode']} {r['dtype']} d={r['head_dim']} s={r['seq']} "
        f"causal={r['causal']} {r['variant']}: {r['error']}" for r in failures]
  return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def probe_platform():
  """JAX's backend, asked of a fresh process so that this one does not start (and preallocate)
  the GPU before the isolated points run."""
  result = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False)
  lines = result.stdout.split()
  return lines[-1] if lines else "unknown"


def refuse_without_gpu(platform, args):
  """True, with the reason printed, when a full-size run would start without a GPU."""
  if platform == "gpu" or args.quick:
    return False
  print(f"bench_attention: no GPU (JAX runs on {platform}); the benchmark needs an NVIDIA GPU. "
        "Use --quick for a smoke run on this machine.", file=sys.stderr)
  return True


def describe(work, impl):
  point = work.point
  return (f"{point['suite']} {impl} {work.mode} {point['dtype']} d{point['head_dim']} "
          f"s{point['seq']}{' causal' if work.causal else ''} {work.variant}")


def run_in_process(works, args, bar):
  records = []
  inputs_key, inputs = None, None
  for work in works:
    key = (tuple(sorted(work.point.items())), work.variant)
    if key != inputs_key:  # one set of inputs per shape and variant, shared by every impl
      inputs = None  # free the previous arrays first
      inputs_key = key
      inputs = make_inputs(work.point) + (make_extras(work.variant, work.point),)
    for impl in work.impls:
      bar.set_description(describe(work, impl))
      records.append(run_point(work, impl, inputs, suite_timing(work.point["suite"], args),
                               peak=False))
      bar.update(1)
  return records


def run_all_isolated(works, args, bar):
  records = []
  for work in works:
    for impl in work.impls:
      bar.set_description(describe(work, impl) + " (own process)")
      records.append(run_isolated(work, impl, suite_timing(work.point["suite"], args),
                                  args.quick))
      bar.update(1)
  return records


def write_results(records, env, args):
  output = args.output
  if output is None and not args.quick:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = pathlib.Path(__file__).resolve().parent / "results" / f"attention_{slug}_{stamp}.json"
  if output is None:
    return
  output.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k not in ("output", "worker")}
  output.write_text(json.dumps(dict(environment=env, settings=settings, results=records),
                               indent=1, default=str))
  print(f"\nresults written to {output}", file=sys.stderr)


def main(argv=None):
  args = parse_args(argv)
  if args.worker is not None:
    return worker(args.worker)
  works = [w for suite in SUITES if suite in args.suites for w in SUITE_WORK[suite](args)]
  isolated = [w for w in works if w.isolated]
  in_process = [w for w in works if not w.isolated]
  if isolated and refuse_without_gpu(probe_platform(), args):
    return 2
  bar = progress_bar(sum(len(w.impls) for w in works), args.no_progress)
  # Before this process starts its GPU backend: see the module docstring (peak memory).
  records = run_all_isolated(isolated, args, bar)
  env = environment()
  if refuse_without_gpu(env["platform"], args):
    return 2
  if env["platform"] == "gpu" and not env["flash_jax_kernels"] and "flash_jax" in args.impls:
    print("bench_attention: flash_jax was installed without its CUDA kernels; its points are "
          "recorded as unsupported. Build them with FLASH_JAX_BUILD_CUDA=1 pip install .",
          file=sys.stderr)
  if env["platform"] != "gpu":
    print(f"bench_attention: smoke run on {env['platform']}: cudnn is unavailable and flash_jax "
          "runs its blockwise JAX implementation; the numbers say nothing about GPU speed.",
          file=sys.stderr)
  print("environment: " + json.dumps(env), file=sys.stderr)
  records += run_in_process(in_process, args, bar)
  bar.close()
  # Report in the order of the suites, whichever ran first.
  records.sort(key=lambda r: SUITES.index(r["suite"]))
  print(f"\n{env['device']} ({env['platform']}), driver {env['driver']}, jax {env['jax']}, "
        f"jaxlib {env['jaxlib']}, cuDNN {env['cudnn']}, {env['date']}\n")
  print(markdown(records, args.impls))
  write_results(records, env, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
