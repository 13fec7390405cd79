"""Pallas kernels for the chunkwise delta rule (TPU via Mosaic, GPU via Pallas' GPU backend)."""


def pallas_chunk(q, k, v, beta, g, h0, layout):
  raise NotImplementedError("impl='pallas' is not built yet; use impl='chunk'.")
