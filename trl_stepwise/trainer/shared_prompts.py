"""Encode each prompt once, however many rows continue it: the few-shot prefix every row shares, then each distinct
prompt (a group's episodes all start from the same one), with gradients flowing back through the shared keys/values.

With 4 episodes per problem and a 300-token few-shot prefix, a 16-episode step otherwise encodes the prefix once per
call and each question four times: about a third of the tokens of every scoring and loss pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import DynamicCache


def encode_prefix(
    model: torch.nn.Module, prefix: torch.Tensor, prefix_embeds: torch.Tensor | None = None
) -> tuple[DynamicCache, torch.Tensor]:
    """Encode the shared prefix once (with gradients when enabled): one row of keys/values, and the last logits.
    ``prefix_embeds``: its input embeddings, when the caller looked them up (then ``prefix`` is not read again)."""
    cache = DynamicCache(config=config_of(model))
    out = model(**model_inputs(prefix, prefix_embeds), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits


def rows_view(prefix_cache: DynamicCache, rows: int) -> DynamicCache:
    """A cache whose every row views the prefix's one row (no copy); the forward appends to the view only."""
    return _with_rows(prefix_cache, lambda t: t.expand(rows, -1, -1, -1))


@dataclass
class SharedPrompts:
    """The distinct prompts of a batch, encoded once: their cache (one row each, after the shared prefix), the logits
    of their last token (which predict each row's first completion token) and, per row, the index of its prompt."""

    cache: DynamicCache
    last_logits: torch.Tensor  # (distinct prompts, vocabulary)
    index: torch.Tensor  # (rows,) row -> its prompt

    def rows(self, rows: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """The cache and first-token logits of these rows (copies: each row's forward appends to its own)."""
        index = self.index[rows]
        return _with_rows(self.cache, lambda t: t.index_select(0, index)), self.last_logits.index_select(0, index)


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
    """``(the first row of each distinct prompt, row -> its prompt)``; None when every row's prompt is its own."""
    keys = torch.cat([prompt_ids * prompt_mask, prompt_mask], dim=1)  # padding of equal prompts is equal too
    unique, index = torch.unique(keys, dim=0, return_inverse=True)
    if unique.shape[0] == keys.shape[0]:
        return None
    first = [int((index == n).nonzero()[0]) for n in range(unique.shape[0])]
    return first, index


def encode_prompts(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prefix_cache: DynamicCache | None,
    prompt_embeds: torch.Tensor | None = None,
) -> SharedPrompts | None:
    """Encode each distinct prompt of ``[pad | prompt]`` rows once, after the shared prefix's cache when there is
    one; None when no two rows share a prompt (nothing to save). ``prompt_embeds``: the rows' input embeddings, when
    the caller looked them up."""
    found = distinct_prompts(prompt_ids, prompt_mask)
    if found is None:
        return None
    first, index = found
    ids = prompt_ids[first]
    cache = rows_view(prefix_cache, len(first)) if prefix_cache is not None else DynamicCache(config=config_of(model))
    mask = behind_cache(prompt_mask[first], cache.get_seq_length())
    out = model(
        **model_inputs(ids, None if prompt_embeds is None else prompt_embeds[first]),
        attention_mask=mask,
        position_ids=positions(mask, ids.shape[1]),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # prompts are left-padded: the last column is every prompt's last token
    )
    return SharedPrompts(cache, out.logits[:, -1, :], index.to(prompt_ids.device))


def model_inputs(ids: torch.Tensor, embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A forward call's token inputs: the embeddings when the caller looked them up, else the token ids."""
    return {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}


def behind_cache(mask: torch.Tensor, cached: int) -> torch.Tensor:
    """The attention mask of rows that continue ``cached`` columns every row attends to (the shared prefix)."""
    if not cached:
        return mask
    return torch.cat([torch.ones((mask.shape[0], cached), dtype=mask.dtype, device=mask.device), mask], dim=1)


def positions(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Position ids of the last ``width`` columns: padding anywhere before them does not count."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]


def config_of(model: torch.nn.Module):
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def _with_rows(cache: DynamicCache, rows) -> DynamicCache:
    """A shallow copy of ``cache`` whose every layer's keys and values are ``rows(tensor)``."""
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in view.layers:
        layer.keys = rows(layer.keys)
        layer.values = rows(layer.values)
    return view
