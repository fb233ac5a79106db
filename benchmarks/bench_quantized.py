"""Benchmark weight-only int8/int4 quantization on random checkpoints with the released models' real geometry.

For each chosen model (tiny, small, base = DeepSeek-VL2) it writes a random bfloat16 checkpoint, sharded
like a released one, to a scratch folder (free disk checked first), then loads it once per scheme in a
fresh process (so the peak resident memory is that configuration's alone) and measures: load time, peak
resident memory (of the load and of the whole run, with the resident-memory trace of the load), time to
first token for a 1-tile image, decode tokens/s at batch 1 and 8, and batch-1 decode as a fraction of its
own bandwidth limit (the bytes of the quantized weights and scales one decode step reads, counted from the
loaded model's tensors and the experts the gates selected, over a read bandwidth measured right after each
step). Every load also answers one greedy text request. On tiny the bfloat16 path runs in the same run, so
the quantized decode speed is given as a ratio to it. Prints a table, writes JSON, deletes the checkpoints
(unless --keep).

    python benchmarks/bench_quantized.py --models tiny --schemes none,int8,int4
    python benchmarks/bench_quantized.py --models small,base --schemes int4 --scratch /work/scratch
    python benchmarks/bench_quantized.py --write-only --models small --scratch /work/scratch --keep
    python benchmarks/bench_quantized.py --models tiny --language-layers 4 --compare-decode \
        --schemes none,int8,int4,int4+lm_head --rounds 3

`--compare-decode` loads every scheme into one process and measures batch-1 decode in alternating rounds, so
the ratios to bfloat16 hold on a machine whose load changes by the minute. `--language-layers N` writes a
shallower model of the same widths: its peak memory against the engine's estimate for the same config tells
how far the estimate (and so the full model's peak) is off, when the full model takes too long to load.
A scheme "int4+lm_head" also quantizes the lm_head (int8), as `--quantize-also lm_head` does.

Timing pieces (TTFT, decode, bandwidth probe, machine record) come from bench_generate.py. Nothing is
downloaded; the tokenizer is the conformance fixtures' small BPE, so the generated text is meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsvl2.config import load_json, model_config_from_dict
from dsvl2.model import DeepseekVL2

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DSVL2_SHARED_DIR", REPO.parent / "shared"))
CONFIG_DIRS = (REPO / "dsvl2" / "assets" / "released_configs", SHARED / "released_configs")
CONFIG_NAMES = {"tiny": "deepseek-vl2-tiny", "small": "deepseek-vl2-small", "base": "deepseek-vl2"}
TOKENIZER_DIR = Path(os.environ.get("DSVL2_CONFORMANCE_DIR", SHARED / "conformance")) / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The released index files are not on this machine; shards of at most 8.6 GB are what the Hugging Face
# repositories list (Small in 4 files, DeepSeek-VL2 in 7), and a tensor-by-tensor loader does not care.
SHARD_BYTES = 8_600_000_000
# Space left free after the checkpoint is written: other work shares the disk.
DISK_MARGIN_BYTES = 2 * 2**30
# Issue 42's targets (bytes of peak resident memory; decode ratios to bfloat16 on tiny; bandwidth fraction).
PEAK_TARGETS = {("small", "int4"): 11e9, ("small", "int8"): 20e9, ("base", "int4"): 19e9}
SPEEDUP_TARGETS = {"int8": 1.6, "int4": 2.2}
BANDWIDTH_TARGET = 0.60
POOL_VALUES = 2**25  # 64 MiB of bfloat16 normal(0, 0.02) values: slices of it fill every matrix


class DiskSpaceError(RuntimeError):
    """The scratch folder's disk has too little free space for the checkpoint."""


class MemoryCheckError(RuntimeError):
    """The machine has too little available memory for the load asked for."""


# ------------------------------------------------------------------------------ checkpoints


def config_path(model: str) -> Path:
    """The released config.json of `model` (tiny, small, base): the package's copy if it has one, else shared/."""
    for folder in CONFIG_DIRS:
        path = folder / f"{CONFIG_NAMES[model]}.config.json"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {CONFIG_NAMES[model]}.config.json in {', '.join(map(str, CONFIG_DIRS))}")


def processor_config_path() -> Path:
    """Tiny's processor_config.json: the only released one here; the three models share its values."""
    for folder in CONFIG_DIRS:
        path = folder / "deepseek-vl2-tiny.processor_config.json"
        if path.is_file():
            return path
    raise FileNotFoundError("no deepseek-vl2-tiny.processor_config.json")


def tensor_layout(config: dict) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor a checkpoint of `config` holds, in the model's parameter order."""
    cfg = model_config_from_dict(config)
    with torch.device("meta"):
        model = DeepseekVL2(cfg)
    tied = {"language.lm_head.weight"} if cfg.language.tie_word_embeddings else set()
    return [(name, list(p.shape)) for name, p in model.named_parameters() if name not in tied]


def plan_shards(layout: list[tuple[str, list[int]]], shard_bytes: int) -> list[list[tuple[str, list[int]]]]:
    """Tensors split into consecutive shards of at most `shard_bytes` bfloat16 bytes (one tensor may exceed it)."""
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_bytes(config: dict) -> int:
    return sum(2 * _numel(shape) for _, shape in tensor_layout(config))


def check_free_disk(folder: Path, needed: int, margin: int | None = None) -> int:
    """Free bytes on `folder`'s disk; DiskSpaceError when fewer than `needed` + `margin` (default
    DISK_MARGIN_BYTES)."""
    margin = DISK_MARGIN_BYTES if margin is None else margin
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + margin:
        raise DiskSpaceError(
            f"{folder}: the checkpoint needs {needed / 1e9:.1f} GB and {margin / 1e9:.1f} GB are kept free, but the "
            f"disk has {free / 1e9:.1f} GB free; delete the other scratch checkpoints or pick another --scratch")
    return free


def _fill_value(name: str) -> float | None:
    """The constant a tensor is filled with (norm scales 1, biases 0), or None for random values."""
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return 0.0
    if "norm" in name and name.endswith(".weight") and not name.endswith("proj.weight"):
        return 1.0
    return None


def _tensor_bytes(name: str, shape: list[int], pool: memoryview, generator: torch.Generator,
                  chunk: int) -> Iterator[memoryview]:
    """The bfloat16 bytes of one tensor, in pieces: slices of the random pool at random offsets, or a constant."""
    n = _numel(shape)
    constant = _fill_value(name)
    if constant is not None:
        yield memoryview(torch.full((n,), constant, dtype=torch.bfloat16).view(torch.uint8).numpy())
        return
    values = len(pool) // 2
    done = 0
    while done < n:
        take = min(n - done, chunk)
        offset = int(torch.randint(0, values - take + 1, (1,), generator=generator))
        yield pool[2 * offset:2 * (offset + take)]
        done += take


def write_shard(path: Path, tensors: list[tuple[str, list[int]]], pool: memoryview, generator: torch.Generator,
                chunk: int = 2**22) -> int:
    """One safetensors file of bfloat16 tensors, written tensor by tensor; returns its size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            for piece in _tensor_bytes(name, shape, pool, generator, chunk):
                f.write(piece)
    return 8 + len(raw) + offset


def random_pool(values: int = POOL_VALUES, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(values, generator=generator) * 0.02).bfloat16()


def write_random_checkpoint(config: dict, folder: Path, shard_bytes: int = SHARD_BYTES, seed: int = 0,
                            pool_values: int = POOL_VALUES) -> dict[str, Any]:
    """A complete checkpoint folder (config, sharded bfloat16 weights with an index, processor and tokenizer
    files) for `config` with random weights, written one tensor at a time: memory stays at the random pool."""
    layout = tensor_layout(config)
    total = sum(2 * _numel(shape) for _, shape in layout)
    folder.mkdir(parents=True, exist_ok=True)
    check_free_disk(folder, total)
    pool_tensor = random_pool(pool_values, seed)
    pool = memoryview(pool_tensor.view(torch.uint8).numpy())
    generator = torch.Generator().manual_seed(seed + 1)
    shards = plan_shards(layout, shard_bytes)
    start = time.perf_counter()
    weight_map: dict[str, str] = {}
    written = 0
    for i, tensors in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        written += write_shard(folder / fname, tensors, pool, generator)
        weight_map.update({name: fname for name, _ in tensors})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    seconds = time.perf_counter() - start
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(processor_config_path(), folder / "processor_config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    return {"folder": str(folder), "bytes": written, "tensor_bytes": total, "shards": len(shards),
            "tensors": len(layout), "seconds": seconds, "write_gb_s": written / seconds / 1e9}


# ------------------------------------------------------------------------------- measuring


def bench_generate() -> Any:
    """benchmarks/bench_generate.py as a module: its TTFT, decode and bandwidth measurements are reused."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_generate as module
    finally:
        sys.path.pop(0)
    return module


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_resident_bytes() -> int:
    """VmHWM: this process's peak resident memory so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryTrace:
    """Samples this process's resident memory every `interval` seconds in a thread, with a label the code
    being traced sets (which step of the load is running when memory peaks)."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.label = "start"
        self.samples: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.samples.append((round(time.perf_counter() - self._start, 2), resident_bytes(), self.label))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def peak(self) -> tuple[float, int, str]:
        return max(self.samples, key=lambda s: s[1])

    def coarse(self, points: int = 40) -> list[tuple[float, int, str]]:
        step = max(1, len(self.samples) // points)
        return self.samples[::step] + [self.peak()]


def quantize_kwargs(scheme: str, group_size: int | None, also: str = "") -> dict[str, Any]:
    """Engine.from_pretrained's quantization arguments (the group size is int4's only)."""
    kwargs: dict[str, Any] = {"quantize": scheme}
    if scheme == "int4" and group_size:
        kwargs["group_size"] = group_size
    if scheme != "none" and also:
        kwargs["quantize_also"] = also
    return kwargs


def tensor_bytes_of(module: torch.nn.Module) -> int:
    """Bytes of every tensor a module holds (parameters, buffers and tensor attributes, such as packed
    quantized weights), each storage counted once."""
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        tensors = list(sub._parameters.values()) + list(sub._buffers.values())
        tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def decode_weight_sizes(model: Any) -> dict[str, int]:
    """What one decode step reads, as bench_generate.weight_bytes counts it, but from whatever tensors the
    (possibly quantized) model holds: everything but the embedding table and the routed experts once, and
    one routed expert's share (a layer's routed-expert bytes over its expert count) per selected expert."""
    from dsvl2.language.moe import MoE

    language = model.language
    moe_layers = [layer.mlp for layer in language.model.layers if isinstance(layer.mlp, MoE)]
    routed = sum(tensor_bytes_of(mlp.experts) for mlp in moe_layers)
    embed = language.model.embed_tokens.weight
    one_expert = tensor_bytes_of(moe_layers[0].experts) // model.cfg.language.n_routed_experts if moe_layers else 0
    return {"always_read": tensor_bytes_of(language) - embed.numel() * embed.element_size() - routed,
            "one_expert": one_expert, "moe_layers": len(moe_layers),
            "embedding_row": model.cfg.language.hidden_size * embed.element_size(),
            "language_total": tensor_bytes_of(language), "model_total": tensor_bytes_of(model)}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: load the checkpoint with the spec's scheme, then measure TTFT, decode and one
    greedy answer. The model is loaded without the engine first so its weight bytes can be counted before
    the engine packs any of them (packed float16 weights are opaque objects)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    bg = bench_generate()
    from dsvl2.engine.cpu import fbgemm_fp16_available
    from dsvl2.engine.generate import Engine, Request
    from dsvl2.engine.kernels import keeps_half_weights
    from dsvl2.engine.sampling import SamplingParams
    from dsvl2.loading import load
    from dsvl2.machine import cpu_flags, release_free_memory

    record: dict[str, Any] = {"mem_available_before": mem_available()}
    kwargs = quantize_kwargs(spec["scheme"], spec.get("group_size"), spec.get("quantize_also", ""))
    with MemoryTrace() as trace:
        # Engine.from_pretrained's two steps, apart: the weights are counted between them.
        trace.label = "read and quantize"
        start = time.perf_counter()
        half_ok = keeps_half_weights(cpu_flags(), fbgemm_fp16_available())
        model, processor = load(spec["folder"], cpu_half=half_ok, cache_slots=1, cache_len=64, **kwargs)
        read_s = time.perf_counter() - start
        record["read_peak_rss_bytes"] = peak_resident_bytes()
        trace.label = "count"
        record["sizes"] = decode_weight_sizes(model)
        trace.label = "engine prepare"
        start = time.perf_counter()
        engine = Engine(model, processor, max_batch=1, max_len=64)
        record["read_s"], record["prepare_s"] = read_s, time.perf_counter() - start
        record["load_s"] = read_s + record["prepare_s"]
        trace.label = "loaded"
        release_free_memory()
        record["load_peak_rss_bytes"] = peak_resident_bytes()
        record["rss_after_load_bytes"] = resident_bytes()
        record["dtype"] = str(engine.dtype).removeprefix("torch.")
        record["kernels"] = engine.kernels.as_dict()
        quantized = [m for m in model.modules() if type(m).__name__ == "QuantizedLinear"]
        record["quantized_linears"] = len(quantized)
        record["quantized_kernels"] = sorted({str(m.kernel) for m in quantized})
        if quantized:  # why the C++ kernels are not used, when they are not: the fallback is otherwise silent
            from dsvl2.quant import kernels as qkernels

            record["extension_status"] = str(qkernels.extension()[1])
        with torch.inference_mode():
            trace.label = "answer"
            answer = engine.generate(Request([{"role": "user", "content": "Describe the sea in one sentence."}], [],
                                             SamplingParams(max_new_tokens=spec.get("answer_tokens", 8))))
            record["answer"] = {"text": answer.text, "tokens": len(answer.token_ids),
                                "finish_reason": answer.finish_reason, "error": answer.error}
            del engine
            if not spec.get("skip_ttft"):
                trace.label = "ttft"
                record["ttft"] = bg.measure_ttft(model, processor, 384, {})
            # The bandwidth probe's buffer is the bench's, not the model's: the peak is read before it exists,
            # and decoding's resident memory is counted without it.
            record["peak_before_probe_bytes"] = peak_resident_bytes()
            probe = bg.BandwidthProbe(spec.get("probe_mb", 512))
            probe_bytes = probe.data.numel() * probe.data.element_size()
            record["read_bandwidth_gb_s"] = probe.best_of() / 1e9
            record["decode"] = []
            for batch in spec["batches"]:
                trace.label = f"decode batch {batch}"
                record["decode"].append(bg.measure_decode(model, processor, record["sizes"], batch,
                                                          spec["decode_steps"], probe, {}))
            trace.label = "done"
        del probe
    decoding = [rss for _, rss, label in trace.samples if label.startswith("decode")]
    record["decode_rss_bytes"] = max(decoding, default=probe_bytes) - probe_bytes
    record["peak_model_bytes"] = max(record["peak_before_probe_bytes"], record["decode_rss_bytes"])
    record["peak_rss_bytes"] = peak_resident_bytes()
    record["memory_trace"] = trace.coarse()
    record["load_peak_sample"] = trace.peak()
    return record


def parse_variant(text: str) -> tuple[str, str]:
    """A --schemes entry: "int4" or "int4+lm_head" -> (scheme, parts also quantized)."""
    scheme, _, also = text.partition("+")
    return scheme, also.replace("+", ",")


def compare_decode(folder: Path, variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 decode of every variant loaded into this one process, measured in alternating rounds, so each
    round's ratios to bfloat16 see the same machine load (a shared machine's load changes by the minute).
    The vision tower is dropped after loading (it plays no part in decoding) so that the models fit together."""
    bg = bench_generate()
    from dsvl2.engine.cpu import fbgemm_fp16_available
    from dsvl2.engine.kernels import keeps_half_weights
    from dsvl2.loading import load
    from dsvl2.machine import cpu_flags, release_free_memory

    half_ok = keeps_half_weights(cpu_flags(), fbgemm_fp16_available())
    models, sizes, processor = {}, {}, None
    for variant in variants:
        scheme, also = parse_variant(variant)
        models[variant], processor = load(folder, cpu_half=half_ok, cache_slots=1, cache_len=64,
                                          **quantize_kwargs(scheme, args.group_size, also))
        sizes[variant] = decode_weight_sizes(models[variant])
        models[variant].vision = torch.nn.Module()  # decoding text never runs the tower: three models then fit
        release_free_memory()
    probe = bg.BandwidthProbe()
    rounds: list[dict[str, dict[str, float]]] = []
    with torch.inference_mode():
        for _ in range(args.rounds):
            rounds.append({v: bg.measure_decode(models[v], processor, sizes[v], 1, args.decode_steps, probe,
                                                {"kernels": "vision=native"}) for v in variants})
            print(f"   round {len(rounds)}: " + ", ".join(f"{v} {r['tokens_per_s']:.2f} tok/s"
                                                          for v, r in rounds[-1].items()), flush=True)
    base = variants[0]
    out: dict[str, Any] = {"rounds": rounds, "sizes": sizes, "baseline": base, "variants": {}}
    for v in variants:
        speeds = [r[v]["tokens_per_s"] for r in rounds]
        ratios = [r[v]["tokens_per_s"] / r[base]["tokens_per_s"] for r in rounds]
        fractions = [r[v]["bandwidth_fraction"] for r in rounds]
        out["variants"][v] = {"tokens_per_s_median": float(np.median(speeds)), "ratio_median": float(np.median(ratios)),
                              "ratios": ratios, "bandwidth_fraction_median": float(np.median(fractions)),
                              "bytes_per_step": rounds[0][v]["bytes_per_step"]}
    return out


def measure(folder: Path, model: str, scheme: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a child process; its own peak resident memory is also read from wait4."""
    scheme, also = parse_variant(scheme)
    spec = {"folder": str(folder), "scheme": scheme, "group_size": args.group_size, "threads": args.threads,
            "quantize_also": also or args.quantize_also,
            "batches": [int(b) for b in args.batches.split(",")], "decode_steps": args.decode_steps,
            "skip_ttft": args.skip_ttft}
    load_before = os.getloadavg()
    code = code_state()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    record: dict[str, Any] = {"model": model, "scheme": scheme + (f"+{also}" if also else ""),
                              "group_size": args.group_size, "language_layers": args.language_layers,
                              "wall_s": time.perf_counter() - start, "loadavg_before": load_before,
                              "loadavg_after": os.getloadavg(), "child_maxrss_bytes": usage.ru_maxrss * 1024,
                              "exit_code": proc.returncode, "code": code}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        record["error"] = f"child exited with {proc.returncode}" + (" (killed: out of memory?)"
                                                                    if proc.returncode == -9 else "")
        return record
    record.update(json.loads(lines[-1]))
    return record


def estimate_parts(config: dict, scheme: str, group_size: int | None, also: str = "") -> dict[str, int]:
    """What a load needs resident by the engine's own estimate (dsvl2.quant.memory: bfloat16 weights with
    `scheme`'s layers quantized, and the runtime), as a dict so later parts can be added beside it."""
    from dsvl2.quant.memory import engine_float32_layers, resident_bytes
    from dsvl2.quant.scheme import parse_scheme

    cfg = model_config_from_dict(config)
    parsed = parse_scheme(scheme, group_size if scheme == "int4" else None, also or None)  # "": the default parts
    quant = None if isinstance(parsed, str) or parsed is None else parsed
    wide = engine_float32_layers(torch.device("cpu"), torch.bfloat16)  # as the loader's check counts it
    return {"engine_estimate": int(resident_bytes(cfg, torch.bfloat16, quant, float32_layers=wide))}


def code_state() -> dict[str, Any]:
    """The commit and the uncommitted files under dsvl2/ a run measured (the package changes while others work)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip()

    return {"head": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "dsvl2").splitlines()}


def required_memory(config: dict, scheme: str, group_size: int | None, also: str = "") -> int:
    """Bytes a load needs, for the check before it."""
    return sum(estimate_parts(config, scheme, group_size, also).values())


def check_memory(model: str, scheme: str, config: dict, group_size: int | None, also: str,
                 margin: int = 2**30) -> None:
    """MemoryCheckError when MemAvailable is below the load's estimate plus `margin`."""
    needed = required_memory(config, scheme, group_size, also) + margin
    available = mem_available()
    if available < needed:
        raise MemoryCheckError(f"{model} {scheme}: the load needs about {needed / 1e9:.1f} GB and "
                               f"{available / 1e9:.1f} GB are available; wait for other work or skip it")


# ------------------------------------------------------------------------------------ report


def add_verdicts(results: dict[str, Any]) -> None:
    runs = results["runs"]
    bf16 = next((r for r in runs if r["model"].startswith("tiny") and r["scheme"] == "none" and "decode" in r), None)
    for run in runs:
        verdicts: dict[str, Any] = {}
        if "error" in run:
            run["verdicts"] = {"ran": False}
            continue
        verdicts["answered"] = run["answer"]["tokens"] > 0 and not run["answer"]["error"]
        target = PEAK_TARGETS.get((run["model"], parse_variant(run["scheme"])[0]))
        if target:
            verdicts["peak_memory"] = run["peak_model_bytes"] <= target
        batch1 = next((d for d in run["decode"] if d["batch"] == 1), None)
        if batch1 and run["scheme"] != "none":
            verdicts["bandwidth_fraction"] = batch1["bandwidth_fraction"] >= BANDWIDTH_TARGET
            if bf16 and run["model"] == bf16["model"]:
                base = next(d for d in bf16["decode"] if d["batch"] == 1)
                run["speedup_vs_bfloat16_batch1"] = batch1["tokens_per_s"] / base["tokens_per_s"]
                target = SPEEDUP_TARGETS[parse_variant(run["scheme"])[0]]
                verdicts["speedup"] = run["speedup_vs_bfloat16_batch1"] >= target
        run["verdicts"] = verdicts


def print_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    flags = ", ".join(f for f, present in machine["key_flags"].items() if present)
    print(f"\n{machine['cpu_model']} ({flags}), {machine['cpu_count']} CPUs, torch {machine['torch']}, "
          f"{results['date']}")
    header = (f"{'model':14} {'scheme':12} {'load s':>7} {'peak GB':>8} {'est GB':>7} {'TTFT s':>7} {'b1 tok/s':>9} "
              f"{'b8 tok/s':>9} {'b1 %bw':>7} {'vs bf16':>8} {'GB/s':>6} {'load avg':>9}  answered")
    print(header)
    print("-" * len(header))
    for run in results["runs"]:
        if "error" in run:
            print(f"{run['model']:14} {run['scheme']:12} {run['error']}")
            continue
        decode = {d["batch"]: d for d in run["decode"]}
        b1, b8 = decode.get(1), decode.get(8)
        ttft = run.get("ttft", {}).get("ttft_s")
        speed = run.get("speedup_vs_bfloat16_batch1")
        estimate = sum(run["estimate"].values()) / 1e9 if "estimate" in run else float("nan")
        cells = [f"{run['model']:14}", f"{run['scheme']:12}", f"{run['load_s']:7.1f}",
                 f"{run['peak_model_bytes'] / 1e9:8.2f}", f"{estimate:7.2f}", f"{ttft:7.1f}" if ttft else f"{'-':>7}",
                 f"{b1['tokens_per_s']:9.2f}" if b1 else f"{'-':>9}",
                 f"{b8['tokens_per_s']:9.2f}" if b8 else f"{'-':>9}",
                 f"{100 * b1['bandwidth_fraction']:6.0f}%" if b1 else f"{'-':>7}",
                 f"{speed:7.2f}x" if speed else f"{'-':>8}",
                 f"{b1['read_bandwidth_gb_s']:6.1f}" if b1 else f"{'-':>6}", f"{run['loadavg_before'][0]:9.2f}",
                 f" {run['answer']['tokens'] > 0}"]
        print(" ".join(cells))
    for run in results["runs"]:
        if "verdicts" in run:
            print(f"{run['model']} {run['scheme']}: {run['verdicts']}")
    for name, compared in results.get("compare_decode", {}).items():
        print(f"\n{name}: batch-1 decode in one process, {len(compared['rounds'])} alternating rounds")
        for variant, entry in compared["variants"].items():
            print(f"  {variant:14} {entry['tokens_per_s_median']:7.2f} tok/s (median), "
                  f"{entry['ratio_median']:.2f}x {compared['baseline']} (per-round ratios "
                  f"{', '.join(f'{r:.2f}' for r in entry['ratios'])}), {entry['bytes_per_step'] / 1e9:.2f} GB/step, "
                  f"{100 * entry['bandwidth_fraction_median']:.0f}% of the bandwidth limit")


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="tiny,small,base", help="comma list of tiny, small, base (DeepSeek-VL2)")
    parser.add_argument("--schemes", default="none,int8,int4",
                        help="comma list of none, int8, int4; none (bfloat16) runs on tiny only")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size (default: the engine's)")
    parser.add_argument("--quantize-also", default="", help="parts also quantized in int8 (lm_head, vision)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--decode-steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dsvl2-bench-quantized"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch checkpoints")
    parser.add_argument("--write-only", action="store_true", help="write the checkpoints and stop (implies --keep)")
    parser.add_argument("--no-memory-check", action="store_true")
    parser.add_argument("--language-layers", type=int, default=None,
                        help="decoder layers of the written model (default: the released config's)")
    parser.add_argument("--compare-decode", action="store_true",
                        help="batch-1 decode of every scheme in one process, alternating --rounds times; the first "
                             "scheme is the baseline of the ratios")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "quantized.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    models = [m for m in args.models.split(",") if m]
    schemes = [s for s in args.schemes.split(",") if s]
    bad = [m for m in models if m not in CONFIG_NAMES]
    bad += [s for s in schemes if parse_variant(s)[0] not in ("none", "int8", "int4")]
    if bad:
        parser.error(f"unknown model or scheme: {', '.join(bad)}")

    bg = bench_generate()
    results: dict[str, Any] = {"machine": bg.machine_record(os.getloadavg()),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "settings": {k: str(v) for k, v in vars(args).items() if k != "child"},
                               "targets": {"peak_bytes": {f"{m} {s}": v for (m, s), v in PEAK_TARGETS.items()},
                                           "speedup_vs_bfloat16": SPEEDUP_TARGETS,
                                           "bandwidth_fraction": BANDWIDTH_TARGET},
                               "checkpoints": {}, "runs": [], "compare_decode": {}}
    for model in models:
        config = load_json(config_path(model))
        name = model
        if args.language_layers:  # a shallower model of the same widths: quick, or to find a peak's per-layer part
            config["language_config"]["num_hidden_layers"] = args.language_layers
            name = f"{model}-{args.language_layers}layers"
        folder = args.scratch / name
        if (folder / "config.json").is_file():
            print(f"== {name}: reusing {folder}", flush=True)
        else:
            print(f"== {name}: writing a random checkpoint to {folder}", flush=True)
            results["checkpoints"][name] = write_random_checkpoint(config, folder)
            print(f"   {results['checkpoints'][name]}", flush=True)
        if args.write_only:
            continue
        try:
            if args.compare_decode:
                print(f"== {name}: batch-1 decode of {', '.join(schemes)} in one process", flush=True)
                results["compare_decode"][name] = compare_decode(folder, schemes, args)
                continue
            for scheme in schemes:
                if scheme == "none" and model != "tiny":
                    continue
                if not args.no_memory_check:
                    try:
                        base, also = parse_variant(scheme)
                        check_memory(model, base, config, args.group_size, also or args.quantize_also)
                    except MemoryCheckError as exc:
                        print(f"   skipped: {exc}", flush=True)
                        results["runs"].append({"model": name, "scheme": scheme, "error": str(exc)})
                        continue
                print(f"== {name} {scheme}", flush=True)
                run = measure(folder, name, scheme, args)
                base, also = parse_variant(scheme)
                run["estimate"] = estimate_parts(config, base, args.group_size, also or args.quantize_also)
                results["runs"].append(run)
                print(f"   {json.dumps({k: v for k, v in run.items() if k not in ('memory_trace', 'sizes')})}",
                      flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    if args.write_only:
        print(json.dumps(results["checkpoints"], indent=1))
        return 0
    add_verdicts(results)
    print_table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
