"""Training: data, the jit-compiled loop, checkpoints and the deltajax-train CLI."""
