"""Start a server on a free loopback port, in a thread or a child process (tests and benchmarks)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout: float = 5.0, context: ssl.SSLContext | None = None,
             key: str | None = None) -> tuple[int, dict]:
    """Status and JSON body of a GET (error statuses included); `context` for HTTPS, `key` sent as a bearer key."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout,
                                    context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _healthy(base_url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        status, body = get_json(base_url + "/health", timeout=2.0, context=context)
    except (OSError, ValueError):
        return False
    return status == 200 and body.get("status") == "ok"


class ThreadedServer:
    """uvicorn serving `app` in a background thread of this process."""

    def __init__(self, app, host: str = LOOPBACK, port: int | None = None, log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level, access_log=False,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dsvl2-uvicorn", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.base_url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


class ServerProcess:
    """`python -m dsvl2.serve` in a child process; ready once /health answers ok. With `ssl_context` (one
    that trusts the server's certificate, whose options `extra_args` gives) it is reached over HTTPS."""

    def __init__(self, model_dir: str | Path, extra_args: list[str] | None = None, host: str = LOOPBACK,
                 env: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.model_dir = Path(model_dir)
        self.extra_args = list(extra_args or [])
        self.host = host
        self.env = env
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="dsvl2-serve-", suffix=".log", delete=False)

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, limit: int = 4000) -> str:
        return Path(self._log.name).read_text(errors="replace")[-limit:]

    def _spawn(self) -> None:
        self.port = free_port(self.host)
        command = [sys.executable, "-m", "dsvl2.serve", "--model", str(self.model_dir), "--host", self.host,
                   "--port", str(self.port), "--log-level", "warning", *self.extra_args]
        env = {**os.environ, **(self.env or {})}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def start(self, timeout: float = 120.0, attempts: int = 3) -> ServerProcess:
        for _ in range(attempts):  # the free port can be taken between probing and binding it
            self._spawn()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if _healthy(self.base_url, self.ssl_context):
                    return self
                time.sleep(0.1)
            else:
                self.stop()
                raise RuntimeError(f"the server did not become healthy in {timeout} s:\n{self.log_tail()}")
            if "address already in use" not in self.log_tail().lower():
                break
        raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)
