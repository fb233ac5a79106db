"""Load-time conversions of weight-only quantization: quantize_int4 / quantize_int8 of a bfloat16 weight and the
kernels' layout conversions (prepare_int4 / prepare_int8 of canonical tensors), in GB/s.

quantize: GB/s of the bfloat16 weight read; prepare: GB/s of the canonical qweight (int4: K/2 bytes a row).
Methods run in turn within one process, `--repeats` times; medians of wall-clock time and of the process's CPU
time (all its threads) are printed: on a shared machine the CPU time says what an idle core would take.

    python benchmarks/bench_quant_prepare.py [--rows 2048 --cols 8192] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dsvl2.quant import kernels
from dsvl2.quant.scheme import quantize_int4, quantize_int8


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of the process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, k, g = args.rows, args.cols, args.group
    weight = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    q4, s4, m4 = quantize_int4(weight, g)
    q8, s8 = quantize_int8(weight)
    lib, line = kernels.extension()
    print(f"{n} x {k} bfloat16 weight ({weight.numel() * 2 / 1e9:.3f} GB), group {g}, {args.threads} threads; {line}")
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "quantize_int4 (bf16 GB/s)": (lambda: quantize_int4(weight, g), weight.numel() * 2),
        "quantize_int8 (bf16 GB/s)": (lambda: quantize_int8(weight), weight.numel() * 2),
        "prepare_int4 (qweight GB/s)": (lambda: kernels.prepare_int4(q4, s4, m4, g, "cpu"), q4.numel()),
        "prepare_int8 (qweight GB/s)": (lambda: kernels.prepare_int8(q8, s8, "cpu"), q8.numel()),
        "to_int4_kernel_layout, torch (qweight GB/s)": (lambda: kernels.to_int4_kernel_layout(q4, None), q4.numel()),
        "to_int8_kernel_layout, torch (qweight GB/s)": (lambda: kernels.to_int8_kernel_layout(q8, None), q8.numel()),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (fn, _) in cases.items():
            times[name].append(timed(fn))
    print(f"{'':45s} {'wall ms':>9s} {'GB/s':>6s} {'CPU ms':>9s} {'GB/s':>6s}")
    for name, (_, nbytes) in cases.items():
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        print(f"{name:45s} {wall * 1e3:9.1f} {nbytes / wall / 1e9:6.2f} {cpu * 1e3:9.1f} {nbytes / cpu / 1e9:6.2f}")
    with open("/proc/loadavg") as f:
        print("load average:", f.read().strip())


if __name__ == "__main__":
    main()
