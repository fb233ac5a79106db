"""The engine with adapters: each request runs its own over shared base weights, alone or batched with others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsvl2.adapters.lora import AdapterError, LoraSettings, apply_lora, lora_layers
from dsvl2.adapters.peft_format import save_adapter
from dsvl2.checkpoint import load_model
from dsvl2.engine.generate import Engine, Request
from dsvl2.engine.sampling import SamplingParams
from dsvl2.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {"a": ("q_proj", "kv_b_proj", "experts.1.down_proj", "experts.2.up_proj"), "b": ("o_proj", "up_proj")}


@pytest.fixture(scope="module")
def adapter_dirs(conf_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two adapters on small_like with large random B, so each changes greedy answers."""
    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    for seed, (name, targets) in enumerate(TARGETS.items()):
        model = load_model(conf_dir / "small_like")
        settings = LoraSettings(r=4, alpha=8, target_modules=targets)
        apply_lora(model, settings)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                pair = layer.adapters["default"]
                pair.lora_A.weight.normal_(0, 0.5, generator=generator)
                pair.lora_B.weight.normal_(0, 0.5, generator=generator)
        folders[name] = save_adapter(model, root / name, settings, model.cfg)
    return folders


def _request(adapter: str | None, image: Path | None = None) -> Request:
    content = "<image>\nWhat is this?" if image else "Tell me a story about a cat."
    return Request([{"role": "user", "content": content}], [image] if image else [],
                   SamplingParams(max_new_tokens=8), adapter=adapter)


def test_each_request_runs_its_adapter_alone_or_batched(conf_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    engine = Engine.from_pretrained(conf_dir / "small_like", dtype="float32", device="cpu", adapters=adapter_dirs,
                                    max_batch=6, check_memory=False)
    image = conf_dir / "images" / "square.png"
    names = [None, "a", "b"]
    alone = {(n, i): engine.generate(_request(n, image if i else None)).token_ids for n in names for i in (0, 1)}
    assert len({tuple(t) for t in alone.values()}) == len(alone)  # every adapter changes the answers
    keys = [(n, i) for i in (1, 0) for n in names]
    batched = engine.generate_batch([_request(n, image if i else None) for n, i in keys])
    assert [c.token_ids for c in batched] == [alone[k] for k in keys]
    # The base answers are the model's without any adapter loaded.
    plain = Engine.from_pretrained(conf_dir / "small_like", dtype="float32", device="cpu", check_memory=False)
    assert plain.generate(_request(None)).token_ids == alone[(None, 0)]
    with pytest.raises(InputError, match="no adapter named 'c' is loaded; loaded: a, b"):
        engine.generate(_request("c"))


def test_default_adapter_and_bad_adapters(conf_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    engine = Engine.from_pretrained(conf_dir / "small_like", dtype="float32", device="cpu",
                                    adapters={"a": adapter_dirs["a"]}, default_adapter="a", check_memory=False)
    assert engine.generate(_request(None)).token_ids == engine.generate(_request("a")).token_ids
    with pytest.raises(AdapterError, match="trained on another base model"):
        Engine.from_pretrained(conf_dir / "tiny_like", dtype="float32", device="cpu", adapters=adapter_dirs,
                               check_memory=False)


def test_serve_picks_the_adapter_by_the_model_field(conf_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    openai = pytest.importorskip("openai", reason="the openai client is needed (pip install -e '.[test]')")
    pytest.importorskip("fastapi", reason="the serve extra is needed (pip install -e '.[serve]')")
    from dsvl2.serve.app import ServeSettings, create_app
    from dsvl2.serve.launch import ThreadedServer
    from dsvl2.serve.runner import EngineRunner

    engine = Engine.from_pretrained(conf_dir / "small_like", dtype="float32", device="cpu", adapters=adapter_dirs,
                                    max_batch=4, check_memory=False)
    expected = {name: engine.generate(_request(name)).text for name in (None, "a", "b")}
    runner = EngineRunner(engine)
    app = create_app(runner, ServeSettings(served_model_name="base"))
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    with ThreadedServer(app) as threaded:
        client = openai.OpenAI(base_url=threaded.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [(m.id, getattr(m, "parent", None)) for m in client.models.list().data] == [
            ("base", None), ("a", "base"), ("b", "base")]
        for model, adapter in (("base", None), ("a", "a"), ("b", "b")):
            answer = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            assert answer.model == model and answer.choices[0].message.content == expected[adapter]
        chunks = list(client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True))
        assert {c.model for c in chunks} == {"b"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["b"]
        with pytest.raises(openai.NotFoundError, match="this server serves 'base', 'a', 'b'"):
            client.chat.completions.create(model="c", messages=messages, max_tokens=2)
    runner.stop()


def test_generate_command_takes_one_adapter(conf_dir: Path, adapter_dirs: dict[str, Path], capsys) -> None:
    import json

    from dsvl2.cli import main

    engine = Engine.from_pretrained(conf_dir / "small_like", dtype="float32", device="cpu",
                                    adapters={"b": adapter_dirs["b"]}, default_adapter="b", check_memory=False)
    expected = engine.generate(_request(None)).token_ids
    common = ["generate", "--model", str(conf_dir / "small_like"), "--dtype", "float32", "--device", "cpu",
              "--max-new-tokens", "8", "--json"]
    assert main([*common, "--adapter", str(adapter_dirs["b"]), "Tell me a story about a cat."]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected
    assert main([*common, "--adapter", str(adapter_dirs["a"]), "--adapter", str(adapter_dirs["b"]), "Hi"]) == 2
    assert "--adapter is given 2 times; this command runs one" in capsys.readouterr().err
    assert main([*common, "--adapter", str(conf_dir / "tiny_like"), "Hi"]) == 2
    assert "is not an adapter directory (no adapter_config.json)" in capsys.readouterr().err
