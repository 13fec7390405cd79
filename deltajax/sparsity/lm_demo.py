"""Spatial-sparsity demo: a DeltaLM with top-k ReLU MLPs against the dense ReLU MLPs.

Both models train with `deltajax.train` (the same Trainer, optimiser and data) on generated
text: sentences from a small random grammar (pseudo-words, determiner/noun/verb agreement, a
topic per document), byte-level, so no download. Top-k keeps k = 10% of the MLP hidden units
per token (exact top-k, gradient through the kept units). Reported: held-out loss and the MLP
activation density measured on held-out batches.

Run: `python -m deltajax.sparsity.lm_demo` (a few minutes on two CPU cores).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from deltajax.sparsity.topk import TopKConfig

# ----------------------------------------------------------------------------- generated text


def _words(rng: np.random.Generator, n: int, syllables: tuple[int, int]) -> list[str]:
  cons, vows = "bdfgklmnprstvz", "aeiou"
  out: set[str] = set()
  while len(out) < n:
    k = int(rng.integers(syllables[0], syllables[1] + 1))
    out.add("".join(rng.choice(list(cons)) + rng.choice(list(vows)) for _ in range(k)))
  return sorted(out)


def make_corpus(num_docs: int = 400, *, seed: int = 0) -> list[str]:
  """Documents of 8-16 sentences `det [adj] noun verb det [adj] noun [adv] .`.

  Agreement: "a"/"every" take a singular noun, "some"/"many" a plural (noun + "s"), "the"
  either; the verb takes "s" after a singular subject. Each document draws its nouns from a
  topic of 12 of the 60 nouns, and each verb prefers its own 8 objects, so there are facts to
  store in the MLPs as well as syntax.
  """
  rng = np.random.default_rng(seed)
  nouns, verbs = _words(rng, 60, (2, 3)), _words(rng, 30, (2, 2))
  adjs, advs = _words(rng, 20, (2, 3)), [w + "ly" for w in _words(rng, 8, (2, 2))]
  objects = {v: rng.choice(len(nouns), 8, replace=False) for v in verbs}

  def noun_phrase(pool) -> tuple[str, bool]:
    det = str(rng.choice(["the", "a", "every", "some", "many"]))
    plural = det in ("some", "many") or (det == "the" and rng.random() < 0.5)
    words = [det] + ([str(rng.choice(adjs))] if rng.random() < 0.4 else [])
    return " ".join(words + [nouns[int(rng.choice(pool))] + ("s" if plural else "")]), plural

  docs = []
  for _ in range(num_docs):
    topic = rng.choice(len(nouns), 12, replace=False)
    sentences = []
    for _ in range(int(rng.integers(8, 17))):
      subj, plural = noun_phrase(topic)
      verb = str(rng.choice(verbs))
      obj, _ = noun_phrase(objects[verb] if rng.random() < 0.8 else topic)
      adv = (" " + str(rng.choice(advs))) if rng.random() < 0.2 else ""
      sentences.append(f"{subj} {verb}{'' if plural else 's'} {obj}{adv} .")
    docs.append(" ".join(sentences) + "\n")
  return docs


# ----------------------------------------------------------------------------- runs


def mlp_density(trainer, params, batches: int, seq_len: int) -> float:
  """Mean of the sown MLP "density" metrics (non-zero fraction of the hidden activations after
  the sparsity hook), over layers and held-out batches."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @jax.jit
  def run(batch):
    _, state = trainer.model.apply({"params": params}, batch["inputs"],
                                   segment_ids=batch["segment_ids"], mutable=["metrics"])
    flat = flax.traverse_util.flatten_dict(state["metrics"])
    vals = [v for k, vs in flat.items() if k[-1] == "density" for v in vs]
    return jnp.mean(jnp.stack(vals))

  d = trainer.config.data
  return float(np.mean([run(trainer.source.batch("eval", i, d.batch_size, seq_len))
                        for i in range(batches)]))


def train_lm(sparsity, text_path: str, *, steps: int, seed: int, overrides: dict[str, str]):
  """Trains a small DeltaLM with ReLU MLPs and `sparsity` on the text; returns
  (held-out loss, MLP density, seconds)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from deltajax.train import presets  # pylint: disable=g-import-not-at-top
  from deltajax.train.loop import Trainer  # pylint: disable=g-import-not-at-top

  over = {"model.d_model": "64", "model.num_layers": "2", "model.num_heads": "2",
          "model.mixer": "deltanet", "model.mlp_activation": "relu", "model.mlp_hidden": "256",
          "data.text_source": text_path, "data.seq_len": "64", "data.batch_size": "16",
          "optim.lr": "3e-3", "optim.warmup_steps": "50", "run.steps": str(steps),
          "run.eval_batches": "8", "run.seed": str(seed),
          **overrides}
  cfg = presets.build_config("text", over)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mlp_sparsity=sparsity))
  t0 = time.time()
  trainer = Trainer(cfg)
  state = trainer.fresh_state()
  for step in range(steps):
    state, _ = trainer.train_step(state, trainer.train_batch(step))
  ev = trainer.evaluate(state.params)
  loss = ev[f"eval/loss@{cfg.data.seq_len}"]
  density = mlp_density(trainer, state.params, cfg.run.eval_batches, cfg.data.seq_len)
  return loss, density, time.time() - t0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--k", type=float, default=0.1, help="top-k fraction of the MLP hidden width")
  p.add_argument("--method", default="exact", help="top-k method (exact, approx, statistical)")
  p.add_argument("--docs", type=int, default=400, help="generated documents")
  p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                 help="extra deltajax.train overrides for both runs")
  args = p.parse_args(argv)
  overrides = dict(kv.split("=", 1) for kv in args.set)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "corpus.txt")
    with open(path, "w") as f:
      f.write("".join(make_corpus(args.docs, seed=args.seed)))
    size = os.path.getsize(path)
    # The dense model's probe: FATReLU at 0 on ReLU outputs is the identity, it only sows the
    # density of the ReLU activations.
    probe = TopKConfig(method="fatrelu", threshold=0.0)
    dense = train_lm(probe, path, steps=args.steps, seed=args.seed, overrides=overrides)
    sparse = train_lm(TopKConfig(k=args.k, method=args.method), path, steps=args.steps, seed=args.seed,
                      overrides=overrides)
  print(f"generated text: {args.docs} documents, {size} bytes; DeltaLM d_model 64, 2 layers, "
        f"ReLU MLP hidden 256; {args.steps} steps of 16 x 64 bytes")
  for name, (loss, dens, secs) in (("dense ReLU MLP", dense), (f"top-k {args.k:g} ({args.method})", sparse)):
    print(f"{name:<22} held-out loss {loss:.4f} nats/byte  MLP activation density {dens:.4f} "
          f"(sparsity {100 * (1 - dens):.1f}%)  [{secs:.0f}s]")
  print(f"relative loss increase of top-k over dense: {100 * (sparse[0] / dense[0] - 1):+.2f}%")


if __name__ == "__main__":
  main()
