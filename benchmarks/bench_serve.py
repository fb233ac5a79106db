"""Serving throughput and latency: requests/s and p50/p99 time to first token at several concurrencies.

Clients stream chat completions over loopback (`stream: true`); time to first token is measured by
the client, from sending the request to the first chunk carrying answer text, and by the server
(its /metrics histogram: acceptance to the first sampled token, text or not). Every answer has
exactly `--max-tokens` tokens (`ignore_eos`), sampled at temperature 1 with a per-request seed
(a random-weight model's greedy answers are often invalid UTF-8 bytes, which the decoder rightly
holds back, so no text would reach the client before the end). Half of the requests carry an image.

    python benchmarks/bench_serve.py                      # conformance tiny_like, server process
    python benchmarks/bench_serve.py --model DIR          # any checkpoint directory
    python benchmarks/bench_serve.py --tiny-dims          # DeepSeek-VL2-Tiny dimensions, random weights
    python benchmarks/bench_serve.py --api-key KEY        # the server needs KEY; every client sends it

With `--tiny-dims` the model is built in memory by benchmarks/bench_generate.py's `random_model`
(no checkpoint is written) and served from a thread of this process. Results are printed and
written to benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONFORMANCE = Path(os.environ.get("DSVL2_CONFORMANCE_DIR", SHARED / "conformance"))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


# ----------------------------------------------------------------------------- one client request

def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def stream_one(host: str, port: int, body: dict[str, Any], key: str | None = None) -> dict[str, float]:
    """Send one streamed request; seconds to the first text chunk and to the end, tokens received."""
    connection = http.client.HTTPConnection(host, port, timeout=600)
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=payload,
                       headers={"Content-Type": "application/json", **auth_headers(key)})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first_text = None
    tokens = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            if first_text is None and choice["delta"].get("content"):
                first_text = time.perf_counter() - start
    total = time.perf_counter() - start
    connection.close()
    return {"ttft": first_text if first_text is not None else total, "latency": total, "tokens": tokens}


def request_body(model: str, number: int, image_url: str | None, max_tokens: int) -> dict[str, Any]:
    text = f"Request {number}: describe what you see in detail."
    content: Any = text
    if image_url is not None and number % 2 == 1:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": number, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


def server_ttft(host: str, port: int, key: str | None = None) -> tuple[dict[float, float], float, float]:
    """The server's time-to-first-token histogram: cumulative bucket counts, sum, count."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", "/metrics", headers=auth_headers(key))
    text = connection.getresponse().read().decode()
    connection.close()
    buckets, total, count = {}, 0.0, 0.0
    for line in text.splitlines():
        if line.startswith("dsvl2_time_to_first_token_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
        elif line.startswith("dsvl2_time_to_first_token_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("dsvl2_time_to_first_token_seconds_count"):
            count = float(line.split()[-1])
    return buckets, total, count


def bucket_quantile(before: dict[float, float], after: dict[float, float], fraction: float) -> float:
    """Upper bound of the histogram bucket holding the quantile of the observations between two reads."""
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts[float("inf")]
    return next(bound for bound, count in counts.items() if count >= fraction * total)


def run_level(host: str, port: int, model: str, concurrency: int, requests: int, image_url: str | None,
              max_tokens: int, first_number: int, key: str | None = None) -> dict[str, Any]:
    bodies = [request_body(model, first_number + n, image_url, max_tokens) for n in range(requests)]
    buckets_before, sum_before, count_before = server_ttft(host, port, key)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda body: stream_one(host, port, body, key), bodies))
    wall = time.perf_counter() - start
    buckets_after, sum_after, count_after = server_ttft(host, port, key)
    ttfts = [r["ttft"] for r in results]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": wall,
        "requests_per_s": requests / wall,
        "completion_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "latency_p50_s": statistics.median(r["latency"] for r in results),
        "latency_p99_s": percentile([r["latency"] for r in results], 0.99),
        # Measured by the server at the first generated token, whether or not it decodes to text yet.
        "server_ttft_mean_s": (sum_after - sum_before) / max(1.0, count_after - count_before),
        "server_ttft_p50_bucket_s": bucket_quantile(buckets_before, buckets_after, 0.5),
        "server_ttft_p99_bucket_s": bucket_quantile(buckets_before, buckets_after, 0.99),
    }


# ----------------------------------------------------------------------------- servers

def tiny_dims_engine(dtype_name: str, device: str, max_batch: int):
    """DeepSeek-VL2-Tiny's real dimensions with random weights, from bench_generate.py's builders.

    The tokenizer is the conformance one (1024 ids); ids the model samples beyond it decode to nothing,
    which leaves the compute per token unchanged.
    """
    import torch

    from dsvl2.engine.generate import Engine

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_generate import random_model, tiny_processor
    finally:
        sys.path.pop(0)
    model = random_model(getattr(torch, dtype_name)).to(device)
    processor = tiny_processor(model.cfg.language.max_position_embeddings)
    return Engine(model, processor, max_batch=max_batch)


class _Server:
    """A server process for a checkpoint directory, or a thread serving an in-memory engine."""

    def __init__(self, args: argparse.Namespace, model_name: str) -> None:
        self.args = args
        self.model_name = model_name
        self._inner: Any = None

    def __enter__(self) -> _Server:
        from dsvl2.serve.launch import ServerProcess, ThreadedServer

        args = self.args
        if args.tiny_dims:
            from dsvl2.serve.app import ServeSettings, create_app
            from dsvl2.serve.auth import KeyRing
            from dsvl2.serve.runner import EngineRunner

            device = _device(args.device)
            dtype = "bfloat16" if args.dtype == "auto" else args.dtype  # float32 would need 13.5 GB
            engine = tiny_dims_engine(dtype, device, args.max_batch)
            app = create_app(EngineRunner(engine, max_pending=args.max_pending),
                             ServeSettings(served_model_name=self.model_name,
                                           api_keys=KeyRing([args.api_key]) if args.api_key else None))
            self._inner = ThreadedServer(app).start()
        else:
            extra = ["--served-model-name", self.model_name, "--max-batch", str(args.max_batch), "--max-pending",
                     str(args.max_pending), "--device", args.device, "--dtype", args.dtype]
            env = {"DSVL2_API_KEY": args.api_key} if args.api_key else None
            self._inner = ServerProcess(args.model, extra, env=env).start(timeout=600)
        return self

    @property
    def port(self) -> int:
        return self._inner.port

    def __exit__(self, *exc: object) -> None:
        self._inner.stop()


def _device(name: str) -> str:
    from dsvl2.loading import choose_device

    return str(choose_device(name))


# ----------------------------------------------------------------------------- main

def print_level(level: dict[str, Any]) -> None:
    ms = {name: level[name] * 1000 for name in ("ttft_p50_s", "ttft_p99_s", "server_ttft_mean_s")}
    print(f"concurrency {level['concurrency']:3d}: {level['requests_per_s']:7.2f} req/s, "
          f"{level['completion_tokens_per_s']:8.1f} tok/s, TTFT p50 {ms['ttft_p50_s']:8.1f} ms, "
          f"p99 {ms['ttft_p99_s']:8.1f} ms (server mean {ms['server_ttft_mean_s']:.1f} ms), "
          f"latency p50 {level['latency_p50_s']:.2f} s", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=CONFORMANCE / "tiny_like", help="checkpoint directory")
    parser.add_argument("--tiny-dims", action="store_true", help="DeepSeek-VL2-Tiny dimensions, random weights")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default: 2 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image", default="square", help="conformance image for half the requests, or 'none'")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-pending", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--api-key", default=None, help="serve with this API key (sent by every client)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "serve.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    image_url = None
    if args.image != "none":
        image = CONFORMANCE / "images" / f"{args.image}.png"
        image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    model_name = "tiny-dims" if args.tiny_dims else args.model.name
    levels = []
    with _Server(args, model_name) as server:
        stream_one("127.0.0.1", server.port, request_body(model_name, 0, image_url, 4), args.api_key)  # warm-up
        stream_one("127.0.0.1", server.port, request_body(model_name, 1, image_url, 4), args.api_key)
        number = 2
        for concurrency in args.concurrency:
            requests = args.requests or max(8, 2 * concurrency)
            level = run_level("127.0.0.1", server.port, model_name, concurrency, requests, image_url,
                              args.max_tokens, number, args.api_key)
            number += requests
            levels.append(level)
            print_level(level)
    result = {
        "benchmark": "serve",
        "model": "DeepSeek-VL2-Tiny dimensions, random weights" if args.tiny_dims else str(args.model),
        "device": _device(args.device),
        "dtype": args.dtype,
        "max_batch": args.max_batch,
        "max_tokens": args.max_tokens,
        "image": args.image,
        "api_key": bool(args.api_key),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1min_at_end": os.getloadavg()[0]},  # other work on the machine skews timings
        "levels": levels,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
