"""`dsvl2 serve`: command-line options and the entry point (heavy imports happen only in `run`)."""

from __future__ import annotations

import argparse
import logging
import sys

from dsvl2.cli_common import add_model_arguments, load_engine
from dsvl2.errors import InputError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dsvl2 serve`."""
    add_model_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: loopback only)")
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
                 "default_max_tokens", "preprocess_workers"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.allow_local_files and args.host not in _LOOPBACK_HOSTS:
        print(f"warning: --allow-local-files on {args.host}: any client that reaches this address can make the "
              "server read image files it has access to", file=sys.stderr)


def build_settings(args: argparse.Namespace):
    from dsvl2.images import DEFAULT_MAX_PIXELS
    from dsvl2.serve.app import ServeSettings

    return ServeSettings(
        served_model_name=args.served_model_name or args.model.resolve().name,
        allow_local_files=args.allow_local_files,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS,
        max_images=args.max_images,
        default_max_tokens=args.default_max_tokens,
        preprocess_workers=args.preprocess_workers,
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    check_arguments(args)
    import uvicorn

    from dsvl2.serve.app import create_app
    from dsvl2.serve.runner import EngineRunner

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = build_settings(args)
    engine = load_engine(args, max_batch=args.max_batch, progress=False)
    runner = EngineRunner(engine, max_pending=args.max_pending)
    app = create_app(runner, settings)
    print(f"serving {settings.served_model_name!r} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsvl2 serve", description="OpenAI-compatible server and web page")
    add_arguments(parser)
    return run(parser.parse_args(argv))
