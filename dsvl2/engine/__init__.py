"""Inference engine: KV cache, sampling, continuous batching."""

from dsvl2.engine.cache import KVCache, cache_bytes_per_token
from dsvl2.engine.generate import Completion, Engine, Request, TokenEvent
from dsvl2.engine.sampling import SamplingParams, sample_next

__all__ = [
    "Completion", "Engine", "KVCache", "Request", "SamplingParams", "TokenEvent", "cache_bytes_per_token",
    "sample_next",
]
