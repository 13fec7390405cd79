"""Sparse attention and the Spark FFN in a hybrid DeltaLM, against dense, on generated data.

Trains the `<task>_hybrid` model (DeltaNet + softmax attention, GELU MLP; presets in
deltajax/train/presets.py) and its sparse variants from scratch with `deltajax.train`'s
Trainer, one run per variant and seed:
  dense           `<task>_hybrid`
  topk<k>         top-k attention, k keys per query (exact)
  topk16_stat     statistical top-k attention, 16 keys per query on average
  spark_attn      Spark attention: half the head dims select 16 keys (statistical top-k)
  spark_ffn       Spark FFN: half the input dims select 8% of the neurons (soft statistical)
then evaluates the dense model with temporal-delta attention (DeltaLLM, training-free) over a
grid of thresholds and local windows, in one full forward (each row is what cached decoding
computes for that token; the tests check cached == full), plus one real prefill + token-by-token
decode for the first grid point that skips at least half the entries.

Tasks: "text" (byte-level, `lm_demo.make_corpus` documents, loss in nats/byte) and "mqar".
Same data and initialisation seed for every variant of one seed, so differences are paired.

Run: `python -m deltajax.sparsity.attention_demo --task text --seeds 0 1 2 --out r.json`
(prints markdown tables; `--summarize a.json b.json` reprints them for merged runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "dense": ("hybrid", {}),
    "topk8": ("topk_attn", {"model.attn_sparsity": "topk:k=8"}),
    "topk16": ("topk_attn", {}),
    "topk32": ("topk_attn", {"model.attn_sparsity": "topk:k=32"}),
    "topk16_stat": ("topk_attn", {"model.attn_sparsity": "topk:k=16,method=statistical"}),
    "spark_attn": ("spark", {"model.mlp_sparsity": "none", "model.mlp_predictor_dim": "None"}),
    "spark_ffn": ("spark", {"model.attn_sparsity": "none", "model.attn_predictor_dim": "None"}),
}
DELTA_THRESHOLDS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
DELTA_WINDOWS = (8, 16)


def build(task: str, variant: str, seed: int, steps: int | None, corpus: str | None):
  """The Config of `variant` for `task` and `seed` (init and data seed)."""
  from deltajax.train import presets  # pylint: disable=g-import-not-at-top
  suffix, over = VARIANTS[variant]
  over = {"run.seed": str(seed), "data.seed": str(seed), **over}
  if steps is not None:
    over["run.steps"] = str(steps)
  if task == "text":
    over["data.text_source"] = corpus
  return presets.build_config(f"{task}_{suffix}", over)


def train(config):
  """(Trainer, trained params, seconds)."""
  from deltajax.train.loop import Trainer  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  trainer = Trainer(config)
  state = trainer.fresh_state()
  for step in range(config.run.steps):
    state, _ = trainer.train_step(state, trainer.train_batch(step))
  return trainer, state.params, time.time() - t0


def evaluate(trainer, params, attn_sparsity=None) -> dict[str, float]:
  """Held-out loss and accuracy (the data's weighted positions) and the mean of every sown
  metric over `run.eval_batches` batches, with the attention sparsity replaced if given."""
  from deltajax.models import DeltaLM  # pylint: disable=g-import-not-at-top
  from deltajax.train.loop import forward_stats  # pylint: disable=g-import-not-at-top
  cfg = trainer.config
  model_cfg = cfg.model if attn_sparsity is None else dataclasses.replace(
      cfg.model, attn_sparsity=attn_sparsity)
  model = DeltaLM(model_cfg)
  step = jax.jit(lambda p, b: forward_stats(model, p, b)[1])
  d, tot = cfg.data, {}
  n = cfg.run.eval_batches
  for i in range(n):
    for k, v in jax.device_get(step(params, trainer.source.batch("eval", i, d.batch_size,
                                                                 d.seq_len))).items():
      tot[k] = tot.get(k, 0.0) + float(v)
  out = {"loss": tot["loss_sum"] / tot["weight"], "accuracy": tot["correct"] / tot["weight"]}
  for k, v in tot.items():
    if k.startswith("metrics/"):
      out[k[len("metrics/"):]] = v / n
  return out


def mean_of(metrics: dict[str, float], suffix: str) -> float | None:
  """Mean of the metrics whose name ends with `suffix` (over layers), None if there are none."""
  vals = [v for k, v in metrics.items() if k.endswith(suffix)]
  return float(np.mean(vals)) if vals else None


def prefill_decode(trainer, params, attn_sparsity, prefill: int) -> dict[str, float]:
  """Delta attention on the first held-out batch as a server would run it: prefill `prefill`
  tokens with the cache, then decode the rest one token at a time (teacher-forced). Returns
  the fraction of attention entries skipped in the prefill and over prefill + decode, and the
  loss; "full_*" are the same from one forward without a cache (they must agree)."""
  import optax  # pylint: disable=g-import-not-at-top
  from deltajax.models import DeltaLM  # pylint: disable=g-import-not-at-top
  cfg = trainer.config
  model = DeltaLM(dataclasses.replace(cfg.model, attn_sparsity=attn_sparsity))
  batch = trainer.source.batch("eval", 0, cfg.data.batch_size, cfg.data.seq_len)
  tokens = jnp.asarray(batch["inputs"])
  B, T = tokens.shape

  def macs(state):  # [skipped, dense] multiply-adds, summed over the attention layers
    flat = jax.tree_util.tree_leaves_with_path(state["metrics"])
    pick = lambda name: sum(v for p, v in flat if name in jax.tree_util.keystr(p))
    return jnp.stack([pick("macs_skipped"), pick("macs_dense")])

  @jax.jit
  def run(params, tokens):
    full, st_full = model.apply(params, tokens, mutable=["metrics"])
    (logits, cache), st = model.apply(params, tokens[:, :prefill],
                                      cache=model.init_cache(B, T), mutable=["metrics"])

    def step(cache, tok):
      (lg, cache), s = model.apply(params, tok[:, None], cache=cache, mutable=["metrics"])
      return cache, (lg[:, 0], macs(s))

    _, (rest, per_token) = jax.lax.scan(step, cache, tokens[:, prefill:].T)
    decoded = jnp.concatenate([logits, jnp.moveaxis(rest, 0, 1)], 1)
    return decoded, full, macs(st), per_token.sum(0), macs(st_full)

  decoded, full, pre, dec, full_macs = run({"params": params}, tokens)
  w = batch["weights"]
  loss = lambda lg: float(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      lg, batch["targets"]) * w) / jnp.sum(w))
  skipped = lambda m: float(2 * m[0] / m[1])  # entries skipped / attended (module doc)
  return {"prefill_sparsity": skipped(pre), "sparsity": skipped(pre + dec),
          "loss": loss(decoded), "full_sparsity": skipped(full_macs), "full_loss": loss(full)}


def _stats(xs) -> str:
  xs = np.asarray([x for x in xs if x is not None], np.float64)
  if not len(xs):
    return "-"
  return f"{xs.mean():.4f}" + (f" ± {xs.std(ddof=1):.4f}" if len(xs) > 1 else "")


def run(args) -> dict:
  """Trains and evaluates every (seed, variant) of `args`; the numbers as a dict."""
  from deltajax.sparsity import lm_demo  # pylint: disable=g-import-not-at-top
  from deltajax.sparsity.delta_attention import DeltaAttentionConfig  # pylint: disable=g-import-not-at-top
  results: dict = {"task": args.task, "args": vars(args), "runs": {}, "delta": {},
                   "decode": {}}

  def save():  # after every run, so an interrupted sweep keeps what it finished
    if args.out:
      with open(args.out, "w") as f:
        json.dump(results, f, indent=1)

  with tempfile.TemporaryDirectory() as tmp:
    corpus = None
    if args.task == "text":
      corpus = os.path.join(tmp, "corpus.txt")
      with open(corpus, "w") as f:
        f.write("".join(lm_demo.make_corpus(args.docs, seed=0)))
    for seed in args.seeds:
      for variant in args.variants:
        trainer, params, secs = train(build(args.task, variant, seed, args.steps, corpus))
        ev = evaluate(trainer, params)
        ev["seconds"] = secs
        results["runs"][f"{variant}/{seed}"] = ev
        save()
        print(f"seed {seed} {variant:<12} loss {ev['loss']:.4f} acc {ev['accuracy']:.4f} "
              f"kept_keys {mean_of(ev, 'kept_keys')} attn density {mean_of(ev, 'mixer/density')} "
              f"ffn density {mean_of(ev, 'mlp/sparsity/density')} [{secs:.0f}s]", flush=True)
        if variant != "dense" or not args.delta:
          continue
        decoded = False
        for window in DELTA_WINDOWS:
          for thr in DELTA_THRESHOLDS:
            cfg = DeltaAttentionConfig(threshold=thr, window=window)
            ev = evaluate(trainer, params, cfg)
            results["delta"][f"{thr}/{window}/{seed}"] = ev
            print(f"seed {seed} delta thr {thr:<6} window {window:<3} loss {ev['loss']:.4f} "
                  f"acc {ev['accuracy']:.4f} sparsity {mean_of(ev, 'sparsity'):.4f}", flush=True)
            if not decoded and thr > 0 and mean_of(ev, "sparsity") >= 0.5:
              dec = prefill_decode(trainer, params, cfg, trainer.config.data.seq_len // 2)
              results["decode"][f"{thr}/{window}/{seed}"] = dec
              print(f"seed {seed} delta thr {thr} window {window} prefill+decode: {dec}",
                    flush=True)
              decoded = True
        save()
  return results


def summarize(results: dict) -> str:
  """Markdown tables: mean ± std over seeds; relative loss paired by seed with dense."""
  runs = results["runs"]
  seeds = sorted({int(k.split("/")[1]) for k in runs})
  variants = [v for v in VARIANTS if any(k.startswith(v + "/") for k in runs)]
  dense = {s: runs[f"dense/{s}"]["loss"] for s in seeds if f"dense/{s}" in runs}
  rel = lambda loss, s: 100 * (loss / dense[s] - 1) if s in dense else None
  lines = [f"{results['task']}, seeds {seeds}", "",
           "| model | seeds | loss | accuracy | rel. loss vs dense (%) | kept keys / query "
           "| attn density | FFN density |", "|---|---|---|---|---|---|---|---|"]
  for v in variants:
    rs = [(s, runs[f"{v}/{s}"]) for s in seeds if f"{v}/{s}" in runs]
    lines.append(
        f"| {v} | {','.join(str(s) for s, _ in rs)} | {_stats([r['loss'] for _, r in rs])} | "
        f"{_stats([r['accuracy'] for _, r in rs])} | "
        f"{_stats([rel(r['loss'], s) for s, r in rs])} | "
        f"{_stats([mean_of(r, 'kept_keys') for _, r in rs])} | "
        f"{_stats([mean_of(r, 'mixer/density') for _, r in rs])} | "
        f"{_stats([mean_of(r, 'mlp/sparsity/density') for _, r in rs])} |")
  if results["delta"]:
    lines += ["", "| delta threshold | window | seeds | loss | accuracy | rel. loss vs dense (%) "
              "| entries skipped |", "|---|---|---|---|---|---|---|"]
    for window in DELTA_WINDOWS:
      for thr in DELTA_THRESHOLDS:
        rs = [(s, results["delta"][f"{thr}/{window}/{s}"]) for s in seeds
              if f"{thr}/{window}/{s}" in results["delta"]]
        lines.append(
            f"| {thr} | {window} | {','.join(str(s) for s, _ in rs)} | "
            f"{_stats([r['loss'] for _, r in rs])} | {_stats([r['accuracy'] for _, r in rs])} | "
            f"{_stats([rel(r['loss'], s) for s, r in rs])} | "
            f"{_stats([mean_of(r, 'sparsity') for _, r in rs])} |")
  for key, d in sorted(results["decode"].items()):
    lines.append(f"\nprefill + decode (threshold/window/seed {key}): " +
                 ", ".join(f"{k} {v:.4f}" for k, v in d.items()))
  return "\n".join(lines)


def merge(paths) -> dict:
  """The union of the JSON results of several runs (of one task)."""
  out = None
  for path in paths:
    with open(path) as f:
      r = json.load(f)
    if out is None:
      out = {k: r[k] for k in ("task", "runs", "delta", "decode")}
    elif r["task"] != out["task"]:
      raise ValueError(f"--summarize: {path} is task {r['task']!r}, not {out['task']!r}")
    else:
      for k in ("runs", "delta", "decode"):
        out[k].update(r[k])
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--task", choices=("text", "mqar"), default="text")
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--steps", type=int, default=None, help="override the presets' 600 steps")
  p.add_argument("--docs", type=int, default=800, help="generated documents (text)")
  p.add_argument("--no-delta", dest="delta", action="store_false",
                 help="skip the delta-attention evaluation of the dense models")
  p.add_argument("--out", default="", help="write all numbers as JSON here")
  p.add_argument("--summarize", nargs="+", metavar="JSON",
                 help="print the tables of earlier --out files (merged) instead of running")
  args = p.parse_args(argv)
  if args.summarize:
    print(summarize(merge(args.summarize)))
    return
  results = run(args)
  print("\n" + summarize(results))


if __name__ == "__main__":
  main()
