"""What machine a benchmark ran on, recorded beside its numbers (shared by ``cpu_capture.py`` and
``cpu_topk_kernel.py``)."""

from __future__ import annotations

import os
import subprocess


def machine_state() -> dict:
    """``lscpu``'s model name, CPU count and flags, ``os.cpu_count()`` and the load average: the machines differ
    (AVX-512, AMX or not) and may be shared, so every run records them."""
    info = {"loadavg_1_5_15": list(os.getloadavg()), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in out.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("Model name", "Flags", "CPU(s)"):
            info[name.strip()] = value.strip()
    return info
