"""Per-key limits on generation requests: how many may run at once and how many may start in a minute,
so that one client cannot fill the queue that every other client waits in."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass(frozen=True)
class KeyLimits:
    max_concurrent: int | None = None  # None: no limit
    per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    @property
    def active(self) -> bool:
        return self.max_concurrent is not None or self.per_minute is not None


class LimitExceeded(Exception):
    """A key is over one of its limits; `retry_after` is the whole seconds until it may try again."""

    def __init__(self, limit: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class KeyLimiter:
    """Counts each key's running requests and the starts of its last minute (a sliding window)."""

    def __init__(self, limits: KeyLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[str, int] = defaultdict(int)
        self._starts: dict[str, deque[float]] = defaultdict(deque)

    def acquire(self, key: str) -> None:
        """Count a request of `key` as started, or raise LimitExceeded (nothing counted then)."""
        now = self._clock()
        with self._lock:
            running, starts = self._running[key], self._starts[key]
            while starts and starts[0] <= now - WINDOW_S:
                starts.popleft()
            if self.limits.max_concurrent is not None and running >= self.limits.max_concurrent:
                raise LimitExceeded("concurrent", f"this API key already has {running} requests running "
                                    f"(limit {self.limits.max_concurrent})", 1)
            if self.limits.per_minute is not None and len(starts) >= self.limits.per_minute:
                wait = max(1, math.ceil(starts[0] + WINDOW_S - now))
                raise LimitExceeded("per_minute", f"this API key made {len(starts)} requests in the last minute "
                                    f"(limit {self.limits.per_minute})", wait)
            self._running[key] = running + 1
            if self.limits.per_minute is not None:
                starts.append(now)

    def release(self, key: str) -> None:
        with self._lock:
            self._running[key] -= 1
