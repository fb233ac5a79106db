"""Kernel choice: the automatic plan for each CPU capability set (no such CPU needed: the flags are input),
--kernels overrides and their errors, the CPU dtype that follows the choice, and every path giving the
default's greedy tokens (and logits within the bfloat16 tolerance) on the conformance checkpoints."""

from __future__ import annotations

import argparse
import copy
from functools import cache

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dsvl2.checkpoint import load_model
from dsvl2.cli_common import add_model_arguments, load_engine
from dsvl2.config import ModelFolder
from dsvl2.engine.cpu import PackedFp16Linear, PackedFp16MLP, fbgemm_fp16_available, float32_compute
from dsvl2.engine.generate import Engine
from dsvl2.engine.kernels import (
    FLOAT32,
    NATIVE,
    PACKED,
    KernelChoiceError,
    KernelPlan,
    choose_kernels,
    keeps_half_weights,
    override,
    resolve_kernels,
)
from dsvl2.errors import InputError
from dsvl2.loading import choose_dtype, stored_dtype
from dsvl2.processor import Processor
from tests.conformance_data import conformance_dir, conformance_variants
from tests.engine.test_generate import case_request, expected_tokens
from tests.test_conformance import BF16_TOLERANCE, case_inputs, max_diff, outputs

CPU, BF16 = torch.device("cpu"), torch.bfloat16
AVX2 = frozenset({"avx2", "fma", "f16c"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}


def parts(plan: KernelPlan) -> tuple[str, ...]:
    return plan.vision, plan.prefill, plan.decode_small, plan.decode_large, plan.lm_head, plan.attention


# ------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize(("flags", "expected"), [
    (AVX2, (FLOAT32, FLOAT32, PACKED, PACKED, PACKED, FLOAT32)),
    (AVX512, (FLOAT32, FLOAT32, PACKED, PACKED, PACKED, FLOAT32)),
    (AVX512_BF16, (NATIVE, NATIVE, PACKED, PACKED, PACKED, NATIVE)),
    (AMX, (NATIVE, NATIVE, PACKED, PACKED, PACKED, NATIVE)),
    (AVX512 | {"amx_bf16", "amx_tile"}, (NATIVE, NATIVE, PACKED, PACKED, PACKED, NATIVE)),  # AMX decides alone too
], ids=["avx2", "avx512", "avx512_bf16", "amx", "amx_without_avx512_bf16_flag"])
def test_bfloat16_plan_for_each_cpu(flags: frozenset[str], expected: tuple[str, ...]) -> None:
    plan = choose_kernels(flags, CPU, BF16)
    assert parts(plan) == expected and plan.reason
    assert keeps_half_weights(flags, fbgemm_fp16=True)


CAPABILITY_SETS = {"avx2": AVX2, "avx512": AVX512, "avx512_bf16": AVX512_BF16, "amx": AMX, "none": frozenset()}


@pytest.mark.parametrize("fbgemm", [True, False], ids=["fbgemm", "no_fbgemm"])
@pytest.mark.parametrize("name", list(CAPABILITY_SETS))
def test_every_capability_set_with_and_without_fbgemm_and_on_cuda(name: str, fbgemm: bool) -> None:
    flags = CAPABILITY_SETS[name]
    native_bf16 = name in ("avx512_bf16", "amx")
    compute = NATIVE if native_bf16 else FLOAT32
    decode = PACKED if fbgemm else NATIVE
    assert parts(choose_kernels(flags, CPU, BF16, fbgemm)) == (compute, compute, decode, decode, decode, compute)
    # float16 is never native on a CPU; a GPU and a float32 model always run PyTorch's own kernels.
    assert parts(choose_kernels(flags, CPU, torch.float16, fbgemm)) == (FLOAT32, FLOAT32, decode, decode, decode,
                                                                        FLOAT32)
    for device, dtype in ((torch.device("cuda"), BF16), (torch.device("cuda"), torch.float32), (CPU, torch.float32)):
        plan = choose_kernels(flags, device, dtype, fbgemm)
        assert set(parts(plan)) == {NATIVE} and not plan.packs_language
    assert keeps_half_weights(flags, fbgemm) == (fbgemm or native_bf16)


def test_without_fbgemm_decode_is_native_and_only_native_bf16_keeps_16_bit_weights() -> None:
    assert parts(choose_kernels(AVX2, CPU, BF16, fbgemm_fp16=False)) == (FLOAT32, FLOAT32, NATIVE, NATIVE, NATIVE,
                                                                         FLOAT32)
    assert not keeps_half_weights(AVX2, fbgemm_fp16=False)
    assert keeps_half_weights(AVX512_BF16, fbgemm_fp16=False)


def test_float16_weights_are_never_native_on_a_cpu_and_float32_or_gpu_models_always_are() -> None:
    assert choose_kernels(AMX, CPU, torch.float16).vision == FLOAT32
    assert set(parts(choose_kernels(AMX, CPU, torch.float32))) == {NATIVE}
    assert set(parts(choose_kernels(AVX2, torch.device("cuda"), BF16))) == {NATIVE}


def test_overrides() -> None:
    auto = choose_kernels(AVX2, CPU, BF16)
    assert override(auto, "auto") == auto and override(auto, None) == auto
    assert set(parts(override(auto, "native"))) == {NATIVE}
    assert parts(override(auto, "float16-packed")) == parts(auto)  # vision and prefill cannot be packed
    assert parts(override(auto, "vision=native, decode=native")) == (NATIVE, FLOAT32, NATIVE, NATIVE, PACKED, FLOAT32)
    # A native prefill takes the attention weights along (it multiplies by them too), unless both are named.
    assert override(auto, "prefill=native").attention == NATIVE
    assert override(auto, "attention=native").prefill == FLOAT32
    assert override(auto, "native").reason == "--kernels native"


@pytest.mark.parametrize(("value", "message"), [
    ("fast", "'fast' is not PART=PATH"),
    ("decoder=native", "'decoder=native' is not PART=PATH"),
    ("vision=float16-packed", "vision cannot run 'float16-packed'"),
    ("decode=float32", "decode_small cannot run 'float32'"),
    ("decode_large=native", "decode at small and large batch must share a path"),
    ("prefill=native,attention=float32", "attention=float32 needs prefill=float32"),
    ("attention=float16-packed", "attention cannot run 'float16-packed'"),
])
def test_bad_overrides_name_the_problem(value: str, message: str) -> None:
    with pytest.raises(KernelChoiceError, match=message):
        override(choose_kernels(AVX2, CPU, BF16), value)


def test_16_bit_paths_refused_for_float32_models_and_without_fbgemm() -> None:
    with pytest.raises(KernelChoiceError, match="this model is float32 on cpu"):
        resolve_kernels("prefill=float32", CPU, torch.float32, AVX2)
    with pytest.raises(KernelChoiceError, match="FBGEMM"):
        resolve_kernels("decode=float16-packed", CPU, BF16, AVX2, fbgemm_fp16=False)
    assert resolve_kernels("auto", CPU, torch.float32, AVX2).prefill == NATIVE


def test_cpu_dtype_follows_the_kernel_choice() -> None:
    assert choose_dtype(None, CPU, BF16, cpu_half=True) == BF16
    assert choose_dtype("auto", CPU, torch.float16, cpu_half=True) == torch.float16
    assert choose_dtype(None, CPU, BF16, cpu_half=False) == torch.float32
    assert choose_dtype(None, CPU, torch.float32, cpu_half=True) == torch.float32
    assert choose_dtype("float32", CPU, BF16, cpu_half=True) == torch.float32
    assert choose_dtype(None, torch.device("cuda"), torch.float32) == BF16


# ------------------------------------------------------------------ the paths on real models

pytestmark_fixtures = pytest.mark.skipif("tiny_like" not in conformance_variants(),
                                         reason=f"no conformance fixtures at {conformance_dir()}")
needs_fbgemm = pytest.mark.skipif(not fbgemm_fp16_available(), reason="this PyTorch build has no FBGEMM float16")
# Every path the automatic choice takes on some CPU, and the all-native one.
PLANS = {
    "avx2_auto": choose_kernels(AVX2, CPU, BF16),
    "avx512_bf16_auto": choose_kernels(AVX512_BF16, CPU, BF16),
    "native": override(choose_kernels(AVX2, CPU, BF16), "native"),
    "float32_prefill_native_decode": override(choose_kernels(AVX2, CPU, BF16), "decode=native,lm_head=native"),
}
GREEDY_CASES = ("one_square", "one_wide")  # clear greedy margins in float32 (see test_generate)


@cache
def engine_for(plan_name: str) -> Engine:
    root = conformance_dir() / "tiny_like"
    return Engine(load_model(root, dtype=BF16), Processor.from_pretrained(root), kernels=PLANS[plan_name])


@pytestmark_fixtures
@needs_fbgemm
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_every_path_gives_the_default_greedy_tokens_and_bf16_logits(plan_name: str) -> None:
    engine = engine_for(plan_name)
    plan = engine.kernels
    assert {p.dtype for p in engine.model.vision.parameters()} == {BF16}  # a float32 path upcasts as it runs
    packed = [m for m in engine.model.language.modules() if isinstance(m, (PackedFp16Linear, PackedFp16MLP))]
    assert bool(packed) == plan.packs_language
    assert all(m.native_rows == (64 if plan.prefill == NATIVE else None) for m in packed)
    completions = engine.generate_batch([case_request(c) for c in GREEDY_CASES])
    assert [c.token_ids for c in completions] == [expected_tokens("tiny_like", c) for c in GREEDY_CASES]
    ref = outputs("tiny_like")
    with torch.inference_mode(), float32_compute(plan.prefill == FLOAT32):
        logits = engine.model(**case_inputs("one_square")).logits[0].float()
    assert max_diff(logits[-4:], ref["one_square.logits_last4"]) <= BF16_TOLERANCE["last4"]
    lse = (logits.logsumexp(-1) - ref["one_square.logits_logsumexp"]).abs().max().item()
    assert lse <= BF16_TOLERANCE["logsumexp"]


@pytestmark_fixtures
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("plan_name", ["avx2_auto", "avx512_bf16_auto"])
def test_a_float32_vision_path_keeps_16_bit_weights_and_computes_as_a_float32_copy(plan_name: str) -> None:
    engine = engine_for(plan_name)
    model, cfg = engine.model, engine.model.cfg.vision
    torch.manual_seed(0)
    tiles = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        out = engine.encode_tiles(tiles)
        vision, projector = copy.deepcopy(model.vision).float(), copy.deepcopy(model.projector).float()
        float32_copy = projector(vision(tiles.to(BF16).float()))
    assert out.dtype == BF16 and {p.dtype for p in model.vision.parameters()} == {BF16}
    # Float32 activations throughout on the float32 path (the same result, bit for bit); bfloat16 ones on the native.
    assert torch.equal(out, float32_copy.to(BF16)) == (engine.kernels.vision == FLOAT32)


class LinearCalls(TorchFunctionMode):
    """Records the dtype of each F.linear call (the native path; FBGEMM's packed ops are not F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@needs_fbgemm
def test_native_rows_computes_large_matmuls_in_bfloat16_from_the_packed_weight() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(BF16)
    packed = PackedFp16Linear(linear)
    packed.native_rows = 8
    rows = torch.randn(8, 64).to(BF16)
    with LinearCalls() as calls:
        out = packed(rows)
        packed(rows[:7])  # below native_rows: FBGEMM
    assert calls.dtypes == [BF16]
    assert (out.float() - torch.nn.functional.linear(rows, linear.weight, linear.bias).float()).abs().max() < 0.02


@needs_fbgemm
def test_a_large_weight_packed_in_blocks_computes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 100, bias=True).to(BF16)
    whole = PackedFp16Linear(linear)
    monkeypatch.setattr(PackedFp16Linear, "BLOCK_ELEMENTS", 64 * 30)
    blocked = PackedFp16Linear(linear)
    x = torch.randn(3, 64)
    assert len(whole.blocks) == 1 and len(blocked.blocks) == 4  # 30 + 30 + 30 + 10 rows
    assert torch.equal(blocked(x), whole(x)) and torch.equal(blocked.weight, linear.weight)
    blocked.native_rows = whole.native_rows = 1
    assert torch.equal(blocked(x.bfloat16()), whole(x.bfloat16()))


@pytestmark_fixtures
def test_stored_dtype_and_a_bad_kernels_option_on_the_command_line() -> None:
    root = conformance_dir() / "tiny_like"
    assert stored_dtype(ModelFolder.read(root)) == torch.float32
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    # Checked before the weights are read: the missing folder is not what the error names.
    args = parser.parse_args(["--model", str(root / "absent"), "--kernels", "prefill=fast"])
    with pytest.raises(InputError, match="prefill cannot run 'fast'"):
        load_engine(args, progress=False)


@pytestmark_fixtures
@needs_fbgemm
@pytest.mark.usefixtures("one_thread")
def test_float32_attention_holds_kv_b_proj_in_float32_and_gives_the_greedy_tokens() -> None:
    """MLA's absorbed path reads kv_b_proj directly: the float32 attention path holds it in float32 and casts the
    bfloat16 activations to meet it."""
    root = conformance_dir() / "small_like"
    engine = Engine(load_model(root, dtype=BF16), Processor.from_pretrained(root), kernels=PLANS["avx2_auto"])
    assert engine.kernels.attention == FLOAT32
    layers = [m.kv_b_proj for m in engine.model.language.modules() if hasattr(m, "kv_b_proj")]
    assert layers and {layer.weight.dtype for layer in layers} == {torch.float32}
    completions = engine.generate_batch([case_request(c) for c in GREEDY_CASES])
    assert [c.token_ids for c in completions] == [expected_tokens("small_like", c) for c in GREEDY_CASES]


@pytestmark_fixtures
@needs_fbgemm
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("plan_name", ["avx2_auto", "avx512_bf16_auto"])
def test_multi_head_attention_computes_in_float32_only_on_the_float32_attention_path(plan_name: str) -> None:
    engine = engine_for(plan_name)  # tiny_like: multi-head attention; its greedy tokens are checked above
    dtypes = {m.compute_dtype for m in engine.model.language.modules() if hasattr(m, "compute_dtype")}
    assert dtypes == ({torch.float32} if engine.kernels.attention == FLOAT32 else {None})
