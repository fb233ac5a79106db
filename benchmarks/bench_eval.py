"""Benchmark the whole `dsvl2 eval` loop (read the benchmark files, generate, score, report) in records/s,
on the bundled default model and on DeepSeek-VL2-Tiny's geometry with random bfloat16 weights.

The records are written here in two published formats (ChartQA's test_human.json with its png/ folder,
VLMEvalKit's TSV with base64 images; chart-sized images drawn on the spot), so nothing is downloaded. Where
the time goes: reading the files, the processor's work on the images (timed on its own over the same
questions, it is part of generation), the vision tower and projector (forward hooks), the language model
(the rest of generation: prefill and decoding), scoring and the report. Random weights never say
end-of-sentence, so the Tiny rows always decode `--max-new-tokens` tokens; the bundled model stops on its
own. Prints a table and writes benchmarks/results/eval.json.

    python benchmarks/bench_eval.py [--records 16] [--batch-size 8] [--threads N] [--skip-tiny]
    python benchmarks/bench_eval.py --language-layers 2 --vision-layers 4 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from dsvl2.engine.generate import Engine
from dsvl2.eval import runner
from dsvl2.machine import cpu_flags, cpu_model

REPO = Path(__file__).resolve().parents[1]
KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def chart_image(index: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A bar chart with labels: a realistic tile count (the processor picks the grid from the aspect)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for bar in range(5):
        height = 40 + (index * 37 + bar * 53) % 300
        x = 60 + bar * 110
        draw.rectangle([x, size[1] - 60 - height, x + 70, size[1] - 60], fill=(40 * bar, 90, 200 - 30 * bar))
        draw.text((x, size[1] - 50), f"C{bar}", fill="black")
        draw.text((x, size[1] - 75 - height), str(height), fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_files(folder: Path, records: int) -> list[runner.Source]:
    """Half the records as ChartQA, half as a VLMEvalKit TSV."""
    (folder / "png").mkdir(parents=True, exist_ok=True)
    chart = []
    for i in range(records // 2):
        (folder / "png" / f"{i}.png").write_bytes(chart_image(i))
        chart.append({"imgname": f"{i}.png", "query": f"What is the value of C{i % 5}?", "label": str(40 + i)})
    (folder / "test_human.json").write_text(json.dumps(chart), encoding="utf-8")
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage"]
    for i in range(records - records // 2):
        encoded = base64.b64encode(chart_image(100 + i)).decode()
        lines.append(f"{i}\tWhich bar is tallest?\tC0\tC1\tC2\tC3\t{'ABCD'[i % 4]}\tchart\t{encoded}")
    (folder / "bench.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return runner.sources_from_args([folder / "test_human.json", folder / "bench.tsv"], ["chartqa", "vlmevalkit"])


class TimedEngine:
    """The engine, with the time spent inside generate_batch, and inside the vision tower and projector
    (forward hooks), added up."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seconds = 0.0
        self.vision_seconds = 0.0
        self._entered: list[float] = []
        for module in (engine.model.vision, engine.model.projector):
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)

    def _enter(self, *_: Any) -> None:
        self._entered.append(time.perf_counter())

    def _leave(self, *_: Any) -> None:
        self.vision_seconds += time.perf_counter() - self._entered.pop()

    def generate_batch(self, requests: list) -> list:
        started = time.perf_counter()
        try:
            return self.engine.generate_batch(requests)
        finally:
            self.seconds += time.perf_counter() - started


def measure(engine: Engine, sources: list[runner.Source], batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    items, errors = [], []
    for source in sources:
        source_items, source_errors = runner.read_source(source)
        items += source_items
        errors += source_errors
    read_s = time.perf_counter() - started
    if errors:
        raise SystemExit(f"benchmark records failed to read: {errors[0].error}")
    timed = TimedEngine(engine)
    started = time.perf_counter()
    results = runner.answer_and_score(timed, items, batch_size, max_new_tokens, progress=False)
    loop_s = time.perf_counter() - started
    started = time.perf_counter()
    report = runner.build_report(results, model="", data="", task_filter="", seconds=0.0)
    report_s = time.perf_counter() - started
    started = time.perf_counter()
    for item in items:  # the processor's share of generation, timed alone over the same questions
        engine.processor.encode(item.conversation, item.images, inference=True)
    processor_s = time.perf_counter() - started
    total = read_s + loop_s + report_s
    tokens = sum(len(engine.tokenizer.encode(r.prediction)) for r in results)
    return {
        "records": len(items),
        "records_per_s": len(items) / total,
        "seconds": {"total": total, "read": read_s, "processor (images, tokens)": processor_s,
                    "vision tower + projector": timed.vision_seconds,
                    "language model (prefill, decode)": timed.seconds - processor_s - timed.vision_seconds,
                    "score": loop_s - timed.seconds, "report": report_s},
        "answer_tokens_mean": tokens / max(1, len(results)),
        "finish_reasons": sorted({r.finish_reason for r in results}),
        "scores": {task: entry["score"] for task, entry in report["tasks"].items()},
    }


def tiny_engine(args: argparse.Namespace, batch_size: int) -> Engine:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_generate import random_model, tiny_config, tiny_processor
    finally:
        sys.path.pop(0)
    model = random_model(torch.bfloat16, config=tiny_config(args.language_layers, args.vision_layers))
    processor = tiny_processor(model.cfg.language.max_position_embeddings)
    return Engine(model, processor, max_batch=batch_size)


def print_table(rows: dict[str, dict]) -> None:
    parts = list(next(iter(rows.values()))["seconds"])
    print(f"{'model':<34}{'records/s':>10}  " + "  ".join(f"{p}" for p in parts))
    for name, row in rows.items():
        shares = "  ".join(f"{row['seconds'][p]:.2f}s ({row['seconds'][p] / row['seconds']['total']:.0%})"
                           for p in parts)
        print(f"{name:<34}{row['records_per_s']:>10.2f}  {shares}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-tiny", action="store_true", help="only the bundled model")
    parser.add_argument("--language-layers", type=int, default=None, help="fewer Tiny decoder layers")
    parser.add_argument("--vision-layers", type=int, default=None, help="fewer Tiny vision blocks")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "eval.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        sources = write_files(Path(folder), args.records)
        engine = Engine.from_pretrained(None, max_batch=args.batch_size)
        rows["bundled default model"] = measure(engine, sources, args.batch_size, args.max_new_tokens)
        del engine
        if not args.skip_tiny:
            layers = f"{args.language_layers or 'all'} LM / {args.vision_layers or 'all'} vision layers"
            engine = tiny_engine(args, args.batch_size)
            rows[f"Tiny geometry, random ({layers})"] = measure(engine, sources, args.batch_size,
                                                                 args.max_new_tokens)
    print_table(rows)
    flags = cpu_flags()
    result = {"cpu": cpu_model(), "flags": [f for f in KEY_FLAGS if f in flags], "threads": torch.get_num_threads(),
              "python": platform.python_version(), "torch": torch.__version__, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
