"""API keys: where they come from (options, a key file re-read on SIGHUP, the environment), how a
request's `Authorization: Bearer` header is checked, and the short hash that names a key in logs and metrics."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from dsvl2.errors import InputError

logger = logging.getLogger("dsvl2.serve")

ENV_VAR = "DSVL2_API_KEY"
ANONYMOUS = "anonymous"  # the identity of requests on a server without keys


def key_hash(key: str) -> str:
    """The name of a key wherever it must be told apart from others: 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def read_key_file(path: Path) -> list[str]:
    """The keys of `path`, one a line; blank lines and lines starting with '#' are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"the API key file {path} is not UTF-8 text") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    for number, key in enumerate(keys, 1):
        if any(character.isspace() for character in key):
            raise InputError(f"the API key file {path} has a key with a space in it (key {number}): "
                             "write one key a line")
    if not keys:
        raise InputError(f"the API key file {path} holds no key (one key a line)")
    return keys


def bearer_token(header: bytes | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    if not header:
        return None
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class KeyRing:
    """The accepted keys: fixed ones (options, environment) and those of a key file, which `reload` re-reads."""

    def __init__(self, keys: Iterable[str] = (), key_file: Path | None = None) -> None:
        self._fixed = tuple(key for key in keys if key)
        self.key_file = key_file
        self._lock = threading.Lock()
        self._keys: tuple[bytes, ...] = ()
        self._load()

    def _load(self) -> None:
        from_file = read_key_file(self.key_file) if self.key_file is not None else []
        keys = tuple(dict.fromkeys(key.encode() for key in (*self._fixed, *from_file)))
        with self._lock:
            self._keys = keys

    def reload(self) -> bool:
        """Re-read the key file; on a problem the old keys stay and the problem is logged."""
        try:
            self._load()
        except InputError as exc:
            logger.error("API keys not reloaded, the previous keys stay valid: %s", exc)
            return False
        logger.info("API keys reloaded: %d key(s)", len(self._keys))
        return True

    def __len__(self) -> int:
        return len(self._keys)

    def match(self, token: str | None) -> str | None:
        """The hash of the key `token` is, or None. Every key is compared, each in constant time, so the
        answer's timing tells nothing about which key, or how much of one, was right."""
        if token is None:
            return None
        presented = token.encode()
        with self._lock:
            keys = self._keys
        found = None
        for key in keys:
            if hmac.compare_digest(key, presented):
                found = key
        return key_hash(found.decode()) if found is not None else None
