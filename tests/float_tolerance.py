"""Tolerances for comparing floating-point results, derived from the dtype and the computation.

Two computations of the same quantity in one dtype (chunked vs whole, another BLAS blocking, another
thread count) differ by rounding. A dot product of length ``k`` accumulates ~``sqrt(k)`` units of
roundoff (random-walk bound; ``k`` is the worst case), and each dependent stage (a transformer layer, a
softmax) passes its error on. So for values of magnitude <= 1 (probabilities, normalised scores)::

    atol = ulps * eps(dtype) * sqrt(k) * stages

with ``ulps`` a few units of slack. The bound is machine-independent: it follows from the arithmetic, not
from what one BLAS happened to produce.
"""

from __future__ import annotations

import math

import numpy as np


def float_atol(dtype, k: int, *, stages: int = 1, ulps: float = 4.0) -> float:
    """Absolute tolerance for magnitude-<=1 results of ``stages`` dependent steps, each a length-``k`` reduction.

    Example:
        >>> round(float_atol(np.float32, 256, stages=3) / np.finfo(np.float32).eps)
        192
    """
    return float(ulps * np.finfo(dtype).eps * math.sqrt(max(1, k)) * max(1, stages))


def mean_rtol(dtype, n: int, *, ulps: float = 4.0) -> float:
    """Relative tolerance of a mean over ``n`` values in ``dtype`` against another summation order."""
    return float(ulps * np.finfo(dtype).eps * math.sqrt(max(1, n)))
