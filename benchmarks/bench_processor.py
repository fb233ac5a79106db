"""Time the processor on one thread: tiling plus token preparation of a prompt with one image.

A 1152x1152 picture selects the 3x3 grid (1 global + 9 local tiles, 2017 image tokens).
Prints a table and writes benchmarks/results/processor.json. Target: encode under 50 ms.

    python benchmarks/bench_processor.py [--model-dir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsvl2.images import load_image
from dsvl2.processor import Processor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = Path(
    os.environ.get("DSVL2_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance")
) / "tiny_like"
TARGET_MS = 50.0


def timed(function: Callable[[], object], repeats: int) -> dict[str, float]:
    function()  # warm-up: first-call allocations and imports are not what is measured
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "processor.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    processor = Processor.from_pretrained(args.model_dir)
    pixels = np.random.default_rng(0).integers(0, 256, (1152, 1152, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    png = buffer.getvalue()
    conversation = [{"role": "user", "content": "<image>\nDescribe this image."}]
    sample = processor.encode(conversation, [picture])
    grid = sample.images_spatial_crop[0].tolist()

    rows = {
        "encode (PIL image: tiling + tokens + normalise)": timed(
            lambda: processor.encode(conversation, [picture]), args.repeats),
        "encode (PNG bytes: decode included)": timed(lambda: processor.encode(conversation, [png]),
                                                     args.repeats),
        "tile_image only (uint8 tiles)": timed(lambda: processor.tile_image(picture), args.repeats),
        "tile_image + normalise": timed(lambda: processor.normalize(processor.tile_image(picture).tiles),
                                        args.repeats),
        "load_image (PNG decode)": timed(lambda: load_image(png), args.repeats),
        "tokens only (text-only prompt)": timed(
            lambda: processor.encode([{"role": "user", "content": "Describe this image."}]), args.repeats),
    }
    headline = rows["encode (PIL image: tiling + tokens + normalise)"]["median_ms"]
    print(f"image 1152x1152 -> grid {grid[0]}x{grid[1]}, {sample.pixel_values.shape[0]} tiles, "
          f"{sample.num_image_tokens[0]} image tokens, {len(sample)} tokens; 1 thread")
    print(f"{'step':<50} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, row in rows.items():
        print(f"{name:<50} {row['median_ms']:>10.2f} {row['min_ms']:>8.2f} {row['max_ms']:>8.2f}")
    verdict = "meets" if headline < TARGET_MS else "MISSES"
    print(f"encode median {headline:.1f} ms {verdict} the {TARGET_MS:.0f} ms target")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "processor",
        "image_size": [1152, 1152],
        "grid": grid,
        "tiles": int(sample.pixel_values.shape[0]),
        "image_tokens": sample.num_image_tokens[0],
        "threads": 1,
        "repeats": args.repeats,
        "target_ms": TARGET_MS,
        "meets_target": headline < TARGET_MS,
        "results": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
    }, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
