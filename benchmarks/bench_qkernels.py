"""Micro-benchmark of the weight-only int8 and int4 matmul kernels (dsvl2.quant.kernels) against the float paths.

For decode-shaped matmuls of DeepSeek-VL2-Tiny and -Small (the dense layer's fused gate and up projection and its
down projection, one routed expert's up and down projections; sizes from ../shared/released_configs) and x of
1, 2, 4, 8, 32 and 256 rows, it times: bfloat16 F.linear, FBGEMM's packed float16 matmul (the bfloat16 model's
decode path on CPUs), and each int8 and int4 kernel (the C++ extension, PyTorch's stock int8pack/int4pack ops,
dequantize-then-F.linear). Each cell is the median of repeated calls, the methods taken in turn within each
repeat so that a change in the machine's load touches them alike. It reports milliseconds and GB/s of weight
bytes read (each method's own bytes: 2 per weight for the 16-bit paths, 1 + scales for int8, 0.5 + scales and
mins for int4), next to the machine's read bandwidth (a sum over a 512 MiB tensor, best of 5, before and after).
Records the CPU model and flags. Prints a table and writes benchmarks/results/qkernels.json.

    python benchmarks/bench_qkernels.py [--models tiny,small] [--rows 1,2,4,8,32,256] [--group-size 64]
                                        [--threads N] [--repeats 9] [--clock wall|thread] [--out FILE]

`--clock thread` times with the calling thread's CPU time (only with --threads 1): on a machine shared with
other work it leaves out the time the benchmark waited for a core. The weights are random; nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dsvl2.quant import kernels

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT.parent / "shared" / "released_configs"
MODEL_FILES = {"tiny": "deepseek-vl2-tiny.config.json", "small": "deepseek-vl2-small.config.json",
               "base": "deepseek-vl2.config.json"}


def shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of the decode-shaped matmuls of a released model."""
    config = json.loads((CONFIGS / MODEL_FILES[model]).read_text())
    language = config.get("language_config", config)
    hidden, dense, expert = language["hidden_size"], language["intermediate_size"], language["moe_intermediate_size"]
    return [(f"{model}.dense_gate_up", 2 * dense, hidden), (f"{model}.dense_down", hidden, dense),
            (f"{model}.expert_up", expert, hidden), (f"{model}.expert_down", hidden, expert)]


def cpu_description() -> dict:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    flags = kernels.cpu_flags()
    simd = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx", "sse4")))
    return {"model": model, "machine": platform.machine(), "simd_flags": simd,
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of one full read (a sum) of a tensor much larger than any cache, best of `repeats`."""
    data = torch.ones(megabytes * 2**20 // 4)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.numel() * 4 / (time.perf_counter() - start))
    return best


def methods(n: int, k: int, group: int) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """name -> (function of bfloat16 x, weight bytes it reads)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s8 = torch.rand(n, generator=g) * 0.01
    q4 = kernels.pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    s4 = torch.rand(n, k // group, generator=g) * 0.01
    m4 = -8 * s4
    int8_bytes, int4_bytes = n * k + 4 * n, n * k // 2 + 8 * n * (k // group)
    packed = torch.ops.quantized.linear_prepack_fp16(w.float(), None)
    out: dict[str, tuple[Callable, int]] = {
        "bf16 F.linear": (lambda x: F.linear(x, w), 2 * n * k),
        "fbgemm fp16": (lambda x: torch.ops.quantized.linear_dynamic_fp16(x.float(), packed), 2 * n * k),
    }
    lib, _ = kernels.extension()
    unlimited = None
    if lib is not None:
        isa = kernels.isa_options(kernels.cpu_flags())[1]
        out["int8 extension"] = (kernels.Int8Extension(lib, isa, q8, s8, unlimited), int8_bytes)
    if k % 32 == 0:
        out["int8 stock"] = (kernels.Int8Stock(q8, s8, 1 << 30, "int8-stock"), int8_bytes)
    out["int8 dequantize"] = (kernels.Int8Dequantize(q8, s8), int8_bytes)
    if lib is not None:
        out["int4 extension"] = (kernels.Int4Extension(lib, isa, q4, s4, m4, group, unlimited), int4_bytes)
    if n % 16 == 0:
        out["int4 stock"] = (kernels.Int4StockCPU(q4, s4, m4, group), n * k // 2 + 4 * n * (k // group))
    out["int4 dequantize"] = (kernels.Int4Dequantize(q4, s4, m4, group), int4_bytes)
    return out


def time_cell(funcs: dict[str, Callable], x: torch.Tensor, repeats: int, clock: Callable[[], float],
              budget_s: float) -> dict[str, float]:
    """Median seconds of each function on x; the functions in turn within each repeat."""
    first = {}
    for name, f in funcs.items():
        f(x)  # warm-up (first-call allocations, the extension's build)
        start = clock()
        f(x)
        first[name] = clock() - start
    # Fewer repeats where one round of every method costs more than the budget.
    rounds = max(3, min(repeats, int(budget_s / max(sum(first.values()), 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(rounds):
        for name, f in funcs.items():
            start = clock()
            f(x)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--rows", default="1,2,4,8,32,256")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per cell before repeats are cut")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "qkernels.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread needs --threads 1 (it counts only the calling thread's CPU time)")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    rows_list = [int(r) for r in args.rows.split(",")]

    bandwidth_before = read_bandwidth()
    report = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "clock": args.clock,
              "group_size": args.group_size, "extension": kernels.extension()[1], "cells": []}
    print(f"# {report['cpu']['model']} ({report['cpu']['torch_capability']}), {report['threads']} threads, "
          f"clock {args.clock}; {report['extension']}; read bandwidth {bandwidth_before / 1e9:.1f} GB/s")
    for model in args.models.split(","):
        for name, n, k in shapes(model):
            funcs = methods(n, k, args.group_size)
            header = f"{'shape':<22} {'rows':>4} " + " ".join(f"{m:>16}" for m in funcs)
            print(f"\n{header}\n{'':<27}" + " ".join(f"{'ms  GB/s':>16}" for _ in funcs))
            for rows in rows_list:
                x = torch.randn(rows, k, dtype=torch.bfloat16)
                medians = time_cell({m: f for m, (f, _) in funcs.items()}, x, args.repeats, clock, args.budget)
                cell = {"shape": name, "n": n, "k": k, "rows": rows, "results": {}}
                line = f"{name:<22} {rows:>4} "
                for method, seconds in medians.items():
                    gbs = funcs[method][1] / seconds / 1e9
                    cell["results"][method] = {"ms": seconds * 1e3, "weight_gb_s": gbs,
                                               "weight_bytes": funcs[method][1]}
                    line += f" {seconds * 1e3:8.3f} {gbs:6.1f}"
                report["cells"].append(cell)
                print(line, flush=True)
    bandwidth_after = read_bandwidth()
    report["read_bandwidth_gb_s"] = {"before": bandwidth_before / 1e9, "after": bandwidth_after / 1e9}
    print(f"\nread bandwidth after: {bandwidth_after / 1e9:.1f} GB/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
