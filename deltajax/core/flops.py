"""The FLOP count of the chunkwise algorithm and the accelerators' peak rates, in one place.

The bench's TFLOP/s column, the training loop's MFU and the models' FLOPs per token all use
these, so the numbers they print compare with each other.
"""
from __future__ import annotations

# Dense bfloat16 matrix peak, FLOP/s per chip, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12, "NVIDIA GB200": 2500e12,
}


def peak_flops(device) -> float | None:
  """Peak bfloat16 FLOP/s of one accelerator, or None (CPU, or a kind not in the table)."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  matches = [k for k in PEAK_BF16_FLOPS if kind.startswith(k)]
  return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def chunk_flops_per_step(chunk_size: int, K: int, V: int) -> float:
  """Forward FLOPs (2 per multiply-add) of the chunkwise form per value head and step.

  Per step of a chunk of C: its rows of K K^T and Q K^T (C K each), of the triangular solve
  applied to K and V (C (K + V)), of Attn V_new (C V), and W S, Q S and the state update
  (K V each). The backward costs about twice this.
  """
  C = chunk_size
  return 2.0 * (3 * C * K + 2 * C * V + 3 * K * V)


def op_flops(*, B: int, T: int, HV: int, K: int, V: int, n: int = 1,
             chunk_size: int = 64) -> float:
  """Forward FLOPs of one op call: every value head, token and Householder step."""
  return B * T * n * HV * chunk_flops_per_step(chunk_size, K, V)
