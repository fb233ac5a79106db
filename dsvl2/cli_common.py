"""Command-line pieces shared by the verbs (`generate`, `chat`, `serve`, `eval`): model and sampling
options, loading the engine, and turning expected failures into one-line messages.

Heavy modules are imported inside the functions, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dsvl2.errors import InputError

if TYPE_CHECKING:
    from dsvl2.engine.generate import Engine
    from dsvl2.engine.sampling import SamplingParams


KERNELS_HELP = (
    "CPU kernel path of each part of the work (default auto: chosen by the CPU's capabilities, shown with "
    "--verbose). A path for every part that can run it: native (the weights' dtype; oneDNN bfloat16 on CPUs "
    "with avx512_bf16 or AMX), float32 (16-bit weights, float32 arithmetic: vision, prefill) or float16-packed "
    "(FBGEMM: decode, lm_head); or PART=PATH,... with parts vision, prefill, decode, lm_head"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device, --max-len, --kernels and --verbose; unset values are chosen by
    `dsvl2.loading` and `dsvl2.engine.kernels`."""
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint directory (config.json, model.safetensors, tokenizer files; "
                             "default: the bundled default model)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                        help="weights dtype (default: bfloat16 on cuda; on cpu a bfloat16/float16 checkpoint's own "
                             "dtype where --kernels has a fast path for it, else float32)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="context length in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--kernels", default="auto", help=KERNELS_HELP)
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="a LoRA adapter folder in peft's format (adapter_config.json, adapter_model.safetensors) "
                             "over the model; `dsvl2 serve` takes several, chosen per request by the model field "
                             "(NAME, default: the folder's name)")
    add_quantize_arguments(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="print the dtype, quantization and kernel paths chosen at load")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize, --group-size, --quantize-also and --no-memory-check (dsvl2.quant)."""
    from dsvl2.quant.memory import released_memory_table

    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default=None,
                        help="weight-only quantization of the language model's linear layers, done while the weights "
                             "are read (default: as the checkpoint is; a checkpoint written by `dsvl2 quantize` loads "
                             f"quantized). {released_memory_table()}")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                        help="int4 group size along the input dimension (default 64, or 32 where 64 does not divide "
                             "a layer)")
    parser.add_argument("--quantize-also", default=None, metavar="PARTS",
                        help="with --quantize, the parts quantized in int8 besides the decoder layers: lm_head, vision "
                             "(comma-separated; default lm_head; none: only the decoder layers)")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="load even when the estimated memory exceeds what is available")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The validated `SamplingParams` of the sampling options."""
    from dsvl2.engine.sampling import SamplingParams

    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
    )
    sampling.validate()
    return sampling


def adapters_from_args(args: argparse.Namespace) -> dict[str, Path]:
    """The --adapter options as {name: folder}; a name is given as NAME=DIR, else it is the folder's name."""
    adapters: dict[str, Path] = {}
    for value in getattr(args, "adapter", []):
        name, sep, folder = value.partition("=")
        if not sep or not re.fullmatch(r"[\w.:-]+", name) or Path(value).exists():
            name, folder = Path(value).name, value
        if name in adapters:
            raise InputError(f"two adapters are named {name!r}: name them with --adapter NAME=DIR")
        adapters[name] = Path(folder)
    return adapters


def load_engine(args: argparse.Namespace, max_batch: int = 1, progress: bool = True,
                several_adapters: bool = False) -> Engine:
    """The engine on the model options' checkpoint (the bundled default model without --model); with one
    --adapter it runs that adapter, with `several_adapters` (serve) each request names its own."""
    from dsvl2.engine.generate import Engine
    from dsvl2.engine.kernels import check_option
    from dsvl2.quant.linear import describe_quantization

    check_option(args.kernels)  # a misspelt --kernels fails before the weights are read
    adapters = adapters_from_args(args)
    if len(adapters) > 1 and not several_adapters:
        raise InputError(f"--adapter is given {len(adapters)} times; this command runs one (dsvl2 serve takes "
                         "several)")
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, progress=progress,
                                    max_batch=max_batch, max_len=args.max_len, kernels=args.kernels,
                                    quantize=args.quantize, group_size=args.group_size,
                                    quantize_also=args.quantize_also, check_memory=not args.no_memory_check,
                                    adapters=adapters or None,
                                    default_adapter=next(iter(adapters)) if adapters and not several_adapters else None)
    if args.verbose:
        print(f"{engine.dtype} weights on {engine.device}; {describe_quantization(engine.model)}; "
              f"{engine.kernels.describe()}", file=sys.stderr)
    return engine


def guarded_run(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Turn expected failures (bad input, bad checkpoint) into a one-line message and exit code."""
    from dsvl2.checkpoint import CheckpointError
    from dsvl2.config import ConfigError

    try:
        return run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
