"""Checkpoint loading: released geometry on the meta device, strict key/shape checks, shards, memory."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsvl2.checkpoint import CheckpointError, build_model, load_model, save_model
from dsvl2.config import ConfigError, load_model_config, model_config_from_dict, model_config_to_dict
from dsvl2.model import init_weights
from tests.conformance_data import REPO

RELEASED = REPO.parent / "shared" / "released_configs"

# Parameter counts and tensor counts of the released checkpoints.
RELEASED_SIZES = {
    "deepseek-vl2-tiny": (3.37e9, 2582),
    "deepseek-vl2-small": (16.1e9, 5639),
    "deepseek-vl2": (27.5e9, 6973),
}


@pytest.mark.parametrize("name", sorted(RELEASED_SIZES))
def test_released_configs_build_on_meta_with_released_sizes(name: str) -> None:
    path = RELEASED / f"{name}.config.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    model = build_model(model_config_from_dict(json.loads(path.read_text())))
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    expected_params, expected_tensors = RELEASED_SIZES[name]
    assert len(params) == expected_tensors
    assert abs(sum(p.numel() for p in params.values()) / expected_params - 1) < 0.005
    # A few released names and shapes, independent of the counts above.
    cfg = model.cfg
    assert params["vision.pos_embed"].shape == (1, 729, 1152)
    assert params["vision.blocks.26.mlp.fc1.weight"].shape == (4304, 1152)
    assert params["projector.layers.0.weight"].shape == (cfg.projector.n_embed, 1152 * 4)
    assert params["language.model.layers.1.mlp.experts.0.gate_proj.weight"].shape == (
        cfg.language.moe_intermediate_size, cfg.language.hidden_size)


def copy_variant(conf_dir: Path, variant: str, dest: Path) -> Path:
    target = dest / variant
    shutil.copytree(conf_dir / variant, target)
    for f in target.iterdir():
        f.chmod(0o644)
    return target


def test_missing_tensor_is_named(conf_dir: Path, tmp_path: Path) -> None:
    d = copy_variant(conf_dir, "small_like", tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["language.model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: language\.model\.layers\.2\.self_attn\.kv_b_proj"):
        load_model(d)


def test_unexpected_and_misshaped_tensors_are_named(conf_dir: Path, tmp_path: Path) -> None:
    d = copy_variant(conf_dir, "tiny_like", tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["language.model.extra.weight"] = torch.zeros(2)
    tensors["image_newline"] = torch.zeros(65)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(d)
    message = str(info.value)
    assert "unexpected tensors: language.model.extra.weight" in message
    assert "image_newline (checkpoint [65], model [64])" in message


def test_truncated_file(conf_dir: Path, tmp_path: Path) -> None:
    d = copy_variant(conf_dir, "tiny_like", tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(d)


def test_unknown_topk_method_in_config(conf_dir: Path, tmp_path: Path) -> None:
    d = copy_variant(conf_dir, "tiny_like", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw["language_config"]["topk_method"] = "random_pick"
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="topk_method is 'random_pick'"):
        load_model(d)


def test_missing_weights_file(tmp_path: Path, conf_dir: Path) -> None:
    shutil.copy(conf_dir / "tiny_like" / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads_identically(conf_dir: Path, tmp_path: Path) -> None:
    reference = load_model(conf_dir / "base_like")
    config = json.loads((conf_dir / "base_like" / "config.json").read_text())
    save_model(reference, tmp_path, config, max_shard_bytes=400_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert not (tmp_path / "model.safetensors").exists()
    loaded = load_model(tmp_path)
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bfloat16_load_keeps_router_in_float32(conf_dir: Path) -> None:
    model = load_model(conf_dir / "base_like", dtype=torch.bfloat16)
    assert model.language.model.embed_tokens.weight.dtype == torch.bfloat16
    gate = model.language.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32
    assert gate.e_score_correction_bias.dtype == torch.float32


def test_save_and_load_round_trip_with_tied_embeddings(tmp_path: Path, conf_dir: Path) -> None:
    cfg = load_model_config(conf_dir / "tiny_like")
    cfg = dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, tie_word_embeddings=True))
    model = init_weights(build_model(cfg, "cpu"), seed=0)
    save_model(model, tmp_path, model_config_to_dict(cfg))
    assert "language.lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.language.lm_head.weight is loaded.language.model.embed_tokens.weight
    assert torch.equal(loaded.language.lm_head.weight, model.language.model.embed_tokens.weight)


MEMORY_PROBE = textwrap.dedent("""
    import sys, torch
    from dsvl2.checkpoint import load_model
    def status_kb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))
    load_model(sys.argv[2])  # a small checkpoint first: lazy imports and allocator set-up leave the baseline
    before = status_kb("VmRSS")
    model = load_model(sys.argv[1])
    # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still reports the parent's peak
    print(before, status_kb("VmHWM"))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read memory")
def test_peak_memory_while_loading_stays_under_1_3x_file_size(tmp_path: Path, conf_dir: Path) -> None:
    raw = json.loads((conf_dir / "base_like" / "config.json").read_text())
    raw["language_config"].update(hidden_size=512, vocab_size=32000, moe_intermediate_size=512,
                                  intermediate_size=2048, n_routed_experts=16, n_group=4)
    raw["projector_config"]["n_embed"] = 512
    cfg = model_config_from_dict(raw)
    save_model(init_weights(build_model(cfg, "cpu"), seed=0), tmp_path, raw)
    size_kb = (tmp_path / "model.safetensors").stat().st_size / 1024
    assert size_kb > 100_000  # large enough that interpreter noise does not matter
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), str(conf_dir / "tiny_like")],
                         capture_output=True, text=True, check=True)
    before, peak = map(int, out.stdout.split())
    assert peak - before < 1.3 * size_kb, f"loading grew RSS by {(peak - before) / size_kb:.2f}x the file size"



def test_building_on_the_meta_device_leaves_torch_dynamo_unimported() -> None:
    # A meta normal_ imports torch._dynamo, whose modules then stay resident: loading must not pay for them.
    code = textwrap.dedent("""
        import sys
        from dsvl2.checkpoint import build_model
        from dsvl2.config import ModelConfig
        model = build_model(ModelConfig())
        assert model.language.lm_head.weight.is_meta and model.vision.pos_embed.is_meta
        print("torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
