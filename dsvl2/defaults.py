"""The default model bundled with the package: a small DeepSeek-VL2 trained on the synthetic tasks.

It is what `dsvl2 generate`, `dsvl2 eval` and `dsvl2 serve` use when no `--model` is given. Its
recipe is `recipes/default/` in the source tree (`scripts/train_default_model.sh` rebuilds it).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL_FOLDER = "default_model"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")


def default_model_dir() -> Path:
    """The bundled checkpoint directory; FileNotFoundError naming the missing file if it is incomplete."""
    path = Path(str(resources.files("dsvl2") / "assets" / DEFAULT_MODEL_FOLDER))
    missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the default model at {path} lacks {', '.join(missing)}; "
            "rebuild it with scripts/train_default_model.sh or pass --model"
        )
    return path
