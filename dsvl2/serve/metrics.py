"""Server metrics in the Prometheus text exposition format (no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

# Time to first token spans a tiny CPU model (milliseconds) to a large one under load (tens of seconds).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.count += 1


def _labels(**labels: str) -> str:
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class ServerMetrics:
    """Counters updated from the event loop and the engine thread; `render` takes a consistent snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.responses: Counter[tuple[str, str]] = Counter()  # (path, status) -> count
        self.finishes: Counter[str] = Counter()  # finish reason -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.engine_errors = 0
        self.ttft = Histogram(TTFT_BUCKETS)

    def count_response(self, path: str, status: int) -> None:
        with self._lock:
            self.responses[(path, str(status))] += 1

    def count_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.finishes[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def count_engine_error(self) -> None:
        with self._lock:
            self.engine_errors += 1

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def render(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> str:
        """Prometheus text; `gauges` maps a metric name to (help, reader) for live values."""
        lines: list[str] = []

        def header(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            header("dsvl2_requests_total", "counter", "HTTP responses by path and status code.")
            for (path, status), count in sorted(self.responses.items()):
                lines.append(f"dsvl2_requests_total{_labels(path=path, status=status)} {count}")
            header("dsvl2_request_finish_total", "counter", "Generations by finish reason.")
            for reason, count in sorted(self.finishes.items()):
                lines.append(f"dsvl2_request_finish_total{_labels(reason=reason)} {count}")
            header("dsvl2_prompt_tokens_total", "counter", "Prompt tokens of finished requests, image tokens included.")
            lines.append(f"dsvl2_prompt_tokens_total {self.prompt_tokens}")
            header("dsvl2_completion_tokens_total", "counter", "Generated tokens of finished requests.")
            lines.append(f"dsvl2_completion_tokens_total {self.completion_tokens}")
            header("dsvl2_engine_step_errors_total", "counter", "Engine steps that raised (their requests failed).")
            lines.append(f"dsvl2_engine_step_errors_total {self.engine_errors}")
            header("dsvl2_time_to_first_token_seconds", "histogram",
                   "Seconds from accepting a request to its first generated token.")
            for bound, count in zip(self.ttft.buckets, self.ttft.counts, strict=True):
                lines.append(f"dsvl2_time_to_first_token_seconds_bucket{_labels(le=repr(bound))} {count}")
            lines.append(f'dsvl2_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft.count}')
            lines.append(f"dsvl2_time_to_first_token_seconds_sum {_number(self.ttft.total)}")
            lines.append(f"dsvl2_time_to_first_token_seconds_count {self.ttft.count}")
        for name, (help_text, read) in gauges.items():
            header(name, "gauge", help_text)
            lines.append(f"{name} {_number(read())}")
        return "\n".join(lines) + "\n"
