"""Maps the top-level `kernels/` and `train/` folders to `deltajax.kernels` and `deltajax.train`.

Metadata lives in pyproject.toml; this file only exists because pyproject cannot prefix the
packages found under a folder.
"""
from setuptools import find_packages, setup

_DIRS = {"deltajax": "deltajax", "deltajax.kernels": "kernels", "deltajax.train": "train"}


def _packages(prefix: str, root: str) -> list[str]:
  return [prefix] + [f"{prefix}.{p}" for p in find_packages(root)]


setup(
    package_dir=_DIRS,
    packages=[p for prefix, root in _DIRS.items() for p in _packages(prefix, root)],
)
