"""The loading boundary: which folder, its configs read once, the device and dtype chosen in one place."""

from __future__ import annotations

import builtins
import dataclasses
import io
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from dsvl2.engine.generate import Engine
from dsvl2.loading import ModelFolderError, load, model_folder, resolve_model_dir
from dsvl2.processor import Processor


@pytest.fixture
def opened(monkeypatch) -> Counter:
    """Names of the files opened from now on (through `open` or `Path.open`), counted."""
    counts: Counter = Counter()
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        counts[Path(str(file)).name] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(builtins, "open", counting_open)
    return counts


def test_one_load_reads_each_config_file_once(conf_dir: Path, opened: Counter) -> None:
    engine = Engine.from_pretrained(conf_dir / "tiny_like", max_batch=1)
    assert opened["config.json"] == 1
    assert opened["processor_config.json"] == 1
    assert engine.processor.context_length == engine.model.cfg.language.max_position_embeddings


def test_the_loaders_take_a_parsed_folder_as_it_is(conf_dir: Path) -> None:
    folder = model_folder(conf_dir / "tiny_like")
    assert folder.raw_config["model_type"] == "deepseek_vl_v2"
    assert folder.processor_config.image_size == folder.config.vision.image_size
    language = dataclasses.replace(folder.config.language, max_position_embeddings=77)
    edited = dataclasses.replace(folder, config=dataclasses.replace(folder.config, language=language),
                                 processor_config=dataclasses.replace(folder.processor_config,
                                                                      image_tag_position="after"))
    model, processor = load(edited)
    assert model.cfg.language.max_position_embeddings == 77 and processor.context_length == 77
    assert processor.config.image_tag_position == "after"


def test_device_and_dtype_are_chosen_by_the_loader(conf_dir: Path) -> None:
    model, processor = load(conf_dir / "tiny_like", device="cpu", dtype="bfloat16")
    assert model.language.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(processor, Processor)
    model, _ = load(conf_dir / "tiny_like")
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert model.language.model.embed_tokens.weight.dtype == expected


def test_a_wrong_folder_is_named_with_what_it_lacks(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ModelFolderError, match=f"{tmp_path / 'missing'} does not exist"):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(ModelFolderError, match=rf"{tmp_path} is not a checkpoint directory \(no config.json\)"):
        load(tmp_path)

    def missing_default_model():
        raise FileNotFoundError("the default model at X lacks model.safetensors")

    monkeypatch.setattr("dsvl2.defaults.default_model_dir", missing_default_model)
    with pytest.raises(ModelFolderError, match="no --model given and the default model at X lacks model.safetensors"):
        resolve_model_dir(None)


def test_no_path_means_the_bundled_default_model(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr("dsvl2.defaults.default_model_dir", lambda: tmp_path)
    assert resolve_model_dir() == tmp_path


def test_a_processor_folder_without_a_model_config(conf_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(conf_dir / "tokenizer", tmp_path / "tokenizer")
    processor = Processor.from_pretrained(folder)
    assert processor.context_length is None
    assert processor.config.image_size == 384  # the official default, with no vision config to say otherwise
