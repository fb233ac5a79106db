"""How far weight-only int8/int4 quantization moves a model's predictions: the mean next-token KL divergence
from the floating-point model over the reference answers' positions (teacher forcing), per task.

Every record of an evaluation set (`dsvl2 eval`'s JSONL: messages with the reference answer as the last
assistant turn) is encoded for training, so its labels mark the answer tokens; the floating-point model
and each quantized one score the same batches, and at every position whose next token is an answer token
KL(p_float || p_quantized) is taken over the vocabulary. Also reported: how often the two models' most
likely next token agrees there. The task scores themselves come from `dsvl2 eval --quantize ...`.

    python benchmarks/bench_quant_quality.py --data heldout/test.jsonl --schemes int8,int4 [--group-sizes 32]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsvl2.eval.runner import load_items
from dsvl2.loading import load
from dsvl2.processor import Batch, Processor

REPO = Path(__file__).resolve().parents[1]


def answer_positions(labels: torch.Tensor, ignore_id: int) -> torch.Tensor:
    """[B, T] bool: positions whose next token is an answer token (the logits that predict the answer)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_id
    return mask


def kl_per_position(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)) of each row, in float64 so tiny divergences are not rounded away."""
    p_log = F.log_softmax(reference_logits.double(), dim=-1)
    q_log = F.log_softmax(logits.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1)


def batches(items: Sequence[Any], processor: Processor, size: int) -> Iterator[tuple[list[str], Batch]]:
    """(task of each row, right-padded training batch) of `size` records at a time."""
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        samples = [processor.encode(item.record["messages"], item.images, inference=False) for item in chunk]
        yield [item.task for item in chunk], processor.batch(samples, padding="right")


@torch.inference_mode()
def answer_logits(model: Any, batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    """[N, V] logits at the masked positions, row-major."""
    return model(input_ids=batch.input_ids, images=batch.images, images_seq_mask=batch.images_seq_mask,
                 images_spatial_crop=batch.images_spatial_crop, attention_mask=batch.attention_mask,
                 logits_mask=mask).logits.float()


def compare(reference: Any, models: dict[str, Any], processor: Processor, items: Sequence[Any],
            batch_size: int) -> dict[str, dict[str, Any]]:
    """Per model: mean KL and top-1 agreement over every answer position, overall and per task."""
    sums: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for tasks, batch in batches(items, processor, batch_size):
        mask = answer_positions(batch.labels, processor.config.ignore_id)
        row_of = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask]
        ref = answer_logits(reference, batch, mask)
        for name, model in models.items():
            logits = answer_logits(model, batch, mask)
            kl = kl_per_position(ref, logits)
            agree = (ref.argmax(-1) == logits.argmax(-1)).double()
            for row, task in enumerate(tasks):
                pick = row_of == row
                entry = sums[name].setdefault(task, [0.0, 0.0, 0.0])
                entry[0] += float(kl[pick].sum())
                entry[1] += float(agree[pick].sum())
                entry[2] += int(pick.sum())
    out: dict[str, dict[str, Any]] = {}
    for name, per_task in sums.items():
        kl_sum, agree_sum, n = (sum(v[i] for v in per_task.values()) for i in range(3))
        out[name] = {"mean_kl": kl_sum / n, "top1_agreement": agree_sum / n, "positions": int(n),
                     "tasks": {task: {"mean_kl": v[0] / v[2], "top1_agreement": v[1] / v[2], "positions": int(v[2])}
                               for task, v in sorted(per_task.items())}}
    return out


def scheme_list(schemes: str, group_sizes: str) -> list[tuple[str, str, int | None]]:
    """(label, --quantize choice, group size) of each quantized model to compare; int4 once per group size
    (an empty group size: the engine's default for the model)."""
    out: list[tuple[str, str, int | None]] = []
    for scheme in (s for s in schemes.split(",") if s):
        if scheme == "int4":
            for g in group_sizes.split(","):
                size = int(g) if g.strip() else None
                out.append((f"int4-g{size}" if size else "int4", "int4", size))
        else:
            out.append((scheme, scheme, None))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled default model)")
    parser.add_argument("--data", type=Path, required=True, help="evaluation JSONL with reference answers")
    parser.add_argument("--schemes", default="int8,int4")
    parser.add_argument("--group-sizes", default="", help="int4 group sizes, comma list ('' = the default)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "quant_quality.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    items, unusable = load_items(args.data, limit=args.limit)
    if unusable:
        print(f"{len(unusable)} records of {args.data} cannot be scored; left out")
    reference, processor = load(args.model, quantize="none")
    models: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for label, choice, group in scheme_list(args.schemes, args.group_sizes):
        try:
            models[label] = load(args.model, quantize=choice, group_size=group)[0]
        except ValueError as exc:  # a group size that does not divide a layer: reported, the others still run
            errors[label] = str(exc)
    results = compare(reference, models, processor, items, args.batch_size)
    for label in models:
        results[label]["quantized_linears"] = sum(type(m).__name__ == "QuantizedLinear"
                                                  for m in models[label].modules())
    report = {"model": str(args.model or "bundled default model"), "data": str(args.data), "records": len(items),
              "reference_dtype": str(next(reference.parameters()).dtype), "results": results, "errors": errors,
              "seconds": time.perf_counter() - start, "loadavg": os.getloadavg()}
    for label, entry in results.items():
        tasks = ", ".join(f"{t} {v['mean_kl']:.2e}" for t, v in entry["tasks"].items())
        print(f"{label:10} mean KL {entry['mean_kl']:.3e} nats, top-1 agreement {entry['top1_agreement']:.4f} "
              f"over {entry['positions']} answer positions ({tasks})")
    for label, message in errors.items():
        print(f"{label:10} not loaded: {message}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
