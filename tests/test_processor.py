"""Processor against the official reference outputs in the conformance directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dsvl2.config import ConfigError, ProcessorConfig, load_json, processor_config_from_dict
from dsvl2.errors import ImageCountError, InputError, PromptTooLongError
from dsvl2.images import load_image
from dsvl2.processor import Processor, with_image_tags
from dsvl2.tokenizer import Tokenizer
from tests.conformance_data import conformance_dir

CONFORMANCE = conformance_dir()
VARIANTS = ("tiny_like", "small_like", "base_like")
CASES = (
    json.loads((CONFORMANCE / "processor_cases.json").read_text())
    if (CONFORMANCE / "processor_cases.json").exists()
    else {}
)
needs_conformance = pytest.mark.skipif(
    not CONFORMANCE.is_dir(), reason=f"conformance directory {CONFORMANCE} is absent"
)
IMAGE_ID = 902  # "<image>" in the fixture tokenizer_config.json added_tokens_decoder


def image_path(name: str) -> Path:
    return CONFORMANCE / "images" / f"{name}.png"


def case_images(conversation: list[dict]) -> list[Path]:
    return [image_path(name) for message in conversation for name in message.get("images", [])]


@pytest.fixture(scope="module")
def processor() -> Processor:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"conformance directory {CONFORMANCE} is absent")
    return Processor.from_pretrained(CONFORMANCE / "tiny_like")


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(CONFORMANCE / "processor.safetensors")


@needs_conformance
@pytest.mark.parametrize("name", sorted(CASES))
def test_case_tokens_match_official(processor: Processor, reference: dict, name: str) -> None:
    case = CASES[name]
    conversation = case["conversation"]
    sample = processor.encode(conversation, case_images(conversation))

    assert processor.format_prompt(conversation) == case["sft_format"]
    assert torch.equal(sample.input_ids, reference[f"{name}.input_ids"])
    assert torch.equal(sample.images_seq_mask, reference[f"{name}.images_seq_mask"].bool())
    assert torch.equal(sample.images_spatial_crop, reference[f"{name}.images_spatial_crop"])
    assert sample.num_image_tokens == case["num_image_tokens"]
    assert int(sample.images_seq_mask.sum()) == sum(case["num_image_tokens"])
    assert (sample.labels[sample.images_seq_mask] == -100).all()


@needs_conformance
@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c["num_image_tokens"]))
def test_case_tiles_match_official_exactly(processor: Processor, reference: dict, name: str) -> None:
    case = CASES[name]
    conversation = case["conversation"]
    paths = case_images(conversation)
    expected = reference[case["tiles"]]  # uint8 [n_tiles, 3, 384, 384]

    cropping = len(paths) <= 2
    tiled = [processor.tile_image(load_image(path), cropping=cropping) for path in paths]
    tiles = torch.cat([t.tiles for t in tiled])
    assert tiles.dtype == torch.uint8
    assert tiles.shape == expected.shape
    assert int((tiles.int() - expected.int()).abs().max()) == 0
    # The fixture names each tile set by the sha256 of its uint8 bytes.
    assert hashlib.sha256(tiles.numpy().tobytes()).hexdigest()[:16] == case["tiles"].removeprefix("tiles.")

    sample = processor.encode(conversation, paths)
    assert torch.equal(sample.pixel_values, (expected.float() / 255 - 0.5) / 0.5)
    assert sample.image_digests == [hashlib.sha256(t.tiles.numpy().tobytes()).hexdigest() for t in tiled]


@needs_conformance
def test_text_only_sample_has_no_tiles_and_official_crop_row(processor: Processor) -> None:
    sample = processor.encode(CASES["text_only"]["conversation"])
    assert sample.pixel_values.shape == (0, 3, 384, 384)
    assert sample.images_spatial_crop.tolist() == [[0, 0]]
    assert sample.num_image_tokens == [] and sample.image_digests == []


@needs_conformance
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_labels_match_official(variant: str) -> None:
    processor = Processor.from_pretrained(CONFORMANCE / variant)
    loss_case = load_json(CONFORMANCE / variant / "cases.json")["_loss"]
    sample = processor.encode(loss_case["conversation"], [image_path(n) for n in loss_case["images"]],
                              inference=False)
    assert sample.input_ids.tolist() == loss_case["input_ids"]
    assert sample.labels.tolist() == loss_case["labels"]


@needs_conformance
def test_mask_prompt_false_keeps_prompt_and_masks_only_image_tokens() -> None:
    released = CONFORMANCE.parent / "released_configs" / "deepseek-vl2-tiny.processor_config.json"
    raw = load_json(released) if released.exists() else {}
    config = processor_config_from_dict(raw) if raw else ProcessorConfig(mask_prompt=False)
    assert config.mask_prompt is False
    config = dataclasses.replace(config, candidate_resolutions=load_processor_candidates())
    processor = Processor(config, Tokenizer.from_dir(CONFORMANCE / "tokenizer"))
    loss_case = load_json(CONFORMANCE / "tiny_like" / "cases.json")["_loss"]
    sample = processor.encode(loss_case["conversation"], [image_path(n) for n in loss_case["images"]],
                              inference=False)

    assert sample.input_ids.tolist() == loss_case["input_ids"]
    expected = [-100 if token == IMAGE_ID else token for token in loss_case["input_ids"]]
    assert sample.labels.tolist() == expected
    assert (sample.labels == -100).sum() == (torch.tensor(loss_case["input_ids"]) == IMAGE_ID).sum()


def load_processor_candidates() -> tuple[tuple[int, int], ...]:
    raw = load_json(CONFORMANCE / "tokenizer" / "processor_config.json")
    return tuple((int(w), int(h)) for w, h in raw["candidate_resolutions"])


BATCH_PROMPTS = (
    ("<image>\nDescribe this image.", ["square"]),
    ("Hello, who are you?", []),
    ("<image>\nRead the text in the image, please.", ["wide"]),
)


@needs_conformance
@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_matches_official(variant: str) -> None:
    processor = Processor.from_pretrained(CONFORMANCE / variant)
    expected = load_file(CONFORMANCE / variant / "batch.safetensors")
    samples = [
        processor.encode([{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}],
                         [image_path(n) for n in names])
        for text, names in BATCH_PROMPTS
    ]
    batch = processor.batch(samples)

    assert torch.equal(batch.input_ids, expected["batch.input_ids"])
    assert torch.equal(batch.attention_mask, expected["batch.attention_mask"])
    assert torch.equal(batch.images_seq_mask, expected["batch.images_seq_mask"].bool())
    assert torch.equal(batch.images_spatial_crop, expected["batch.images_spatial_crop"])
    # One global + three local tiles for the wide image; the text-only row holds a zero placeholder.
    assert batch.images.shape == (3, 4, 3, 384, 384)
    assert torch.equal(batch.images[0, :2], samples[0].pixel_values)
    assert not batch.images[0, 2:].any() and not batch.images[1].any()
    padding = batch.attention_mask == 0
    assert (batch.labels[padding] == -100).all()
    assert (batch.input_ids[padding] == processor.pad_id).all()


@needs_conformance
def test_right_padding_for_training(processor: Processor) -> None:
    short = processor.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                             inference=False)
    long = processor.encode([{"role": "user", "content": "Hello there, friend"},
                             {"role": "assistant", "content": "Hello"}], inference=False)
    batch = processor.batch([short, long], padding="right")
    assert torch.equal(batch.input_ids[0, : len(short)], short.input_ids)
    assert batch.attention_mask[0].tolist() == [1] * len(short) + [0] * (len(long) - len(short))


@needs_conformance
def test_role_aliases_and_missing_generation_turn_give_official_ids(processor: Processor, reference: dict
                                                                   ) -> None:
    official = CASES["multi_turn"]["conversation"]
    plain_roles = {"<|User|>": "user", "<|Assistant|>": "assistant"}
    # The official conversation without its trailing empty assistant message.
    aliased = [{"role": plain_roles[m["role"]], "content": m["content"]} for m in official[:-1]]
    sample = processor.encode(aliased, [image_path("photo")])
    assert torch.equal(sample.input_ids, reference["multi_turn.input_ids"])
    assert processor.format_prompt(aliased) == CASES["multi_turn"]["sft_format"]


@needs_conformance
def test_images_taken_from_messages_when_not_given(processor: Processor, reference: dict) -> None:
    conversation = [
        {"role": "user", "content": "<image>\nDescribe this image.", "images": [image_path("square")]}
    ]
    sample = processor.encode(conversation)
    assert torch.equal(sample.input_ids, reference["one_square.input_ids"])


@needs_conformance
def test_identical_images_share_a_digest(processor: Processor) -> None:
    conversation = [{"role": "user", "content": "<image> <image> <image>"}]
    sample = processor.encode(conversation, [image_path("square"), image_path("tiny"), image_path("square")])
    first, second, third = sample.image_digests
    assert first == third and first != second


@needs_conformance
@pytest.mark.parametrize(("tags", "given"), [(2, 1), (1, 3), (0, 2)])
def test_image_count_mismatch_names_both_numbers(processor: Processor, tags: int, given: int) -> None:
    conversation = [{"role": "user", "content": "Look: " + "<image> " * tags}]
    with pytest.raises(ImageCountError) as error:
        processor.encode(conversation, [image_path("tiny")] * given)
    message = str(error.value)
    assert f"{tags} <image>" in message and f"{given} image" in message


@needs_conformance
def test_prompt_too_long_names_length_and_limit(processor: Processor) -> None:
    assert processor.context_length == 4096  # language_config.max_position_embeddings of tiny_like
    conversation = [{"role": "user", "content": "<image>"}]
    sample = processor.encode(conversation, [image_path("tiny")])
    with pytest.raises(PromptTooLongError) as error:
        processor.encode(conversation, [image_path("tiny")], max_length=len(sample) - 1)
    assert str(len(sample)) in str(error.value) and str(len(sample) - 1) in str(error.value)


@needs_conformance
def test_context_length_from_config_is_enforced(processor: Processor) -> None:
    small = Processor(processor.config, processor.tokenizer, context_length=20)
    small.encode([{"role": "user", "content": "short"}])
    with pytest.raises(PromptTooLongError, match="over the limit of 20"):
        small.encode([{"role": "user", "content": "word " * 50}])


@needs_conformance
@pytest.mark.parametrize(
    "conversation",
    [
        [],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "system", "content": "late system"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}],
        [{"role": "user", "content": 42}],
        "just a string",
    ],
)
def test_malformed_conversations_raise_input_error(processor: Processor, conversation) -> None:
    with pytest.raises(InputError):
        processor.encode(conversation)


@needs_conformance
def test_inference_prompt_ends_with_assistant_colon(processor: Processor) -> None:
    sample = processor.encode([{"role": "user", "content": "Hi"}])
    assistant_colon = processor.tokenizer.encode("<|Assistant|>:")
    assert sample.input_ids[-2:].tolist() == assistant_colon
    training = processor.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                inference=False)
    assert training.input_ids[-1] == processor.tokenizer.eos_id


@needs_conformance
def test_tile_size_224_config() -> None:
    config = ProcessorConfig(image_size=224, patch_size=14, downsample_ratio=2,
                             candidate_resolutions=((224, 224), (448, 224), (224, 448), (448, 448)))
    processor = Processor(config, Tokenizer.from_dir(CONFORMANCE / "tokenizer"))
    assert processor.tokens_per_side == 8  # 224 / 14 = 16 patches, pixel-shuffled 2x2 -> 8
    sample = processor.encode([{"role": "user", "content": "<image>"}], [Image.new("RGB", (400, 200), "red")])
    assert sample.images_spatial_crop.tolist() == [[2, 1]]
    assert sample.pixel_values.shape == (3, 3, 224, 224)
    # 8 rows of (8 + newline) global, 1 separator, 8 rows of (2 * 8 + newline) local
    assert int(sample.images_seq_mask.sum()) == 8 * 9 + 1 + 8 * 17 == sample.num_image_tokens[0]


@needs_conformance
def test_per_channel_mean_and_std_normalise_and_fill(processor: Processor) -> None:
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    config = dataclasses.replace(processor.config, image_mean=mean, image_std=std)
    clip_like = Processor(config, processor.tokenizer)
    assert clip_like.fill_color == (122, 116, 104)  # int(mean * 255) per channel, as the official pad colour
    tiles = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    channel_mean, channel_std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (tiles.float() / 255 - channel_mean) / channel_std
    assert torch.equal(clip_like.normalize(tiles), expected)


def test_image_tags_go_before_or_after_the_text() -> None:
    assert with_image_tags("Describe.", 1) == "<image>\nDescribe."
    assert with_image_tags("Compare.", 3) == "<image>\n<image>\n<image>\nCompare."
    assert with_image_tags("Compare.", 2, "after") == "Compare.\n<image>\n<image>"
    assert with_image_tags("A <image> B", 1, "after") == "A <image> B"  # the text places its own
    assert with_image_tags("No image.", 0, "after") == "No image."
    with pytest.raises(InputError, match="'middle'"):
        with_image_tags("Describe.", 1, "middle")


def test_image_tag_position_is_read_and_checked() -> None:
    assert processor_config_from_dict({}).image_tag_position == "before"
    assert processor_config_from_dict({"image_tag_position": "after"}).image_tag_position == "after"
    with pytest.raises(ConfigError, match="image_tag_position is 'middle'"):
        processor_config_from_dict({"image_tag_position": "middle"})
