"""benchmarks/bench_quantized.py and bench_quant_quality.py: the random sharded checkpoint writer, the disk and
memory checks, the weight-byte count and the KL measure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsvl2.checkpoint import checkpoint_files, load_model
from dsvl2.config import load_json
from tests.benchmarks import load_bench
from tests.conformance_data import conformance_dir, conformance_variants

# The writer copies the fixtures' tokenizer, and the released configs sit beside them.
pytestmark = pytest.mark.skipif("small_like" not in conformance_variants(),
                                reason=f"no conformance fixtures at {conformance_dir()}")


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_quantized")


def small_config() -> dict:
    """The small_like conformance config: the released Small's structure (MLA, MoE) at a tiny width."""
    return load_json(conformance_dir() / "small_like" / "config.json")


def test_random_sharded_checkpoint_loads_with_every_tensor_written(bench, tmp_path):
    config = small_config()
    total = bench.checkpoint_bytes(config)
    info = bench.write_random_checkpoint(config, tmp_path / "ckpt", shard_bytes=total // 3, pool_values=2**16)
    folder = tmp_path / "ckpt"
    assert info["shards"] >= 3
    assert len(checkpoint_files(folder)) == info["shards"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    for name in ("config.json", "processor_config.json", "tokenizer.json"):
        assert (folder / name).is_file()
    model = load_model(folder, dtype=torch.bfloat16)
    params = {name: p.detach() for name, p in model.named_parameters()}
    assert len(params) == len(bench.tensor_layout(config))
    weight = params["language.model.layers.1.self_attn.q_proj.weight"].float()
    assert 0.01 < float(weight.std()) < 0.03  # random, at the pool's scale
    norm = next(p for n, p in params.items() if n.endswith("input_layernorm.weight"))
    assert torch.equal(norm, torch.ones_like(norm))
    bias = next(p for n, p in params.items() if n.endswith(".bias"))
    assert not bias.any()


def test_shards_hold_consecutive_tensors_under_the_limit(bench):
    layout = [("a", [4, 4]), ("b", [8]), ("c", [100]), ("d", [2])]
    shards = bench.plan_shards(layout, shard_bytes=64)
    assert [[name for name, _ in shard] for shard in shards] == [["a", "b"], ["c"], ["d"]]


def test_disk_check_refuses_with_the_sizes(bench, tmp_path):
    free = bench.check_free_disk(tmp_path / "not" / "yet", needed=1, margin=0)
    assert free > 0
    with pytest.raises(bench.DiskSpaceError, match=r"needs .* GB .* GB free"):
        bench.check_free_disk(tmp_path, needed=free * 2)


def test_writer_checks_the_disk_before_writing(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DISK_MARGIN_BYTES", 2**62)
    with pytest.raises(bench.DiskSpaceError):
        bench.write_random_checkpoint(small_config(), tmp_path / "ckpt", pool_values=2**16)
    assert not list((tmp_path / "ckpt").glob("*.safetensors"))


def test_decode_bytes_count_the_quantized_tensors(bench, tmp_path):
    from dsvl2.loading import load

    config = small_config()
    bench.write_random_checkpoint(config, tmp_path / "ckpt", pool_values=2**16)
    plain, _ = load(tmp_path / "ckpt", dtype=torch.bfloat16, quantize="none")
    int8, _ = load(tmp_path / "ckpt", dtype=torch.bfloat16, quantize="int8")
    plain_sizes, int8_sizes = bench.decode_weight_sizes(plain), bench.decode_weight_sizes(int8)
    # bfloat16 experts: 2 bytes a weight; int8: 1 byte plus a float32 scale per output row.
    expert = plain.language.model.layers[1].mlp.experts[0]
    weights = sum(p.numel() for p in expert.parameters())
    rows = sum(p.shape[0] for p in expert.parameters())
    assert plain_sizes["one_expert"] == 2 * weights
    assert int8_sizes["one_expert"] >= weights + 4 * rows
    assert int8_sizes["one_expert"] < 0.6 * plain_sizes["one_expert"]
    assert int8_sizes["always_read"] < plain_sizes["always_read"]


def test_memory_check_names_needed_and_available(bench, monkeypatch):
    monkeypatch.setattr(bench, "mem_available", lambda: 10**9)
    with pytest.raises(bench.MemoryCheckError, match=r"needs about .* GB and 1.0 GB are available"):
        bench.check_memory("small", "int4", load_json(bench.config_path("small")), None, "")


def test_estimate_orders_the_schemes(bench):
    config = load_json(bench.config_path("small"))
    none, int8, int4 = (bench.required_memory(config, s, None) for s in ("none", "int8", "int4"))
    assert int4 < int8 < none
    parameters = bench.checkpoint_bytes(config) // 2
    assert parameters // 2 < int4 < parameters  # half a byte a weight and more, less than int8's byte


def test_kl_is_zero_for_equal_logits_and_matches_the_definition():
    quality = load_bench("bench_quant_quality")
    p = torch.tensor([[0.0, 1.0, 2.0]])
    assert float(quality.kl_per_position(p, p)) == 0.0
    q = torch.tensor([[2.0, 1.0, 0.0]])
    pp, qq = p.double().softmax(-1)[0].tolist(), q.double().softmax(-1)[0].tolist()
    expected = sum(a * math.log(a / b) for a, b in zip(pp, qq, strict=True))
    assert float(quality.kl_per_position(p, q)) == pytest.approx(expected, rel=1e-9)


def test_answer_positions_are_the_ones_before_each_label():
    quality = load_bench("bench_quant_quality")
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert quality.answer_positions(labels, -100).tolist() == [[False, True, True, False, False]]


def test_scheme_variants_name_the_parts_quantized_too(bench):
    assert bench.parse_variant("int4") == ("int4", "")
    assert bench.parse_variant("int4+lm_head") == ("int4", "lm_head")
    assert bench.parse_variant("int8+lm_head+vision") == ("int8", "lm_head,vision")
    assert bench.quantize_kwargs("int8", 64, "lm_head") == {"quantize": "int8", "quantize_also": "lm_head"}
    assert bench.quantize_kwargs("none", 64, "") == {"quantize": "none"}
