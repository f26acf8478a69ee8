"""Attention in the scoring passes on a CPU: grouped-query keys and values go to torch unrepeated, with the same
log-probabilities and gradients as transformers' copies per query head, and in float32 under bfloat16 autocast."""

from __future__ import annotations

import torch
import transformers.integrations.sdpa_attention as sdpa_attention
from test_batching import make_batch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from trl_stepwise.trainer import attention, batching


def scored(model, batch, weights):
    model.zero_grad()
    scores = batching.score_completions(model, batch, temperature=0.7, with_entropy=True)
    (scores.logps * weights * batch["completion_mask"]).sum().backward()
    return scores.logps.detach(), [p.grad.clone() for p in model.parameters()]


def test_scoring_on_a_cpu_keeps_grouped_keys_unrepeated_with_the_same_results(make_tiny_model, monkeypatch):
    model = make_tiny_model(attn_implementation="sdpa").train()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    batch = make_batch(model.config.vocab_size)
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(3))
    decision = sdpa_attention.use_gqa_in_sdpa
    repeats = []
    original_repeat = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *args: repeats.append(1) or original_repeat(*args))

    logps, grads = scored(model, batch, weights)
    assert repeats == []  # every layer's masked attention took the keys and values as they are

    monkeypatch.setattr(attention, "TORCH_HAS_GQA", False)  # transformers' own decision: a copy per query head
    expected_logps, expected_grads = scored(model, batch, weights)
    assert repeats, "transformers repeats masked grouped-query keys on a CPU"
    mask = batch["completion_mask"]
    assert torch.allclose(logps[mask], expected_logps[mask], atol=1e-6)
    for got, expected in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, expected, atol=1e-6)
    assert sdpa_attention.use_gqa_in_sdpa is decision  # restored after every block


def test_the_decision_elsewhere_is_transformers_own():
    cpu = torch.zeros(1, 2, 3, 8)
    meta = torch.zeros(1, 2, 3, 8, device="meta")
    mask = torch.zeros(1, 1, 3, 3)
    with attention.masked_gqa_on_cpu():
        assert sdpa_attention.use_gqa_in_sdpa(mask, meta, meta) is False  # not a CPU: masked GQA stays off
        assert sdpa_attention.use_gqa_in_sdpa(None, meta, meta) is True  # transformers' own rule: no mask
        assert sdpa_attention.use_gqa_in_sdpa(mask, cpu, cpu) is True
        with attention.masked_gqa_on_cpu():  # nested blocks leave the outer one's decision in place
            inner = sdpa_attention.use_gqa_in_sdpa
        assert sdpa_attention.use_gqa_in_sdpa is inner


class _Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def test_attention_is_float32_under_bfloat16_autocast_with_or_without_gradients():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, n, 5, 8, generator=generator) for n in (6, 2, 2))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    float32 = sdpa_attention.sdpa_attention_forward(_Attention(), query, key, value, mask)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bfloat16 = ALL_ATTENTION_FUNCTIONS["sdpa"](_Attention(), query, key, value, mask)[0]
    assert (bfloat16.float() - float32).abs().max() > 1e-3  # outside the block: autocast's bfloat16
    for gradients in (True, False):  # a loss pass, a reference pass: the same precision
        with attention.cpu_scoring_attention(), torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.set_grad_enabled(gradients):
                out = ALL_ATTENTION_FUNCTIONS["sdpa"](_Attention(), query, key, value, mask)[0]
                with attention.cpu_scoring_attention():  # nested: the outer block's function stays
                    assert ALL_ATTENTION_FUNCTIONS["sdpa"].cpu_scoring_attention
        assert out.dtype == torch.float32
        assert torch.allclose(out, float32, atol=1e-6)
    assert not getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "cpu_scoring_attention", False)  # restored after the block
