"""Figures from the JSON files of bench_attention.py: speed-up, memory reduction, TFLOP/s.

  python benchmarks/plot.py benchmarks/results/h100_2026-11-25_grid_bf16.json \\
      benchmarks/results/h100_2026-11-25_seed.json --out benchmarks/results/figures/

PNG files written to --out, each only when the inputs hold its data:

  grid_speedup_<dtype>.png  grid, forward+backward: time of standard attention (xla) over
                            flash_jax's, one line per (head dim, causal)
  grid_tflops_<dtype>.png   grid: TFLOP/s of flash_jax, cudnn and xla, one panel per
                            (head dim, causal, pass)
  seed_speedup.png          seed configuration: xla time over flash_jax's, one line per variant
                            (none, key padding, dropout, padding+dropout)
  seed_memory.png           seed configuration: xla compiled temp memory over flash_jax's, one
                            line per variant
  memory_reduction.png      memory suite: compiled temp and peak device memory of flash_jax and
                            xla against the sequence length, and xla's over flash_jax's

bench_attention.py measures xla with dropout as standard attention written out; in files from
before that, where xla's dropout points are unsupported, flash_jax with dropout is compared with
xla's plain attention and labelled so. Points an implementation could not run (oom, error,
unsupported) are left out of their line and marked with that status. When several files hold the
same point, the later file's is used. Each figure carries the GPU, driver, jax and
cuDNN versions and the date of the runs it shows. Needs matplotlib (pip install ".[bench]").
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines or in CI

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib import ticker  # noqa: E402

# The orders and names bench_attention.py writes; not imported from it because it imports jax and
# flash_jax, which plotting does not need.
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
VARIANTS = ("none", "padding", "dropout", "padding+dropout")
IMPL_STYLE = {"flash_jax": dict(color="tab:red", marker="o"),
              "cudnn": dict(color="tab:blue", marker="s"),
              "xla": dict(color="tab:gray", marker="^")}
VARIANT_STYLE = {"none": dict(color="tab:red", marker="o"),
                 "padding": dict(color="tab:purple", marker="s"),
                 "dropout": dict(color="tab:green", marker="D"),
                 "padding+dropout": dict(color="tab:orange", marker="v")}
HEAD_DIM_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
BASELINE = "xla"
DPI = 110  # keeps the committed PNGs around 50-150 kB


# --- records -----------------------------------------------------------------------------------

def point_key(record):
  return tuple(record[k] for k in ("suite", "dtype", "head_dim", "seq", "batch", "heads", "causal",
                                   "mode", "variant", "impl"))


def load(paths):
  """Records of all files, each with its file's environment; the later file wins a point."""
  points = {}
  for path in paths:
    data = json.loads(pathlib.Path(path).read_text())
    for record in data["results"]:
      points[point_key(record)] = dict(record, environment=data["environment"])
  return list(points.values())


def environment_line(env):
  """'GPU, driver, jax, cuDNN, date' with the fields the run could not read left out."""
  parts = [env.get("device")]
  parts += [f"{name} {env[key]}" for name, key in (("driver", "driver"), ("jax", "jax"),
                                                   ("cuDNN", "cudnn")) if env.get(key)]
  parts.append((env.get("date") or "")[:10])  # the day: runs of one session differ by minutes
  return ", ".join(p for p in parts if p)


def ok(record):
  return record is not None and record["status"] == "ok"


def seq_label(seq):
  return f"{seq // 1024}k" if seq >= 1024 and seq % 1024 == 0 else str(seq)


def status_text(record):
  return {"unsupported": "unsup."}.get(record["status"], record["status"])


# Records are looked up by (line, impl, seq); a line holds the settings one curve shares.
Line = collections.namedtuple("Line", ("suite", "dtype", "head_dim", "causal", "mode", "variant"))


def line_of(record):
  return Line(*(record[f] for f in Line._fields))


def index(records):
  return {(line_of(r), r["impl"], r["seq"]): r for r in records}


def ratio_points(by_key, line, baseline_line, seqs, metric):
  """[(seq, baseline's metric / flash_jax's, None) or (seq, None, failure text)] along seqs."""
  points = []
  for seq in seqs:
    ours, theirs = by_key.get((line, "flash_jax", seq)), by_key.get((baseline_line, BASELINE, seq))
    if ours is None or theirs is None:
      continue  # not measured: nothing to show or mark
    if ok(ours) and ok(theirs):
      # temp_mib is None where the backend has no memory_analysis: no value, and no failure.
      if ours[metric] and theirs[metric] is not None:
        points.append((seq, theirs[metric] / ours[metric], None))
      continue
    points.append((seq, None, ", ".join(f"{r['impl']} {status_text(r)}" for r in (ours, theirs)
                                        if not ok(r))))
  return points


def baseline_variant(records, variant):
  """The variant of the baseline to divide by: the same, or "none" where it was not or could not
  be run.

  jax.nn.dot_product_attention has no dropout: flash_jax with dropout is then compared with
  standard attention without it, which understates the gain (dropout only adds to its cost).
  """
  runs = [r for r in records if r["impl"] == BASELINE and r["variant"] == variant]
  if variant != "none" and all(r["status"] == "unsupported" for r in runs):
    return "none"
  return variant


# --- drawing -----------------------------------------------------------------------------------

def format_seq_axis(ax, seqs):
  """Log2 x axis, one labelled tick per measured sequence length, room for the failure marks."""
  ax.set_xscale("log", base=2)
  ax.set_xlim(min(seqs) / 1.3, max(seqs) * 1.3)
  ax.xaxis.set_major_locator(ticker.FixedLocator(seqs))
  ax.xaxis.set_major_formatter(ticker.FixedFormatter([seq_label(s) for s in seqs]))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.grid(True, alpha=0.3)


def draw_line(ax, points, label, style, linestyle="-"):
  """Plots points [(seq, value, failure)]: the values as a line, the failures as text.

  A failure is written at its sequence length at the height of the nearest plotted point of the
  same line, where the line would have gone, or at the axes' foot when the line has no point.
  """
  shown = [(seq, value) for seq, value, _ in points if value is not None]
  ax.plot([s for s, _ in shown], [v for _, v in shown], label=label, linestyle=linestyle,
          linewidth=1.6, markersize=4, **style)
  text = dict(fontsize=7, color=style["color"], style="italic", ha="center",
              textcoords="offset points", xytext=(0, 5))
  for seq, value, failure in points:
    if value is not None:
      continue
    if shown:
      nearest = min(shown, key=lambda p: abs(math.log2(p[0] / seq)))
      ax.annotate(failure, (seq, nearest[1]), **text)
    else:
      ax.annotate(failure, (seq, 0.02), xycoords=ax.get_xaxis_transform(), **text)


def save(fig, title, subtitle, records, path):
  """Title, settings and the environment of the runs shown, then the PNG."""
  envs = dict.fromkeys(environment_line(r["environment"]) for r in records)
  fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
  # supxlabel rather than fig.text: the constrained layout keeps room for it under the axes.
  fig.supxlabel("; ".join(envs), fontsize=8, color="0.35")
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def grid_settings(records, dtype):
  """'bfloat16, batch × seq = 16384, heads × head dim = 2048', products left out if they vary."""
  parts = [dtype]
  for name, (a, b) in (("batch × seq", ("batch", "seq")), ("heads × head dim",
                                                          ("heads", "head_dim"))):
    products = {r[a] * r[b] for r in records}
    if len(products) == 1:
      parts.append(f"{name} = {products.pop()}")
  return ", ".join(parts)


def zero_based(ax):
  """Linear y axis from 0, with headroom for the failure marks above the highest point."""
  ax.set_ylim(0, ax.get_ylim()[1] * 1.08)


def head_dim_causal_label(head_dim, causal):
  return f"d={head_dim}, {'causal' if causal else 'non-causal'}"


# --- figures -----------------------------------------------------------------------------------

def grid_speedup(records, dtype, out):
  grid = [r for r in records if r["suite"] == "grid" and r["dtype"] == dtype and
          r["mode"] == "fwd+bwd" and r["variant"] == "none"]
  lines = sorted({line_of(r) for r in grid if r["impl"] == "flash_jax"},
                 key=lambda line: (-line.head_dim, line.causal))
  if not lines or not any(r["impl"] == BASELINE for r in grid):
    return None
  by_key, seqs = index(grid), sorted({r["seq"] for r in grid})
  dims = sorted({line.head_dim for line in lines}, reverse=True)
  fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
  for line in lines:
    style = dict(color=HEAD_DIM_COLORS[dims.index(line.head_dim) % len(HEAD_DIM_COLORS)],
                 marker="s" if line.causal else "o")
    draw_line(ax, ratio_points(by_key, line, line, seqs, "ms"),
              head_dim_causal_label(line.head_dim, line.causal), style,
              "--" if line.causal else "-")
  ax.axhline(1, color="0.5", linewidth=0.8)
  format_seq_axis(ax, seqs)
  zero_based(ax)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("speed-up over standard attention (×)")
  ax.legend(fontsize=8)
  return save(fig, "flash_jax speed-up over standard attention (xla), forward+backward",
              grid_settings(grid, dtype), grid, out / f"grid_speedup_{dtype}.png")


def grid_tflops(records, dtype, out):
  grid = [r for r in records if r["suite"] == "grid" and r["dtype"] == dtype and
          r["variant"] == "none"]
  if not grid:
    return None
  modes = [m for m in MODES if any(r["mode"] == m for r in grid)]
  configs = sorted({(r["head_dim"], r["causal"]) for r in grid}, key=lambda c: (-c[0], c[1]))
  impls = [i for i in IMPL_STYLE if any(r["impl"] == i for r in grid)]
  by_key, seqs = index(grid), sorted({r["seq"] for r in grid})
  fig, axes = plt.subplots(len(modes), len(configs), squeeze=False, sharey=True,
                           figsize=(0.6 + 3.2 * len(configs), 1.4 + 2.8 * len(modes)),
                           layout="constrained")
  for row, mode in enumerate(modes):
    for col, (head_dim, causal) in enumerate(configs):
      ax, line = axes[row][col], Line("grid", dtype, head_dim, causal, mode, "none")
      for impl in impls:
        runs = [by_key[line, impl, s] for s in seqs if (line, impl, s) in by_key]
        if runs:
          draw_line(ax, [(r["seq"], r["tflops"] if ok(r) else None, status_text(r))
                         for r in runs], impl, IMPL_STYLE[impl])
      format_seq_axis(ax, seqs)
      ax.set_title(f"{head_dim_causal_label(head_dim, causal)}, {MODE_TITLES[mode]}", fontsize=9)
      if col == 0:
        ax.set_ylabel("TFLOP/s")
      if row == len(modes) - 1:
        ax.set_xlabel("sequence length")
  zero_based(axes[0][0])  # the panels share their y axis
  # One legend, in the first panel, gathered from all since one panel may lack an implementation.
  legend = {}
  for ax in axes.flat:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  axes[0][0].legend(legend.values(), legend.keys(), loc="best", fontsize=8)
  return save(fig, "Attention TFLOP/s: flash_jax, cuDNN and standard attention (xla)",
              grid_settings(grid, dtype), grid, out / f"grid_tflops_{dtype}.png")


VARIANT_LABELS = {"none": "no mask, no dropout", "padding": "key padding", "dropout": "dropout",
                  "padding+dropout": "key padding and dropout"}


def seed_ratio(records, out, metric, name, title, ylabel, log_y):
  """The seed configuration's baseline/flash_jax ratio of metric, one line per variant.

  log_y: a log2 y axis, for memory, whose ratio grows in proportion to the sequence length.
  """
  seed = [r for r in records if r["suite"] == "seed"]
  lines = sorted({line_of(r) for r in seed if r["impl"] == "flash_jax"},
                 key=lambda line: VARIANTS.index(line.variant))
  if not lines or not any(r["impl"] == BASELINE for r in seed):
    return None
  by_key, seqs = index(seed), sorted({r["seq"] for r in seed})
  fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
  for line in lines:
    baseline = baseline_variant(seed, line.variant)
    label = VARIANT_LABELS[line.variant]
    if baseline != line.variant:
      label += f" ({BASELINE} without {line.variant})"
    draw_line(ax, ratio_points(by_key, line, line._replace(variant=baseline), seqs, metric),
              label, VARIANT_STYLE[line.variant])
  format_seq_axis(ax, seqs)
  ax.axhline(1, color="0.5", linewidth=0.8)
  if log_y:
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
  else:
    zero_based(ax)
  ax.set_xlabel("sequence length")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  first = seed[0]
  settings = (f"batch {first['batch']}, {first['heads']} heads, head dim {first['head_dim']}, "
              f"{first['dtype']}, forward+backward")
  return save(fig, title, settings, seed, out / name)


MEMORY_METRICS = (("temp_mib", "compiled temp", "-"), ("peak_mib", "peak", "--"))


def metric_points(by_key, line, impl, seqs, metric):
  """[(seq, value, None) or (seq, None, failure)] of one implementation; runs that lack the
  metric (no peak memory on CPU) are left out."""
  points = []
  for seq in seqs:
    record = by_key.get((line, impl, seq))
    if record is None or (ok(record) and record.get(metric) is None):
      continue
    points.append((seq, record[metric], None) if ok(record) else (seq, None, status_text(record)))
  return points


def memory_reduction(records, out):
  """Memory suite: MiB of flash_jax and xla (left), xla's over flash_jax's (right), for the
  compiled temp memory (solid) and the peak device memory (dashed)."""
  runs = [r for r in records if r["suite"] == "memory"]
  ours = [r for r in runs if r["impl"] == "flash_jax"]
  if not ours or not any(r["impl"] == BASELINE for r in runs):
    return None
  by_key, seqs, line = index(runs), sorted({r["seq"] for r in runs}), line_of(ours[0])
  fig, (absolute, reduction) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
  for metric, name, linestyle in MEMORY_METRICS:
    for impl in ("flash_jax", BASELINE):
      points = metric_points(by_key, line, impl, seqs, metric)
      if points:
        draw_line(absolute, points, f"{impl} {name}", IMPL_STYLE[impl], linestyle)
    points = ratio_points(by_key, line, line, seqs, metric)
    if points:
      draw_line(reduction, points, name, IMPL_STYLE["flash_jax"], linestyle)
  for ax, ylabel in ((absolute, "MiB"), (reduction, "xla memory / flash_jax's")):
    format_seq_axis(ax, seqs)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
  reduction.axhline(1, color="0.5", linewidth=0.8)
  first = runs[0]
  settings = (f"batch {first['batch']}, {first['heads']} heads, head dim {first['head_dim']}, "
              f"{first['dtype']}, forward+backward; peak: one call in a fresh process, inputs "
              "included")
  return save(fig, "Memory of flash_jax and standard attention (xla)", settings, runs,
              out / "memory_reduction.png")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("json", nargs="+", type=pathlib.Path, help="bench_attention.py results")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).resolve().parent / "results" / "figures",
                      help="folder for the PNG files (default benchmarks/results/figures)")
  args = parser.parse_args(argv)
  records = load(args.json)
  args.out.mkdir(parents=True, exist_ok=True)
  written = []
  for dtype in sorted({r["dtype"] for r in records if r["suite"] == "grid"}):
    written += [grid_speedup(records, dtype, args.out), grid_tflops(records, dtype, args.out)]
  written += [
      seed_ratio(records, args.out, "ms", "seed_speedup.png",
                 "flash_jax speed-up over standard attention (xla)",
                 "speed-up over standard attention (×)", log_y=False),
      seed_ratio(records, args.out, "temp_mib", "seed_memory.png",
                 "flash_jax memory reduction over standard attention (xla)",
                 "xla compiled temp memory / flash_jax's", log_y=True),
      memory_reduction(records, args.out),
  ]
  written = [path for path in written if path is not None]
  if not written:
    print("plot.py: no figure has data in these files: they hold no grid points, and no seed "
          "or memory points of both flash_jax and xla", file=sys.stderr)
    return 1
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
