"""Low-level pieces shared by the ops and the kernels: the static description of a call, packed
documents, the chunk-size rule and the FLOP count. Imports nothing from deltajax.ops or
deltajax.kernels, so both can depend on it without a cycle."""
