"""What this machine is and what it can do: the CPU from /proc/cpuinfo, its float32 peak, and a matmul
yardstick measured in the benchmark's own process."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import timeit
from typing import Any

from tfsweep.cpu import read_cpuinfo


def float32_peak(cpu: dict[str, Any], cores: int) -> tuple[float, str]:
    """The CPU's float32 peak in FLOP/s as cores x clock x FLOP/cycle, and the assumption behind it.

    FLOP/cycle counts two FMA pipes (2 FLOP per lane each): 16 float32 lanes with AVX-512 on Intel
    and on AMD from Zen 5, 8 lanes where 512-bit FMAs are split into 256-bit halves (AMD Zen 4,
    family 25) or only AVX2 exists. The clock is the one /proc/cpuinfo reports; boost can exceed it.
    """
    flags = cpu["flags"]
    if "avx512f" in flags and not (cpu["vendor"] == "AuthenticAMD" and cpu["family"] <= 25):
        lanes, why = 16, "AVX-512, 2 FMA pipes x 16 float32 lanes"
    elif "avx512f" in flags:
        lanes, why = 8, "AMD Zen 4 (family 25): 512-bit FMAs run as 2 x 256-bit, so 2 FMA pipes x 8 lanes"
    elif "fma" in flags:
        lanes, why = 8, "AVX2, 2 FMA pipes x 8 float32 lanes"
    else:
        lanes, why = 2, "no FMA found: 2 pipes x 2 lanes (SSE guess)"
    per_cycle = 2 * lanes * 2
    clock = cpu["mhz"] * 1e6
    return cores * clock * per_cycle, f"{cores} cores x {cpu['mhz']:.0f} MHz x {per_cycle} FLOP/cycle ({why})"


def describe() -> dict[str, Any]:
    """The machine and software a result was measured on, as saved with it."""
    import keras
    import tensorflow as tf

    cpu = read_cpuinfo()
    cores = os.cpu_count() or 1
    peak, assumption = float32_peak(cpu, cores)
    return {"cpu": cpu["model_name"], "vendor": cpu["vendor"], "cpu_family": cpu["family"],
            "cpu_model": cpu["model"], "cores": cores, "mhz": cpu["mhz"],
            "isa": sorted(cpu["flags"] & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "float32_peak_flops": peak, "peak_assumption": assumption,
            "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def matmul_flops(size: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul: what TensorFlow's own best kernel achieves here (median)."""
    import tensorflow as tf

    a = tf.random.stateless_uniform([size, size], seed=[1, 2])
    b = tf.random.stateless_uniform([size, size], seed=[3, 4])
    per_call = max(1, int(2e10 // (2 * size ** 3)))  # ~20 GFLOP a timing: long enough to time well

    @tf.function
    def products(count):
        total = tf.zeros([size, size])
        for _ in tf.range(count):
            total += tf.linalg.matmul(a, b)
        return total

    products(tf.constant(1)).numpy()  # trace
    seconds = timeit.repeat(lambda: products(tf.constant(per_call)).numpy(), number=1, repeat=repeats)
    return 2 * size ** 3 * per_call / statistics.median(seconds)
