"""Autoregressive generation: a chunked prefill, then a jit-compiled scan of one-token steps."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def sample(logits: jax.Array, rng, *, temperature, top_p, greedy: bool = False) -> jax.Array:
  """logits [B, V] -> tokens [B] int32: argmax when `greedy`, else sampling at `temperature`
  (> 0) from the nucleus of mass `top_p` (1 = the whole distribution). temperature and top_p
  may be traced, so one compiled decode loop serves every sampling setting."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  p = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p: a token stays when the mass before it
  # is below top_p (so the top token always stays).
  keep = (jnp.cumsum(p, axis=-1) - p) < top_p
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  nucleus = jnp.where(logits >= cutoff, logits, -jnp.inf)
  logits = jnp.where(top_p >= 1.0, logits, nucleus)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check(prompt, max_new_tokens, temperature, top_p, rng):
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be an integer array [B, T]; got shape {prompt.shape}, "
                     f"dtype {prompt.dtype}.")
  if prompt.shape[1] < 1:
    raise ValueError(f"prompt must hold at least one token; got shape {prompt.shape}.")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0; got {temperature}.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1]; got {top_p}.")
  if temperature > 0 and rng is None:
    raise ValueError("rng (a jax.random key) is needed when temperature > 0.")


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _generate(model, variables, prompt, rng, temperature, top_p, *, max_new_tokens, greedy):
  B, T0 = prompt.shape
  cache = model.init_cache(B, T0 + max_new_tokens)
  logits, cache = model.apply(variables, prompt, cache=cache)  # prefill (chunk path for long T)
  rngs = jax.random.split(rng, max_new_tokens)
  first = sample(logits[:, -1], rngs[0], temperature=temperature, top_p=top_p, greedy=greedy)

  def step(carry, key):
    tok, cache = carry
    logits, cache = model.apply(variables, tok[:, None], cache=cache)
    nxt = sample(logits[:, -1], key, temperature=temperature, top_p=top_p, greedy=greedy)
    return (nxt, cache), tok

  (last, _), toks = lax.scan(step, (first, cache), rngs[1:])
  new = jnp.concatenate([jnp.moveaxis(toks, 0, 1), last[:, None]], axis=1)
  return jnp.concatenate([prompt, new], axis=1)


def generate(model, params, prompt, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, rng=None) -> jax.Array:
  """Continues `prompt` [B, T0] int32 by max_new_tokens tokens; returns [B, T0 + max_new_tokens].

  params: the variables from `model.init` (or their "params" entry). All rows share one length
  (no padding). Compiled once per (model, shapes, max_new_tokens, greedy or not): temperature
  0 is greedy, otherwise tokens are sampled (top_p < 1: nucleus sampling).
  """
  prompt = jnp.asarray(prompt)
  _check(prompt, max_new_tokens, temperature, top_p, rng)
  variables = params if "params" in params else {"params": params}
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return _generate(model, variables, prompt, rng, jnp.float32(max(temperature, 1e-6)),
                   jnp.float32(top_p), max_new_tokens=max_new_tokens,
                   greedy=temperature == 0.0)
