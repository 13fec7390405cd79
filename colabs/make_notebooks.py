"""Writes the four notebooks in colabs/: the single source of truth for their cells.

Edit the cells here, then run `python colabs/make_notebooks.py` from the repository root;
tests/test_colabs.py checks that the stored notebooks equal what this script writes, executes
their code cells (at the small size) and checks that they are stored without outputs.

Every notebook starts with the same two cells: install deltajax only if it is missing (plain
Python, no shell magics, so the notebook also runs as a script), and the size knob
`SMALL = os.environ.get("DELTAJAX_COLAB_SMALL") == "1"` (CI runs the tiny version).
"""
from __future__ import annotations

import json
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

# Where a fresh runtime installs deltajax from: a placeholder until the repository is public;
# DELTAJAX_PIP overrides it at run time (e.g. a local path or a wheel).
PIP_SPEC = "git+https://github.com/deltajax/deltajax.git"

# ----------------------------------------------------------------------------- cell builders


def _source(text: str) -> list[str]:
  """Dedented text as notebook source lines (one list entry per line, newline kept)."""
  lines = textwrap.dedent(text).strip("\n").split("\n")
  return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def md(text: str) -> dict:
  return {"cell_type": "markdown", "metadata": {}, "source": _source(text)}


def code(text: str) -> dict:
  return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
          "source": _source(text)}


def notebook(cells: list[dict]) -> dict:
  return {
      "cells": cells,
      "metadata": {
          "colab": {"provenance": []},
          "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"},
      },
      "nbformat": 4,
      "nbformat_minor": 4,
  }


INSTALL = code(f"""
    # Install deltajax only if it is missing (a fresh Colab runtime); an installed one is used as
    # is. Set DELTAJAX_PIP to install from elsewhere (a local checkout, a wheel, a fork).
    import os
    import subprocess
    import sys

    try:
      import deltajax
    except ImportError:
      subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                             os.environ.get("DELTAJAX_PIP", "{PIP_SPEC}")])
      import deltajax
    """)

SETUP = code("""
    import functools
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    # The size knob: DELTAJAX_COLAB_SMALL=1 runs a tiny version in seconds (what CI does);
    # unset, the real one (a few minutes on a CPU runtime, less on a GPU or TPU).
    SMALL = os.environ.get("DELTAJAX_COLAB_SMALL") == "1"
    ON_CPU = jax.default_backend() == "cpu"
    dev = jax.devices()[0]
    print(f"deltajax {deltajax.__version__}, jax {jax.__version__}, {len(jax.devices())} x "
          f"{dev.platform} ({dev.device_kind}); SMALL={SMALL}")
    """)

REL_RMS = code('''
    def rel_rms(x, ref):
      """Relative RMS error rms(x - ref) / rms(ref), in float32 (deltajax's comparison metric)."""
      x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
      return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref ** 2)))
    ''')

TRAIN = code('''
    import dataclasses

    from deltajax.train import presets
    from deltajax.train.loop import Trainer


    def train(preset, overrides, *, model=None, log_every=100):
      """Builds a deltajax.train preset with `overrides` ({"section.field": "value"}, as on the
      command line) and `model` (LMConfig fields set directly, e.g. a sparsity config object),
      then runs its jitted train step; returns (trainer, params, losses).

      `python -m deltajax.train <preset> --section.field=value` does the same with checkpoints,
      metrics files and plots (deltajax.train.loop.train_and_evaluate).
      """
      cfg = presets.build_config(preset, {"run.tensorboard": "false", "run.plot": "false",
                                          **overrides})
      cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **(model or {})))
      trainer = Trainer(cfg)
      state, losses, t0 = trainer.fresh_state(), [], time.time()
      for step in range(cfg.run.steps):
        state, metrics = trainer.train_step(state, trainer.train_batch(step))
        losses.append(float(metrics["loss"]))
        if (step + 1) % log_every == 0 or step + 1 == cfg.run.steps:
          print(f"  step {step + 1:4d}  loss {losses[-1]:.4f}  accuracy "
                f"{float(metrics['accuracy']):.3f}  ({time.time() - t0:.0f}s)")
      return trainer, state.params, losses
    ''')


# ----------------------------------------------------------------------------- 01 quickstart

QUICKSTART = [
    md("""
        # deltajax quickstart

        deltajax implements the **delta-rule family of linear recurrences** in JAX: DeltaNet,
        Gated DeltaNet, DeltaProduct and Kimi Delta Attention (KDA), with Flax layers, Pallas
        kernels and a training stack. Per head, a matrix state `S` (`[K, V]`) is updated token by
        token,

        | op | update |
        |---|---|
        | `delta_rule` | `S = S + k (beta (v - S^T k))^T` |
        | `gated_delta_rule` | `S = exp(g) S` (one gate per head), then the delta step |
        | `kda` | `S = Diag(exp(g)) S` (one gate per key channel), then the delta step |
        | `delta_product` | `n` delta steps per token (a product of Householder matrices) |

        and read out as `o_t = S_t^T q_t`. Tensors are time-major as in
        flash-linear-attention: `q, k [B, T, H, K]`, `v [B, T, HV, V]`, `beta [B, T, HV]`.

        This notebook shows, in three parts:
        1. the ops on random data: the chunkwise parallel form against the token-by-token
           reference (expect relative RMS errors around 1e-7 in float32, and around 1e-3 with
           bfloat16 inputs, inside the library's 1e-2 tolerance);
        2. a Flax layer (`GatedDeltaNet`): init, apply, and cached one-token decoding that
           reproduces the full forward;
        3. a tiny language model trained on multi-query associative recall (MQAR) with
           `deltajax.train`, then asked for the values of the keys it was shown with `generate`.
        """),
    INSTALL,
    SETUP,
    md("""
        ## 1. The ops against the reference

        Every op takes `impl=`: `"recurrent"` (a `lax.scan` over tokens, the readable reference
        and the decode path), `"chunk"` (the chunkwise WY form in plain JAX: only `T / 64`
        sequential steps, matrix multiplies inside a chunk), `"pallas"` (kernels; see notebook 2)
        or `"auto"`. `deltajax.bench.make_args` builds random inputs in each op's argument order:
        unit-norm keys, `beta` in (0, 1), log-gates `g <= 0`.
        """),
    REL_RMS,
    code("""
        from deltajax import bench, ops

        if SMALL:
          shape, op_names = bench.Shape(B=1, T=48, H=2, K=16, V=16, chunk_size=16), ("delta_rule",)
        else:
          shape, op_names = bench.Shape(B=1, T=256, H=2, K=64, V=64, chunk_size=64), bench.OPS


        def run_op(name, impl, args):
          fn = functools.partial(getattr(ops, name), impl=impl, chunk_size=shape.chunk_size,
                                 output_final_state=True)
          return jax.jit(fn)(*args)


        for name in op_names:
          args = bench.make_args(name, shape, jnp.float32)
          o_ref, state_ref = run_op(name, "recurrent", args)
          o, state = run_op(name, "chunk", args)
          print(f"{name:<17} o {o.shape}, state {state.shape}; chunk vs recurrent relative RMS: "
                f"output {rel_rms(o, o_ref):.1e}, final state {rel_rms(state, state_ref):.1e}")

        # bfloat16 inputs: the state and the accumulations stay in float32, the output is bf16.
        args16 = bench.make_args("delta_rule", shape, jnp.bfloat16)
        o16, _ = run_op("delta_rule", "chunk", args16)
        o32, _ = run_op("delta_rule", "recurrent", [a.astype(jnp.float32) for a in args16])
        print(f"delta_rule, bfloat16 inputs: output {o16.dtype}, relative RMS against the float32 "
              f"reference {rel_rms(o16, o32):.1e}")
        """),
    md("""
        ## 2. A layer

        The mixers in `deltajax.layers` (`DeltaNet`, `GatedDeltaNet`, `GatedDeltaProduct`,
        `KimiDeltaAttention`, `LinearAttention`, `Attention`) are Flax linen modules called as
        `(y, new_cache) = layer.apply(variables, x, segment_ids=None, cache=None)`. Inside:
        q/k/v projections, a short causal convolution, `beta = sigmoid(.)` (or `2 sigmoid(.)`
        with `allow_neg_eigval=True`), the gate, the op, a gated RMSNorm and the output
        projection. With a cache (from `layer.init_cache(batch_size)`) the layer carries its
        recurrent state and convolution window, so decoding one token at a time reproduces the
        full forward (expect a relative RMS around 1e-7).
        """),
    code("""
        from deltajax.layers import GatedDeltaNet
        from deltajax.models import num_params

        D, T = (16, 12) if SMALL else (64, 128)
        layer = GatedDeltaNet(d_model=D, num_heads=2, allow_neg_eigval=True,
                              chunk_size=16 if SMALL else 64)
        x = jax.random.normal(jax.random.PRNGKey(0), (2, T, D))
        variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
        y, _ = jax.jit(layer.apply)(variables, x)
        print(f"GatedDeltaNet: x {x.shape} -> y {y.shape}; {num_params(variables):,} parameters in "
              f"{sorted(variables['params'])}")

        # Prefill all but the last 4 tokens with a cache, then decode them one at a time.
        prefill = T - 4
        step = jax.jit(lambda cache, x: layer.apply(variables, x, cache=cache))
        y_pre, cache = step(layer.init_cache(2), x[:, :prefill])
        ys = [y_pre]
        for t in range(prefill, T):
          y_t, cache = step(cache, x[:, t:t + 1])
          ys.append(y_t)
        print(f"prefill {prefill} + {T - prefill} one-token steps vs the full forward: relative RMS "
              f"{rel_rms(jnp.concatenate(ys, axis=1), y):.1e}")
        """),
    md("""
        ## 3. Train a tiny model on MQAR, then sample from it

        MQAR (multi-query associative recall, from Zoology; section 5 of the DeltaNet paper): a
        row starts with key-value pairs `k1 v1 ... kN vN`, then every key appears once more and
        the model must predict its value. Recall like this is where the delta rule shines over
        plain linear attention, whose additive state blurs the pairs together.

        `deltajax.train` has the task generators, presets and a jitted, sharded training step;
        the `mqar` preset is a 2-layer DeltaNet. We shrink it so it trains in about a minute on a
        CPU. Expect the loss to fall from about `ln(vocab)` towards 0 after a plateau, and the
        held-out accuracy on the queried positions to reach close to 100% (the full run; chance
        is 1 in 16). To see the contrast with linear attention, train again with
        `"model.mixer": "linear_attn"`.
        """),
    TRAIN,
    code("""
        MQAR = {"model.d_model": "64", "model.num_layers": "2", "model.chunk_size": "16",
                "data.seq_len": "32", "data.vocab_size": "32", "data.num_kv_pairs": "4",
                "data.batch_size": "32", "optim.lr": "3e-3", "optim.warmup_steps": "30",
                "run.steps": "400"}
        if SMALL:
          MQAR.update({"model.d_model": "16", "model.num_layers": "1", "data.seq_len": "16",
                       "data.vocab_size": "16", "data.num_kv_pairs": "2", "data.batch_size": "8",
                       "run.steps": "10", "run.eval_batches": "1"})
        trainer, params, losses = train("mqar", MQAR)
        results = trainer.evaluate(params)
        print({k: round(v, 3) for k, v in results.items()})

        plt.figure(figsize=(5, 3))
        plt.plot(losses)
        plt.xlabel("step")
        plt.ylabel("training loss (nats)")
        plt.title(f"MQAR, {trainer.config.model.mixer}")
        plt.tight_layout()
        plt.show()
        """),
    md("""
        `deltajax.models.generate(model, params, prompt, max_new_tokens=...)` prefills the prompt
        with the chunk form and then decodes one token per step inside a compiled `lax.scan`
        (greedy by default; `temperature` and `top_p` for sampling). Here every prompt is the
        key-value pairs of a held-out example followed by one of its keys: the model's next
        token should be that key's value (expect nearly all right after the full run).
        """),
    code("""
        from deltajax.models import generate

        n, rows = trainer.config.data.num_kv_pairs, 8
        examples = trainer.source.batch("eval", 0, rows, trainer.config.data.seq_len)["inputs"]
        pairs = examples[:, :2 * n]                                    # [rows, 2n]
        keys, values = pairs[:, 0::2], pairs[:, 1::2]                  # [rows, n]
        # One prompt per (example, key): the example's pairs, then the key.  [rows * n, 2n + 1]
        prompts = np.concatenate([np.repeat(pairs, n, axis=0), keys.reshape(-1, 1)], axis=1)
        out = generate(trainer.model, params, jnp.asarray(prompts), max_new_tokens=1)
        answers = np.asarray(out[:, -1]).reshape(rows, n)
        print("first example's pairs:", " ".join(f"{k}:{v}" for k, v in zip(keys[0], values[0])))
        for key, value, answer in zip(keys[0], values[0], answers[0]):
          print(f"  query {key:2d} -> model says {answer:2d} (value {value:2d}) "
                f"{'right' if answer == value else 'wrong'}")
        print(f"{np.mean(answers == values):.0%} of {answers.size} queries over {rows} held-out "
              f"examples recalled")
        """),
]

# ----------------------------------------------------------------------------- 02 kernels

KERNELS = [
    md("""
        # Kernels and benchmarks

        Every deltajax op has three implementations behind one function:

        * `impl="recurrent"`: `lax.scan` token by token. Simple and exact, but `T` sequential
          steps of small matrix-vector work: it cannot use matrix units.
        * `impl="chunk"`: the chunkwise WY ("Householder") form in plain JAX. Inside a chunk of
          `C = 64` tokens the product of `C` generalized Householder matrices is built with
          matrix multiplies (`P = (I + A)^-1`, `W = P (beta K)`, `U = P (beta V)`); only the
          `T / C` chunk-to-chunk state updates are sequential. A memory-lean `custom_vjp`
          recomputes instead of storing.
        * `impl="pallas"`: the same algorithm as Pallas kernels (Mosaic TPU on a TPU, Mosaic GPU
          on a Hopper GPU such as an H100), with the state kept on chip through the chunk
          pass. On a CPU runtime they run in interpret mode: correct, but a Python-speed
          emulation, so they are compared numerically here and only timed on a GPU or TPU.

        First the three are compared on one input (outputs and gradients, relative RMS error
        against the recurrent reference; expect around 1e-7 in float32). Then
        `deltajax.bench` times forward+backward against the sequence length, with plain
        softmax attention for contrast: attention's cost grows as `T^2`, the delta rule's as
        `T`, so the lines cross and the gap widens with length.
        """),
    INSTALL,
    SETUP,
    REL_RMS,
    code("""
        from deltajax import bench, ops

        IMPLS = ("recurrent", "chunk", "pallas")
        if SMALL:
          shape, op_names = bench.Shape(B=1, T=32, H=1, K=16, V=16, chunk_size=16), ("delta_rule",)
        else:
          shape, op_names = bench.Shape(B=1, T=128, H=2, K=32, V=32, chunk_size=32), bench.OPS


        def forward_and_grads(name, impl, args):
          \"\"\"The op's output and the gradients of sum(o^2) with respect to every input.\"\"\"
          fn = functools.partial(getattr(ops, name), impl=impl, chunk_size=shape.chunk_size)

          def loss(*a):
            o = fn(*a)[0]
            return jnp.sum(o * o), o

          grad_fn = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)
          (_, o), grads = jax.jit(grad_fn)(*args)
          return o, grads


        agrees = {impl: True for impl in IMPLS}  # within deltajax's float32 tolerance, every op
        for name in op_names:
          args = bench.make_args(name, shape, jnp.float32)
          o_ref, grads_ref = forward_and_grads(name, "recurrent", args)
          for impl in IMPLS[1:]:
            t0 = time.time()
            try:
              o, grads = forward_and_grads(name, impl, args)
            except Exception as e:  # pylint: disable=broad-except
              if ON_CPU:  # interpret mode is what the test suite checks: it must work here
                raise
              # The kernels are verified in interpret mode; say so if this backend rejects them.
              print(f"{name:<17} {impl:<7} failed on {dev.platform}: {type(e).__name__}: {e}")
              agrees[impl] = False
              continue
            o_err = rel_rms(o, o_ref)
            grad_err = max(rel_rms(g, g_ref) for g, g_ref in zip(grads, grads_ref))
            agrees[impl] &= max(o_err, grad_err) < 1e-5
            print(f"{name:<17} {impl:<7} vs recurrent: output {o_err:.1e}, gradients (worst "
                  f"input) {grad_err:.1e}  [{time.time() - t0:.1f}s incl. compile]")
        print("implementations that agree with the reference:", [i for i, ok in agrees.items() if ok])
        """),
    md("""
        ## Time against sequence length

        `deltajax.bench.bench_one(op, impl, shape, dtype, repeats)` compiles the op under
        `jax.jit`, warms up, and reports the median forward and forward+backward time (with
        `block_until_ready`), the compile time, the peak memory of the compiled program and the
        model TFLOP/s. The same benchmark runs from the command line:
        `python -m deltajax.bench --ops gated_delta_rule --T 1024,4096 --plot bench.png`.

        Softmax attention here is the plain `jnp` version (scores, causal mask, softmax,
        weighted sum), timed with the same helper: no flash-attention kernel, so at long
        lengths it is also limited by the `T x T` score matrix in memory.
        """),
    code("""
        OP = "gated_delta_rule"
        # Interpreted Pallas (CPU) is not timed, nor is an implementation that disagreed above.
        impls = [i for i in IMPLS if agrees[i] and not (ON_CPU and i == "pallas")]
        if SMALL:
          Ts, dims = (32, 64), dict(B=1, H=1, K=16, V=16, chunk_size=16)
        elif ON_CPU:
          Ts, dims = (256, 512, 1024, 2048), dict(B=1, H=4, K=64, V=64, chunk_size=64)
        else:  # attention's T x T scores at 8192 still fit a 16 GB T4
          Ts, dims = (512, 1024, 2048, 4096, 8192), dict(B=1, H=4, K=128, V=128, chunk_size=64)
        repeats = 2 if SMALL else 5

        results = []
        for T in Ts:
          for impl in impls:
            results.append(bench.bench_one(OP, impl, bench.Shape(T=T, **dims), jnp.float32, repeats))
        print(bench.format_table(results))
        print()
        print(bench.summarize(results))
        """),
    code('''
        def causal_attention(q, k, v):
          """Softmax attention with a causal mask: q, k, v [B, T, H, K] -> [B, T, H, K]."""
          T = q.shape[1]
          scores = jnp.einsum("bthk,bshk->bhts", q, k) * q.shape[-1] ** -0.5
          scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
          return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v)


        attention_loss = lambda q, k, v: jnp.sum(jnp.square(causal_attention(q, k, v)))
        attention_step = jax.jit(jax.value_and_grad(attention_loss, argnums=(0, 1, 2)))
        attention_ms = {}
        for T in Ts:
          q, k, v = bench.make_args("delta_rule", bench.Shape(T=T, **dims), jnp.float32)[:3]
          attention_ms[T] = bench.median_ms(lambda: attention_step(q, k, v), repeats)
          print(f"softmax attention T={T:<6} forward+backward {attention_ms[T]:9.2f} ms")

        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in impls:
          points = sorted((r.T, r.fwd_bwd_ms) for r in results if r.impl == impl)
          ax.loglog(*zip(*points), "o-", label=f"{OP} ({impl})")
        ax.loglog(Ts, [attention_ms[T] for T in Ts], "s--", color="k", label="softmax attention")
        ax.set_xticks(Ts, [str(T) for T in Ts])
        ax.minorticks_off()
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("forward+backward time (ms)")
        ax.set_title(f"{dev.platform} ({dev.device_kind}), float32, " + ", ".join(
            f"{k}={v}" for k, v in dims.items()), fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        plt.show()
        '''),
    md("""
        What to expect. On a CPU, for forward+backward, the chunk form is already several times
        faster than the token loop and needs about a sixth of its memory (the `peak MiB`
        column: the recurrent backward stores a state per token); softmax attention is fastest
        at a few hundred tokens, but its `T^2` term overtakes the chunk form at around 500 to
        1000 tokens (the slopes of the log-log lines are about 1 and 2). On a GPU or TPU the
        chunk form and the Pallas kernels run on the matrix units, so expect them to pull
        further ahead of the token loop, and attention to fall behind at long lengths.
        """),
]

# ----------------------------------------------------------------------------- 03 sparsity

SPARSITY = [
    md("""
        # Activation sparsity: delta layers and top-k MLPs

        Two ways to make most activations zero, so that hardware that skips zeros does less
        work:

        * **Temporal sparsity** (Delta Activation Layer; Yousefzadeh & Sifalakis 2021): quantise
          an activation with a learned step, and pass on only its *change* since the previous
          frame. Consecutive video frames are similar, so most changes are zero; an L1 penalty
          on the changes (weighted by the next layer's fan-out, so it tracks MACs) makes them
          sparser still. Summing the next layer's response to the deltas over time reproduces
          the dense quantised network exactly.
        * **Spatial sparsity** (top-k; Lazy Neuron, Spark Transformer, TopK SAEs): keep only the
          `k` largest MLP activations of each token, by an exact `lax.top_k`, an approximate
          `lax.approx_max_k` (fast on TPU), or a statistical threshold
          `mean + std * Phi^-1(1 - k/d)` (no sort).

        Part 1 trains a small ConvNet on generated videos of moving shapes
        (`deltajax.sparsity.video`), then fine-tunes it with Delta layers. Expect accuracy to
        stay within a couple of points while the non-zero deltas drop several-fold below the
        dense ReLU's non-zero activations (about 0.5 -> 0.1 with the full settings). Part 2
        compares the top-k methods and trains a small language model with a top-k MLP.
        """),
    INSTALL,
    SETUP,
    md("""
        ## 1. Delta layers on generated video

        Each video: one shape (square, disk, cross or ring) moving one pixel per frame over a
        static textured background, with a little sensor noise; the label is the shape. The
        bottom row shows the temporal differences: only the pixels the shape enters or leaves
        (and the noise) change.
        """),
    code("""
        from deltajax import sparsity
        from deltajax.sparsity import video

        if SMALL:
          n_train, n_test, dense_steps, finetune_steps, batch = 64, 32, 4, 4, 8
        else:
          n_train, n_test, dense_steps, finetune_steps, batch = 4096, 1024, 600, 400, 32
        x_train, y_train = video.make_videos(n_train, seed=0)
        x_test, y_test = video.make_videos(n_test, seed=1)
        print(f"train {x_train.shape}, test {x_test.shape} (videos, frames, height, width, channel)")

        clip = x_train[0, :, :, :, 0]
        frames = clip.shape[0]
        fig, axes = plt.subplots(2, frames, figsize=(1.2 * frames, 2.6))
        for t in range(frames):
          axes[0, t].imshow(clip[t], cmap="gray", vmin=-0.3, vmax=1)
          axes[1, t].imshow(clip[t] - clip[t - 1] if t else np.zeros_like(clip[0]), cmap="bwr",
                            vmin=-1, vmax=1)
          axes[0, t].set_title(f"t={t}", fontsize=8)
        for ax in axes.flat:
          ax.axis("off")
        fig.suptitle(f"a {video.SHAPES[y_train[0]]}: frames (top) and temporal differences (bottom)",
                     fontsize=9)
        plt.show()
        """),
    md("""
        Train the dense network first. Its Delta layers are inert probes
        (`DeltaConfig(quantize=False)`) that only count. Then switch them on: a per-channel
        learned quantisation step (starting at 0.3) and an L1 penalty on the deltas whose
        coefficient rises in stages along a sine curve (ProSparse's schedule), and fine-tune.
        """),
    code("""
        dense_net = video.VideoNet(video.NetConfig())
        dense_params = dense_net.init(jax.random.PRNGKey(0), x_train[:2])["params"]
        t0 = time.time()
        dense_params = video.train(dense_net, dense_params, x_train, y_train, steps=dense_steps,
                                   lr=3e-3, batch=batch, seed=0)
        print(f"dense training: {time.time() - t0:.0f}s")

        step_init, l1 = 0.3, 50.0
        delta_net = video.VideoNet(video.NetConfig(delta=sparsity.DeltaConfig(
            mode="quantized", step="channel", step_init=step_init)))
        start = video.reset_steps(dense_params, step_init)
        n = finetune_steps
        l1_schedule = sparsity.prosparse_l1_schedule([l1 / 4, l1 / 2, l1], [n // 4] * 3,
                                                     warmup_steps=n // 8, rise_fraction=0.5)
        t0 = time.time()
        delta_params = video.train(delta_net, start, x_train, y_train, steps=n, lr=1e-3,
                                   batch=batch, seed=1, coef_schedule=l1_schedule)
        print(f"delta fine-tuning: {time.time() - t0:.0f}s")
        """),
    code("""
        runs = {"dense ReLU": video.evaluate(dense_net, dense_params, x_test, y_test),
                "quantised, not fine-tuned": video.evaluate(delta_net, start, x_test, y_test),
                "delta fine-tuned": video.evaluate(delta_net, delta_params, x_test, y_test)}
        for name, r in runs.items():
          print(f"{name:<26} accuracy {r['accuracy']:6.1%}  activation density "
                f"{r['act_nz'] / r['act_n']:.3f}  delta density {r['delta_nz'] / r['rest_n']:.3f}  "
                f"next-layer MACs on deltas {r['eff_macs'] / r['dense_macs']:.3f} of dense")
        dense, tuned = runs["dense ReLU"], runs["delta fine-tuned"]
        print(f"non-zero dense ReLU activations / non-zero deltas: "
              f"{(dense['act_nz'] / dense['act_n']) / (tuned['delta_nz'] / tuned['rest_n']):.2f}x")
        err = video.delta_inference_error(delta_net, delta_params, x_test[:8])
        print(f"2nd conv on accumulated deltas vs on the values: relative max error {err:.1e}")

        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.2))
        ax0.plot([float(l1_schedule(s)) for s in range(n)])
        ax0.set_xlabel("fine-tuning step")
        ax0.set_ylabel("L1 coefficient")
        ax0.set_title("ProSparse-style schedule", fontsize=9)
        layers = np.arange(len(dense["layers"]))
        bars = {"dense: activations": dense["layers"][:, 0], "dense: deltas": dense["layers"][:, 1],
                "fine-tuned: activations": tuned["layers"][:, 0],
                "fine-tuned: deltas": tuned["layers"][:, 1]}
        for i, (label, values) in enumerate(bars.items()):
          ax1.bar(layers + 0.2 * (i - 1.5), values, width=0.2, label=label)
        ax1.set_xticks(layers, [f"Delta layer {i}" for i in layers], fontsize=8)
        ax1.set_ylabel("density (fraction non-zero)")
        ax1.set_title("per-layer density on held-out videos", fontsize=9)
        ax1.set_ylim(0, 1)
        ax1.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        plt.show()
        """),
    md("""
        ## 2. Top-k activations

        On Gaussian activations with `k = 10%` of `d`: exact and approximate top-k keep exactly
        (or nearly) `k` per token (off TPU, `approx_max_k` falls back to sort-and-slice, so it
        equals exact); the statistical threshold keeps about `k` with some spread per token and
        needs no sort; a fixed threshold (FATReLU at the same `Phi^-1(0.9)`) keeps `k` only on
        average, with the widest spread.
        """),
    code("""
        tokens, d = (64, 128) if SMALL else (2048, 1024)
        h = jax.random.normal(jax.random.PRNGKey(0), (tokens, d))
        configs = {"exact": sparsity.TopKConfig(k=0.1, method="exact"),
                   "approx": sparsity.TopKConfig(k=0.1, method="approx"),
                   "statistical": sparsity.TopKConfig(k=0.1, method="statistical"),
                   "fatrelu": sparsity.TopKConfig(method="fatrelu", threshold=1.2816)}
        plt.figure(figsize=(6, 3))
        for name, cfg in configs.items():
          y = jax.jit(functools.partial(sparsity.topk, config=cfg))(h)
          per_token = np.asarray(jnp.mean(y != 0, axis=-1))
          print(f"{name:<12} density mean {per_token.mean():.4f}, std over tokens {per_token.std():.4f}")
          plt.hist(per_token, bins=np.linspace(0.05, 0.15, 41), alpha=0.6, label=name)
        plt.xlabel("per-token density (fraction kept)")
        plt.ylabel("tokens")
        plt.legend(fontsize=8)
        plt.tight_layout()
        plt.show()
        """),
    md("""
        Now a top-k MLP inside a model: a 2-layer DeltaLM with ReLU MLPs, trained with
        `deltajax.train` on generated text (sentences from a small random grammar,
        `deltajax.sparsity.lm_demo.make_corpus`, byte level, no download). The dense model's MLP
        has a `fatrelu` probe at threshold 0 (the identity on ReLU outputs) so both report
        the same metric; the sparse one keeps the top 10% of its hidden units per token.
        The dense ReLU MLPs end up around 40% non-zero; top-k holds every token at 10% with
        about the same held-out loss (within a few percent either way at this size). The
        histograms show the per-token density of the MLP hidden activations on held-out text:
        a wide spread for ReLU, a spike at 0.1 for top-k.
        """),
    code("""
        import os
        import tempfile

        import flax
        from deltajax.sparsity import lm_demo

        corpus_path = os.path.join(tempfile.mkdtemp(), "corpus.txt")
        with open(corpus_path, "w") as f:
          f.write("".join(lm_demo.make_corpus(40 if SMALL else 400, seed=0)))
        TEXT = {"data.text_source": corpus_path, "model.mixer": "deltanet",
                "model.mlp_activation": "relu", "model.d_model": "64", "model.num_layers": "2",
                "model.num_heads": "2", "model.mlp_hidden": "256", "model.chunk_size": "32",
                "data.seq_len": "64", "data.batch_size": "16", "optim.lr": "3e-3",
                "optim.warmup_steps": "30", "run.steps": "200", "run.eval_batches": "4"}
        if SMALL:
          TEXT.update({"model.d_model": "16", "model.num_layers": "1", "model.mlp_hidden": "64",
                       "model.chunk_size": "16", "data.seq_len": "16", "data.batch_size": "4",
                       "run.steps": "5", "run.eval_batches": "1"})
        """),
    TRAIN,
    code('''
        import optax


        def held_out(trainer, params, batches):
          """Held-out loss (nats per predicted byte) and the per-token density of the MLP hidden
          activations after the sparsity hook (every layer), in one pass over eval batches."""
          is_hook = lambda module, _: isinstance(module, sparsity.TopK)

          @jax.jit
          def run(batch):
            logits, state = trainer.model.apply(
                {"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                capture_intermediates=is_hook, mutable=["intermediates"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            flat = flax.traverse_util.flatten_dict(state["intermediates"])
            density = [jnp.mean(y != 0, -1).ravel() for ys in flat.values() for y in ys]
            return jnp.sum(ce * batch["weights"]), jnp.sum(batch["weights"]), jnp.concatenate(density)

          d = trainer.config.data
          out = [run(trainer.source.batch("eval", i, d.batch_size, d.seq_len)) for i in range(batches)]
          loss_sum, weight, density = zip(*out)
          return float(sum(loss_sum) / sum(weight)), np.concatenate(density)


        hooks = {"dense ReLU MLP": sparsity.TopKConfig(method="fatrelu", threshold=0.0),
                 "top-10% MLP": sparsity.TopKConfig(k=0.1)}
        losses, densities, curves = {}, {}, {}
        for name, hook in hooks.items():
          print(name)
          trainer, params, curves[name] = train("text", TEXT, model={"mlp_sparsity": hook})
          losses[name], densities[name] = held_out(trainer, params, trainer.config.run.eval_batches)
          print(f"  held-out loss {losses[name]:.4f} nats/byte, MLP hidden density "
                f"{densities[name].mean():.3f}")
        dense_loss, sparse_loss = losses.values()
        print(f"top-k loss increase over dense: {sparse_loss / dense_loss - 1:+.1%}")

        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.2))
        for name in hooks:
          ax0.plot(curves[name], label=name)
          ax1.hist(densities[name], bins=np.linspace(0, 1, 51), alpha=0.6, label=name)
        ax0.set_xlabel("step")
        ax0.set_ylabel("training loss (nats/byte)")
        ax1.set_xlabel("per-token density of the MLP hidden activations")
        ax1.set_ylabel("tokens x layers")
        for ax in (ax0, ax1):
          ax.legend(fontsize=8)
        fig.tight_layout()
        plt.show()
        '''),
]

# ----------------------------------------------------------------------------- 04 state tracking

STATE_TRACKING = [
    md("""
        # State tracking: parity and S3, with and without negative eigenvalues

        A delta-rule layer multiplies its state by `I - beta k k^T` at every token. With
        `beta` in `[0, 1]` (the usual `sigmoid`) the eigenvalues of that matrix lie in
        `[0, 1]`: the state can shrink along `k` but never flip sign, and a model built from
        such layers cannot solve **parity** (is the number of ones so far odd?) at arbitrary
        length. With `beta` in `[0, 2]` (`allow_neg_eigval=True`, `2 sigmoid`) the eigenvalue
        along `k` reaches `-1`: the matrix becomes a reflection, and flipping a sign per `1` is
        exactly parity (Grazzi et al., "Unlocking state-tracking in linear RNNs through negative
        eigenvalues").

        The **S3 word problem** asks for the running composition of permutations of 3 objects,
        a non-abelian group. DeltaProduct applies `n` Householder steps per token, so each
        token's transition is a product of `n` reflections, which can represent rotations as
        well as reflections: with negative eigenvalues and `n = 2` it tracks S3.

        We train each model at one length and test on held-out sequences up to 4x longer
        (generated by `deltajax.train`'s task modules; presets `parity`, a 1-layer DeltaNet,
        and `s3`, a 2-layer DeltaProduct with 2 Householder steps per token). What to expect:

        * parity: with negative eigenvalues the per-token accuracy reaches 100% at the
          training length (64) within a few hundred steps, stays at 100% at twice the length
          and around 95% at 4x; with `beta` in `[0, 1]` it stays close to chance (50%) at every
          length. (With the preset's short convolution on, the same needs about 500 steps.)
        * S3 learns much more slowly. On a CPU runtime this notebook trains it for only 400
          steps at length 16: expect roughly 45-50% per-token accuracy with negative
          eigenvalues against roughly 30% without (chance is 1/6), and a similar gap at 4x the
          length. That is the start of learning, not the end: the loss plateau is consistent
          with the model tracking the sign of the running permutation (a parity, which narrows
          6 answers to 3) before the rotations. On a GPU/TPU runtime the `s3` preset runs as
          shipped (1000 steps at length 32); raise `run.steps` to go further.

        The small CI version (`DELTAJAX_COLAB_SMALL=1`) trains for a few steps only, to check
        that everything runs.
        """),
    INSTALL,
    SETUP,
    TRAIN,
    code("""
        # preset -> overrides (strings, as on the command line). On an accelerator the presets
        # run as shipped; on a CPU runtime they are cut to fit a few minutes, with the layers'
        # short convolution (and S3's forget gate) off, which learn much faster in a short run;
        # S3 then trains at length 16 with one layer.
        TASKS = {"parity": {}, "s3": {}}
        if ON_CPU:
          TASKS["parity"] = {"model.use_short_conv": "false", "model.chunk_size": "16",
                             "run.steps": "300", "run.eval_batches": "2"}
          TASKS["s3"] = {"model.num_layers": "1", "model.use_short_conv": "false",
                         "model.use_forget_gate": "false", "model.chunk_size": "16",
                         "data.seq_len": "16", "data.eval_seq_lens": "16,32,64",
                         "optim.lr": "1e-2", "run.steps": "400", "run.eval_batches": "2"}
        if SMALL:
          for preset, length in (("parity", 16), ("s3", 8)):
            TASKS[preset].update({"model.d_model": "16", "model.num_layers": "1",
                                  "data.seq_len": str(length), "data.eval_seq_lens": str(length),
                                  "data.batch_size": "8", "run.steps": "5",
                                  "run.eval_batches": "1"})

        accuracy = {}  # (preset, allow_neg_eigval) -> {length: per-token accuracy}
        for preset, overrides in TASKS.items():
          for neg in (False, True):
            print(f"{preset}, allow_neg_eigval={neg}")
            trainer, params, _ = train(preset, overrides, model={"allow_neg_eigval": neg})
            ev = trainer.evaluate(params)
            accuracy[preset, neg] = {n: ev[f"eval/accuracy@{n}"]
                                     for n in trainer.config.data.eval_lengths}
            print("  held-out accuracy by length:",
                  ", ".join(f"{n}: {a:.3f}" for n, a in accuracy[preset, neg].items()))
        """),
    code("""
        fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.2))
        for ax, preset in zip(axes, TASKS):
          mixer = presets.PRESETS[preset].model["mixer"]
          cfg = presets.build_config(preset, TASKS[preset])
          for neg in (False, True):
            lengths, acc = zip(*accuracy[preset, neg].items())
            ax.plot(lengths, acc, "o-", label=f"beta in [0, {2 if neg else 1}]"
                    + (" (negative eigenvalues)" if neg else ""))
          ax.axvline(cfg.data.seq_len, color="gray", ls=":", label="training length")
          ax.axhline(1 / cfg.model.vocab_size, color="gray", ls="--", label="chance")
          ax.set_xscale("log", base=2)
          ax.set_xticks(lengths, [str(n) for n in lengths])
          ax.minorticks_off()
          ax.set_ylim(0, 1.02)
          ax.set_xlabel("held-out sequence length")
          ax.set_ylabel("per-token accuracy")
          ax.set_title(f"{preset} ({mixer})", fontsize=10)
          ax.legend(fontsize=8)
        fig.tight_layout()
        plt.show()
        """),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_kernels_and_benchmarks.ipynb": KERNELS,
    "03_activation_sparsity.ipynb": SPARSITY,
    "04_state_tracking.ipynb": STATE_TRACKING,
}


def render(cells: list[dict]) -> str:
  """The notebook file's text: JSON with one-space indent, as Jupyter writes it."""
  return json.dumps(notebook(cells), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
  del argv
  for name, cells in NOTEBOOKS.items():
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
      f.write(render(cells))
    print(f"wrote colabs/{name} ({len(cells)} cells)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
