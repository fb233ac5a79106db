"""Training tokens/s and peak memory of a DeepSeek-VL2-Tiny-sized model, with and without activation checkpointing.

The model has the real Tiny dimensions (SigLIP-so400m width 1152, hidden 1280, 64 routed experts of
width 896, vocabulary 129280) from its released config.json, with fewer layers when asked
(`--language-layers`, `--vision-layers`) so that float32 weights + gradients + AdamW state fit
the machine. Each variant runs in its own process (so its peak memory is its own) and times the
trainer's real step: data loading, forward, backward, clipping, AdamW, MoE bias rule. Every
sample is the same conversation (one image, a fixed answer), so every step has the same tokens.

Peak memory is `torch.cuda.max_memory_allocated` on a GPU; on the CPU it is the process's peak
resident set size (weights, optimiser state and the Python/torch runtime included).

`--adapters` measures LoRA adapter steps instead (dsvl2.train.adapters, bfloat16 autocast, activation
checkpointing, one sample of `--tokens` tokens): Tiny with a bfloat16 base, and Small with an int4 base,
both with rank-16 adapters on the attention projections and the dense and shared-expert MLPs and every
other weight frozen. Their random bases are made as the trainer would load them, never the whole float
model in memory: the int4 layers are created already quantized (random codes, scales and minima), one
layer at a time, the rest in bfloat16 (routers in float32).

    python benchmarks/bench_train.py --language-layers 2 --vision-layers 4 --steps 2
    python benchmarks/bench_train.py --adapters --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DSVL2_SHARED_DIR", REPO.parent / "shared"))
DEFAULT_CONFIG = SHARED / "released_configs" / "deepseek-vl2-tiny.config.json"
# A tokenizer with the real special tokens (1024 ids, all inside Tiny's vocabulary).
DEFAULT_TOKENIZER = Path(os.environ.get("DSVL2_CONFORMANCE_DIR", SHARED / "conformance")) / "tiny_like"
SMALL_CONFIG = SHARED / "released_configs" / "deepseek-vl2-small.config.json"
# The adapter rows: (name, config, base quantization).
ADAPTER_ROWS = {"adapter-tiny": (DEFAULT_CONFIG, "none"), "adapter-small-int4": (SMALL_CONFIG, "int4")}
ADAPTER_TARGETS = r"language\.model\.layers\.\d+\.(self_attn\.\w+|mlp\.(gate|up|down)_proj|mlp\.shared_experts\.\w+)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model config.json (Tiny)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="folder with tokenizer.json and processor_config.json")
    parser.add_argument("--language-layers", type=int, default=None, help="decoder layers (default: config's)")
    parser.add_argument("--vision-layers", type=int, default=None, help="SigLIP blocks (default: config's)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per step")
    parser.add_argument("--image-size", default="384x384", help="WxH of the sample image (sets the tile grid)")
    parser.add_argument("--answer-words", type=int, default=64, help="words in the answer")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.json")
    parser.add_argument("--variant", choices=("plain", "checkpointed", *ADAPTER_ROWS), default=None,
                        help="run one variant in this process and print its JSON (used internally)")
    parser.add_argument("--adapters", action="store_true",
                        help="the adapter rows (Tiny bfloat16 base, Small int4 base) instead of full training")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (--adapters)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the one sample per step (--adapters)")
    parser.add_argument("--compute", choices=("bfloat16", "float32"), default=None,
                        help="--adapters: bfloat16 autocast over bfloat16 weights (the rows' definition), or float32 "
                             "arithmetic over float32 unquantized weights (default: bfloat16 where the CPU multiplies "
                             "it natively or on a GPU, else float32: PyTorch's bfloat16 matmuls are generic loops)")
    parser.add_argument("--rows", default=",".join(ADAPTER_ROWS), help="--adapters: the rows to run")
    args = parser.parse_args(argv)
    if args.compute is None:
        import torch

        from dsvl2.machine import computes_natively

        gpu = torch.cuda.is_available() if args.device == "auto" else args.device != "cpu"
        args.compute = "bfloat16" if gpu or computes_natively(torch.bfloat16) else "float32"
    return args


def _write_data(folder: Path, image_size: str, answer_words: int) -> Path:
    import numpy as np
    from PIL import Image

    width, height = (int(v) for v in image_size.lower().split("x"))
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    words = "the quick brown fox jumps over a lazy dog".split()
    answer = " ".join(words[i % len(words)] for i in range(answer_words))
    record = {"messages": [{"role": "user", "content": "<image>\nDescribe the image in detail."},
                           {"role": "assistant", "content": answer}],
              "images": ["image.png"]}
    shard = folder / "train.jsonl"
    shard.write_text((json.dumps(record) + "\n") * 16)
    return shard


def _model_config(args: argparse.Namespace, path: Path | None = None) -> dict:
    config = json.loads((path or args.config).read_text())
    if args.language_layers is not None:
        config["language_config"]["num_hidden_layers"] = args.language_layers
    if args.vision_layers is not None:
        config["vision_config"]["layers"] = args.vision_layers
    return config


def run_variant(args: argparse.Namespace) -> dict:
    """Build the trainer in this process, time its steps, report this process's peak memory."""

    from dsvl2.train.recipe import recipe_from_dict

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shard = _write_data(folder, args.image_size, args.answer_words)
        checkpointed = args.variant == "checkpointed"
        recipe = recipe_from_dict({
            "stage": "sft",
            "model": {"config": _model_config(args), "processor": str(args.tokenizer)},
            "data": {"sources": [{"name": "bench", "paths": [str(shard)]}], "shuffle_buffer": 1},
            "optimizer": {"lr": 1e-5},
            "training": {"steps": args.warmup + args.steps, "micro_batch_size": args.batch_size,
                         "activation_checkpointing": checkpointed, "dtype": args.dtype, "device": args.device},
            "output": {"dir": str(folder / "out"), "progress": False},
        }, folder)
        return {"activation_checkpointing": checkpointed, **timed_steps(recipe, args.warmup, args.steps)}


def timed_steps(recipe: object, warmup: int, steps: int) -> dict:
    """Build the trainer of `recipe`, run `warmup` then `steps` timed steps, and report the steps' speed and this
    process's peak memory (the GPU's allocator peak on CUDA)."""
    import torch

    from dsvl2.train.trainer import Trainer

    started = time.perf_counter()
    trainer = Trainer(recipe)
    build_seconds = time.perf_counter() - started
    device = trainer.dist.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = [trainer.train_step() for _ in range(warmup + steps)]
    trainer.close()
    timed = records[warmup:]
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
    seconds = [r["step_seconds"] for r in timed]
    tokens = timed[0]["tokens"]
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "tokens_per_step": tokens,
        "step_seconds": seconds,
        "tokens_per_s": tokens * len(seconds) / sum(seconds),
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "build_seconds": build_seconds,
        "losses": [r["loss"] for r in records],
    }


def random_base(raw: dict, quantize: str, dtype) -> object:
    """A DeepseekVL2 of config `raw` with random weights: `quantize`d layers created already quantized, one at a
    time (as dsvl2.quant.load installs a quantized checkpoint's), every other parameter in `dtype` (routers in
    float32, norms one)."""
    import torch
    from torch import nn

    from dsvl2.checkpoint import FLOAT32_SUFFIXES, build_model
    from dsvl2.config import model_config_from_dict
    from dsvl2.quant.load import QuantizingLoader, plan_targets
    from dsvl2.quant.scheme import QUANTIZED_DTYPES, parse_scheme

    model = build_model(model_config_from_dict(raw))  # on the meta device: no memory
    generator = torch.Generator().manual_seed(0)
    if quantize != "none":
        _, targets = plan_targets(model, parse_scheme(quantize))
        loader = QuantizingLoader(model, targets, True, dtype, "cpu")
        for layer, target in targets.items():
            for suffix, shape in target.shapes().items():
                kind = QUANTIZED_DTYPES[suffix][target.bits]
                if kind.is_floating_point:  # scales, and minima at -7.5 steps: weights of std ~0.02
                    value = torch.full(shape, 0.006 if suffix == "scales" else -0.045, dtype=kind)
                else:
                    info = torch.iinfo(kind)
                    value = torch.randint(info.min, info.max + 1, shape, dtype=kind, generator=generator)
                loader.take(f"{layer}.{suffix}", value)
        loader.finish()
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        module_name, _, leaf = name.rpartition(".")
        kind = torch.float32 if name.endswith(FLOAT32_SUFFIXES) else dtype
        if "norm" in module_name.rsplit(".", 1)[-1] or name.endswith("e_score_correction_bias"):
            norm_weight = "norm" in name and leaf == "weight"
            value = torch.ones(param.shape, dtype=kind) if norm_weight else torch.zeros(param.shape, dtype=kind)
        else:
            value = torch.empty(param.shape, dtype=kind).normal_(0, 0.02, generator=generator)
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    return model.eval()


def _sized_data(folder: Path, args: argparse.Namespace) -> Path:
    """One record of an image and an answer long enough for `args.tokens` tokens in all."""
    from dsvl2.processor import Processor

    processor = Processor.from_pretrained(args.tokenizer)
    processor.context_length = 1 << 20

    def length(words: int) -> int:
        shard = _write_data(folder, args.image_size, words)
        record = json.loads(shard.read_text().splitlines()[0])
        return len(processor.encode(record["messages"], [folder / "image.png"], inference=False))

    short, long = length(16), length(272)
    per_word = (long - short) / 256
    return _write_data(folder, args.image_size, max(1, 16 + round((args.tokens - short) / per_word)))


def run_adapter_variant(args: argparse.Namespace) -> dict:
    """One adapter row: the trainer's adapter step over a random base (no checkpoint is read)."""
    import torch

    from dsvl2.train import adapters as adapter_runs
    from dsvl2.train.recipe import recipe_from_dict

    config_path, quantize = ADAPTER_ROWS[args.variant]
    raw = _model_config(args, config_path)
    dtype = getattr(torch, args.compute)
    adapter_runs.base_model = lambda recipe: (random_base(raw, quantize, dtype), raw)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shard = _sized_data(folder, args)
        recipe = recipe_from_dict({
            "stage": "sft",
            # model.checkpoint is only named: base_model above makes the random base instead of reading it.
            "model": {"checkpoint": str(args.tokenizer), "processor": str(args.tokenizer)},
            "data": {"sources": [{"name": "bench", "paths": [str(shard)]}], "shuffle_buffer": 1},
            "optimizer": {"lr": 1e-4},
            "training": {"steps": args.warmup + args.steps, "micro_batch_size": 1, "activation_checkpointing": True,
                         "dtype": args.compute, "device": args.device},
            "output": {"dir": str(folder / "out"), "progress": False},
            "adapter": {"r": args.rank, "alpha": 2 * args.rank, "target_modules": ADAPTER_TARGETS,
                        "base_dtype": args.compute, "quantize": quantize},
        }, folder)
        measured = timed_steps(recipe, args.warmup, args.steps)
    return {
        "variant": args.variant, "quantize": quantize, "compute": args.compute, "rank": args.rank,
        "language_layers": raw["language_config"]["num_hidden_layers"], "vision_layers": raw["vision_config"]["layers"],
        "activation_checkpointing": True, **measured,
    }


def _run_subprocess(forwarded: list[str], variant: str) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--variant", variant]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main_adapters(args: argparse.Namespace, forwarded: list[str]) -> int:
    results = []
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("variant", "out")}
    report = {"settings": settings, "torch": __import__("torch").__version__, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "results": results}
    out = args.out if args.out != REPO / "benchmarks" / "results" / "train.json" else args.out.with_name(
        "train_adapters.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for variant in args.rows.split(","):
        result = _run_subprocess(forwarded, variant)
        if result is None:
            return 1
        results.append(result)
        out.write_text(json.dumps(report, indent=1))  # each row as soon as it is measured
    print(f"{'adapter step':<22}{'layers':>8}{'parameters':>12}{'trained':>10}{'tokens/step':>13}{'s/step':>9}"
          f"{'tokens/s':>10}{'peak memory':>14}")
    for r in results:
        print(f"{r['variant']:<22}{r['language_layers']:>8}{r['parameters'] / 1e9:>11.2f}B"
              f"{r['trainable_parameters'] / 1e6:>9.1f}M"
              f"{r['tokens_per_step']:>13}{sum(r['step_seconds']) / len(r['step_seconds']):>9.1f}"
              f"{r['tokens_per_s']:>10.1f}{r['peak_memory_bytes'] / 2**30:>11.2f} GiB")
    print(f"(rank {args.rank}, activation checkpointing, {args.compute} compute; memory = "
          f"{results[0]['peak_memory_kind']}; device {results[0]['device']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant in ADAPTER_ROWS:
        print(json.dumps(run_adapter_variant(args)))
        return 0
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    if args.adapters:
        return main_adapters(args, forwarded)
    results = []
    for variant in ("plain", "checkpointed"):
        command = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--variant", variant]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("variant", "out")}
    report = {"settings": settings, "torch": __import__("torch").__version__, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "results": results}
    print(f"{'activation checkpointing':<26}{'tokens/step':>12}{'s/step':>10}{'tokens/s':>11}{'peak memory':>14}")
    for r in results:
        print(f"{'on' if r['activation_checkpointing'] else 'off':<26}{r['tokens_per_step']:>12}"
              f"{sum(r['step_seconds']) / len(r['step_seconds']):>10.2f}{r['tokens_per_s']:>11.1f}"
              f"{r['peak_memory_bytes'] / 2**30:>11.2f} GiB")
    print(f"({results[0]['parameters'] / 1e6:.0f}M parameters, {results[0]['trainable_parameters'] / 1e6:.0f}M "
          f"trained; memory = {results[0]['peak_memory_kind']}; device {results[0]['device']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
