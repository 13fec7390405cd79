"""The token loop (impl="recurrent", the decode path) through the shared test base."""
from op_test_base import OpTestBase


class TestRecurrent(OpTestBase):
  impl = "recurrent"
