"""Build script: the pure-Python packages come from pyproject.toml.

The optional CUDA extension in kernels/ is added by kernels/build.py when nvcc is
present (see docs/kernels.md); the packages work without it (torch path).
"""
from setuptools import setup

setup()
