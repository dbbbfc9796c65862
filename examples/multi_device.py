"""Training a tiny causal attention model on several devices with flash_jax, two ways:

- data parallel: `jax.jit` with the batch sharded over a ("data",) mesh; flash_jax's sharding
  rules run each device's slice of the batch through the kernel with no communication.
- sequence parallel: `shard_map` over a ("seq",) mesh with `flash_jax.ring_attention`; each device
  holds a chunk of every sequence and K/V chunks travel around the ring.

Both start from the same parameters and data, and the script checks that their losses and
parameters agree step by step.

    python examples/multi_device.py                      # 8 forced CPU devices
    python examples/multi_device.py --layout zigzag      # load-balanced causal ring
    python examples/multi_device.py --platform gpu       # every visible GPU
"""

from __future__ import annotations

import argparse
import os


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--devices", type=int, default=8,
                      help="number of forced CPU devices (cpu) or GPUs to use (gpu, default all)")
  parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous",
                      help="token layout of the ring (zigzag balances causal work)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  return parser.parse_args()


ARGS = parse_args()
if ARGS.platform == "cpu":
  # Must be set before JAX initialises its backends.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import flash_jax  # noqa: E402

VOCAB, MODEL, HEADS, KV_HEADS, LEARNING_RATE = 64, 64, 4, 2, 0.5


def shard_map(f, mesh, in_specs, out_specs):
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  from jax.experimental.shard_map import shard_map as experimental_shard_map
  return experimental_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def init_params(key, seq):
  keys = jax.random.split(key, 6)
  head_dim = MODEL // HEADS
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[0])
  return {
      "embed": jax.random.normal(keys[0], (VOCAB, MODEL), jnp.float32),
      "position": 0.1 * jax.random.normal(keys[1], (seq, MODEL), jnp.float32),
      "query": normal(keys[2], (MODEL, HEADS * head_dim)),
      "key_value": normal(keys[3], (MODEL, 2 * KV_HEADS * head_dim)),
      "out": normal(keys[4], (HEADS * head_dim, MODEL)),
      "logits": normal(keys[5], (MODEL, VOCAB)),
  }


def embed(params, tokens):
  return params["embed"][tokens] + params["position"][None, :tokens.shape[1]]


def token_losses(params, x, targets, attention):
  """Per-token cross-entropy of one attention block on embedded tokens x [b, s, model]."""
  batch, seq, _ = x.shape
  head_dim = MODEL // HEADS
  q = (x @ params["query"]).reshape(batch, seq, HEADS, head_dim)
  k, v = jnp.split((x @ params["key_value"]).reshape(batch, seq, 2 * KV_HEADS, head_dim), 2,
                   axis=2)
  h = x + attention(q, k, v).reshape(batch, seq, -1) @ params["out"]
  logits = jax.nn.log_softmax(h @ params["logits"])
  return -jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def data_parallel_loss(params, tokens, targets):
  attention = lambda q, k, v: flash_jax.attention(q, k, v, causal=True)
  return token_losses(params, embed(params, tokens), targets, attention).mean()


def sequence_parallel_loss(mesh, layout):
  devices = mesh.shape["seq"]
  attention = lambda q, k, v: flash_jax.ring_attention(q, k, v, axis_name="seq", causal=True,
                                                       layout=layout)
  per_shard = shard_map(lambda params, x, targets: token_losses(params, x, targets, attention),
                        mesh, in_specs=(P(), P(None, "seq"), P(None, "seq")),
                        out_specs=P(None, "seq"))

  def loss(params, tokens, targets):
    x = embed(params, tokens)
    if layout == "zigzag":  # tokens and their targets in the balanced order; the mean ignores it
      x, targets = flash_jax.zigzag_shard(x, devices), flash_jax.zigzag_shard(targets, devices)
    return per_shard(params, x, targets).mean()
  return loss


def train(loss, params, tokens, targets, **jit_kwargs):
  def step(params, tokens, targets):
    value, grads = jax.value_and_grad(loss)(params, tokens, targets)
    return value, jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)

  step = jax.jit(step, **jit_kwargs)

  losses = []
  for _ in range(ARGS.steps):
    value, params = step(params, tokens, targets)
    losses.append(float(value))
  return losses, params


def main():
  devices = jax.devices(ARGS.platform)
  if ARGS.platform == "gpu" and ARGS.devices:
    devices = devices[:ARGS.devices]
  n = len(devices)
  divisor = 2 * n if ARGS.layout == "zigzag" else n
  if ARGS.batch % n or ARGS.seq % divisor:
    raise SystemExit(f"--batch must be a multiple of {n} and --seq of {divisor} "
                     f"({n} devices, layout {ARGS.layout})")
  key_params, key_data = jax.random.split(jax.random.key(0))
  params = init_params(key_params, ARGS.seq)
  # A learnable toy task: the target of token t is the token one position earlier.
  tokens = jax.random.randint(key_data, (ARGS.batch, ARGS.seq), 0, VOCAB)
  targets = jnp.roll(tokens, 1, axis=1)

  data_mesh = Mesh(np.array(devices), ("data",))
  replicated, by_batch = NamedSharding(data_mesh, P()), NamedSharding(data_mesh, P("data"))
  dp_losses, dp_params = train(data_parallel_loss, params, tokens, targets,
                               in_shardings=(replicated, by_batch, by_batch),
                               out_shardings=(replicated, replicated))

  seq_mesh = Mesh(np.array(devices), ("seq",))
  by_seq = NamedSharding(seq_mesh, P(None, "seq"))
  sp_losses, sp_params = train(sequence_parallel_loss(seq_mesh, ARGS.layout), params,
                               jax.device_put(tokens, by_seq), jax.device_put(targets, by_seq))

  print(f"{n} {devices[0].platform} devices, ring layout {ARGS.layout}")
  for i, (a, b) in enumerate(zip(dp_losses, sp_losses)):
    print(f"step {i}: data parallel loss {a:.6f}   sequence parallel loss {b:.6f}")
  tolerance = 1e-4 if ARGS.platform == "cpu" else 2e-2
  loss_gap = max(abs(a - b) for a, b in zip(dp_losses, sp_losses))
  param_gap = max(float(jnp.abs(a - b).max()) for a, b in
                  zip(jax.tree.leaves(dp_params), jax.tree.leaves(sp_params)))
  print(f"max loss difference {loss_gap:.2e}, max parameter difference {param_gap:.2e}")
  if loss_gap > tolerance or param_gap > tolerance:
    raise SystemExit("data parallel and sequence parallel training disagree")
  if dp_losses[-1] >= dp_losses[0]:
    raise SystemExit("the loss did not decrease")
  print("data parallel and sequence parallel training agree")


if __name__ == "__main__":
  main()
