"""The Mosaic GPU kernels (kernels/gpu) through the shared test base, in the Mosaic GPU
interpreter on CPU, plus each kernel against its float64 reference (kernels/gpu/reference.py).
"""
from op_test_base import OpTestBase

from deltajax.kernels import KernelConfig


class TestMosaicGPU(OpTestBase):
  impl = "pallas"
  kernel_config = KernelConfig(backend="gpu", interpret=True)
