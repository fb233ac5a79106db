"""Killing a training run mid-step, for the resume tests of full and adapter runs."""

from __future__ import annotations

from typing import Any


def crash_during_step(trainer: Any, step: int) -> Any:
    """`trainer`, made to die (KeyboardInterrupt) while computing `step`, after every earlier step was logged."""
    real_step = trainer.train_step

    def train_step(*args: Any, **kwargs: Any) -> Any:
        if trainer.step + 1 == step:
            raise KeyboardInterrupt(f"killed during step {step}")
        return real_step(*args, **kwargs)

    trainer.train_step = train_step
    return trainer
