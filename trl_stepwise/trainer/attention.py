"""Attention in the scoring passes on a CPU: in float32, grouped-query keys and values never copied per query head,
and calls over a few hundred keys as two matrix products instead of the CPU flash kernel.

transformers' SDPA attention hands grouped-query keys and values to torch as they are (``enable_gqa``) only where no
attention mask is given, because CUDA's fast kernels take no mask with it. The scoring passes always have a mask
(padding, the shared prefix's cache), so on a CPU every layer copied its keys and values once per query head
(``repeat_kv``) and summed the copies' gradients back. torch's CPU kernel takes masked grouped-query attention
itself, with the same results: 6.05 s against 7.08 s for a main-job bfloat16 loss pass (benchmarks/README.md).

At the passes' shapes (a few dozen completion tokens per row against a few hundred keys: the few-shot prefix, the
prompt) the CPU flash kernel's backward is slow (3.6x its own forward, 18% of a main-job loss pass), and slower in
bfloat16 than in float32. So calls over at most ``MATMUL_ATTENTION_MAX_KEYS`` keys fold the query heads of each
key/value head into its queries and run as two float32 matrix products with a softmax between them
(``matmul_attention``), and the others run on the flash kernel in float32 too, autocast or not: every scoring pass,
with or without gradients, computes attention in the same precision, so the reference's, the rollout's and the loss
pass's log-probs of equal weights stay equal. A main-job loss pass takes 6.10 s instead of 6.68, closer to float32
(benchmarks/README.md, "Scoring passes").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import transformers.integrations.sdpa_attention as sdpa_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.import_utils import is_torch_greater_or_equal

# enable_gqa in torch.nn.functional.scaled_dot_product_attention
TORCH_HAS_GQA = is_torch_greater_or_equal("2.5", accept_dev=True)

# Keys per call up to which attention runs as matrix products. Their float32 scores are kept for the backward (the
# flash kernel keeps none): 5 bytes per query head and key, at 512 keys ~23 KB per token on SmolLM2-135M (9 heads),
# against ~32 KB of the layer's other activations.
MATMUL_ATTENTION_MAX_KEYS = 512


@contextlib.contextmanager
def cpu_scoring_attention() -> Iterator[None]:
    """Within the block (a scoring pass), transformers' SDPA attention on a CPU runs in float32: masked calls over at
    most ``MATMUL_ATTENTION_MAX_KEYS`` keys as matrix products (``matmul_attention``), the others on torch's kernel
    with grouped-query keys and values unrepeated (``masked_gqa_on_cpu``); on other devices it runs as it does."""
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(original, "cpu_scoring_attention", False):  # nested: the outer block decides
        with masked_gqa_on_cpu():
            yield
        return

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kw):
        if query.device.type != "cpu":
            return original(module, query, key, value, *args, **kw)
        mask = args[0] if args else kw.get("attention_mask")
        if key.shape[-2] <= MATMUL_ATTENTION_MAX_KEYS and _matmul_attention_fits(query, key, mask, args[1:], kw):
            scale = kw.get("scaling")
            scale = query.shape[-1] ** -0.5 if scale is None else scale
            return matmul_attention(query, key, value, mask, scale).transpose(1, 2).contiguous(), None
        with torch.autocast("cpu", enabled=False):
            out, weights = original(module, query.float(), key.float(), value.float(), *args, **kw)
        return out.to(query.dtype), weights

    attention.cpu_scoring_attention = True  # type: ignore[attr-defined]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        with masked_gqa_on_cpu():
            yield
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original


def matmul_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``softmax(q k^T scale, where mask) v`` in float32 for query (B, H, Q, D), keys and values (B, KV, K, D) and a
    boolean mask (B or 1, 1, Q, K); the H / KV query heads that share a key/value head are folded into its queries,
    so the keys are neither copied per query head nor cast down. Returns (B, H, Q, D) in the query's dtype."""
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    with torch.autocast(query.device.type, enabled=False):
        folded = query.float().reshape(rows, kv_heads, group * queries, dim)
        scores = torch.matmul(folded, key.float().transpose(-1, -2)) * scale
        allowed = mask.expand(rows, 1, queries, -1).repeat(1, 1, group, 1)  # folded queries: head-major
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = torch.matmul(weights, value.float())
    return out.view(rows, heads, queries, -1).to(query.dtype)


def _matmul_attention_fits(
    query: torch.Tensor, key: torch.Tensor, mask: Any, rest: tuple, kwargs: dict[str, Any]
) -> bool:
    """Whether a call is one ``matmul_attention`` computes as transformers' SDPA attention would: with a boolean mask
    over exactly its keys in which every query sees a key, and no dropout, position bias or paged cache."""
    dropout = rest[0] if rest else kwargs.get("dropout", 0.0)
    if dropout or kwargs.get("position_bias") is not None or kwargs.get("cache") or kwargs.get("output_attentions"):
        return False
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return False
    rows, heads, queries, _ = query.shape
    if key.dim() != 4 or heads % key.shape[1] or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    if mask.shape[-2:] != (queries, key.shape[2]) or mask.shape[0] not in (1, rows):
        return False
    return bool(mask.any(-1).all())  # a query that sees nothing: the flash kernel's convention for it, not a NaN


@contextlib.contextmanager
def masked_gqa_on_cpu() -> Iterator[None]:
    """Within the block, transformers' SDPA attention passes grouped-query keys and values on a CPU to torch
    unrepeated, mask or not; elsewhere (other devices, equal head dims not given) it decides as it does."""
    original = sdpa_attention.use_gqa_in_sdpa
    if not TORCH_HAS_GQA or getattr(original, "masked_gqa_on_cpu", False):  # nested: the outer block decides
        yield
        return

    def use_gqa(attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
        on_cpu = key.device.type == "cpu" and key.shape[-1] == value.shape[-1]
        return on_cpu or original(attention_mask, key, value)

    use_gqa.masked_gqa_on_cpu = True  # type: ignore[attr-defined]
    sdpa_attention.use_gqa_in_sdpa = use_gqa
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original
