"""`dsvl2 serve`: command-line options and the entry point (heavy imports happen only in `run`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dsvl2.cli_common import add_model_arguments, load_engine
from dsvl2.errors import InputError

if TYPE_CHECKING:
    from dsvl2.serve.auth import KeyRing

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dsvl2 serve`."""
    add_model_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to bind (default: loopback only; another address needs API keys or --no-auth)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--served-model-name", default=None,
                        help="model id clients must send (default: the model directory's name)")
    parser.add_argument("--allow-local-files", action="store_true",
                        help="accept absolute local file paths as image URLs (only for trusted clients)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--max-pending", type=int, default=64,
                        help="accepted requests (running + waiting) before answering 429")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit in MiB (413 above)")
    parser.add_argument("--max-image-pixels", type=int, default=None,
                        help="pixel limit per image (default: dsvl2.images.DEFAULT_MAX_PIXELS)")
    parser.add_argument("--max-images", type=int, default=8, help="images per request")
    parser.add_argument("--default-max-tokens", type=int, default=512,
                        help="completion length when a request sets no max_tokens")
    parser.add_argument("--preprocess-workers", type=int, default=2,
                        help="threads decoding images and tokenizing prompts (bounds their memory)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    _add_access_arguments(parser)


def _add_access_arguments(parser: argparse.ArgumentParser) -> None:
    """Who may use the server: keys, TLS, per-key limits, CORS, the access log."""
    group = parser.add_argument_group("access (serving others than this machine)")
    group.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="a key clients must send as 'Authorization: Bearer KEY' on /v1/ and /metrics "
                            "(repeatable; visible in the process list: prefer --api-key-file or $DSVL2_API_KEY)")
    group.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                       help="a file of keys, one a line ('#' starts a comment); re-read on SIGHUP")
    group.add_argument("--no-auth", action="store_true",
                       help="serve a non-loopback --host without keys (anyone reaching the port can use it)")
    group.add_argument("--ssl-certfile", type=Path, default=None, metavar="FILE",
                       help="TLS certificate (PEM): serve HTTPS")
    group.add_argument("--ssl-keyfile", type=Path, default=None, metavar="FILE",
                       help="the certificate's private key (PEM), unless the certificate file holds it")
    group.add_argument("--max-concurrent-per-key", type=int, default=None, metavar="N",
                       help="generation requests one key may have running at once (429 above; default: no limit; "
                            "without keys all clients share one count)")
    group.add_argument("--requests-per-minute-per-key", type=int, default=None, metavar="N",
                       help="generation requests one key may start in any 60 s (429 above; default: no limit)")
    group.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="an origin (https://host:port) whose pages may call the API (repeatable; default: none)")
    group.add_argument("--log-prompts", action="store_true",
                       help="write each conversation's text into the access log (images as [image])")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise SystemExit(f"error: {name} must be positive, got {value}")


def check_arguments(args: argparse.Namespace) -> None:
    from dsvl2.loading import resolve_model_dir

    try:
        args.model = resolve_model_dir(args.model)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    for name in ("max_batch", "max_len", "max_pending", "max_body_mb", "max_image_pixels", "max_images",
                 "default_max_tokens", "preprocess_workers", "max_concurrent_per_key", "requests_per_minute_per_key"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _check_adapter_names(args)
    args.key_ring = _key_ring(args)
    _check_tls(args)
    for origin in args.cors_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise SystemExit(f"error: --cors-origin {origin}: give an origin as scheme://host[:port], or *")
    if args.key_ring is not None and args.ssl_certfile is None and not is_loopback(args.host):
        print(f"warning: API keys on {args.host} over plain HTTP travel unencrypted: give --ssl-certfile, or put "
              "a TLS proxy in front", file=sys.stderr)
    if args.allow_local_files and not is_loopback(args.host):
        print(f"warning: --allow-local-files on {args.host}: any client that reaches this address can make the "
              "server read image files it has access to", file=sys.stderr)


def _check_adapter_names(args: argparse.Namespace) -> None:
    """A request names an adapter by the model field: no adapter may take the base model's name."""
    from dsvl2.cli_common import adapters_from_args

    try:
        adapters = adapters_from_args(args)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    served = args.served_model_name or args.model.resolve().name
    if served in adapters:
        raise SystemExit(f"error: the adapter {adapters[served]} would be served as {served!r}, the base model's "
                         "name: name it with --adapter NAME=DIR")


def _key_ring(args: argparse.Namespace) -> KeyRing | None:
    """The accepted keys (None: none needed); refuses to serve a non-loopback host without keys."""
    from dsvl2.serve.auth import ENV_VAR, KeyRing, check_key

    keys = [*args.api_key, os.environ.get(ENV_VAR, "").strip()]
    if args.api_key_file is None and not any(keys):
        if not is_loopback(args.host) and not args.no_auth:
            raise SystemExit(f"error: --host {args.host} is reachable from other machines and no API key is set, "
                             "so anyone who reaches the port could use the model: give keys with --api-key-file, "
                             f"--api-key or ${ENV_VAR}, or pass --no-auth to serve without keys")
        return None
    if args.no_auth:
        raise SystemExit("error: --no-auth and API keys (--api-key, --api-key-file or "
                         f"${ENV_VAR}) contradict each other: give one or the other")
    try:
        for key in args.api_key:
            check_key(key, "an --api-key")
        check_key(keys[-1], f"${ENV_VAR}")
        return KeyRing(keys, args.api_key_file)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None


def _check_tls(args: argparse.Namespace) -> None:
    if args.ssl_keyfile is not None and args.ssl_certfile is None:
        raise SystemExit("error: --ssl-keyfile needs --ssl-certfile (the certificate it belongs to)")
    for option, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if path is not None and not path.is_file():
            raise SystemExit(f"error: {option} {path}: no such file")


def build_settings(args: argparse.Namespace):
    from dsvl2.images import DEFAULT_MAX_PIXELS
    from dsvl2.serve.app import ServeSettings
    from dsvl2.serve.limits import KeyLimits

    return ServeSettings(
        served_model_name=args.served_model_name or args.model.resolve().name,
        allow_local_files=args.allow_local_files,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS,
        max_images=args.max_images,
        default_max_tokens=args.default_max_tokens,
        preprocess_workers=args.preprocess_workers,
        api_keys=args.key_ring,
        key_limits=KeyLimits(args.max_concurrent_per_key, args.requests_per_minute_per_key),
        cors_origins=tuple(args.cors_origin),
        log_prompts=args.log_prompts,
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    check_arguments(args)
    import uvicorn

    from dsvl2.adapters.lora import AdapterError
    from dsvl2.serve.app import create_app
    from dsvl2.serve.runner import EngineRunner

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = build_settings(args)
    try:
        engine = load_engine(args, max_batch=args.max_batch, progress=False, several_adapters=True)
    except AdapterError as exc:  # a bad adapter folder: one line, as for the other options
        raise SystemExit(f"error: {exc}") from None
    runner = EngineRunner(engine, max_pending=args.max_pending)
    app = create_app(runner, settings)
    if settings.api_keys is not None and args.api_key_file is not None:
        signal.signal(signal.SIGHUP, lambda *_: settings.api_keys.reload())
    scheme = "https" if args.ssl_certfile else "http"
    keys = f"{len(settings.api_keys)} API key(s)" if settings.api_keys is not None else "no API key"
    print(f"serving {settings.served_model_name!r} on {scheme}://{args.host}:{args.port} ({keys})", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsvl2 serve", description="OpenAI-compatible server and web page")
    add_arguments(parser)
    return run(parser.parse_args(argv))
