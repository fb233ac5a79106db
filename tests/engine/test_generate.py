"""The inference engine on the conformance checkpoints: greedy tokens of the official implementation,
continuous batching, chunked prefill, the image cache, streaming, stop strings, cancellation, errors.

Prompts go through our processor from the original conversations and images, so these also check
that processor and engine agree with the official pipeline end to end.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsvl2.checkpoint import load_model
from dsvl2.engine.cache import KVCache
from dsvl2.engine.cpu import PackedFp16Linear, PackedFp16MLP, fbgemm_fp16_available, float32_compute, pack_linear_layers
from dsvl2.engine.generate import Engine, Request
from dsvl2.engine.kernels import choose_kernels
from dsvl2.engine.sampling import SamplingParams
from dsvl2.errors import ImageCountError, ImageDecodeError, InputError, PromptTooLongError
from dsvl2.language.moe import MLP
from dsvl2.processor import Processor
from tests.conformance_data import conformance_cases, conformance_dir, conformance_variants

VARIANTS = conformance_variants()
CASES = conformance_cases()
MLA_VARIANTS = [v for v in VARIANTS if v != "tiny_like"]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)

pytestmark = [pytest.mark.skipif(not VARIANTS, reason=f"no conformance fixtures at {conformance_dir()}"),
              pytest.mark.usefixtures("one_thread")]


@cache
def model_and_processor(variant: str):
    root = conformance_dir() / variant
    return load_model(root), Processor.from_pretrained(root)


def make_engine(variant: str, **kwargs) -> Engine:
    model, processor = model_and_processor(variant)
    return Engine(model, processor, **kwargs)


@cache
def shared_engine(variant: str) -> Engine:
    return make_engine(variant)


@cache
def reference(variant: str, name: str = "outputs") -> dict[str, torch.Tensor]:
    return load_file(conformance_dir() / variant / f"{name}.safetensors")


def image_path(name: str) -> Path:
    return conformance_dir() / "images" / f"{name}.png"


def case_request(case: str, sampling: SamplingParams = GREEDY) -> Request:
    conversation, images = [], []
    for message in CASES[case]["conversation"]:
        conversation.append({"role": message["role"], "content": message["content"]})
        images += [image_path(name) for name in message.get("images", [])]
    return Request(conversation, images, sampling)


def expected_tokens(variant: str, case: str) -> list[int]:
    return reference(variant)[f"{case}.greedy_tokens"].tolist()


# The three prompts of batch.safetensors (their token ids are checked against the fixture below).
BATCH_PROMPTS = [
    ("<image>\nDescribe this image.", ["square"]),
    ("Hello, who are you?", []),
    ("<image>\nRead the text in the image, please.", ["wide"]),
]


def batch_requests() -> list[Request]:
    return [Request([{"role": "user", "content": text}], [image_path(n) for n in names], GREEDY)
            for text, names in BATCH_PROMPTS]


def run_until_done(engine: Engine, limit: int = 500) -> list:
    events = []
    for _ in range(limit):
        if not engine.has_work():
            return events
        events += engine.step()
    raise AssertionError("the engine did not finish")


# ------------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_of_every_case(variant: str) -> None:
    """All cases at once: 11 requests for 8 slots, so some wait and join as others finish."""
    engine = shared_engine(variant)
    completions = engine.generate_batch([case_request(case) for case in CASES])
    for case, completion in zip(CASES, completions, strict=True):
        assert completion.finish_reason == "length", (case, completion.error)
        assert completion.token_ids == expected_tokens(variant, case), case
        assert completion.prompt_tokens == len(reference(variant)[f"{case}.logits_argmax"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_fixture_prompts_match_the_official_input_ids(variant: str) -> None:
    batch = reference(variant, "batch")
    engine = shared_engine(variant)
    for row, request in enumerate(batch_requests()):
        sample = engine.processor.encode(request.conversation, request.images)
        keep = batch["batch.attention_mask"][row].bool()
        assert sample.input_ids.tolist() == batch["batch.input_ids"][row][keep].tolist()
        assert sample.images_seq_mask.tolist() == batch["batch.images_seq_mask"][row][keep].bool().tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_rows_generated_together(variant: str) -> None:
    completions = shared_engine(variant).generate_batch(batch_requests())
    expected = reference(variant, "batch")["batch.greedy_tokens"].tolist()
    assert [c.token_ids for c in completions] == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_rows_with_continuous_batching(variant: str) -> None:
    """One request starts alone; the others join while it is decoding."""
    engine = make_engine(variant, max_batch=4, prefill_chunk=128)
    first, *others = batch_requests()
    ids = [engine.submit(first)]
    events = [engine.step() for _ in range(8)]
    assert engine.num_running == 1 and any(e.token_id is not None for step in events for e in step)
    ids += [engine.submit(r) for r in others]
    events = [e for step in events for e in step] + run_until_done(engine)
    tokens = {i: [e.token_id for e in events if e.request_id == i and e.token_id is not None] for i in ids}
    expected = reference(variant, "batch")["batch.greedy_tokens"].tolist()
    assert [tokens[i] for i in ids] == expected


# --------------------------------------------------------------------------- cache and prefill


@pytest.mark.parametrize("variant", ["tiny_like", "base_like"])
def test_chunked_prefill_equals_full_prefill(variant: str) -> None:
    model, processor = model_and_processor(variant)
    request = case_request("one_wide")
    sample = processor.encode(request.conversation, request.images)
    with torch.no_grad():
        embeds = model.embed_inputs(sample.input_ids[None], sample.pixel_values[None],
                                    sample.images_seq_mask[None], sample.images_spatial_crop[None])
        length = embeds.shape[1]
        full_cache, chunk_cache = (KVCache(model.cfg.language, 1, length + 1) for _ in range(2))
        slot = torch.tensor([0])
        full = model.decode_step(embeds, torch.arange(length)[None], full_cache, slot, last_only=False)
        chunks = []
        for start in range(0, length, 64):
            stop = min(start + 64, length)
            chunks.append(model.decode_step(embeds[:, start:stop], torch.arange(start, stop)[None],
                                            chunk_cache, slot, last_only=False))
    assert (torch.cat(chunks, 1) - full).abs().max() < 1e-4
    for full_buf, chunk_buf in zip(sum(full_cache.buffers, []), sum(chunk_cache.buffers, []), strict=True):
        assert (full_buf - chunk_buf).abs().max() < 1e-5
    completion = make_engine(variant, prefill_chunk=64).generate(request)
    assert completion.token_ids == expected_tokens(variant, "one_wide")


@pytest.mark.parametrize("variant", MLA_VARIANTS)
def test_absorbed_and_expanded_mla_agree(variant: str) -> None:
    model, processor = model_and_processor(variant)
    request = case_request("one_square")
    sample = processor.encode(request.conversation, request.images)
    with torch.no_grad():
        embeds = model.embed_inputs(sample.input_ids[None], sample.pixel_values[None],
                                    sample.images_seq_mask[None], sample.images_spatial_crop[None])
        length = embeds.shape[1]
        cache = KVCache(model.cfg.language, 2, length + 8)
        slots = torch.tensor([1])
        prefix = length - 6
        model.decode_step(embeds[:, :prefix], torch.arange(prefix)[None], cache, slots)
        rest = embeds[:, prefix:]
        positions = torch.arange(prefix, length)[None]
        # A block of several tokens, then the same tokens one at a time (rewriting the same entries).
        expanded = model.decode_step(rest, positions, cache, slots, absorbed=False, last_only=False)
        absorbed = model.decode_step(rest, positions, cache, slots, absorbed=True, last_only=False)
        assert (expanded - absorbed).abs().max() < 1e-4
        for i in range(rest.shape[1]):
            one = rest[:, i:i + 1]
            pos = positions[:, i:i + 1]
            expanded = model.decode_step(one, pos, cache, slots, absorbed=False)
            absorbed = model.decode_step(one, pos, cache, slots, absorbed=True)
            assert (expanded - absorbed).abs().max() < 1e-4


def test_a_sequence_in_a_batch_of_8_equals_the_sequence_alone() -> None:
    variant = "base_like" if "base_like" in VARIANTS else VARIANTS[0]
    cases = ["text_only", "one_square", "one_tiny", "system_turn", "unicode", "multi_turn", "one_tall", "two_images"]
    sampling = [GREEDY if i % 2 else SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=i,
                                                    ignore_eos=True) for i in range(len(cases))]
    engine = make_engine(variant, max_batch=8, prefill_chunk=256)
    together = engine.generate_batch([case_request(c, s) for c, s in zip(cases, sampling, strict=True)])
    alone = make_engine(variant, max_batch=1)
    for case, params, completion in zip(cases, sampling, together, strict=True):
        assert completion.token_ids == alone.generate(case_request(case, params)).token_ids, case
        if params is GREEDY:
            assert completion.token_ids == expected_tokens(variant, case)


def test_seeded_sampling_through_the_engine() -> None:
    engine = shared_engine(VARIANTS[0])
    runs = [engine.generate(case_request("text_only", SamplingParams(max_new_tokens=16, temperature=1.5, seed=s,
                                                                    ignore_eos=True)))
            for s in (5, 5, 6)]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].token_ids != runs[2].token_ids


# ----------------------------------------------------------------------- text, stops, streaming


class ScriptedModel:
    """The real model (so the cache is really written), with logits forcing a fixed answer."""

    def __init__(self, model, script: list[int], prompt_len: int) -> None:
        self._model, self.script, self.prompt_len = model, script, prompt_len

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def eval(self):
        return self

    def decode_step(self, embeds, positions, cache, slots, absorbed=None, last_only=True):
        logits = self._model.decode_step(embeds, positions, cache, slots, absorbed, last_only)
        forced = torch.full_like(logits, -1e4)
        for row, position in enumerate(positions[:, -1].tolist()):
            index = min(position + 1 - self.prompt_len, len(self.script) - 1)
            forced[row, -1, self.script[index]] = 0.0
        return forced


def scripted_engine(answer: str, request: Request, variant: str = "tiny_like") -> Engine:
    model, processor = model_and_processor(variant)
    prompt_len = len(processor.encode(request.conversation, request.images))
    script = processor.tokenizer.encode(answer) + [processor.tokenizer.eos_id]
    return Engine(ScriptedModel(model, script, prompt_len), processor, max_batch=2)


def test_streamed_text_equals_the_final_text_for_multibyte_characters() -> None:
    answer = "图片中的文字 café ✓ ok"
    request = case_request("text_only", SamplingParams(max_new_tokens=64))
    engine = scripted_engine(answer, request)
    events = list(engine.stream(request))
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == answer
    assert events[-1].finished and events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens == len(engine.tokenizer.encode(answer)) + 1  # the eos counts
    request.request_id = ""
    assert engine.generate(request).text == answer


def test_stop_string_ends_generation_and_is_removed() -> None:
    request = case_request("text_only", SamplingParams(max_new_tokens=64, stop=("STOP",)))
    engine = scripted_engine("Hello world. STOP here and more", request)
    events = list(engine.stream(request))
    assert "".join(e.text for e in events) == "Hello world. "
    assert not any("S" in e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert len([e for e in events if e.token_id is not None]) < 14  # stopped before the end of the script


def test_a_stop_prefix_that_never_completes_is_released() -> None:
    request = case_request("text_only", SamplingParams(max_new_tokens=64, stop=("STOPPED",)))
    answer = "Hello world. STOP here"
    assert scripted_engine(answer, request).generate(request).text == answer


def test_max_new_tokens_and_eos() -> None:
    request = case_request("text_only", SamplingParams(max_new_tokens=3))
    engine = scripted_engine("Hello world. STOP here", request)
    completion = engine.generate(request)
    assert completion.finish_reason == "length" and completion.completion_tokens == 3
    assert completion.text == engine.tokenizer.decode(completion.token_ids)
    request = case_request("text_only", SamplingParams(max_new_tokens=64))
    completion = scripted_engine("Hi", request).generate(request)
    assert completion.finish_reason == "stop" and completion.text == "Hi"


def test_generation_stops_at_the_context_length() -> None:
    engine = make_engine("tiny_like", max_len=40, max_batch=1)
    completion = engine.generate(case_request("text_only", SamplingParams(max_new_tokens=100, ignore_eos=True)))
    assert completion.finish_reason == "length"
    assert completion.prompt_tokens + completion.completion_tokens == 40
    with pytest.raises(PromptTooLongError, match="40"):
        engine.submit(case_request("one_square"))


# ------------------------------------------------------------------------ queue and lifecycle


def test_cancel_frees_the_slot_for_the_next_request() -> None:
    engine = make_engine("small_like" if "small_like" in VARIANTS else VARIANTS[0], max_batch=1)
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    running = engine.submit(case_request("text_only", long))
    waiting = engine.submit(case_request("one_square", long))
    for _ in range(3):
        engine.step()
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    engine.cancel(running)
    events = engine.step()
    final = [e for e in events if e.request_id == running]
    assert final[-1].finished and final[-1].finish_reason == "cancelled"
    assert engine.num_running == 1 and engine.num_waiting == 0  # the waiting request took the slot
    engine.cancel(waiting)
    assert [e.finish_reason for e in engine.step() if e.finished] == ["cancelled"]
    assert not engine.has_work() and engine.num_running == 0
    completion = engine.generate(case_request("text_only"))
    assert completion.token_ids == expected_tokens(engine_variant(engine), "text_only")


def engine_variant(engine: Engine) -> str:
    return next(v for v in VARIANTS if model_and_processor(v)[0] is engine.model)


def test_cancel_a_waiting_request() -> None:
    engine = make_engine(VARIANTS[0], max_batch=1)
    first = engine.submit(case_request("text_only"))
    second = engine.submit(case_request("text_only"))
    engine.cancel(second)
    events = run_until_done(engine)
    assert [e.finish_reason for e in events if e.finished and e.request_id == second] == ["cancelled"]
    assert not [e for e in events if e.request_id == second and e.token_id is not None]
    assert [e.finish_reason for e in events if e.finished and e.request_id == first] == ["length"]


def count_tiles(monkeypatch, engine: Engine) -> list[int]:
    """Record the number of tiles of every vision-tower call."""
    calls: list[int] = []
    original = engine.model.encode_tiles

    def counting(tiles):
        calls.append(tiles.shape[0])
        return original(tiles)

    monkeypatch.setattr(engine.model, "encode_tiles", counting)
    return calls


def test_image_cache_encodes_an_image_once_across_requests(monkeypatch) -> None:
    variant = VARIANTS[0]
    engine = make_engine(variant)
    calls = count_tiles(monkeypatch, engine)
    first = engine.generate(case_request("one_square"))
    second = engine.generate(case_request("unicode"))  # same image, other question
    both = engine.generate_batch([case_request("system_turn"), case_request("one_square")])
    assert calls == [2]  # the global view and the single local tile, once
    assert first.token_ids == expected_tokens(variant, "one_square")
    assert second.token_ids == expected_tokens(variant, "unicode")
    assert [c.token_ids for c in both] == [expected_tokens(variant, c) for c in ("system_turn", "one_square")]


def test_image_cache_evicts_the_least_recently_used(monkeypatch) -> None:
    engine = make_engine(VARIANTS[0], image_cache_size=1)
    calls = count_tiles(monkeypatch, engine)
    for case in ("one_square", "one_square", "one_tiny", "one_square"):
        engine.generate(case_request(case, SamplingParams(max_new_tokens=1)))
    assert len(calls) == 3


def test_large_images_are_encoded_a_few_tiles_per_step(monkeypatch) -> None:
    """A 10-tile image takes ten steps of one tile, while a running request keeps decoding."""
    variant = VARIANTS[0]
    engine = make_engine(variant, vision_tiles_per_step=1)
    calls = count_tiles(monkeypatch, engine)
    chatty = engine.submit(case_request("text_only", SamplingParams(max_new_tokens=40, ignore_eos=True)))
    engine.step()
    large = engine.submit(case_request("one_large"))
    per_step = [engine.step() for _ in range(10)]
    assert calls == [1] * 10
    assert all(any(e.request_id == chatty and e.token_id is not None for e in events) for events in per_step)
    events = [e for step in per_step for e in step] + run_until_done(engine)
    tokens = [e.token_id for e in events if e.request_id == large and e.token_id is not None]
    assert tokens == expected_tokens(variant, "one_large")


def test_invalid_requests_are_rejected_before_queueing() -> None:
    engine = shared_engine(VARIANTS[0])
    with pytest.raises(ImageDecodeError):
        engine.submit(Request([{"role": "user", "content": "<image> what?"}], [b"not an image"]))
    with pytest.raises(ImageCountError):
        engine.validate(Request([{"role": "user", "content": "<image> <image>"}], [image_path("square")]))
    with pytest.raises(InputError, match="top_p"):
        engine.submit(Request([{"role": "user", "content": "hi"}], [], SamplingParams(top_p=2.0)))
    assert not engine.has_work()


def test_an_invalid_request_fails_alone_in_a_batch() -> None:
    variant = VARIANTS[0]
    bad = Request([{"role": "user", "content": "<image> what?"}], [b"\x89PNG broken"])
    good, error = shared_engine(variant).generate_batch([case_request("one_square"), bad])
    assert good.finish_reason == "length" and good.token_ids == expected_tokens(variant, "one_square")
    assert error.finish_reason == "error" and "decod" in error.error


def test_a_failure_during_prefill_fails_only_that_request(monkeypatch) -> None:
    variant = VARIANTS[0]
    engine = make_engine(variant)

    def broken_vision(tiles):
        raise RuntimeError("vision tower exploded")

    monkeypatch.setattr(engine.model, "encode_tiles", broken_vision)
    failed, fine = engine.generate_batch([case_request("one_square"), case_request("text_only")])
    assert failed.finish_reason == "error" and "vision tower exploded" in failed.error
    assert fine.finish_reason == "length" and fine.token_ids == expected_tokens(variant, "text_only")
    assert not engine.has_work() and engine.num_running == 0


def test_submit_from_another_thread_while_stepping() -> None:
    variant = VARIANTS[0]
    engine = make_engine(variant, max_batch=2)
    ids: list[str] = []
    submitter = threading.Thread(target=lambda: ids.extend(engine.submit(case_request(c))
                                                           for c in ("text_only", "one_tiny", "system_turn")))
    events = []
    submitter.start()
    while submitter.is_alive() or engine.has_work():
        events += engine.step()
    submitter.join()
    for request_id, case in zip(ids, ("text_only", "one_tiny", "system_turn"), strict=True):
        tokens = [e.token_id for e in events if e.request_id == request_id and e.token_id is not None]
        assert tokens == expected_tokens(variant, case)


def test_duplicate_request_ids_are_rejected() -> None:
    engine = make_engine(VARIANTS[0])
    request = case_request("text_only")
    request.request_id = "same"
    engine.submit(request)
    with pytest.raises(InputError, match="same"):
        engine.submit(Request(request.conversation, [], GREEDY, request_id="same"))
    run_until_done(engine)
    engine.submit(Request(request.conversation, [], GREEDY, request_id="same"))  # free again once finished


# ------------------------------------------------------------------------------ CPU fast paths


def bf16_linear(rows: int, cols: int, bias: bool = False) -> torch.nn.Linear:
    torch.manual_seed(rows * cols)
    return torch.nn.Linear(cols, rows, bias=bias).to(torch.bfloat16)


@pytest.mark.skipif(not fbgemm_fp16_available(), reason="this PyTorch build has no FBGEMM float16 kernels")
def test_packed_linear_is_the_bf16_weights_in_float32() -> None:
    linear = bf16_linear(96, 64, bias=True)
    x = torch.randn(7, 3, 64)
    expected = F.linear(x, linear.weight.float(), linear.bias.float())
    packed = PackedFp16Linear(linear)
    assert (packed(x) - expected).abs().max() < 1e-5
    assert torch.equal(packed.weight, linear.weight)  # bfloat16 -> float16 -> bfloat16 is exact here
    assert packed(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(not fbgemm_fp16_available(), reason="this PyTorch build has no FBGEMM float16 kernels")
def test_packed_mlp_matches_the_mlp_in_float32() -> None:
    mlp = MLP(64, 40).to(torch.bfloat16)
    x = torch.randn(5, 64)
    reference = MLP(64, 40)
    reference.load_state_dict({k: v.float() for k, v in mlp.state_dict().items()})
    assert (PackedFp16MLP(mlp)(x) - reference(x)).abs().max() < 1e-5


@pytest.mark.skipif(not fbgemm_fp16_available(), reason="this PyTorch build has no FBGEMM float16 kernels")
def test_packing_replaces_every_half_linear_but_kv_b_proj() -> None:
    model = load_model(conformance_dir() / "base_like", dtype=torch.bfloat16)
    count = pack_linear_layers(model.language)
    kinds = {type(m).__name__ for m in model.language.modules()}
    plain = [n for n, m in model.language.named_modules() if type(m) is torch.nn.Linear]
    assert count > 0 and {"PackedFp16Linear", "PackedFp16MLP"} <= kinds
    assert plain and all(n.endswith("kv_b_proj") for n in plain)


def test_float32_compute_mode_upcasts_half_matrix_work() -> None:
    linear = bf16_linear(32, 48)
    x = torch.randn(4, 48).bfloat16()
    with float32_compute(True):
        inside = linear(x)
    assert inside.dtype == torch.bfloat16
    assert torch.equal(inside, F.linear(x.float(), linear.weight.float()).bfloat16())


def test_bfloat16_engine_on_cpu_packs_and_generates() -> None:
    root = conformance_dir() / "tiny_like"
    # The automatic plan of a CPU without native bfloat16 (AVX2), whichever CPU runs the test.
    plan = choose_kernels({"avx2"}, torch.device("cpu"), torch.bfloat16, fbgemm_fp16_available())
    engine = Engine(load_model(root, dtype=torch.bfloat16), Processor.from_pretrained(root), kernels=plan)
    assert engine.kernels.prefill == "float32" and (engine.packed_layers > 0) == fbgemm_fp16_available()
    # The vision side stays bfloat16 (upcast as it runs, so memory stays near the checkpoint's size); so does
    # its output.
    vision_side = [*engine._model.vision.parameters(), *engine._model.projector.parameters()]
    assert all(p.dtype == torch.bfloat16 for p in vision_side)
    tiles = torch.zeros(1, 3, *(2 * [engine._model.cfg.vision.image_size]))
    assert engine.encode_tiles(tiles).dtype == torch.bfloat16
    # Cases whose greedy choices have clear margins in float32: bfloat16 weights choose the same.
    completions = engine.generate_batch([case_request("one_square"), case_request("one_wide")])
    assert [c.token_ids for c in completions] == [expected_tokens("tiny_like", c) for c in ("one_square", "one_wide")]
