"""The fused decode kernel's online statistics state, ported line by line from kernels/decode_capture.cu: a state
is ``(max, S, V, C)`` over the keys seen so far (``S`` = sum of exp(x - max), ``V`` = sum of exp(x - max)(x - max),
``C`` = the salient part of ``S``); entropy = ln S - V/S, coverage = C/S. Shared by the CPU tests that check the
algorithm (test_graph_capture_cpu.py) and emulate the kernel (test_cuda_path_cpu.py)."""

from __future__ import annotations

import math

EMPTY = (-math.inf, 0.0, 0.0, 0.0)


def add_key(st, x, salient):  # kernels/decode_capture.cu add_key
    m, s, v, c = st
    if x > m:
        if s > 0:
            d = m - x
            a = math.exp(d)
            v, s, c = a * (v + d * s), s * a, c * a
        m = x
    e = math.exp(x - m)
    return (m, s + e, v + e * (x - m), c + (e if salient else 0.0))


def combine(a, b):  # kernels/decode_capture.cu combine
    if a[1] <= 0:
        return b
    if b[1] <= 0:
        return a
    m = max(a[0], b[0])
    ea, eb = math.exp(a[0] - m), math.exp(b[0] - m)
    return (m, ea * a[1] + eb * b[1], ea * (a[2] + (a[0] - m) * a[1]) + eb * (b[2] + (b[0] - m) * b[1]),
            ea * a[3] + eb * b[3])
