"""The `dsvl2` command line: one subcommand per verb.

A verb is a `Command(name, help, module)` entry whose module defines `add_arguments(parser)` and
`run(args) -> int` (or a Command given those two functions directly); adding a verb is one line
in `COMMANDS`. A name with a space ("data synth") becomes a nested subcommand. Modules are imported
only when the parser is built, and a verb whose module does not exist (yet) is left out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dsvl2.cli_common import add_model_arguments, add_sampling_arguments, guarded_run, load_engine, sampling_from_args
from dsvl2.errors import InputError

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str  # "generate", or "data synth" for a nested verb
    help: str
    module: str | None = None  # defines add_arguments(parser) and run(args) -> int
    add_arguments: AddArguments | None = None  # given directly instead of `module`
    run: Run | None = None


def _load_verb(command: Command) -> tuple[AddArguments, Run] | None:
    if command.add_arguments is not None and command.run is not None:
        return command.add_arguments, command.run
    if command.module is None:
        raise ValueError(f"command {command.name!r} has neither a module nor add_arguments/run")
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        if exc.name and command.module.startswith(exc.name):  # the verb's own module is absent
            return None
        raise
    return module.add_arguments, module.run


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsvl2", description="DeepSeek-VL2 in plain PyTorch")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for command in COMMANDS if commands is None else commands:
        loaded = _load_verb(command)
        if loaded is None:
            continue
        add_arguments, run = loaded
        *group_names, leaf = command.name.split()
        target = verbs
        for group in group_names:
            if group not in groups:
                group_parser = verbs.add_parser(group, help=f"{group} commands")
                groups[group] = group_parser.add_subparsers(dest=f"{group}_command", metavar="COMMAND",
                                                            required=True)
            target = groups[group]
        sub = target.add_parser(leaf, help=command.help, description=command.help)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


# ---------------------------------------------------------------------------------------- generate


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", action="extend", nargs="+", default=[], metavar="FILE",
                        help="image file(s), in the order of the prompt's <image> tags")
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: text, token ids, finish reason, grounding boxes")
    parser.add_argument("--boxes-out", type=Path, default=None,
                        help="with grounding in the answer, save the first image with the boxes drawn")
    parser.add_argument("prompt", nargs="?", help="the question; <image> tags place the images (default: "
                        "before or after the text, as the model's processor_config.json says)")


def run_generate(args: argparse.Namespace) -> int:
    return guarded_run(_generate, args)


def _split_prompt(args: argparse.Namespace) -> tuple[str, list[str]]:
    """`--image a.png b.png "prompt"`: the greedy --image list swallows the prompt; take it back."""
    images = list(args.image)
    prompt = args.prompt
    if prompt is None and images and not Path(images[-1]).is_file():
        prompt = images.pop()
    if prompt is None:
        raise InputError("no prompt given")
    return prompt, images


def _generate(args: argparse.Namespace) -> int:
    from dsvl2.engine.generate import Request
    from dsvl2.processor import with_image_tags

    prompt, images = _split_prompt(args)
    sampling = sampling_from_args(args)
    engine = load_engine(args)
    conversation = [{"role": "system", "content": args.system}] if args.system else []
    position = engine.processor.config.image_tag_position
    conversation.append({"role": "user", "content": with_image_tags(prompt, len(images), position)})
    request = Request(conversation, images, sampling)
    if args.json:
        completion = engine.generate(request)
    else:
        completion = _stream_to(engine, request, sys.stdout)
    if completion.finish_reason == "error":
        print(f"error: {completion.error}", file=sys.stderr)
        return 1
    grounding = _grounding_summary(completion.text, images)
    if args.boxes_out is not None:
        _save_boxes(completion.text, images, args.boxes_out)
    if args.json:
        print(json.dumps({
            "text": completion.text, "token_ids": completion.token_ids, "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            **grounding,
        }, ensure_ascii=False))
    return 0


def _stream_to(engine: Any, request: Any, out: TextIO) -> Any:
    """Print an answer as it is generated; returns its Completion."""
    from dsvl2.engine.generate import Completion

    completion = Completion("", [], "", 0, 0, request_id=request.request_id)
    for event in engine.stream(request):
        if event.text:
            out.write(event.text)
            out.flush()
        completion.add(event)
    out.write("\n")
    out.flush()
    return completion


def _grounding_summary(text: str, images: list[str]) -> dict[str, Any]:
    """Refs with their boxes on the 0..999 grid and, with an image, in pixels of the first image."""
    from dsvl2.grounding import box_to_pixels, parse_grounding

    parsed = parse_grounding(text)
    size = _image_size(images[0]) if images else None
    refs = []
    for ref in parsed.refs:
        entry: dict[str, Any] = {"label": ref.label, "boxes": [list(b) for b in ref.boxes]}
        if size is not None:
            entry["boxes_px"] = [[round(v, 1) for v in box_to_pixels(b, *size)] for b in ref.boxes]
        refs.append(entry)
    return {"grounding": refs, "grounding_errors": parsed.errors}


def _image_size(path: str) -> tuple[int, int]:
    from dsvl2.images import load_image

    image = load_image(path)
    return image.width, image.height


def _save_boxes(text: str, images: list[str], out: Path) -> None:
    from dsvl2.grounding import draw_boxes, parse_grounding
    from dsvl2.images import load_image

    refs = [ref for ref in parse_grounding(text).refs if ref.boxes]
    if not images:
        print("warning: --boxes-out needs an --image; nothing drawn", file=sys.stderr)
        return
    if not refs:
        print("warning: the answer has no grounding boxes; nothing drawn", file=sys.stderr)
        return
    draw_boxes(load_image(images[0]), refs).save(out)
    print(f"boxes drawn on {images[0]} saved to {out}", file=sys.stderr)


COMMANDS: list[Command] = [
    Command("generate", "answer one prompt about zero or more images",
            add_arguments=add_generate_arguments, run=run_generate),
    Command("chat", "multi-turn chat on the terminal (/help lists its commands)", "dsvl2.chat"),
    Command("serve", "OpenAI-compatible HTTP server", "dsvl2.serve.cli"),
    Command("train", "fine-tune or train from scratch", "dsvl2.train.trainer"),
    Command("eval", "run the evaluation suites", "dsvl2.eval.runner"),
    Command("quantize", "write an int8 or int4 weight-only quantized checkpoint", "dsvl2.quant.cli"),
    Command("merge", "fold a LoRA adapter into a model's weights (a checkpoint in the released layout)",
            "dsvl2.adapters.merge"),
    Command("data synth", "write a synthetic vision-language dataset", "dsvl2.train.synthetic"),
    Command("data check", "read every record and image of a recipe's data (or --data files) and report problems",
            "dsvl2.train.check"),
    Command("data convert", "write LLaVA, ShareGPT or parquet records as dsvl2 JSON Lines", "dsvl2.train.convert"),
]


if __name__ == "__main__":
    sys.exit(main())
