"""The inference engine: requests in, streamed tokens out, many requests batched together.

`Engine.step()` is one scheduler iteration: cancelled requests leave, waiting requests take free
KV-cache slots, up to `prefill_chunk` prompt tokens are prefilled, then every sequence with a
sampled token decodes together in one `decode_step` (each row at its own position, no padding).
Images are encoded by the vision tower once per distinct image (an LRU keyed by the digest of
the image's tiles and the request's adapter), so a picture shared by several turns or requests costs one encoding, and a
few tiles per step, so a large image does not stall the requests already decoding.

With LoRA adapters loaded (dsvl2.adapters), each request names the one it runs (`Request.adapter`) over the
shared base weights; a step runs one decode forward per adapter among its sequences, since a routed
expert sees a gathered subset of rows and cannot follow a per-row choice.

`submit` and `cancel` may be called from any thread; `step` belongs to one thread (a server's
loop). `stream`, `generate` and `generate_batch` drive `step` themselves, for scripts and the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsvl2.adapters.lora import selection_of
from dsvl2.config import ModelFolder
from dsvl2.engine.cache import KVCache
from dsvl2.engine.cpu import (
    fbgemm_fp16_available,
    float32_attention,
    float32_compute,
    pack_language,
    set_native_rows,
)
from dsvl2.engine.kernels import (
    FLOAT32,
    NATIVE,
    NATIVE_PREFILL_ROWS,
    PACKED,
    KernelPlan,
    keeps_half_weights,
    resolve_kernels,
)
from dsvl2.engine.sampling import SamplingParams, StopStringFilter, make_generator, sample_next
from dsvl2.engine.scheduler import Phase, Scheduler, Sequence, contiguous_range
from dsvl2.errors import InputError, PromptTooLongError
from dsvl2.loading import load
from dsvl2.machine import cpu_flags
from dsvl2.quant.experts import fuse_experts

logger = logging.getLogger(__name__)


@dataclass
class Request:
    conversation: list[dict]  # [{"role": "user"|"assistant"|"system", "content": "... <image> ..."}]
    images: list = field(default_factory=list)  # PIL images, bytes or paths, in <image> order
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""  # filled with a uuid when empty
    adapter: str | None = None  # a loaded adapter's name; None: the engine's default_adapter


@dataclass
class TokenEvent:
    """One per generated token, and a final one (token_id None) that carries the finish reason."""

    request_id: str
    text: str  # newly completed text (never half a UTF-8 char, stop text removed)
    token_id: int | None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    prompt_tokens: int = 0  # image tokens included
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    request_id: str = ""

    def add(self, event: TokenEvent) -> None:
        """Fold the next streamed event of this request into the completion."""
        self.text += event.text
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
        self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens
        if event.finished:
            self.finish_reason, self.error = event.finish_reason or "", event.error


class ImageEmbeddingCache:
    """LRU of per-image token embeddings [n_tokens, D], keyed by (tile digest, tile grid)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class ImageEncoding:
    """A prompt's images on their way through the vision tower, a few tiles per engine step.

    Images found in the engine's cache (same tile digest and grid) are not encoded again; the
    missing ones are encoded tile by tile in order, and each image is laid out into its token
    sequence (and cached) as soon as its last tile is done.
    """

    def __init__(self, sample: Any, adapter: str | None = None) -> None:
        crops = [(int(w), int(h)) for w, h in sample.images_spatial_crop.tolist() if w and h]
        digests = list(sample.image_digests) or [None] * len(crops)
        self.pixels = sample.pixel_values
        self.crops = crops
        self.starts = [0]
        for w, h in crops:
            self.starts.append(self.starts[-1] + 1 + w * h)
        self.adapter = adapter  # an adapter may change the vision tower or projector: its own cache entries
        self.keys = [(digest, w, h, adapter) if digest else None
                     for digest, (w, h) in zip(digests, crops, strict=True)]
        self.features: list[torch.Tensor | None] = [None] * len(crops)
        self.done_tiles: dict[int, list[torch.Tensor]] = {}  # image -> projected tiles encoded so far

    def advance(self, engine: Engine, tile_budget: int) -> bool:
        """Encode up to `tile_budget` missing tiles (one vision call); True once every image is ready."""
        for i, key in enumerate(self.keys):
            if self.features[i] is None and key is not None:
                self.features[i] = engine.image_cache.get(key)  # another request may have encoded it
        wanted = [(i, t) for i, value in enumerate(self.features) if value is None
                  for t in range(self.starts[i] + self._encoded(i), self.starts[i + 1])][:tile_budget]
        if wanted:
            with engine.adapter_context(self.adapter):
                encoded = engine.encode_tiles(self.pixels[[t for _, t in wanted]])
            for (i, _), tile in zip(wanted, encoded, strict=True):
                self.done_tiles.setdefault(i, []).append(tile)
            for i in sorted({i for i, _ in wanted}):
                if self._encoded(i) == self.starts[i + 1] - self.starts[i]:
                    self._finish(engine, i)
        return all(value is not None for value in self.features)

    def _encoded(self, image: int) -> int:
        return len(self.done_tiles.get(image, []))

    def _finish(self, engine: Engine, image: int) -> None:
        width_tiles, height_tiles = self.crops[image]
        tiles = torch.stack(self.done_tiles.pop(image))
        self.features[image] = engine.model.layout_image(tiles, width_tiles, height_tiles)
        engine.stats["images_encoded"] += 1
        if self.keys[image] is not None:
            engine.image_cache.put(self.keys[image], self.features[image])


class Engine:
    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        prefill_chunk: int = 512,
        image_cache_size: int = 64,
        vision_tiles_per_step: int | None = None,
        compile: bool = False,
        kernels: str | KernelPlan | None = None,
        default_adapter: str | None = None,
    ) -> None:
        """`vision_tiles_per_step`: image tiles encoded per step (default 2 on CPU, 32 on GPU).
        `kernels`: the path each part runs (dsvl2.engine.kernels): None or "auto" chooses by the CPU's
        capabilities, a --kernels value ("native", "prefill=float32,decode=native") changes that choice,
        a KernelPlan is used as it is. Applied once, in place: a float16-packed path packs the language
        model's linear layers (a float32 vision path keeps the vision weights 16-bit and upcasts them as used).
        `default_adapter`: the loaded adapter a request without one runs (None: the base model)."""
        self._model = model.eval()
        self._processor = processor
        self.adapters = selection_of(model)
        self.adapter_names = tuple(self.adapters.names) if self.adapters is not None else ()
        if default_adapter is not None and default_adapter not in self.adapter_names:
            raise InputError(f"default adapter {default_adapter!r} is not loaded; loaded: "
                             f"{', '.join(self.adapter_names) or 'none'}")
        self.default_adapter = default_adapter
        lang = model.cfg.language
        self.max_len = int(max_len or lang.max_position_embeddings)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        param = next(model.language.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(lang, max_batch, self.max_len, dtype=self.dtype, device=self.device)
        self.scheduler = Scheduler(max_batch, prefill_chunk)
        self.image_cache = ImageEmbeddingCache(image_cache_size)
        # A step encodes at most this many image tiles, so one large image does not stall every other
        # request for the whole vision pass; a CPU's tiles are slow, so it takes fewer per step.
        self.vision_tiles_per_step = vision_tiles_per_step or (2 if self.device.type == "cpu" else 32)
        self.kernels = resolve_kernels(kernels, self.device, self.dtype, fbgemm_fp16=fbgemm_fp16_available())
        self.packed_layers = self._apply_kernels(self.kernels)
        logger.info("%s", self.kernels.describe())
        self._decode_fn = self._compiled_decode() if compile else model.decode_step
        self.stats = {"vision_calls": 0, "images_encoded": 0, "prefill_tokens": 0, "decode_steps": 0}

    def _apply_kernels(self, plan: KernelPlan) -> int:
        """Convert the model in place for `plan`; returns the number of language modules packed."""
        language = self._model.language
        packed = pack_language(language, decoder=plan.decode_small == PACKED, lm_head=plan.lm_head == PACKED)
        set_native_rows(language, NATIVE_PREFILL_ROWS if plan.prefill == NATIVE else None)
        if plan.attention == FLOAT32:
            float32_attention(language)
        fuse_experts(language)  # quantized experts: one kernel call per MoE layer where the C++ kernels run them
        return packed

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | ModelFolder | None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        progress: bool = False,
        adapters: dict[str, str | Path] | None = None,
        quantize: str | None = None,
        group_size: int | None = None,
        quantize_also: str | tuple[str, ...] | None = None,
        check_memory: bool = True,
        **kwargs: Any,
    ) -> Engine:
        """An engine on a checkpoint folder's weights and processor (None: the bundled default model);
        `dsvl2.loading` chooses the device and dtype left unset (a GPU in bfloat16; the CPU in the checkpoint's
        16-bit dtype where a kernel path computes it fast, else in float32). `quantize` "none", "int8" or "int4"
        (None: as the checkpoint is), `group_size`, `quantize_also`, `check_memory` and `adapters` (LoRA adapter
        folders by name; `default_adapter` chooses the one requests run by default): see `dsvl2.loading.load`."""
        half_ok = keeps_half_weights(cpu_flags(), fbgemm_fp16_available())
        model, processor = load(model_dir, device=device, dtype=dtype, progress=progress, cpu_half=half_ok,
                                quantize=quantize, group_size=group_size, quantize_also=quantize_also,
                                check_memory=check_memory, cache_slots=kwargs.get("max_batch", 8),
                                cache_len=kwargs.get("max_len"), adapters=adapters)
        return cls(model, processor, **kwargs)

    # -- properties -----------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self._model

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return self._processor.tokenizer

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def adapter_context(self, name: str | None) -> contextlib.AbstractContextManager:
        """The context in which the model runs adapter `name` (None: the base model)."""
        return self.adapters.use(name) if self.adapters is not None else contextlib.nullcontext()

    def _resolve_adapter(self, request: Request) -> str | None:
        name = request.adapter if request.adapter is not None else self.default_adapter
        if name is not None and name not in self.adapter_names:
            raise InputError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.adapter_names) or 'none'}")
        return name

    # -- submitting -----------------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        """Raise an InputError subclass for a request that cannot run (bad sampling values, bad image,
        tag/image count mismatch, prompt too long)."""
        self._encode(request)

    def _encode(self, request: Request) -> Any:
        if not isinstance(request.sampling, SamplingParams):
            raise InputError(f"sampling must be a SamplingParams, got {type(request.sampling).__name__}")
        request.sampling.validate()
        self._resolve_adapter(request)
        # No images on the request: the processor takes each message's own "images" list, if any.
        images = list(request.images) if request.images else None
        sample = self._processor.encode(request.conversation, images, inference=True)
        if len(sample) >= self.max_len:
            raise PromptTooLongError(
                f"the prompt is {len(sample)} tokens long (image tokens included); the engine's context "
                f"is {self.max_len} tokens and at least one must be left for the answer"
            )
        return sample

    def submit(self, request: Request) -> str:
        """Validate and queue a request; returns its id. Safe to call from any thread."""
        sample = self._encode(request)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        params = request.sampling
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.add(self.tokenizer.eos_id)
        needs_generator = not params.greedy
        seq = Sequence(
            request_id=request.request_id,
            sample=sample,
            sampling=params,
            stop_ids=frozenset(stop_ids),
            generator=make_generator(params.seed, self.device) if needs_generator else None,
            decoder=self.tokenizer.stream_decoder(),
            stop_filter=StopStringFilter(params.stop),
            adapter=self._resolve_adapter(request),
        )
        try:
            self.scheduler.add(seq)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request; its final event (finish_reason "cancelled") comes from the next step."""
        self.scheduler.cancel(request_id)

    # -- stepping -------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One scheduler iteration; returns the events it produced, in order."""
        events: list[TokenEvent] = []
        with torch.inference_mode():
            for seq in self.scheduler.take_cancelled():
                events.append(self._final_event(seq, "cancelled"))
            self.scheduler.admit()
            for seq, start, stop in self.scheduler.prefill_plan():
                events += self._guarded(seq, self._prefill, seq, start, stop)
            batch = self.scheduler.decode_batch()
            if batch:
                events += self._decode(batch)
        return events

    def _guarded(self, seq: Sequence, fn: Any, *args: Any) -> list[TokenEvent]:
        """Run one sequence's work; an exception finishes that sequence alone with "error"."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - any failure must end the request, not the engine
            logger.exception("request %s failed", seq.request_id)
            return [self._fail(seq, exc)]

    def _fail(self, seq: Sequence, exc: BaseException) -> TokenEvent:
        message = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        return self._final_event(seq, "error", error=message)

    def _prefill(self, seq: Sequence, start: int, stop: int) -> list[TokenEvent]:
        if seq.prompt_embeds is None:
            seq.prompt_embeds = self._prompt_embeddings(seq)
            if seq.prompt_embeds is None:
                return []  # images still encoding; the prompt's tokens wait for the next step
        embeds = seq.prompt_embeds[start:stop][None]
        positions = torch.arange(start, stop, device=self.device)[None]
        slots = torch.tensor([seq.slot], device=self.device)
        with float32_compute(self.kernels.prefill == FLOAT32):
            with self.cache.slot_range(seq.slot, seq.slot + 1), self.adapter_context(seq.adapter):
                logits = self._model.decode_step(embeds, positions, self.cache, slots, absorbed=False)
        seq.prefilled = stop
        self.stats["prefill_tokens"] += stop - start
        if stop < seq.prompt_len:
            return []
        seq.prompt_embeds = None
        seq.phase = Phase.DECODE
        token = sample_next(logits[:, -1], [seq.sampling], [seq.generator], [self._history(seq)])[0]
        seq.first_token_time = time.monotonic()
        return self._accept(seq, token)

    def _decode(self, batch: list[Sequence]) -> list[TokenEvent]:
        """One decode forward per adapter among the batch's sequences (one in all without adapters)."""
        groups: dict[str | None, list[Sequence]] = {}
        for seq in batch:
            groups.setdefault(seq.adapter, []).append(seq)
        events: list[TokenEvent] = []
        for name, group in groups.items():
            with self.adapter_context(name):
                events += self._decode_group(group)
        return events

    def _decode_group(self, batch: list[Sequence]) -> list[TokenEvent]:
        tokens = torch.tensor([[s.output_ids[-1]] for s in batch], device=self.device)
        positions = torch.tensor([[s.next_position] for s in batch], device=self.device)
        slots_list = [s.slot for s in batch]
        slots = torch.tensor(slots_list, device=self.device)
        embeds = self._model.embed_tokens(tokens)
        span = contiguous_range(slots_list)
        try:
            if span is not None:
                with self.cache.slot_range(*span):
                    logits = self._decode_fn(embeds, positions, self.cache, slots)
            else:
                logits = self._decode_fn(embeds, positions, self.cache, slots)
        except Exception as exc:  # noqa: BLE001 - a failed batch ends its requests, not the engine
            logger.exception("decode step failed")
            return [self._fail(seq, exc) for seq in batch]
        self.stats["decode_steps"] += 1
        params = [s.sampling for s in batch]
        generators = [s.generator for s in batch]
        histories = [self._history(s) if s.sampling.repetition_penalty != 1.0 else None for s in batch]
        next_tokens = sample_next(logits[:, -1], params, generators, histories)
        events: list[TokenEvent] = []
        for seq, token in zip(batch, next_tokens, strict=True):
            events += self._guarded(seq, self._accept, seq, token)
        return events

    @staticmethod
    def _history(seq: Sequence) -> list[int] | None:
        if seq.sampling.repetition_penalty == 1.0:
            return None
        return seq.prompt_ids + seq.output_ids

    def _accept(self, seq: Sequence, token: int) -> list[TokenEvent]:
        """Record a sampled token; the token's event, then the final event if it ended the sequence."""
        seq.output_ids.append(token)
        reason = None
        text = ""
        if token in seq.stop_ids:
            reason = "stop"
        else:
            text, hit_stop = seq.stop_filter.push(seq.decoder.push(token))
            reason = "stop" if hit_stop else None
        if reason is None and (
            len(seq.output_ids) >= seq.sampling.max_new_tokens or seq.prompt_len + len(seq.output_ids) >= self.max_len
        ):
            reason = "length"
        events = [self._event(seq, text, token)]
        if reason is not None:
            events.append(self._final_event(seq, reason))
        return events

    def _event(self, seq: Sequence, text: str, token: int | None, **kw: Any) -> TokenEvent:
        return TokenEvent(seq.request_id, text, token, prompt_tokens=seq.prompt_len,
                          completion_tokens=len(seq.output_ids), **kw)

    def _final_event(self, seq: Sequence, reason: str, error: str | None = None) -> TokenEvent:
        """Free the sequence's slot and release the text still held back (unless a stop string ended it)."""
        self.scheduler.release(seq)
        text = ""
        if reason in ("stop", "length") and not seq.stop_filter.stopped:
            text, _ = seq.stop_filter.push(seq.decoder.flush())
            text += seq.stop_filter.flush()
        return self._event(seq, text, None, finished=True, finish_reason=reason, error=error)

    # -- images ---------------------------------------------------------------------------------

    def _prompt_embeddings(self, seq: Sequence) -> torch.Tensor | None:
        """Prompt embeddings [T, D] with each image's features at its image tokens, or None while
        the images are still being encoded (at most `vision_tiles_per_step` tiles per step)."""
        if seq.images is None:
            seq.images = ImageEncoding(seq.sample, seq.adapter)
        if not seq.images.advance(self, self.vision_tiles_per_step):
            return None
        input_ids = seq.sample.input_ids.to(self.device)[None]
        mask = seq.sample.images_seq_mask.to(self.device)[None]
        embeds = self._model.embed_with_images(input_ids, mask, seq.images.features)
        seq.images = None
        return embeds[0]

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Normalised tiles [N, 3, S, S] -> projected tile embeddings [N, s*s, D] (one vision call)."""
        self.stats["vision_calls"] += 1
        # The vision weights stay 16-bit (memory near the checkpoint's size); a float32 path upcasts each as it runs.
        with float32_compute(self.kernels.vision == FLOAT32, keep_float32=True):
            return self._model.encode_tiles(tiles.to(self.device)).to(self.dtype)

    # -- compile --------------------------------------------------------------------------------

    def _compiled_decode(self) -> Any:
        """torch.compile'd decode step (GPU only); any failure falls back to the eager step."""
        eager = self._model.decode_step
        if self.device.type != "cuda":
            logger.warning("compile=True is only used on CUDA; decoding eagerly on %s", self.device)
            return eager
        compiled = torch.compile(eager, dynamic=True)
        state = {"fn": compiled}

        def decode(*args: Any, **kwargs: Any) -> torch.Tensor:
            try:
                return state["fn"](*args, **kwargs)
            except Exception:  # noqa: BLE001 - compilation problems must not stop serving
                if state["fn"] is eager:
                    raise
                logger.exception("compiled decode failed; falling back to eager decoding")
                state["fn"] = eager
                return eager(*args, **kwargs)

        return decode

    # -- blocking helpers -----------------------------------------------------------------------

    def stream(self, request: Request) -> Iterator[TokenEvent]:
        """Submit and step until this request finishes, yielding its events. Raises InputError for an
        invalid request. Drives `step()` itself: not for use beside a background stepping thread."""
        request_id = self.submit(request)
        try:
            while True:
                for event in self.step():
                    if event.request_id == request_id:
                        yield event
                        if event.finished:
                            return
        finally:
            if self.scheduler.is_active(request_id):  # the consumer stopped early
                self.cancel(request_id)
                self.step()

    def generate(self, request: Request) -> Completion:
        """Run one request to completion (raises InputError for an invalid request)."""
        return self.generate_batch([request], raise_invalid=True)[0]

    def generate_batch(self, requests: list[Request], raise_invalid: bool = False) -> list[Completion]:
        """Run requests together; an invalid one gets a Completion with finish_reason "error"."""
        completions: dict[str, Completion] = {}
        ids: list[str] = []
        for request in requests:
            try:
                ids.append(self.submit(request))
            except InputError as exc:
                if raise_invalid:
                    raise
                request_id = request.request_id or uuid.uuid4().hex
                ids.append(request_id)
                completions[request_id] = Completion("", [], "error", 0, 0, error=str(exc), request_id=request_id)
        pending = {i: Completion("", [], "", 0, 0, request_id=i) for i in ids if i not in completions}
        while pending:
            for event in self.step():
                partial = pending.get(event.request_id)
                if partial is None:
                    continue
                partial.add(event)
                if event.finished:
                    completions[event.request_id] = pending.pop(event.request_id)
        return [completions[i] for i in ids]
