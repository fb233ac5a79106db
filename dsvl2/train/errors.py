"""The error every training entry point reports in plain words (`dsvl2 train` exits with code 2)."""

from __future__ import annotations


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why."""
