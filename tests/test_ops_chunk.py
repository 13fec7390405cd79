"""The chunkwise form in plain JAX (impl="chunk") through the shared test base."""
from op_test_base import OpTestBase


class TestChunk(OpTestBase):
  impl = "chunk"
