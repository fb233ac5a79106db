"""The bundled default model: complete, small, a real DeepSeek-VL2 configuration, and it works."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
import torch

from dsvl2.checkpoint import load_model
from dsvl2.config import load_model_config, load_processor_config, model_config_from_dict
from dsvl2.defaults import default_model_dir
from dsvl2.eval.metrics import box_iou, parse_det_boxes
from dsvl2.tokenizer import Tokenizer
from dsvl2.train.synthetic import generate_dataset
from tests.conformance_data import REPO

RECIPE = REPO / "recipes" / "default"
SPECIAL_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>", "<|ref|>",
                  "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>")
# Training images come from the train split; the test split has its own random streams.
FRESH_SEED = 31337


def _load_recipe_script(name: str):
    spec = importlib.util.spec_from_file_location(f"default_recipe_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_files_are_complete_and_small():
    model_dir = default_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "processor_config.json"):
        assert (model_dir / name).is_file(), name
    assert (model_dir / "model.safetensors").stat().st_size < 40 * 1024 * 1024


def test_config_is_a_small_deepseek_vl2_with_mla_and_moe():
    cfg = load_model_config(default_model_dir())
    language = cfg.language
    assert language.use_mla and language.kv_lora_rank
    assert language.n_routed_experts >= 8 and language.num_experts_per_tok == 2
    assert language.n_shared_experts >= 1
    assert language.first_k_dense_replace == 1
    assert not language.is_moe_layer(0) and all(language.is_moe_layer(i) for i in range(1, language.num_hidden_layers))
    assert cfg.projector.projector_type == "downsample_mlp_gelu" and cfg.projector.downsample_ratio == 2
    for width, height in cfg.candidate_resolutions:
        assert width % cfg.vision.image_size == 0 and height % cfg.vision.image_size == 0


def test_shipped_config_is_the_recipe_config():
    shipped = load_model_config(default_model_dir())
    recipe = model_config_from_dict(json.loads((RECIPE / "model.json").read_text()))
    assert shipped == recipe


def test_shipped_processor_config_is_the_recipes_and_asks_the_question_first():
    shipped = json.loads((default_model_dir() / "processor_config.json").read_text())
    recipe = _load_recipe_script("prepare").processor_config(json.loads((RECIPE / "model.json").read_text()))
    assert shipped == recipe
    assert load_processor_config(default_model_dir()).image_tag_position == "after"  # as the synthetic records


def test_tokenizer_has_every_special_token_and_single_digits():
    model_dir = default_model_dir()
    tokenizer = Tokenizer.from_dir(model_dir)
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids)
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token) == [token_id]
    language = load_model_config(model_dir).language
    assert (tokenizer.bos_id, tokenizer.eos_id) == (language.bos_token_id, language.eos_token_id)
    assert tokenizer.vocab_size <= language.vocab_size
    digits = tokenizer.encode("[[120, 7, 999, 45]]")
    assert sum(tokenizer.decode([i]).isdigit() for i in digits) == 9  # one token per digit
    text = "<|ref|>the red circle<|/ref|><|det|>[[1, 22, 333, 999]]<|/det|> Ünïcode ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == SPECIAL_TOKENS[0] and config["eos_token"] == SPECIAL_TOKENS[1]
    assert {v["content"] for v in config["added_tokens_decoder"].values()} >= set(SPECIAL_TOKENS)


def test_loads_strictly_and_is_small():
    model = load_model(default_model_dir())  # strict: every tensor named and shaped as the config says
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000


def _fresh_grounding_ious(folder: Path, lone: bool) -> list[float]:
    """IoU of the default model's box on 12 fresh grounding scenes of one shape (lone) or of several."""
    from dsvl2.engine.generate import Engine, Request
    from dsvl2.engine.sampling import SamplingParams

    generate_dataset(folder, 100, seed=FRESH_SEED, split="test", tasks=["grounding"])
    records = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    records = [r for r in records if (len(r["objects"]) == 1) == lone][:12]
    engine = Engine.from_pretrained(default_model_dir(), max_batch=len(records))
    requests = [Request(r["messages"][:1], [folder / r["images"][0]], SamplingParams(max_new_tokens=40))
                for r in records]
    ious = []
    for record, completion in zip(records, engine.generate_batch(requests), strict=True):
        assert completion.text.startswith(f"<|ref|>{record['expression']}<|/ref|><|det|>"), completion.text
        boxes = parse_det_boxes(completion.text)
        ious.append(box_iou(boxes[0], record["box"]) if boxes else 0.0)
    return ious


def test_grounds_a_lone_shape_in_fresh_images(tmp_path):
    ious = _fresh_grounding_ious(tmp_path, lone=True)
    assert len(ious) == 12 and sum(iou >= 0.5 for iou in ious) >= 9, ious


def test_grounds_the_named_shape_among_several(tmp_path):
    ious = _fresh_grounding_ious(tmp_path, lone=False)
    assert len(ious) == 12 and sum(iou >= 0.5 for iou in ious) >= 9, ious


# ------------------------------------------------------------------------------------------ the recipe


def test_recipe_multi_turn_answers_follow_the_metadata(tmp_path):
    prepare = _load_recipe_script("prepare")
    generate_dataset(tmp_path, 24, seed=5, split="train", tasks=["grounding", "counting", "chart", "ocr"])
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    extra_turns = 0
    for record in records:
        expanded = prepare.multi_turn(record, rng)
        messages = expanded["messages"]
        assert messages[:2] == record["messages"]  # the evaluation-format turn comes first, unchanged
        assert messages[0]["content"].endswith("\n<image>")  # question first
        assert all("<image>" not in m["content"] for m in messages[1:])
        pairs = list(zip(messages[2::2], messages[3::2], strict=True))
        extra_turns += len(pairs)
        # regions name what the first question counts: kept on a single turn, dropped with more
        assert ("regions" in expanded) == ("regions" in record and not pairs)
        for question, answer in pairs:
            _check_answer(record, question["content"], answer["content"])
            # a later question cannot be seen by the image tokens: no choosing among shapes there
            assert "<|ref|>" not in question["content"] or len(record["objects"]) == 1
    assert extra_turns > len(records)


def _check_answer(record: dict, question: str, answer: str) -> None:
    objects = record.get("objects", [])
    if match := re.fullmatch(r"<\|ref\|>(.+)<\|/ref\|>\.", question):
        words = match.group(1).removeprefix("the ").split()
        matching = [o for o in objects if all(w in (o["color"], o["shape"], "shape") for w in words)]
        assert len(matching) == 1, question
        assert parse_det_boxes(answer) == [matching[0]["box"]]
    elif match := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        assert int(answer) == sum(o["color"] == match.group(1) for o in objects)
    elif question == "How many shapes are there?":
        assert int(answer) == len(objects)
    elif match := re.fullmatch(r"How many (\w+)s are there\?", question):
        assert int(answer) == sum(o["shape"] == match.group(1) for o in objects)
    elif match := re.fullmatch(r"What is the value of bar (.+)\?", question):
        assert {b["label"]: str(b["value"]) for b in record["bars"]}[match.group(1)] == answer
    elif question.startswith("Which bar has the"):
        values = {b["label"]: b["value"] for b in record["bars"]}
        pick = max if "highest" in question else min
        assert values[answer] == pick(values.values())
    else:
        pytest.fail(f"unexpected question {question!r}")


def test_recipe_grounding_file_is_single_turn_with_every_shape_asked(tmp_path):
    """prepare.py's grounding file holds the grounding and grounded-caption records as generated, then one
    single-turn record, question first, per other shape of a scene of several; --one-object-out holds the
    multi-turn records of one-shape scenes, as written in the multi-turn file."""
    prepare = _load_recipe_script("prepare")
    generate_dataset(tmp_path, 60, seed=2, split="train",
                     tasks=["grounding", "grounded_caption", "counting", "ocr"])
    out = {name: tmp_path / f"{name}.jsonl" for name in ("all", "grounding", "one")}
    assert prepare.main(["--data", str(tmp_path / "train.jsonl"), "--train-out", str(out["all"]),
                         "--grounding-out", str(out["grounding"]), "--one-object-out", str(out["one"])]) == 0
    read = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in out.items()}
    generated = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    scenes = [r for r in generated if r["task"] in ("grounding", "grounded_caption")]
    assert read["grounding"][:len(scenes)] == scenes
    singles = read["grounding"][len(scenes):]
    several = [r for r in scenes if len(r["objects"]) > 1]
    # every shape but (at most) the one the record's own question names
    assert sum(len(r["objects"]) - 1 for r in several) <= len(singles) <= sum(len(r["objects"]) for r in several)
    for single in singles:
        assert len(single["messages"]) == 2
        question, answer = (m["content"] for m in single["messages"])
        assert question.endswith("\n<image>")
        _check_answer(single, question.removesuffix("\n<image>"), answer)
        assert parse_det_boxes(answer) == [single["objects"][single["target"]]["box"]]
    multi_turn_scenes = [r for r in read["all"] if r["task"] in ("grounding", "grounded_caption")]
    assert read["one"] == [r for r in multi_turn_scenes if len(r["objects"]) == 1] and read["one"]
    with pytest.raises(SystemExit):
        prepare.main(["--data", str(tmp_path / "train.jsonl"), "--one-object-out", str(out["one"])])


def test_recipe_stages_chain_from_vision_to_sft():
    """Each stage of the committed recipe starts from the last checkpoint the stage before writes, the
    language-model stages keep the tower and projector that stage vision trained, scaled once."""
    from dsvl2.train.recipe import load_recipe

    names = ("vision", "align", "warmup", "pretrain", "sft")
    stages = [load_recipe(RECIPE / f"{name}.yaml") for name in names]
    assert [s.stage for s in stages] == ["vision", "align", "pretrain", "pretrain", "sft"]
    script = (REPO / "scripts" / "train_default_model.sh").read_text()
    assert f"for stage in {' '.join(names)}; do" in script
    assert stages[0].model.checkpoint is None and stages[0].model.config is not None
    for before, after in zip(stages, stages[1:], strict=False):
        expected = Path(before.output.dir) / f"checkpoint-{before.training.steps:07d}"
        assert Path(after.model.checkpoint).resolve() == expected.resolve(), after.stage
    for stage in stages[2:]:
        assert set(stage.training.freeze) == {"vision", "projector"}
    # the image tokens are brought to the text's scale once, where the language model starts to learn
    scales = [[p.options["rms"] for p in s.extensions if p.use.endswith(":TokenScale")] for s in stages]
    assert scales == [[], [], [0.5], [], []]
    # stage vision is the recipe's own trainer; the later stages add the recipe's losses in a fixed order
    assert stages[0].trainer.use == "default_recipe.vision_stage:VisionStage"
    assert [s.trainer for s in stages[1:]] == [None] * 4
    losses = ["default_recipe.box_attention:BoxAttention", "default_recipe.token_relevance:TokenRelevance"]
    assert [[p.use for p in s.extensions] for s in stages[3:]] == [losses, losses]


def test_recipe_pretraining_and_sft_hold_follow_up_conversations():
    """Follow-up questions (issue 44): the language-model stages after the warm-up draw a share of their
    samples from conversations of 2-3 turns about one scene, which the script generates."""
    from dsvl2.train.recipe import load_recipe

    chat = (REPO / "runs" / "default" / "data_chat" / "train.jsonl").resolve()
    for name in ("pretrain", "sft"):
        sources = {s.name: s for s in load_recipe(RECIPE / f"{name}.yaml").data.sources}
        assert [Path(p).resolve() for p in sources["chat"].paths] == [chat], name
        assert 0.1 <= sources["chat"].weight / sum(s.weight for s in sources.values()) <= 0.3, name
    settings = dict(re.findall(r"^([A-Z_]+)=(\S+)", (RECIPE / "data.env").read_text(), re.MULTILINE))
    assert settings["CHAT_TURNS"] == "2-3" and int(settings["N_TRAIN_CHAT"]) > 0
    assert set(settings["CHAT_TASKS"].split(",")) == {"grounding", "counting", "caption", "grounded_caption"}
    script = (REPO / "scripts" / "train_default_model.sh").read_text()
    assert '--out "$RUN/data_chat"' in script and '--turns "$CHAT_TURNS"' in script
    # the installed report is the held-out seed no recipe choice was made on
    assert settings["REPORT_SEED"] != settings["EVAL_SEED"]
    assert 'cp "$RUN/eval_report_test.json" "$ASSETS/eval_report.json"' in script


def test_vision_probe_reads_the_stage_heads_slots_and_bins():
    probe = _load_recipe_script("vision_probe")
    from default_recipe.vision_labels import BOX_BINS, scene_labels

    bins = torch.zeros(4, BOX_BINS)
    bins[0, 0] = bins[1, 3] = bins[2, 10] = bins[3, BOX_BINS - 1] = 1.0
    step = 1000 / BOX_BINS
    assert probe.box_from_bins(bins) == [0.5 * step, 3.5 * step, 10.5 * step, (BOX_BINS - 0.5) * step]
    objects = [{"color": "red", "shape": "circle", "box": [0, 0, 100, 100]},
               {"color": "red", "shape": "square", "box": [200, 0, 300, 100]},
               {"color": "blue", "shape": "circle", "box": [400, 0, 500, 100]}]
    counts = scene_labels(objects, 1, 1).counts[0]
    assert [int(counts[probe.count_slot(q)]) for q in ({"color": "red"}, {"shape": "circle"}, {"shape": "square"},
                                                       {"color": "green"}, {})] == [2, 2, 1, 0, 3]
    assert probe.named_box("<|ref|>the red circle<|/ref|><|det|>[[0, 5, 100, 120]]<|/det|>") == [0, 5, 100, 120]
    report = probe.summarise([(1, 0.7), (1, 0.2), (2, 0.9)], [(2, 1), (2, 2), (0, 0)])
    assert report["grounding"]["1"] == pytest.approx({"n": 2, "accuracy": 0.5, "iou": 0.45})
    assert report["grounding"]["all"] == pytest.approx({"n": 3, "accuracy": 2 / 3, "iou": 0.6})
    assert report["counting"]["2"] == {"n": 2, "accuracy": 0.5, "named": {"1": 1, "2": 1}}


def test_selection_breakdown_tells_reading_from_choosing():
    selection = _load_recipe_script("selection")
    objects = [{"box": [0, 0, 100, 100]}, {"box": [500, 500, 700, 700]}]
    assert selection.landing([0, 0, 100, 110], objects) == 0
    assert selection.landing([480, 500, 700, 690], objects) == 1
    assert selection.landing([200, 200, 300, 300], objects) is None and selection.landing(None, objects) is None
    table = selection.breakdown([(1, 0, 0), (2, 1, 1), (2, 1, 0), (2, 0, None)])
    assert table["1"] == {"n": 1, "accuracy": 1.0, "reading": 1.0, "selection": 1.0, "chance_selection": 1.0}
    assert table["2"] == pytest.approx({"n": 3, "accuracy": 1 / 3, "reading": 2 / 3, "selection": 0.5,
                                        "chance_selection": 0.5})
    assert table["all"]["n"] == 4 and table["all"]["selection"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("uses_words", [True, False])
def test_selection_measures_whether_the_words_choose_the_shape(tmp_path, uses_words):
    # A stand-in model that reads the scene from the generator's own records: it boxes the shape the
    # question names, or, ignoring the words, always the first shape.
    selection = _load_recipe_script("selection")
    generate_dataset(tmp_path, 12, seed=FRESH_SEED, split="test", tasks=["grounding"])
    records = selection.grounding_records(tmp_path / "test.jsonl")
    scenes = {str(tmp_path / r["images"][0]): r["objects"] for r in records}

    def ask(image, question):
        objects = scenes[str(image)]
        named = [o for o in objects if re.search(rf"\b{o['color']}\b|\b{o['shape']}\b", question)] or objects
        exact = [o for o in named if o["color"] in question and o["shape"] in question] or named
        obj = exact[0] if uses_words else objects[0]
        return f"<|ref|>x<|/ref|><|det|>[{obj['box']}]<|/det|>"

    result = selection.measure(ask, records, tmp_path, scenes=5)
    several = sum(len(r["objects"]) > 1 for r in records)
    dependence = result["query_dependence"]
    assert dependence["scenes"] == min(5, several) > 0
    assert result["by_shapes"]["all"]["reading"] == 1.0
    if uses_words:
        assert dependence["accuracy"] == 1.0 and dependence["same_shape_for_every_query"] == 0.0
        assert result["by_shapes"]["all"]["accuracy"] == 1.0
    else:
        assert dependence["same_shape_for_every_query"] == 1.0 and dependence["accuracy"] < 1.0
        assert result["by_shapes"]["all"]["selection"] < 1.0
