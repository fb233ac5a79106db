"""`dsvl2 quantize`: write a quantized checkpoint that every command loads directly."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsvl2.cli_common import guarded_run
from dsvl2.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="floating-point checkpoint directory (default: the bundled default model)")
    parser.add_argument("--out", type=Path, required=True, help="new directory for the quantized checkpoint")
    parser.add_argument("--bits", type=int, choices=(4, 8), required=True,
                        help="8: int8, one scale per output channel; 4: int4, groups along the input dimension")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                        help="int4 group size (default 64, or 32 where 64 does not divide a layer)")
    parser.add_argument("--quantize-also", default=None, metavar="PARTS",
                        help="the parts quantized in int8 besides the decoder layers: lm_head, vision "
                             "(comma-separated; default lm_head; none: only the decoder layers)")
    parser.add_argument("--shard-size-gb", type=float, default=2.0,
                        help="largest safetensors file written, in GB (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    return guarded_run(_quantize, args)


def _quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dsvl2.loading import model_folder
    from dsvl2.quant.convert import quantize_checkpoint
    from dsvl2.quant.scheme import parse_scheme

    if args.shard_size_gb <= 0:
        raise InputError("--shard-size-gb must be positive")
    scheme = parse_scheme("int8" if args.bits == 8 else "int4", args.group_size, args.quantize_also)
    folder = model_folder(args.model)
    progress = None if args.quiet else lambda it, total: tqdm(it, total=total, desc="quantizing", unit="tensor")
    scheme = quantize_checkpoint(folder, args.out, scheme, int(args.shard_size_gb * 1e9), progress)
    print(f"wrote {args.out} ({scheme.name}) from {folder.path}", file=sys.stderr)
    return 0
