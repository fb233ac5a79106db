"""Benchmark the engine on a model with DeepSeek-VL2-Tiny's real dimensions and random bfloat16 weights.

Measures time to first token (one 1-tile and one 9-tile image), prefill tokens/s, decode tokens/s
at batch 1, 8 and 32, peak resident memory, KV-cache bytes per token, and decode speed as a
fraction of the memory-bandwidth limit: the bytes of weights a decode step must read (attention,
dense and shared layers, the lm_head, and the routed experts the batch actually selected, counted
with hooks on the gates) plus the KV cache it reads, divided by a measured read bandwidth.
Records the CPU model and flags and the kernel paths the engine chose (dsvl2.engine.kernels); reports
the achieved GFLOP/s of prefill and of the vision tower next to a matmul peak measured on the spot
(one large matmul on each path). `--compare-paths` runs every kernel path in the same process, one
freshly built model each, so the paths can be compared in one run on any machine; `--load-memory`
writes a random checkpoint and measures the peak resident memory of loading and preparing it.
Prints a table and writes benchmarks/results/generate.json.

    python benchmarks/bench_generate.py [--quick] [--threads N] [--batches 1,8,32] [--kernels auto]
    python benchmarks/bench_generate.py --compare-paths --language-layers 3 --vision-layers 6 --quick
    python benchmarks/bench_generate.py --load-memory /tmp/tiny-random

The weights are random, so the text is meaningless; the tokenizer is the conformance fixtures'
small BPE (the engine's speed does not depend on it). Nothing is downloaded.

OpenMP's wait policy is left as the environment sets it, as `dsvl2 generate` runs: threads that
spin briefly between the thousand small parallel regions of a decode step keep batch-1 decoding
about 25% faster than OMP_WAIT_POLICY=PASSIVE (measured on the 2-core CPU machine). On a CPU shared
with other work spinning threads wait for descheduled ones: there set OMP_WAIT_POLICY=PASSIVE or use
`--threads 1`. The policy is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from dsvl2.checkpoint import save_model
from dsvl2.config import load_json, model_config_from_dict, processor_config_from_dict
from dsvl2.engine.generate import Engine, Request
from dsvl2.engine.kernels import (
    FLOAT32,
    NATIVE,
    PACKED,
    KernelPlan,
    choose_kernels,
    override,
    resolve_kernels,
)
from dsvl2.engine.sampling import SamplingParams
from dsvl2.engine.scheduler import Phase
from dsvl2.language.moe import MoE
from dsvl2.machine import cpu_flags, cpu_model, release_free_memory
from dsvl2.model import DeepseekVL2
from dsvl2.processor import Processor
from dsvl2.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DSVL2_SHARED_DIR", REPO.parent / "shared"))
CONFIG = SHARED / "released_configs" / "deepseek-vl2-tiny.config.json"
PROCESSOR_CONFIG = SHARED / "released_configs" / "deepseek-vl2-tiny.processor_config.json"
TOKENIZER_DIR = Path(os.environ.get("DSVL2_CONFORMANCE_DIR", SHARED / "conformance")) / "tokenizer"
TARGETS = {"ttft_1_tile_s": 22.0, "ttft_9_tiles_s": 150.0, "decode_bandwidth_fraction": 0.70}
FLOAT32_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
# The CPU flags that decide the kernel paths, recorded first in the JSON.
KEY_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


# ------------------------------------------------------------------------------------ model


def tiny_config(language_layers: int | None = None, vision_layers: int | None = None) -> dict:
    """The released tiny config.json, with fewer decoder layers and vision blocks when asked (quick runs)."""
    raw = load_json(CONFIG)
    if language_layers:
        raw["language_config"]["num_hidden_layers"] = language_layers
    if vision_layers:
        raw["vision_config"]["layers"] = vision_layers
    return raw


@torch.no_grad()
def random_model(dtype: torch.dtype, seed: int = 0, config: dict | None = None) -> DeepseekVL2:
    """The released tiny geometry (or `config`), built on the meta device and materialised once in `dtype`.

    Matrices are filled from one pool of normal(0, 0.02) values at random offsets: copying is
    as fast as memory, drawing 3.4B random numbers is not. Routers get their own fresh values.
    """
    cfg = model_config_from_dict(config or load_json(CONFIG))
    with torch.device("meta"):
        model = DeepseekVL2(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(2**24, generator=generator) * 0.02).to(dtype)
    for name, param in model.named_parameters():
        if name.endswith(FLOAT32_SUFFIXES):  # routers stay float32, as the checkpoint loader keeps them
            param.data = torch.randn(param.shape, generator=generator) * 0.02
            if name.endswith("e_score_correction_bias"):
                param.zero_()
        elif name.endswith(".bias"):
            param.zero_()
        elif param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            fill_from_pool(param.view(-1), pool, generator)
    return model.eval()


def fill_from_pool(flat: torch.Tensor, pool: torch.Tensor, generator: torch.Generator) -> None:
    done = 0
    while done < flat.numel():
        offset = int(torch.randint(0, pool.numel() // 2, (1,), generator=generator))
        n = min(flat.numel() - done, pool.numel() - offset)
        flat[done:done + n] = pool[offset:offset + n]
        done += n


def tiny_processor(context_length: int) -> Processor:
    config = processor_config_from_dict(load_json(PROCESSOR_CONFIG))
    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR, pad_token=config.pad_token)
    return Processor(config, tokenizer, context_length=context_length)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ------------------------------------------------------------------------------ measurements


class BandwidthProbe:
    """Read bandwidth: the time of one full read (a sum) of a tensor much larger than any cache.

    Other work on a shared machine takes memory bandwidth too, and it changes from minute to
    minute; decode steps are therefore compared with probes taken right after each of them."""

    def __init__(self, megabytes: int = 512) -> None:
        self.data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)

    def measure(self) -> float:
        start = time.perf_counter()
        self.data.sum()
        return self.data.numel() * 4 / (time.perf_counter() - start)

    def best_of(self, repeats: int = 5) -> float:
        return max(self.measure() for _ in range(repeats))


class ExpertCounter:
    """Counts the distinct routed experts each MoE layer runs, per forward call."""

    def __init__(self, model: DeepseekVL2) -> None:
        self.per_call: list[int] = []
        self.handles = [m.gate.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, MoE)]

    def _hook(self, module: Any, inputs: Any, output: tuple) -> None:
        self.per_call.append(int(output[1].unique().numel()))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def weight_bytes(model: DeepseekVL2) -> dict[str, int]:
    """Language-model weight bytes a decode step reads: everything but the embedding table and the
    routed experts once, plus each selected expert. Taken before the engine packs the weights."""
    language = model.language
    moe_layers = [layer.mlp for layer in language.model.layers if isinstance(layer.mlp, MoE)]
    routed = sum(module_bytes(mlp.experts) for mlp in moe_layers)
    return {
        "always_read": module_bytes(language) - module_bytes(language.model.embed_tokens) - routed,
        "one_expert": module_bytes(moe_layers[0].experts[0]) if moe_layers else 0,
        "moe_layers": len(moe_layers),
        "embedding_row": model.cfg.language.hidden_size * language.model.embed_tokens.weight.element_size(),
    }


def decode_step_bytes(sizes: dict[str, int], distinct_experts: float, batch: int, context: float,
                      cache_bytes_per_token: int) -> float:
    """Bytes one decode step must read: the always-read weights, each selected routed expert once,
    the batch's KV cache and embedding rows."""
    return (sizes["always_read"] + sizes["moe_layers"] * distinct_experts * sizes["one_expert"]
            + batch * (context * cache_bytes_per_token + sizes["embedding_row"]))


def measure_decode(model: DeepseekVL2, processor: Processor, sizes: dict[str, int], batch: int, steps: int,
                   probe: BandwidthProbe, engine_kwargs: dict) -> dict[str, float]:
    """Tokens/s of `steps` decode steps of `batch` sequences; sampled at temperature 1 (one seed each)
    so the rows differ and route to different experts, as real requests do."""
    prompt_words = "Write a long story about the sea, the wind and a lighthouse keeper, number"
    engine = Engine(model, processor, max_batch=batch, max_len=64 + steps + 8, **engine_kwargs)
    for i in range(batch):
        params = SamplingParams(max_new_tokens=steps + 4, ignore_eos=True, temperature=1.0, seed=i)
        engine.submit(Request([{"role": "user", "content": f"{prompt_words} {i}."}], [], params))
    while engine.num_waiting or any(s.phase is Phase.PREFILL for s in engine.scheduler.running):
        engine.step()
    engine.step()  # warm-up decode step
    counter = ExpertCounter(model)
    contexts, step_times, bandwidths = [], [], []
    for _ in range(steps):
        contexts.append(sum(s.next_position + 1 for s in engine.scheduler.running) / batch)
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
        bandwidths.append(probe.measure())
    counter.close()
    while engine.has_work():
        for seq in list(engine.scheduler.running):
            engine.cancel(seq.request_id)
        engine.step()
    distinct = float(np.mean(counter.per_call))
    step_bytes = decode_step_bytes(sizes, distinct, batch, float(np.mean(contexts)), engine.cache.bytes_per_token)
    # The median step: a shared machine's occasional stall says nothing about the engine.
    step_s = float(np.median(step_times))
    bandwidth = float(np.median(bandwidths))
    tokens_per_s = batch / step_s
    limit = batch * bandwidth / step_bytes
    return {"batch": batch, "tokens_per_s": tokens_per_s, "step_ms": step_s * 1000,
            "mean_tokens_per_s": batch * steps / sum(step_times),
            "distinct_experts_per_layer": distinct, "bytes_per_step": step_bytes,
            "read_bandwidth_gb_s": bandwidth / 1e9, "bandwidth_limit_tokens_per_s": limit,
            "bandwidth_fraction": tokens_per_s / limit}


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class FlopCounter(TorchFunctionMode):
    """Multiply-add FLOPs of the matrix work run inside it (linear layers, packed or not, convolutions,
    attention), summed per `phase`; element-wise work is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.flops: dict[str, float] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flops = self._flops(func, args, out)
        if flops:
            self.flops[self.phase] = self.flops.get(self.phase, 0.0) + flops
        return out

    @staticmethod
    def _flops(func: Any, args: tuple, out: Any) -> float:
        if func is torch.nn.functional.linear or func is torch.ops.quantized.linear_dynamic_fp16:
            return 2.0 * out.numel() * args[0].shape[-1]
        if func is torch.nn.functional.conv2d:
            weight = args[1]
            return 2.0 * out.numel() * weight[0].numel()
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            return 2.0 * q.numel() * k.shape[-2] + 2.0 * out.numel() * k.shape[-2]
        return 0.0


def measure_ttft(model: DeepseekVL2, processor: Processor, size: int, engine_kwargs: dict) -> dict[str, float]:
    """Submit-to-first-token time of one image request on an idle engine, split into its parts, with the
    achieved GFLOP/s of the vision tower and of prefill."""
    engine = Engine(model, processor, max_batch=1, max_len=2300, **engine_kwargs)
    vision_time = [0.0]
    original = model.encode_tiles
    counter = FlopCounter()

    def timed_vision(tiles: torch.Tensor) -> torch.Tensor:
        counter.phase = "vision"
        start = time.perf_counter()
        try:
            return original(tiles)
        finally:
            vision_time[0] += time.perf_counter() - start
            counter.phase = "prefill"

    model.encode_tiles = timed_vision  # type: ignore[method-assign]
    try:
        request = Request([{"role": "user", "content": "<image>\nDescribe this image."}],
                          [synthetic_image(size, size, seed=size)], SamplingParams(max_new_tokens=2))
        start = time.perf_counter()
        engine.submit(request)
        encoded = time.perf_counter()
        first = None
        counter.phase = "prefill"
        with counter:
            while first is None:
                events = engine.step()
                if any(e.token_id is not None for e in events):
                    first = time.perf_counter()
        while engine.has_work():
            engine.step()
    finally:
        del model.encode_tiles
    sample = processor.encode(request.conversation, request.images)
    prefill_s = first - encoded - vision_time[0]
    tiles = int(sample.pixel_values.shape[0])
    return {"image_px": size, "tiles": tiles, "prompt_tokens": len(sample), "ttft_s": first - start,
            "processor_s": encoded - start, "vision_s": vision_time[0], "prefill_s": prefill_s,
            "prefill_tokens_per_s": len(sample) / prefill_s,
            "vision_gflop_s": counter.flops.get("vision", 0.0) / vision_time[0] / 1e9,
            "prefill_gflop_s": counter.flops.get("prefill", 0.0) / prefill_s / 1e9}


def matmul_peak(path: str, n: int = 1024, repeats: int = 3) -> float:
    """GFLOP/s of one n x n x n matmul on a kernel path (best of `repeats` after a warm-up): native
    bfloat16, float32, or FBGEMM's packed float16 with float32 activations."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    if path == PACKED:
        packed = torch.ops.quantized.linear_prepack_fp16(b, None)
        run = lambda: torch.ops.quantized.linear_dynamic_fp16(a, packed)  # noqa: E731
    elif path == NATIVE:  # F.linear, as the model calls it: PyTorch's bfloat16 `@` may take a slower kernel
        a16, b16 = a.bfloat16(), b.bfloat16()
        run = lambda: torch.nn.functional.linear(a16, b16)  # noqa: E731
    else:
        run = lambda: torch.nn.functional.linear(a, b)  # noqa: E731
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


# -------------------------------------------------------------------------------------- main


def timed_call(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    print(f"[{label}: {time.perf_counter() - start:.1f}s]", flush=True)
    return result


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_record(load_before: tuple) -> dict[str, Any]:
    flags = cpu_flags()
    return {"cpu_model": cpu_model(), "key_flags": {f: f in flags for f in KEY_FLAGS}, "cpu_flags": sorted(flags),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg_before": load_before, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}


# --paths names for the comparison's plans.
COMPARED = {"float32": "float32 vision+prefill, packed decode",
            "native-compute": "native vision+prefill, packed decode", "native": "native everywhere"}


def comparison_plans(only: str | None = None) -> dict[str, KernelPlan]:
    """Every path the automatic choice takes on some CPU, and the all-native path (PyTorch's own kernels), or
    those `only` names (--paths); the one this machine chooses is marked "(auto)"."""
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    without_bf16 = choose_kernels({"avx2"}, cpu, bf16)
    plans = {COMPARED["float32"]: without_bf16,
             COMPARED["native-compute"]: choose_kernels({"avx512_bf16"}, cpu, bf16),
             COMPARED["native"]: override(without_bf16, "native")}
    if only:
        unknown = set(only.split(",")) - set(COMPARED)
        if unknown:
            raise SystemExit(f"--paths: unknown {', '.join(sorted(unknown))} (known: {', '.join(COMPARED)})")
        plans = {COMPARED[key]: plans[COMPARED[key]] for key in only.split(",")}
    auto = resolve_kernels("auto", cpu, bf16)
    named = {f"{name} (auto)" if parts_of(plan) == parts_of(auto) else name: plan for name, plan in plans.items()}
    return named if only or any(name.endswith("(auto)") for name in named) else {"auto": auto, **named}


def parts_of(plan: KernelPlan) -> dict[str, str]:
    return {k: v for k, v in plan.as_dict().items() if k != "reason"}


def run_path(args: argparse.Namespace, plan: KernelPlan, probe: BandwidthProbe, steps: int) -> dict[str, Any]:
    """Build a fresh random model, prepare it for `plan` and measure time to first token and decoding."""
    config = tiny_config(args.language_layers, args.vision_layers)
    model = timed_call("build model", lambda: random_model(torch.bfloat16, config=config))
    sizes = weight_bytes(model)
    parameters = sum(p.numel() for p in model.parameters())  # before packing hides them
    processor = tiny_processor(model.cfg.language.max_position_embeddings)
    start = time.perf_counter()
    engine = Engine(model, processor, max_batch=1, max_len=16, kernels=plan)  # converts the model once
    prepare_s = time.perf_counter() - start
    engine_kwargs = {"kernels": plan}
    with torch.inference_mode():
        ttft = []
        if not args.skip_ttft:
            sides = [384] if args.quick else [384, 1152]
            ttft = [timed_call(f"ttft {s}px", lambda s=s: measure_ttft(model, processor, s, engine_kwargs))
                    for s in sides]
        decode = [timed_call(f"decode batch {b}", lambda b=b: measure_decode(model, processor, sizes, b, steps,
                                                                             probe, engine_kwargs))
                  for b in (int(x) for x in args.batches.split(","))]
    peaks = {"vision": matmul_peak(FLOAT32 if plan.vision == FLOAT32 else NATIVE),
             "prefill": matmul_peak(PACKED if plan.packs_language and plan.prefill == FLOAT32 else plan.prefill)}
    return {"kernels": plan.as_dict(), "parameters": parameters,
            "decode_weight_bytes": sizes, "prepare_seconds": prepare_s, "ttft": ttft, "decode": decode,
            "matmul_peak_gflop_s": peaks, "cache_bytes_per_token": engine.cache.bytes_per_token}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decode steps, no 9-tile run (about 5 min)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--decode-steps", type=int, default=None)
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--kernels", default="auto", help="kernel paths, as dsvl2's --kernels (default: auto)")
    parser.add_argument("--compare-paths", action="store_true",
                        help="run every kernel path in this process (one fresh model each) instead of --kernels")
    parser.add_argument("--paths", default=None, help=f"with --compare-paths: only these ({','.join(COMPARED)})")
    parser.add_argument("--repeats", type=int, default=1, help="run the paths this many times, alternating")
    parser.add_argument("--language-layers", type=int, default=None, help="fewer decoder layers (quick comparisons)")
    parser.add_argument("--vision-layers", type=int, default=None, help="fewer vision blocks (quick comparisons)")
    parser.add_argument("--load-memory", type=Path, default=None, metavar="DIR",
                        help="write a random bfloat16 checkpoint to DIR and measure loading and preparing it")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "generate.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load_memory:
        return load_memory(args)
    steps = args.decode_steps or (8 if args.quick else 24)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    if args.compare_paths:
        plans = comparison_plans(args.paths)
    else:
        plans = {args.kernels: resolve_kernels(args.kernels, cpu, bf16)}

    load_before = os.getloadavg()
    probe = BandwidthProbe()
    bandwidth = probe.best_of()
    results: dict[str, Any] = {
        "machine": machine_record(load_before),
        "model": {"config": str(CONFIG), "language_layers": args.language_layers,
                  "vision_layers": args.vision_layers, "dtype": "bfloat16"},
        "automatic_kernels": resolve_kernels("auto", cpu, bf16).as_dict(),
        "read_bandwidth_gb_s": bandwidth / 1e9,  # best of 5 at the start; each decode row has its own
        "targets": TARGETS,
        "settings": {"quick": args.quick, "decode_steps": steps, "compare_paths": args.compare_paths,
                     "repeats": args.repeats},
        "paths": {},
    }
    for repeat in range(args.repeats):
        for name, plan in plans.items():
            print(f"== {name}, run {repeat + 1}: {plan.describe()}", flush=True)
            run = run_path(args, plan, probe, steps)
            run["verdicts"] = verdicts(run)
            results["paths"].setdefault(name, []).append(run)
            release_free_memory()  # the path's model is gone: hand its memory back before the next is built
            write_results(results, args.output)  # after every run, so a long comparison stopped early keeps them
    print_table(results)
    print(f"wrote {args.output}")
    return 0


def write_results(results: dict[str, Any], output: Path) -> None:
    results.update({"peak_rss_bytes": peak_rss_bytes(), "loadavg_after": os.getloadavg()})
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))


def load_memory(args: argparse.Namespace) -> int:
    """Write a random bfloat16 checkpoint (sharded, as released) unless DIR holds one, then load and prepare
    it in a fresh process with the automatic dtype and --kernels; prints its peak resident memory. The engine
    gets a 64-token KV cache: the cache is sized by --max-len and --max-batch, not by the checkpoint."""
    folder = args.load_memory
    if not (folder / "config.json").is_file():
        config = tiny_config(args.language_layers, args.vision_layers)
        model = timed_call("build model", lambda: random_model(torch.bfloat16, config=config))
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        timed_call("save checkpoint", lambda: save_model(model, folder, config, max_shard_bytes=total // 2 + 1))
        del model
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(TOKENIZER_DIR / name, folder / name)
        shutil.copy(PROCESSOR_CONFIG, folder / "processor_config.json")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    code = ("import json, resource, sys; from dsvl2.engine.generate import Engine; "
            "e = Engine.from_pretrained(sys.argv[1], kernels=sys.argv[2], max_batch=1, max_len=64); "
            "print(json.dumps({'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
            "'dtype': str(e.dtype), 'kernels': e.kernels.as_dict()}))")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(folder), args.kernels], capture_output=True, text=True,
                         check=True)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record.update({"checkpoint_bytes": size, "ratio": record["peak_rss_bytes"] / size,
                   "seconds": time.perf_counter() - start, "folder": str(folder)})
    print(json.dumps(record, indent=1))
    return 0


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    out = {}
    goal = TARGETS["decode_bandwidth_fraction"]
    for t in results["ttft"]:
        key = "ttft_1_tile_s" if t["tiles"] <= 2 else "ttft_9_tiles_s"
        out[key] = t["ttft_s"] <= TARGETS[key]
    for d in results["decode"]:
        if d["batch"] in (1, 32):
            out[f"decode_batch_{d['batch']}_bandwidth"] = d["bandwidth_fraction"] >= goal
    return out


def print_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    flags = ", ".join(f for f, present in machine["key_flags"].items() if present)
    print(f"\n{machine['cpu_model']} ({flags}), {machine['torch_threads']} threads, "
          f"read bandwidth {results['read_bandwidth_gb_s']:.1f} GB/s")
    print(f"automatic kernels: {results['automatic_kernels']}")
    for name, path in ((name, run) for name, runs in results["paths"].items() for run in runs):
        peaks = path["matmul_peak_gflop_s"]
        print(f"\n{name}: {path['parameters'] / 1e9:.2f}B parameters, bfloat16, prepared in "
              f"{path['prepare_seconds']:.1f} s")
        for t in path["ttft"]:
            print(f"  TTFT {t['tiles']:2d} tiles ({t['prompt_tokens']} tokens): {t['ttft_s']:7.1f} s  "
                  f"(processor {t['processor_s']:.2f} s, vision {t['vision_s']:.1f} s = {t['vision_gflop_s']:.0f} "
                  f"GFLOP/s of {peaks['vision']:.0f} peak, prefill {t['prefill_s']:.1f} s = "
                  f"{t['prefill_tokens_per_s']:.0f} tok/s, {t['prefill_gflop_s']:.0f} GFLOP/s of "
                  f"{peaks['prefill']:.0f} peak)")
        for d in path["decode"]:
            print(f"  decode batch {d['batch']:2d}: {d['tokens_per_s']:7.2f} tok/s  ({d['step_ms']:.0f} ms/step, "
                  f"{d['distinct_experts_per_layer']:.1f} experts/layer, {d['bytes_per_step'] / 1e9:.2f} GB/step, "
                  f"{d['read_bandwidth_gb_s']:.1f} GB/s -> limit {d['bandwidth_limit_tokens_per_s']:.1f} tok/s, "
                  f"{100 * d['bandwidth_fraction']:.0f}% of it)")
        print(f"  targets met: {path['verdicts']}; KV cache {path['cache_bytes_per_token']} bytes/token")
    print(f"\npeak RSS {results['peak_rss_bytes'] / 2**30:.2f} GiB; load average {machine['loadavg_before']} -> "
          f"{results['loadavg_after']}")


if __name__ == "__main__":
    raise SystemExit(main())
