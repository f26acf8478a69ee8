"""Tensors from trajectories, and memory-bounded log-probabilities of completion tokens.

Sequences are laid out ``[pad | prompt | completion | pad]`` so every completion starts at the same column; the
model is then asked for logits of the completion columns only (``logits_to_keep``), and log-probabilities are
``logit[token] - logsumexp(logits)`` in float32, computed a chunk of positions at a time (forward and backward,
``vocab_logprobs``), so no float32 copy of the vocabulary-sized logits is ever stored, and the logits are neither cut
nor joined (each would copy them). The input embeddings of a whole batch are looked up at once.

When all rows start with the same few-shot prefix (the usual case: hundreds of tokens), the prefix is encoded once
and its key/value cache is shared by every row, gradients included; rows that share their whole prompt (a group's
episodes) share its encoding too (``shared_prompts``), so only the completions are encoded per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from trl_stepwise.kv_cache import shared_prefix_length
from trl_stepwise.rollout import Trajectory
from trl_stepwise.trainer.attention import cpu_scoring_attention
from trl_stepwise.trainer.sharding import agreed_count, padding_call
from trl_stepwise.trainer.shared_prompts import (
    behind_cache,
    encode_prefix,
    encode_prompts,
    model_inputs,
    positions,
    rows_view,
)
from trl_stepwise.trainer.vocab_logprobs import filtered_logprobs, log_softmax_and_entropy, selective_log_softmax


def pad_trajectories(
    trajectories: Sequence[Trajectory],
    pad_id: int | None,
    device: torch.device | str | None = None,
    advantages: Sequence[Sequence[float]] | None = None,
    old_logps: Sequence[Sequence[float]] | None = None,
    ref_logps: Sequence[Sequence[float]] | None = None,
    teacher_logps: Sequence[Sequence[float]] | None = None,
    sampling_logps: Sequence[Sequence[float]] | None = None,
    old_sampling_logps: Sequence[Sequence[float]] | None = None,
    out_of_loss: Sequence[bool] | None = None,
) -> dict[str, torch.Tensor | int]:
    """Stack trajectories into model inputs plus per-token tensors aligned to the completion columns; rows marked
    ``out_of_loss`` (``mask_truncated_completions``) keep their tokens but no completion-mask entry."""
    pad_id = 0 if pad_id is None else pad_id
    shared = shared_prefix_length([t.prompt_ids for t in trajectories])
    prompts = [t.prompt_ids[shared:] for t in trajectories]
    prompt_width = max(len(p) for p in prompts)
    completion_width = max(max(len(t.completion_ids) for t in trajectories), 1)
    rows, masks, completion_masks = [], [], []
    out_of_loss = out_of_loss or [False] * len(trajectories)
    for t, prompt, dropped in zip(trajectories, prompts, out_of_loss, strict=True):
        left = prompt_width - len(prompt)
        right = completion_width - len(t.completion_ids)
        rows.append([pad_id] * left + prompt + t.completion_ids + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(t.completion_ids)) + [0] * right)
        completion_masks.append([bool(m) and not dropped for m in t.policy_mask] + [False] * right)
    attention_mask = torch.tensor(masks, dtype=torch.long)
    completion_mask = torch.tensor(completion_masks, dtype=torch.bool)
    engine_sampled = torch.tensor([t.engine_sampled for t in trajectories], dtype=torch.bool)
    batch: dict[str, torch.Tensor | int] = {
        "input_ids": torch.tensor(rows, dtype=torch.long),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        # tokens the engine sampled (its log-probs are real): not forced, not a reference solution played in
        "sampled_mask": completion_mask & engine_sampled[:, None],
        "completion_width": completion_width,
        "prefix_ids": torch.tensor([trajectories[0].prompt_ids[:shared]], dtype=torch.long),
    }
    per_token = {
        "advantages": advantages,
        "old_logps": old_logps,
        "ref_logps": ref_logps,
        "teacher_logps": teacher_logps,
        "sampling_logps": sampling_logps,
        "old_sampling_logps": old_sampling_logps,
    }
    for name, values in per_token.items():
        if values is not None:
            batch[name] = _pad_floats(values, completion_width)
    if device is not None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def micro_batches(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[Sequence[float]],
    num_micro_batches: int,
    pad_id: int | None,
    old_logps: Sequence[Sequence[float]] | None = None,
    ref_logps: Sequence[Sequence[float]] | None = None,
    teacher_logps: Sequence[Sequence[float]] | None = None,
    sampling_logps: Sequence[Sequence[float]] | None = None,
    old_sampling_logps: Sequence[Sequence[float]] | None = None,
    out_of_loss: Sequence[bool] | None = None,
) -> list[dict[str, torch.Tensor | int]]:
    """Split episodes into ``num_micro_batches`` batches of similar length (less padding), keeping all data aligned."""
    order = sorted(
        range(len(trajectories)), key=lambda i: len(trajectories[i].prompt_ids) + len(trajectories[i].completion_ids)
    )
    num_micro_batches = max(1, min(num_micro_batches, len(order)))
    size = -(-len(order) // num_micro_batches)
    batches = []
    for start in range(0, len(order), size):
        index = order[start : start + size]
        batches.append(
            pad_trajectories(
                [trajectories[i] for i in index],
                pad_id,
                advantages=[advantages[i] for i in index],
                old_logps=[old_logps[i] for i in index] if old_logps is not None else None,
                ref_logps=[ref_logps[i] for i in index] if ref_logps is not None else None,
                teacher_logps=[teacher_logps[i] for i in index] if teacher_logps is not None else None,
                sampling_logps=[sampling_logps[i] for i in index] if sampling_logps is not None else None,
                old_sampling_logps=(
                    [old_sampling_logps[i] for i in index] if old_sampling_logps is not None else None
                ),
                out_of_loss=[out_of_loss[i] for i in index] if out_of_loss is not None else None,
            )
        )
    return batches


@dataclass
class CompletionScores:
    """What one forward pass gives per completion token (B, C)."""

    logps: torch.Tensor  # log pi_T(token): the tempered softmax the policy gradient is taken of (with grad)
    entropy: torch.Tensor | None = None  # of the tempered softmax (no grad)
    sampling_logps: torch.Tensor | None = None  # under the engine's top-k / top-p filter, renormalised (no grad)


def score_completions(model: torch.nn.Module, *args: Any, **kwargs: Any) -> CompletionScores:
    """``_score_completions`` with the CPU's attention for these passes (``cpu_scoring_attention``), except under
    activation checkpointing, whose recomputation in the backward runs outside this call."""
    with contextlib.nullcontext() if _checkpointing(model) else cpu_scoring_attention():
        return _score_completions(model, *args, **kwargs)


def _score_completions(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor | int],
    temperature: float = 1.0,
    with_entropy: bool = False,
    prefix_model: torch.nn.Module | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    sharded_over: int = 0,
) -> CompletionScores:
    """Log-probabilities of the completion tokens; optionally the entropy and the log-probs of the truncated
    distribution the engine samples from (``top_k`` / ``top_p``; without them it is ``logps``).

    Rows of very different lengths are scored in a few length buckets, each cut to its own longest row
    (``length_buckets``): episodes that end after 10 tokens no longer pay for the one that ran 130. Only the first
    bucket goes through ``model``; the shared prefix and the other buckets through ``prefix_model`` (default
    ``model``): pass the unwrapped model when ``model`` is a DDP wrapper, which allows one wrapped forward call per
    backward. ``sharded_over``: the process count of a sharded ``model`` (0: not sharded): every process makes as many
    forward calls as the process that needs the most, the others on one padding token, at zero weight in the result
    (so that a backward runs through them too).
    """
    width = int(batch["completion_width"])
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    inner = prefix_model or model
    prefix = batch.get("prefix_ids")
    has_prefix = prefix is not None and prefix.shape[1] > 0
    prefix_embeds, embeds = (None, None) if sharded_over else _embedded(inner, prefix, input_ids)
    prefix_cache = None
    shared = None
    padding: list[torch.Tensor] = []  # zero-weight outputs that must be in the backward graph (under sharding)
    if not _checkpointing(model):  # recomputation would re-append to a shared cache
        if has_prefix:
            prefix_cache, prefix_logits = encode_prefix(inner, prefix, prefix_embeds)
            if sharded_over:  # the last layer's backward (through the cache) is then announced to FSDP as any other
                padding.append(prefix_logits.sum())
        prompt_width = input_ids.shape[1] - width
        prompt_embeds = None if embeds is None else embeds[:, :prompt_width]
        shared = encode_prompts(
            inner, input_ids[:, :prompt_width], attention_mask[:, :prompt_width], prefix_cache, prompt_embeds
        )
    scale = 1.0 / temperature if temperature > 0 else 1.0
    filtered = top_k > 0 or top_p < 1.0
    parts: list[CompletionScores] = []
    order: list[int] = []
    buckets = length_buckets(attention_mask, width, input_ids.device.type)
    if sharded_over:
        wanted = len(buckets) + (prefix_cache is not None) + (shared is not None)
        padding += [padding_call(inner) for _ in range(agreed_count(wanted, sharded_over) - wanted)]
    for number, bucket in enumerate(buckets):
        first_logits = None
        if shared is not None:  # rows continue their group's encoded prompt: only the completions are encoded
            columns, mask, part_width = _completions_only(attention_mask[bucket], width)
            cache, first_logits = shared.rows(bucket)
        else:
            columns, mask, part_width = _trim(attention_mask[bucket], width)
            cache = rows_view(prefix_cache, len(bucket)) if prefix_cache is not None else None
        ids = input_ids[bucket][:, columns]
        row_embeds = None if embeds is None else embeds[bucket][:, columns]
        if has_prefix:  # with activation checkpointing (no cache) the prefix goes back in every row
            mask = behind_cache(mask, prefix.shape[1])
            if prefix_cache is None:
                ids = torch.cat([prefix.expand(len(bucket), -1), ids], dim=1)
                if row_embeds is not None:
                    row_embeds = torch.cat([prefix_embeds.expand(len(bucket), -1, -1), row_embeds], dim=1)
        out = (model if number == 0 else inner)(
            **model_inputs(ids, row_embeds),
            attention_mask=mask,
            position_ids=positions(mask, ids.shape[1]),
            past_key_values=cache,
            logits_to_keep=part_width + (first_logits is None),
            use_cache=cache is not None,
        )
        targets = ids[:, -part_width:]
        part = _position_scores(out.logits, targets, first_logits, scale, with_entropy, filtered, top_k, top_p)
        parts.append(part)
        order.extend(bucket)
    logps = _assemble([p.logps for p in parts], order, width)
    if padding:  # at zero weight: their backward takes part in the gradient reduction and adds nothing
        logps = logps + torch.stack(padding).sum() * 0.0
    return CompletionScores(
        logps,
        entropy=_assemble([p.entropy for p in parts], order, width) if with_entropy else None,
        sampling_logps=_assemble([p.sampling_logps for p in parts], order, width) if filtered else logps.detach(),
    )


# Padded tokens one more forward call is worth: on a CPU a call costs little beyond its tokens; an accelerator runs
# short calls at a fraction of its throughput, so it splits a batch only where whole rows of padding would go.
BUCKET_CALL_COST_TOKENS = {"cpu": 64}
ACCELERATOR_CALL_COST_TOKENS = 2048
MAX_BUCKETS = 8


def length_buckets(attention_mask: torch.Tensor, completion_width: int, device_type: str = "cpu") -> list[list[int]]:
    """Split rows ``[pad | prompt | completion | pad]`` into at most ``MAX_BUCKETS`` groups (row indices) of similar
    length, each scored padded only to its own longest row: minimises padded tokens plus a cost per forward call
    (dynamic programming over rows sorted by length)."""
    rows = attention_mask.shape[0]
    prompt_width = attention_mask.shape[1] - completion_width
    real = attention_mask.bool()
    # real tokens left of the completion columns, and completion columns up to the last real token
    prompts = real[:, :prompt_width].sum(-1).tolist()
    last = torch.where(real[:, prompt_width:], torch.arange(completion_width, device=real.device) + 1, 0)
    completions = last.max(-1).values.tolist()
    order = sorted(range(rows), key=lambda i: (prompts[i] + completions[i], completions[i]))
    call_cost = BUCKET_CALL_COST_TOKENS.get(device_type, ACCELERATOR_CALL_COST_TOKENS)
    best = [0.0] + [float("inf")] * rows  # best[j]: cost of the first j sorted rows
    cut = [0] * (rows + 1)
    parts = [0] * (rows + 1)
    for j in range(1, rows + 1):
        widest_prompt = widest_completion = 0
        for i in range(j - 1, -1, -1):  # the last bucket holds sorted rows i..j-1
            widest_prompt = max(widest_prompt, prompts[order[i]])
            widest_completion = max(widest_completion, completions[order[i]])
            if parts[i] + 1 > MAX_BUCKETS:
                continue
            cost = best[i] + (j - i) * (widest_prompt + max(widest_completion, 1)) + call_cost
            if cost < best[j]:
                best[j], cut[j], parts[j] = cost, i, parts[i] + 1
    buckets: list[list[int]] = []
    j = rows
    while j > 0:
        buckets.append(sorted(order[cut[j] : j]))  # one bucket: the batch's own order
        j = cut[j]
    return buckets[::-1]


def _trim(attention_mask: torch.Tensor, completion_width: int) -> tuple[slice, torch.Tensor, int]:
    """The columns that are not padding in every row (left of the prompts, right of the completions), their mask and
    the completion columns among them."""
    prompt_width = attention_mask.shape[1] - completion_width
    used = attention_mask[:, :prompt_width].bool().any(0)
    first = int(used.float().argmax()) if bool(used.any()) else prompt_width
    width = _used_completion_width(attention_mask, completion_width)
    end = prompt_width + width
    return slice(first, end), attention_mask[:, first:end], width


def _completions_only(attention_mask: torch.Tensor, completion_width: int) -> tuple[slice, torch.Tensor, int]:
    """The completion columns up to the last one any row uses, and the attention mask of the whole rows (the prompt's
    columns are in the cache)."""
    prompt_width = attention_mask.shape[1] - completion_width
    width = _used_completion_width(attention_mask, completion_width)
    return slice(prompt_width, prompt_width + width), attention_mask[:, : prompt_width + width], width


def _embedded(
    model: torch.nn.Module, prefix: torch.Tensor | None, input_ids: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input embeddings of the prefix (1, P, H) and of the rows (B, W, H) from one lookup, so the pass has one
    embedding backward instead of one per forward call (each a zero-filled vocabulary x hidden gradient, added to
    the others); ``(None, None)`` for a model without ``get_input_embeddings`` (its calls then take token ids)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if embeddings is None:
        return None, None
    prefix_width = 0 if prefix is None else prefix.shape[1]
    ids = input_ids.reshape(-1) if not prefix_width else torch.cat([prefix.reshape(-1), input_ids.reshape(-1)])
    table = embeddings(ids)
    rows = table[prefix_width:].view(*input_ids.shape, -1)
    return (table[None, :prefix_width] if prefix_width else None), rows


def _position_scores(
    logits: torch.Tensor,
    targets: torch.Tensor,
    first_logits: torch.Tensor | None,
    scale: float,
    with_entropy: bool,
    filtered: bool,
    top_k: int,
    top_p: float,
) -> CompletionScores:
    """Scores of the completion tokens ``targets`` (rows, C) from the logits of one forward call: (rows, C + 1, V)
    whose last position predicts nothing, or (rows, C, V) after the prompt's own last logits ``first_logits`` (rows,
    V), which predict the first token. The logits are scored as they are, the last position's result dropped: cutting
    or joining them would copy a vocabulary-sized tensor forward and fill another in the backward."""
    if first_logits is not None:
        settings = (None, scale, with_entropy, filtered, top_k, top_p)
        first = _position_scores(first_logits[:, None], targets[:, :1], *settings)
        rest = _position_scores(logits, targets[:, 1:], *settings)
        return CompletionScores(
            torch.cat([first.logps, rest.logps], dim=1),
            entropy=torch.cat([first.entropy, rest.entropy], dim=1) if with_entropy else None,
            sampling_logps=torch.cat([first.sampling_logps, rest.sampling_logps], dim=1) if filtered else None,
        )
    next_tokens = torch.nn.functional.pad(targets, (0, logits.shape[1] - targets.shape[1]))  # the last: any token
    columns = targets.shape[1]
    if with_entropy:
        logps, entropy = log_softmax_and_entropy(logits, next_tokens, scale)
        scores = CompletionScores(logps[:, :columns], entropy=entropy[:, :columns])
    else:
        scores = CompletionScores(selective_log_softmax(logits, next_tokens, scale)[:, :columns])
    if filtered:
        scores.sampling_logps = filtered_logprobs(logits.detach(), next_tokens, scale, top_k, top_p)[:, :columns]
    return scores


def _used_completion_width(attention_mask: torch.Tensor, completion_width: int) -> int:
    """Completion columns up to the last one any row uses (at least one)."""
    used = attention_mask[:, attention_mask.shape[1] - completion_width :].bool().any(0).nonzero()
    return max(int(used[-1]) + 1 if len(used) else 0, 1)


def _assemble(parts: list[torch.Tensor], order: list[int], width: int) -> torch.Tensor:
    """Per-bucket (rows, own width) scores back into the batch's (B, width) layout and row order."""
    padded = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
    stacked = torch.cat(padded, dim=0) if len(padded) > 1 else padded[0]
    if order == sorted(order):
        return stacked
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return stacked.index_select(0, inverse.to(stacked.device))


def completion_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor | int],
    temperature: float = 1.0,
    with_entropy: bool = False,
    prefix_model: torch.nn.Module | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (B, C) of the completion tokens; optionally the policy entropy per position (no grad)."""
    scores = score_completions(model, batch, temperature, with_entropy, prefix_model)
    return (scores.logps, scores.entropy) if with_entropy else scores.logps


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (recomputation would re-append to a shared cache).

    Looks through wrappers that hold the model as ``.module`` (DDP, DeepSpeed's engine), which do not forward the
    flag: under DDP the shared cache would otherwise meet a checkpointed forward and crash.
    """
    while True:
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            if hasattr(type(model), name) or hasattr(model, name):
                return bool(getattr(model, name, False))
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return False
        model = inner


def _pad_floats(values: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    return torch.tensor([list(v) + [0.0] * (width - len(v)) for v in values], dtype=torch.float32)


@torch.no_grad()
def sequence_logps(
    model: torch.nn.Module,
    trajectories: Sequence[Trajectory],
    *,
    pad_id: int,
    max_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    filtered: bool = False,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    sharded_over: int = 0,
) -> list[list[float]] | tuple[list[list[float]], list[list[float]]]:
    """Log-probs of every completion token, in chunks of at most ``max_tokens`` padded tokens; with ``filtered``, a
    pair: also those under the engine's sampling filter (``top_k`` / ``top_p``), the quantity its log-probs are
    compared with. ``autocast``: the trainer's mixed precision (frozen models sit outside ``accelerator.prepare``).
    ``sharded_over``: the process count of a sharded ``model`` (0: not sharded): every process scores as many chunks
    as the process with the most (the extra ones copies of its last), each with the calls ``score_completions``
    agrees on."""
    was_training = model.training
    model.eval()
    plain: list[list[float]] = []
    under_filter: list[list[float]] = []
    chunks = chunks_by_tokens(trajectories, max_tokens)
    real = len(chunks)
    if sharded_over:  # another process's extra chunks: a copy of the last one in their place, its result dropped
        chunks += [chunks[-1]] * (agreed_count(real, sharded_over) - real)
    try:
        for number, chunk in enumerate(chunks):
            batch = pad_trajectories(chunk, pad_id=pad_id, device=model.device)
            with autocast():
                scores = score_completions(
                    model,
                    batch,
                    temperature=temperature,
                    top_k=top_k if filtered else 0,
                    top_p=top_p if filtered else 1.0,
                    sharded_over=sharded_over,
                )
            if number >= real:
                continue
            lengths = [len(t.completion_ids) for t in chunk]
            plain.extend(row[:n] for row, n in zip(scores.logps.tolist(), lengths, strict=True))
            if filtered:
                rows = scores.sampling_logps.tolist()
                under_filter.extend(row[:n] for row, n in zip(rows, lengths, strict=True))
    finally:
        if was_training:
            model.train()
    return (plain, under_filter) if filtered else plain


def chunks_by_tokens(trajectories: Sequence[Trajectory], max_tokens: int) -> list[list[Trajectory]]:
    """Consecutive trajectories grouped so that each padded chunk stays within ``max_tokens``: the prefix every row
    shares counts once (it is encoded once), the rest of each row as ``longest x count``."""
    shared = shared_prefix_length([t.prompt_ids for t in trajectories]) if trajectories else 0
    chunks: list[list[Trajectory]] = []
    current: list[Trajectory] = []
    longest = 0
    for t in trajectories:
        length = len(t.prompt_ids) + len(t.completion_ids) - shared
        if current and shared + max(longest, length) * (len(current) + 1) > max_tokens:
            chunks.append(current)
            current, longest = [], 0
        current.append(t)
        longest = max(longest, length)
    if current:
        chunks.append(current)
    return chunks
