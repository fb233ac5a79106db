"""Data of the adapter recipe: "What color is the <shape>?" about the synthetic shape scenes, answered
"The <shape> is <color>.".

The scenes and images are the synthetic generator's (`dsvl2.train.synthetic.generate_dataset`, caption task); each
record asks about a shape that appears once in its scene. The default model was never asked this: it describes a
scene in one sentence, so the adapter must learn to pick one shape's colour out. The answer names the shape again
and the colour as the captions write it (" yellow", one token of the tokenizer), not "Yellow." (three pieces, the
first shared with other colours: "B" begins both "Blue" and "Black"), so that the adapter learns the colour, not
its spelling.

    python recipes/adapter_shape_color/make_data.py            # writes data/train/ and data/test/ here
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from dsvl2.train.synthetic import generate_dataset

HERE = Path(__file__).resolve().parent
SIZES = {"train": (2000, 11), "test": (200, 12)}  # records and seed of each split


def color_records(folder: Path, split: str, rng: np.random.Generator) -> list[dict]:
    """One question per scene of `folder/<split>.jsonl` that has a shape kind appearing once."""
    records = []
    for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        scene = json.loads(line)
        kinds = Counter(obj["shape"] for obj in scene["objects"])
        unique = [obj for obj in scene["objects"] if kinds[obj["shape"]] == 1]
        if not unique:
            continue
        asked = unique[int(rng.integers(len(unique)))]
        answer = f"The {asked['shape']} is {asked['color']}."
        records.append({
            "messages": [{"role": "user", "content": f"What color is the {asked['shape']}?\n<image>"},
                         {"role": "assistant", "content": answer}],
            "images": scene["images"], "task": "vqa", "answers": [answer],
        })
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args(argv)
    for split, (count, seed) in SIZES.items():
        folder = args.out / split
        generate_dataset(folder, count, seed=seed, split="train" if split == "train" else "test", tasks=["caption"])
        source = "train" if split == "train" else "test"
        records = color_records(folder, source, np.random.default_rng(seed))
        (folder / f"{source}.jsonl").unlink()  # the captions: only the colour questions are this recipe's data
        (folder / "color.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"{split}: {len(records)} records in {folder / 'color.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
