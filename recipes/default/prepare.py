"""Make the inputs of the default model's training run: its tokenizer folder and training records.

    python recipes/default/prepare.py --data DATA/train.jsonl --tokenizer-out BASE --train-out DATA/train_mt.jsonl \
        [--grounding-out DATA/train_st_grounding.jsonl] [--one-object-out DATA/train_mt_one_object.jsonl]

- BASE gets tokenizer.json, tokenizer_config.json, special_tokens_map.json, processor_config.json and
  config.json (a copy of model.json next to this file) in the released layout; the first stage builds
  fresh weights from that config. The tokenizer is a byte-level BPE trained on the text of the training
  records, with digits split one per token (box coordinates and counts are then sequences of the ten
  digit tokens) and every special token of DeepSeek-VL2, begin/end of sentence first (ids 0 and 1).
  Every question of a synthetic record comes before its image; the processor config says so
  ("image_tag_position": "after"), so that `dsvl2 generate`, `chat` and the web page place tags as in training.
- The multi-turn file (alignment, and the one-shape scenes of the warm-up: --one-object-out) holds the same
  images as the input, each with more questions: the record's own question first (exactly the evaluation
  format), then further questions about the same picture derived from its metadata (counts, the other
  bars, the box of a lone shape).
- The grounding file (pretraining and SFT, with the generated single-turn records) holds the grounding and
  grounded-caption records as generated, plus one single-turn record, question first, for every other
  shape of a scene of several. Pretraining and SFT use no later turns: a later question comes after the
  image, whose tokens then cannot see what it names, and with such turns in the mix the language model
  learnt to box one shape whatever the words said (recipes/default/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsvl2.config import model_config_from_dict
from dsvl2.grounding import IMAGE_TAG, format_grounding
from dsvl2.processor import with_image_tags

RECIPE_DIR = Path(__file__).resolve().parent
BOS, EOS, UNK, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<unk>", "<｜▁pad▁｜>"
# The order fixes the ids: begin/end of sentence are 0 and 1, as model.json's bos/eos_token_id say.
SPECIAL_TOKENS = (BOS, EOS, UNK, PAD, "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>",
                  "<|grounding|>", "<|User|>", "<|Assistant|>")
ROLE_TOKENS = ("<|User|>", "<|Assistant|>")
MAX_EXTRA_TURNS = 8
MAX_SCENE_COUNTS = 3  # counting questions added to a grounding scene
IMAGE_TAG_POSITION = "after"  # the synthetic records ask before the image; so does every record made here

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def record_texts(records: Iterable[dict]) -> Iterator[str]:
    """Every piece of text a record contributes to training: plain text and message contents."""
    for record in records:
        if "text" in record:
            yield record["text"]
        for message in record.get("messages", []):
            yield message["content"]


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SystemExit(f"{path}:{number}: not valid JSON: {error}") from error
    return records


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with individual digits; the special tokens take the first ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json in the layout of the released checkpoints."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(token)): {**_added_token(token), "special": True} for token in SPECIAL_TOKENS
        },
        "additional_special_tokens": list(ROLE_TOKENS),
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": PAD,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }


def special_tokens_map() -> dict:
    return {
        "additional_special_tokens": [_added_token(token) for token in ROLE_TOKENS],
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "pad_token": _added_token(PAD),
        "unk_token": UNK,
    }


def processor_config(model_config: dict) -> dict:
    return {
        "processor_class": "DeepseekVLV2Processor",
        "candidate_resolutions": model_config["candidate_resolutions"],
        "patch_size": model_config["vision_config"]["patch_size"],
        "downsample_ratio": model_config["projector_config"].get("downsample_ratio", 2),
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "normalize": True,
        "image_token": "<image>",
        "pad_token": PAD,
        "add_special_token": False,
        "sft_format": "deepseek",
        "mask_prompt": True,
        "ignore_id": -100,
        "image_tag_position": IMAGE_TAG_POSITION,
    }


def write_tokenizer_folder(records: list[dict], out: Path, model_json: Path) -> int:
    """Train the tokenizer and write it with the processor and model configs; returns its size."""
    config = json.loads(model_json.read_text(encoding="utf-8"))
    model_config_from_dict(config)  # fail early on a bad config
    language = config["language_config"]
    tokenizer = train_tokenizer(record_texts(records), language["vocab_size"])
    for name, token in (("bos_token_id", BOS), ("eos_token_id", EOS)):
        if language.get(name) != tokenizer.token_to_id(token):
            raise SystemExit(f"{model_json}: language_config.{name} must be {tokenizer.token_to_id(token)}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    files = {
        "tokenizer_config.json": tokenizer_config(tokenizer),
        "special_tokens_map.json": special_tokens_map(),
        "processor_config.json": processor_config(config),
        "config.json": config,
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer.get_vocab_size()


# --------------------------------------------------------------------------------------------------
# Multi-turn training records
# --------------------------------------------------------------------------------------------------


def _grounding_turns(record: dict, rng: random.Random) -> list[tuple[str, str]]:
    """Referring questions about every object of a scene whose (colour, shape) pairs are unique."""
    objects = record["objects"]
    turns = []
    for obj in objects:
        expressions = [f"the {obj['color']} {obj['shape']}"]
        if sum(o["shape"] == obj["shape"] for o in objects) == 1:
            expressions.append(f"the {obj['shape']}")
        if sum(o["color"] == obj["color"] for o in objects) == 1:
            expressions.append(f"the {obj['color']} shape")
        expression = rng.choice(expressions)
        turns.append((f"<|ref|>{expression}<|/ref|>.", format_grounding(expression, [obj["box"]])))
    return turns


def _counting_turns(record: dict, rng: random.Random) -> list[tuple[str, str]]:
    objects = record["objects"]
    turns = [("How many shapes are there?", str(len(objects)))]
    for color in sorted({o["color"] for o in objects}):
        turns.append((f"How many {color} shapes are there?", str(sum(o["color"] == color for o in objects))))
    for shape in sorted({o["shape"] for o in objects}):
        turns.append((f"How many {shape}s are there?", str(sum(o["shape"] == shape for o in objects))))
    return turns


def _chart_turns(record: dict, rng: random.Random) -> list[tuple[str, str]]:
    bars = record["bars"]
    values = [bar["value"] for bar in bars]
    turns = [(f"What is the value of bar {bar['label']}?", str(bar["value"])) for bar in bars]
    if values.count(max(values)) == 1:
        turns.append(("Which bar has the highest value?", bars[values.index(max(values))]["label"]))
    if values.count(min(values)) == 1:
        turns.append(("Which bar has the lowest value?", bars[values.index(min(values))]["label"]))
    return turns


def _scene_turns(record: dict, rng: random.Random) -> list[tuple[str, str]]:
    """A scene of unique (colour, shape) pairs: a few counts, and the box of a lone shape.

    The boxes of a scene of several shapes are not asked in later turns: a later question comes after the
    image, whose tokens then cannot see what it names, and trained on such turns the language model boxed
    one shape whatever the words said. They become single-turn records instead (`single_turn_groundings`).
    """
    counts = _counting_turns(record, rng)
    rng.shuffle(counts)
    boxes = _grounding_turns(record, rng) if len(record["objects"]) == 1 else []
    return boxes + counts[:MAX_SCENE_COUNTS]


def single_turn_groundings(scene: dict, rng: random.Random) -> list[dict]:
    """For a grounding or grounded-caption record (see `grounding_scenes`) of several shapes: one single-turn
    record, question before the image, per shape that the record's own question does not ask for."""
    if len(scene["objects"]) < 2:
        return []
    asked = {_question(message["content"]) for message in scene["messages"] if message["role"] == "user"}
    objects = scene["objects"]
    return [{"messages": [{"role": "user", "content": with_image_tags(question, 1, IMAGE_TAG_POSITION)},
                          {"role": "assistant", "content": answer}],
             "images": scene["images"], "task": "grounding", "answers": [answer], "image_size": scene["image_size"],
             "box": objects[target]["box"], "target": target, "objects": objects}
            for target, (question, answer) in enumerate(_grounding_turns(scene, rng)) if question not in asked]


def _question(content: str) -> str:
    """A first turn's question without its image tag (the tag comes before or after it)."""
    return content.removeprefix(f"{IMAGE_TAG}\n").removesuffix(f"\n{IMAGE_TAG}")


_EXTRA_TURNS = {
    "grounding": _scene_turns,
    "grounded_caption": _scene_turns,
    "counting": _counting_turns,
    "caption": _counting_turns,
    "chart": _chart_turns,
}


def multi_turn(record: dict, rng: random.Random, max_extra: int = MAX_EXTRA_TURNS) -> dict:
    """The record with further question/answer turns about its image (other questions, random order); its
    `regions` go when turns are added, since they name what the first question counts only."""
    make = _EXTRA_TURNS.get(record.get("task"))
    if make is None or "messages" not in record:
        return record
    asked = {_question(message["content"]) for message in record["messages"]}
    extra = [(q, a) for q, a in make(record, rng) if q not in asked]
    rng.shuffle(extra)
    messages = list(record["messages"])
    for question, answer in extra[:max_extra]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    out = {**record, "messages": messages}
    if len(messages) > len(record["messages"]):
        out.pop("regions", None)
    return out


def write_multi_turn(records: list[dict], out: Path, seed: int) -> list[dict]:
    """Write the expanded records; returns them."""
    rng = random.Random(seed)
    expanded = [multi_turn(record, rng) for record in records]
    write_jsonl(expanded, out)
    return expanded


def write_jsonl(records: list[dict], out: Path) -> None:
    with out.open("w", encoding="utf-8", newline="\n") as lines:
        for record in records:
            lines.write(json.dumps(record, ensure_ascii=False) + "\n")


def grounding_scenes(records: list[dict], objects: int | None = None) -> list[dict]:
    """The grounding and grounded-caption records (of scenes of exactly `objects` shapes, if given)."""
    return [r for r in records if r.get("task") in ("grounding", "grounded_caption")
            and (objects is None or len(r.get("objects", [])) == objects)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="synthetic training JSONL (dsvl2 data synth)")
    parser.add_argument("--tokenizer-out", type=Path, help="folder for the tokenizer, processor and model config")
    parser.add_argument("--train-out", type=Path, help="multi-turn JSONL to write (next to --data: same images)")
    parser.add_argument("--model-config", type=Path, default=RECIPE_DIR / "model.json",
                        help="config.json of the model (default: model.json of this recipe)")
    parser.add_argument("--grounding-out", type=Path,
                        help="also write the multi-turn grounding and grounded-caption records here")
    parser.add_argument("--one-object-out", type=Path,
                        help="also write the multi-turn grounding records of one-shape scenes here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    outputs = [p for p in (args.train_out, args.grounding_out, args.one_object_out) if p]
    if any(p.resolve().parent != args.data.resolve().parent for p in outputs):
        parser.error("--train-out, --grounding-out and --one-object-out must be in the folder of --data: "
                     "image paths are relative to it")
    if (args.grounding_out or args.one_object_out) and not args.train_out:
        parser.error("--grounding-out and --one-object-out need --train-out (they are parts of it)")
    records = read_jsonl(args.data)
    if args.tokenizer_out:
        size = write_tokenizer_folder(records, args.tokenizer_out, args.model_config)
        print(f"wrote {args.tokenizer_out}: tokenizer of {size} tokens")
    if args.train_out:
        expanded = write_multi_turn(records, args.train_out, args.seed)
        answers = sum(sum(m["role"] == "assistant" for m in r.get("messages", [])) or 1 for r in expanded)
        print(f"wrote {args.train_out}: {len(records)} records, {answers} answers")
        if args.grounding_out:
            scenes, rng = grounding_scenes(records), random.Random(args.seed + 1)
            singles = [single for scene in scenes for single in single_turn_groundings(scene, rng)]
            write_jsonl(scenes + singles, args.grounding_out)
            print(f"wrote {args.grounding_out}: {len(scenes) + len(singles)} records")
        if args.one_object_out:
            one_object = grounding_scenes(expanded, objects=1)
            write_jsonl(one_object, args.one_object_out)
            print(f"wrote {args.one_object_out}: {len(one_object)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
