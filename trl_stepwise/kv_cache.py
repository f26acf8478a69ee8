"""A key/value cache that appends in place, for long batched decoding on CPU.

transformers' ``DynamicLayer`` concatenates the whole cache with each new token, which copies every row's keys and
values once per decoded token: with a shared few-shot prefix repeated over a batch of 64 episodes that is gigabytes
of memory traffic per token. ``GrowingLayer`` keeps spare capacity and writes new tokens into it, so a token costs
only its own keys and values (the buffer grows by a fixed margin, copied once per margin).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
MIN_SHARED_PREFIX = 16  # a shared prefix shorter than this is not worth its own pass
SPARE = 128  # tokens of room added per growth: one copy per 128 decoded tokens, little memory held spare


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` with preallocated room to grow; ``keys``/``values`` are views of the filled part."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._keys is None or self._length + new > self._keys.shape[-2]:
            self._grow(key_states, value_states, self._length + new)
        self._keys[:, :, self._length : self._length + new] = key_states
        self._values[:, :, self._length : self._length + new] = value_states
        self._length += new
        self._refresh_views()
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        capacity = needed + SPARE
        batch, heads, _, key_dim = key_states.shape
        keys = key_states.new_empty((batch, heads, capacity, key_dim))
        values = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        if self._keys is not None and self._length:
            keys[:, :, : self._length] = self._keys[:, :, : self._length]
            values[:, :, : self._length] = self._values[:, :, : self._length]
        self._keys, self._values = keys, values

    def _refresh_views(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._keys = self._keys[indices, ...]
            self._values = self._values[indices, ...]
            self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingLayer does not support crop(); use DynamicCache for speculative decoding.")


def growing_cache(config) -> DynamicCache:
    """A ``DynamicCache`` whose layers append in place."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


@contextlib.contextmanager
def grouped_query_attention():
    """Let SDPA handle grouped-query attention itself (``enable_gqa``) even with a padding mask.

    Without it transformers repeats every key/value head for each query head before attention: a full copy of the
    cache per layer per token. The flag is read per call, so it is set only while the rollout runs.
    """
    previous = os.environ.get(FORCE_GQA_ENV)
    os.environ[FORCE_GQA_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_GQA_ENV, None)
        else:
            os.environ[FORCE_GQA_ENV] = previous


def shared_prefix_length(sequences: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX) -> int:
    """Tokens every sequence starts with, keeping at least one own token per sequence; 0 when shorter than
    ``minimum`` (encoding the shared prefix once then costs more than it saves)."""
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1
    for sequence in sequences[1:]:
        n = 0
        while n < length and sequence[n] == first[n]:
            n += 1
        length = n
    return length if length >= minimum else 0
