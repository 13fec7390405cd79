"""MLP: SwiGLU (default) or a ReLU-family activation, with an optional sparsity hook, and
Spark Transformer's FFN with a low-cost predictor.

Spark FFN (You et al. 2025, arXiv:2506.06644; its abstract: "reallocates existing FFN
parameters ... to form a low-cost predictor for identifying activated entries", 8% of FFN
neurons active with statistical top-k). With `predictor_dim=r`, the first matrix [D, hidden]
of the plain (non-gated) FFN is split by input rows into a predictor K1 [r, hidden] and a
value part K2 [D - r, hidden]:
    h = act(sparsity(x[:r] K1)) * (x[r:] K2),    y = h W_down.
The sparsity (top-k of the cheap predictor, D/r times fewer multiply-adds than a full row)
chooses the neurons; only their columns of K2 and rows of W_down need computing. The
parameter count equals the plain FFN's, D * hidden + hidden * D. The split by input rows
follows this library's issue 15; the paper's method section could not be read here.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from deltajax.layers.common import Dtype, dense, output_init

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # squared ReLU (Primer)
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
}
GLU_ACTIVATIONS = {"swiglu": jax.nn.silu, "geglu": jax.nn.gelu, "reglu": jax.nn.relu}
MLP_ACTIVATIONS = tuple(GLU_ACTIVATIONS) + tuple(ACTIVATIONS)


class MLP(nn.Module):
  """x [..., D] -> down(sparsity(h)), h = act(gate(x)) * up(x) (GLU) or act(up(x)).

  `sparsity`: optional callable or linen module applied to the hidden activations h
  [..., hidden] before the down projection (deltajax.sparsity supplies top-k / delta modules).
  predictor_dim: Spark FFN (module doc): 1 <= predictor_dim < D input dimensions predict, via
  `sparsity`, which neurons to compute; needs a non-gated activation and a sparsity.
  out_init_scale scales the down projection's init (models: 1 / sqrt(2 * num_layers)).
  """
  hidden: int
  activation: str = "swiglu"
  sparsity: Any = None
  predictor_dim: int | None = None
  out_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.activation not in MLP_ACTIVATIONS:
      raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}; got {self.activation!r}.")
    D = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.predictor_dim is not None:
      r = self._check_predictor(D)
      predicted = dense(self.hidden, ("embed", "mlp"), name="predictor", **kw)(x[..., :r])
      up = dense(self.hidden, ("embed", "mlp"), name="up", **kw)(x[..., r:])
      h = ACTIVATIONS[self.activation](self.sparsity(predicted)) * up
    else:
      up = dense(self.hidden, ("embed", "mlp"), name="up", **kw)(x)
      if self.activation in GLU_ACTIVATIONS:
        gate = dense(self.hidden, ("embed", "mlp"), name="gate", **kw)(x)
        h = GLU_ACTIVATIONS[self.activation](gate) * up
      else:
        h = ACTIVATIONS[self.activation](up)
      if self.sparsity is not None:
        h = self.sparsity(h)
    return dense(D, ("mlp", "embed"), name="down", kernel_init=output_init(self.out_init_scale),
                 **kw)(h)

  def _check_predictor(self, D: int) -> int:
    r = self.predictor_dim
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r < D:
      raise ValueError(f"predictor_dim must be an int in [1, d_model - 1 = {D - 1}] (the rest "
                       f"of the input feeds the value part); got {r!r}.")
    if self.activation in GLU_ACTIVATIONS:
      raise ValueError(f"predictor_dim needs a non-gated activation (one of "
                       f"{tuple(ACTIVATIONS)}): the predictor takes the gate's place; got "
                       f"activation={self.activation!r}.")
    if self.sparsity is None:
      raise ValueError("predictor_dim needs a sparsity (e.g. TopKConfig) on the predictor; "
                       "got sparsity=None.")
    return r
