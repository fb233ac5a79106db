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


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def check_key(key: str, where: str) -> None:
    """A key travels in an HTTP header: printable ASCII without spaces."""
    if not all("!" <= character <= "~" for character in key):
        raise InputError(f"{where} has a space or a character other than printable ASCII; "
                         "a key is one word of printable ASCII")


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
        check_key(key, f"key {number} of the API key file {path}")
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
        self._digests: dict[bytes, str] = {}  # SHA-256 of each key -> its short hash
        self._load()

    def _load(self) -> None:
        from_file = read_key_file(self.key_file) if self.key_file is not None else []
        digests = {_digest(key): key_hash(key) for key in (*self._fixed, *from_file)}
        with self._lock:
            self._digests = digests

    def reload(self) -> bool:
        """Re-read the key file; on a problem the old keys stay and the problem is logged."""
        try:
            self._load()
        except InputError as exc:
            logger.error("API keys not reloaded, the previous keys stay valid: %s", exc)
            return False
        logger.info("API keys reloaded: %d key(s)", len(self))
        return True

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, token: str | None) -> str | None:
        """The short hash of the key `token` is, or None. Digests of equal length are compared, every one
        in constant time, so the answer's timing tells nothing of which key, how much of it, or its length."""
        if token is None:
            return None
        presented = _digest(token)
        with self._lock:
            digests = self._digests
        found = None
        for digest, name in digests.items():
            if hmac.compare_digest(digest, presented):
                found = name
        return found
