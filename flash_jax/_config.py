"""The static configuration carried by the attention primitives.

Every feature of an attention call that is not an array lives here, so the primitives, their
lowerings and the sharding rules all read one hashable object.
"""

from __future__ import annotations

import dataclasses

# Optional array operands, in the order they follow (query, key, value) when present. After
# normalisation by the API each has a leading batch axis of size `batch` or 1 (broadcast):
#   q_segment_ids int32 [b, sq]     kv_segment_ids int32 [b, sk]
#   q_positions   int32 [b, sq]     kv_positions   int32 [b, sk]   (given together: they replace
#                 the aligned diagonal; causal, window and ALiBi compare kv_pos - q_pos with 0,
#                 e.g. positions counted from each packed sequence's end for varlen)
#   q_lengths     int32 [b]         kv_lengths     int32 [b]
#   mask          bool  [b|1, h|1, sq|1, sk|1]
#   bias          float [b|1, h|1, sq|1, sk|1]  (differentiable)
#   alibi_slopes  float32 [b|1, h]
#   dropout_seed  uint32 [b, 2]     one Philox key per batch row
OPTIONAL_OPERANDS = (
    "q_segment_ids",
    "kv_segment_ids",
    "q_positions",
    "kv_positions",
    "q_lengths",
    "kv_lengths",
    "mask",
    "bias",
    "alibi_slopes",
    "dropout_seed",
)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Static parameters of one attention call.

  Attributes:
    softmax_scale: multiplies q.k before the softmax.
    causal: mask keys after the query's diagonal.
    causal_top_left: alignment of that diagonal when seq_q != seq_k. False: bottom-right
      (query i sees keys j <= i + seq_k - seq_q, FlashAttention-2). True: top-left (j <= i,
      jax.nn.dot_product_attention).
    window_left, window_right: sliding window around the aligned diagonal, -1 = unbounded.
      The diagonal offset is the causal one (seq_k - seq_q for bottom-right, 0 for top-left)
      whether or not `causal` is set.
    softcap: 0 disables; else scores s -> softcap * tanh(s / softcap) before masking.
    dropout_rate: probability of dropping an attention weight, in [0, 1).
    deterministic: the backward accumulates in a fixed order (bitwise reproducible).
    operands: names from OPTIONAL_OPERANDS of the array operands that follow q, k, v.
  """

  softmax_scale: float
  causal: bool = False
  causal_top_left: bool = False
  window_left: int = -1
  window_right: int = -1
  softcap: float = 0.0
  dropout_rate: float = 0.0
  deterministic: bool = False
  operands: tuple[str, ...] = ()

  def __post_init__(self):
    unknown = [name for name in self.operands if name not in OPTIONAL_OPERANDS]
    if unknown:
      raise ValueError(f"AttentionConfig.operands: unknown operand names {unknown}")
    order = [OPTIONAL_OPERANDS.index(name) for name in self.operands]
    if order != sorted(order) or len(set(order)) != len(order):
      raise ValueError(
          f"AttentionConfig.operands must follow the order of OPTIONAL_OPERANDS without repeats, "
          f"got {self.operands}")

  @property
  def has_window(self) -> bool:
    return self.window_left >= 0 or self.window_right >= 0

  def diagonal_offset(self, seq_q: int, seq_k: int) -> int:
    """Column of the diagonal for query row 0: query i is aligned with key i + offset."""
    return 0 if self.causal_top_left else seq_k - seq_q
