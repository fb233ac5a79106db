"""Text tokenizer: a thin wrapper over the `tokenizers` library (no `transformers`).

A checkpoint directory holds `tokenizer.json` (the byte-level BPE and its added tokens) and
`tokenizer_config.json` / `special_tokens_map.json`, which name the begin/end/pad tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _BackendTokenizer

IMAGE_TOKEN = "<image>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
ROLE_TOKENS = ("<|User|>", "<|Assistant|>")
DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"
DEFAULT_PAD = "<｜▁pad▁｜>"

_REPLACEMENT_CHAR = "\ufffd"


def _token_name(value: Any) -> str | None:
    """A special-token entry is either a plain string or an AddedToken-style dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


class Tokenizer:
    """Encodes text to ids and back; `encode` never adds begin/end-of-sentence itself."""

    def __init__(self, backend: _BackendTokenizer, bos_token: str = DEFAULT_BOS, eos_token: str = DEFAULT_EOS,
                 pad_token: str = DEFAULT_PAD, image_token: str = IMAGE_TOKEN) -> None:
        self._backend = backend
        # The official processor registers these when the tokenizer lacks them; the released
        # tokenizers already hold them all, so this only matters for a bare BPE file.
        self._ensure_special_tokens([pad_token, image_token, *GROUNDING_TOKENS, *ROLE_TOKENS])
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.image_token = pad_token, image_token
        self._bos_id = self.token_to_id(bos_token)
        self._eos_id = self.token_to_id(eos_token)
        self._pad_id = self.token_to_id(pad_token)
        self._image_id = self.token_to_id(image_token)

    @classmethod
    def from_dir(cls, path: str | Path, pad_token: str | None = None) -> Tokenizer:
        """Load `tokenizer.json` of a checkpoint directory; special-token names from its config files."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"{tokenizer_file} does not exist (a checkpoint needs tokenizer.json)")
        backend = _BackendTokenizer.from_file(str(tokenizer_file))
        names: dict[str, str] = {}
        # special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        for file_name in ("tokenizer_config.json", "special_tokens_map.json"):
            source = _read_json(path / file_name)
            for key in ("bos_token", "eos_token", "pad_token"):
                name = _token_name(source.get(key))
                if name:
                    names[key] = name
        return cls(
            backend,
            bos_token=names.get("bos_token", DEFAULT_BOS),
            eos_token=names.get("eos_token", DEFAULT_EOS),
            pad_token=pad_token or names.get("pad_token", DEFAULT_PAD),
        )

    def _ensure_special_tokens(self, tokens: list[str]) -> None:
        missing = [t for t in tokens if self._backend.token_to_id(t) is None]
        if missing:
            self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it (e.g. `<|ref|>`) become their ids."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode`'s ids and, for each, the [start, end) character span of `text` it covers."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise KeyError(f"token id {token_id} is outside the tokenizer's vocabulary ({self.vocab_size})")
        return token

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def image_id(self) -> int:
        return self._image_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (the model's may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)


_MAX_UTF8_BYTES = 4


class StreamDecoder:
    """Turns a stream of token ids into text pieces, never splitting a multi-byte character.

    A byte-level token can end in the middle of a UTF-8 character, which decodes to U+FFFD;
    such text is held back until a later token completes it, for at most three tokens: every token
    holds at least one byte and a character at most four, so text that still ends in U+FFFD
    after that is invalid output, not a character in progress. Decoding restarts from a
    recent boundary (`_prefix`) so each push costs O(tokens since the last emitted piece).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context decoded with the pending tokens
        self._read = 0  # end of the tokens whose text was already returned

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        # Decoding a context token before the new ones keeps decoders that treat the
        # first token of a string specially (leading-space stripping) from changing the text.
        emitted = self._decode(self._ids[self._prefix:self._read])
        current = self._decode(self._ids[self._prefix:])
        pending = len(self._ids) - self._read
        if len(current) <= len(emitted) or (current.endswith(_REPLACEMENT_CHAR) and pending < _MAX_UTF8_BYTES):
            return ""
        piece = current[len(emitted):]
        self._prefix, self._read = self._read, len(self._ids)
        return piece

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes to U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix:self._read])
        current = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return current[len(emitted):]
