"""OpenAI-compatible HTTP server and web page over the continuous-batching engine (`dsvl2 serve`)."""

from dsvl2.serve.cli import add_arguments, run

__all__ = ["add_arguments", "run"]
