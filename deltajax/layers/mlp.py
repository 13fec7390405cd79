"""MLP: SwiGLU (default) or a ReLU-family activation, with an optional sparsity hook."""
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
  out_init_scale scales the down projection's init (models: 1 / sqrt(2 * num_layers)).
  """
  hidden: int
  activation: str = "swiglu"
  sparsity: Any = None
  out_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.activation not in MLP_ACTIVATIONS:
      raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}; got {self.activation!r}.")
    D = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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
