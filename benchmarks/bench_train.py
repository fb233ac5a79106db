"""Training tokens/s and peak memory of a DeepSeek-VL2-Tiny-sized model, with and without activation checkpointing.

The model has the real Tiny dimensions (SigLIP-so400m width 1152, hidden 1280, 64 routed experts of
width 896, vocabulary 129280) from its released config.json, with fewer layers when asked
(`--language-layers`, `--vision-layers`) so that float32 weights + gradients + AdamW state fit
the machine. Each variant runs in its own process (so its peak memory is its own) and times the
trainer's real step: data loading, forward, backward, clipping, AdamW, MoE bias rule. Every
sample is the same conversation (one image, a fixed answer), so every step has the same tokens.

Peak memory is `torch.cuda.max_memory_allocated` on a GPU; on the CPU it is the process's peak
resident set size (weights, optimiser state and the Python/torch runtime included).

    python benchmarks/bench_train.py --language-layers 2 --vision-layers 4 --steps 2
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
    parser.add_argument("--variant", choices=("plain", "checkpointed"), default=None,
                        help="run one variant in this process and print its JSON (used internally)")
    return parser.parse_args(argv)


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


def _model_config(args: argparse.Namespace) -> dict:
    config = json.loads(args.config.read_text())
    if args.language_layers is not None:
        config["language_config"]["num_hidden_layers"] = args.language_layers
    if args.vision_layers is not None:
        config["vision_config"]["layers"] = args.vision_layers
    return config


def run_variant(args: argparse.Namespace) -> dict:
    """Build the trainer in this process, time its steps, report this process's peak memory."""
    import torch

    from dsvl2.train.recipe import recipe_from_dict
    from dsvl2.train.trainer import Trainer

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
        started = time.perf_counter()
        trainer = Trainer(recipe)
        build_seconds = time.perf_counter() - started
        device = trainer.dist.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        records = [trainer.train_step() for _ in range(args.warmup + args.steps)]
        trainer.close()
        timed = records[args.warmup:]
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
        seconds = [r["step_seconds"] for r in timed]
        tokens = timed[0]["tokens"]
        return {
            "activation_checkpointing": checkpointed,
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
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
