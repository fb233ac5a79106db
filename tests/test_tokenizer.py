"""Tokenizer wrapper and streaming decoder on the conformance tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsvl2.tokenizer import Tokenizer
from tests.conformance_data import conformance_dir

CONFORMANCE = conformance_dir()
TOKENIZER_DIR = CONFORMANCE / "tokenizer"
MIXED_TEXT = "图片中的文字是什么？ café naïve Ünïcödé 😀👍🏽 日本語のテキスト ½ € ﬁ"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"conformance tokenizer {TOKENIZER_DIR} is absent")
    return Tokenizer.from_dir(TOKENIZER_DIR)


def added_tokens() -> dict[str, int]:
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    return {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}


def test_special_token_ids_follow_the_tokenizer_config(tokenizer: Tokenizer) -> None:
    ids = added_tokens()
    assert tokenizer.bos_id == ids["<｜begin▁of▁sentence｜>"]
    assert tokenizer.eos_id == ids["<｜end▁of▁sentence｜>"]
    assert tokenizer.pad_id == ids["<｜▁pad▁｜>"]
    assert tokenizer.image_id == ids["<image>"]
    for name in ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"):
        assert tokenizer.token_to_id(name) == ids[name]
    assert tokenizer.vocab_size == max(ids.values()) + 1


def test_encode_adds_no_special_tokens_and_keeps_tags_whole(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|User|>: hello <image>")
    assert ids[0] == tokenizer.token_to_id("<|User|>")
    assert ids[-1] == tokenizer.image_id
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.encode("") == []


def test_decode_round_trips_and_can_skip_special_tokens(tokenizer: Tokenizer) -> None:
    text = "<|User|>: " + MIXED_TEXT + "<｜end▁of▁sentence｜>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == ": " + MIXED_TEXT


def test_offsets_give_the_characters_of_each_token(tokenizer: Tokenizer) -> None:
    text = "<|User|>: " + MIXED_TEXT
    ids, spans = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    assert spans[0] == (0, len("<|User|>"))
    # A character of several bytes may be split over tokens, which then share its span.
    assert all(a1 <= a2 and b1 <= b2 for (a1, b1), (a2, b2) in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] == len(text)
    ascii_text = "read 4821 now"
    ids, spans = tokenizer.encode_with_offsets(ascii_text)
    assert "".join(ascii_text[a:b] for a, b in spans) == ascii_text
    assert [tokenizer.decode([i]) for i in ids] == [ascii_text[a:b] for a, b in spans]


def test_unknown_token_raises_key_error_naming_it(tokenizer: Tokenizer) -> None:
    with pytest.raises(KeyError, match="no-such-token"):
        tokenizer.token_to_id("<no-such-token>")


def test_stream_decoder_pieces_concatenate_to_decode(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MIXED_TEXT + "<|ref|>x<|/ref|>")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the text must split characters across tokens"
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 5  # it streams, rather than emitting everything at the end


def test_stream_decoder_skips_special_tokens_when_asked(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|Assistant|>: 😀 ok<｜end▁of▁sentence｜>")
    stream = tokenizer.stream_decoder(skip_special_tokens=True)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True) == ": 😀 ok"


def test_stream_decoder_flush_returns_incomplete_tail(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a😀")
    stream = tokenizer.stream_decoder()
    held = "".join(stream.push(i) for i in ids[:-1])
    assert held == "a"  # the emoji's bytes are incomplete: nothing of it is emitted yet
    assert stream.flush().startswith("\ufffd")


def test_missing_special_tokens_are_added(tmp_path: Path, tokenizer: Tokenizer) -> None:
    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|grounding|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(TOKENIZER_DIR / "tokenizer_config.json", tmp_path)
    reduced = Tokenizer.from_dir(tmp_path)
    grounding_id = reduced.token_to_id("<|grounding|>")
    assert reduced.encode("<|grounding|>") == [grounding_id]


def test_from_dir_without_tokenizer_json_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_stream_decoder_releases_invalid_bytes_instead_of_holding_them_forever() -> None:
    """A run of tokens that never forms valid UTF-8 must still stream, a few tokens late at most."""

    directory = conformance_dir() / "tokenizer"
    if not directory.exists():
        pytest.skip("conformance tokenizer not found")
    tokenizer = Tokenizer.from_dir(directory)
    lead_byte = next(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd")
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(lead_byte) for _ in range(10)]
    assert sum(1 for p in pieces if p) >= 2  # released while streaming, not only at the end
    assert "".join(pieces) + decoder.flush() == tokenizer.decode([lead_byte] * 10)
