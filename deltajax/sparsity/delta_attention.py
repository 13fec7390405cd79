"""Temporal-delta attention: a training-free, inference-only sparsification of softmax attention.

Source. DeltaLLM (Qi, Gao, Ren, Chen, 2025, arXiv:2507.19608) makes attention temporally sparse
at inference, with no fine-tuning, in prefill and in cached decoding: it builds a *delta matrix*
of how the attention of one query differs from that of the previous one, thresholds it, and
uses full attention in a *local window* of recent keys with the delta approximation outside
it. Only the paper's abstract could be read from this project (no network; the method section
was not in the stored copy), so the construction below is this library's, built from those
three ingredients and from the delta-network rule of DeltaRNN (Neil et al. 2017; Gao et al.
2018) that the same group uses: send a change only when it exceeds the threshold relative to
the *last sent* value, and keep that memory so errors do not drift.

Construction, per batch row and head, over query rows t = 0, 1, ... (time order):
  A_t[j]    exact softmax attention weights of query t over keys j (0 where masked).
  M_{t-1}   the memory: the approximated weights of the previous query row (zeros at t = 0).
  sent_t[j] = window_t[j] or |A_t[j] - M_{t-1}[j]| > threshold
              window_t[j]: key j is among the `window` most recent keys of query t
              (t - window < j <= t); every new key enters there, so it is sent exactly first.
  Â_t[j]    = A_t[j] where sent_t[j], else M_{t-1}[j]     (the thresholded delta matrix is
              Δ_t = Â_t - M_{t-1}, non-zero only where sent)
  M_t       = Â_t;     o_t = Â_t V = o_{t-1} + Δ_t V.
The last identity is where the saving is: a kernel that accumulates o_t from o_{t-1} spends
head_dim multiply-adds on each *sent* entry of the value product only; every entry not sent
skips them. (The scores q_t k_j are still computed densely: the softmax needs them all.)
Threshold 0 sends every entry that changed, so Â = A bit for bit and the output equals dense
attention exactly.

Metrics: "sparsity" = entries not sent / attended (causal, unmasked) entries; "macs_skipped" =
head_dim * (entries not sent), the value-product multiply-adds a delta kernel skips, against
"macs_dense" = 2 * head_dim * (attended entries), those of dense attention (scores and value
product), so macs_skipped / macs_dense = sparsity / 2.

Training: the thresholding has no useful gradient and the method is training-free, so
differentiating through it raises a ValueError at trace time.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from deltajax.sparsity import checks


@dataclasses.dataclass(frozen=True)
class DeltaAttentionConfig:
  """threshold: minimum change of an attention weight (a probability) to be sent (>= 0).
  window: the number of most recent keys (the query's own included) attended exactly (>= 1).
  """
  threshold: float = 0.0
  window: int = 16

  def __post_init__(self):
    checks.check_nonneg("threshold", self.threshold)
    checks.check_positive_int("window", self.window)


def local_window(q_pos, k_pos, window: int):
  """bool [B, T, S]: t - window < j <= t, from positions q_pos [B, T] and k_pos [B, S]."""
  diff = q_pos[:, :, None] - k_pos[:, None, :]
  return (diff >= 0) & (diff < window)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def delta_weights(p, memory, exact, valid, threshold: float):
  """The approximated attention weights, row by row in query order.

  p [B, H, T, S] float32 exact weights; memory [B, H, S] the previous row's approximation;
  exact [B, T, S] bool entries sent whatever their change (the local window); valid
  [B, T, S] bool attended entries. Returns (Â [B, H, T, S], memory [B, H, S] after the last
  row, sent [B, H, T, S] bool, valid entries sent only).
  """

  def row(mem, xs):
    p_t, exact_t, valid_t = xs  # [B, H, S], [B, 1, S], [B, 1, S]
    sent = valid_t & (exact_t | (jnp.abs(p_t - mem) > threshold))
    a_t = jnp.where(sent, p_t, jnp.where(valid_t, mem, 0.0))
    return a_t, (a_t, sent)

  rows = lambda a: jnp.moveaxis(a, 2, 0)
  memory, (a, sent) = lax.scan(row, memory, (rows(p), rows(exact[:, None]),
                                              rows(valid[:, None])))
  return jnp.moveaxis(a, 0, 2), memory, jnp.moveaxis(sent, 0, 2)


@delta_weights.defjvp
def _delta_weights_jvp(threshold, primals, tangents):
  del threshold, primals, tangents
  raise ValueError("delta attention (sparsity=DeltaAttentionConfig) is a training-free "
                   "inference mode and cannot be differentiated; train with dense or top-k "
                   "attention and switch to delta attention for evaluation or decoding.")


def attention_metrics(sent, valid, head_dim: int) -> dict[str, jax.Array]:
  """{"sparsity", "macs_skipped", "macs_dense"} float32 scalars (see the module doc).

  sent [B, H, T, S] bool; valid [B, T, S] bool.
  """
  attended = sent.shape[1] * jnp.sum(valid, dtype=jnp.float32)
  skipped = attended - jnp.sum(sent, dtype=jnp.float32)
  return {"sparsity": skipped / jnp.maximum(attended, 1.0),
          "macs_skipped": skipped * head_dim, "macs_dense": 2.0 * head_dim * attended}
