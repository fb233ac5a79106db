"""A small QLoRA step with the quantized layers' input gradient in bfloat16 and in float32, in one process.

Two residual MLP blocks of DeepSeek-VL2-Tiny's routed-expert-sized geometry (1280 -> 1792 -> 1280, gate/up/down)
with int4 weights (group 64) and rank-16 LoRA adapters; bfloat16 activations; one step is forward, backward and
AdamW on the adapter. `dsvl2.quant.linear` computes the input gradient in float32 on a CPU without native
bfloat16 (`dsvl2.machine.has_native_bf16`); this script pretends the CPU has it for the bfloat16 rows, so both
run here, alternating, and prints the best of `--repeats` of each.

    python benchmarks/bench_qlora_backward.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from dsvl2 import machine
from dsvl2.adapters.lora import LoraSettings, apply_lora, freeze_all_but_adapter, selection_of
from dsvl2.quant.linear import QuantizedLinear


class QuantizedMLP(nn.Module):
    """x + down(silu(gate(x)) * up(x)) with int4 weights."""

    def __init__(self, hidden: int, inner: int, group: int) -> None:
        super().__init__()
        self.gate_proj = QuantizedLinear.from_weight(torch.randn(inner, hidden) * 0.02, 4, group)
        self.up_proj = QuantizedLinear.from_weight(torch.randn(inner, hidden) * 0.02, 4, group)
        self.down_proj = QuantizedLinear.from_weight(torch.randn(hidden, inner) * 0.02, 4, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[QuantizedMLP(1280, 1792, 64) for _ in range(args.blocks)])
    apply_lora(model, LoraSettings(r=16, alpha=32, target_modules=("gate_proj", "up_proj", "down_proj")))
    optimizer = torch.optim.AdamW([p for _, p in freeze_all_but_adapter(model)], lr=1e-4)
    x = torch.randn(args.tokens, 1280).to(torch.bfloat16)
    print(f"CPU {machine.cpu_model()}, capability {torch.backends.cpu.get_cpu_capability()}, native bfloat16 "
          f"{machine.has_native_bf16()}, torch {torch.__version__}, {args.threads} thread(s), {args.tokens} tokens")
    detected = machine.has_native_bf16
    seconds: dict[str, list[float]] = {"bfloat16": [], "float32": []}
    try:
        for _ in range(args.repeats):
            for name, native in (("bfloat16", True), ("float32", False)):
                machine.has_native_bf16 = lambda flags=None, native=native: native
                started = time.perf_counter()
                with selection_of(model).use("default"):
                    model(x).float().square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                seconds[name].append(time.perf_counter() - started)
    finally:
        machine.has_native_bf16 = detected
    for name, times in seconds.items():
        print(f"input gradient in {name:<9} step {min(times):6.2f} s (best of {len(times)}: "
              f"{', '.join(f'{t:.2f}' for t in times)})")
    print(f"float32 is {min(seconds['bfloat16']) / min(seconds['float32']):.1f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
