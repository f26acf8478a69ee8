"""Attention in the scoring passes on a CPU: grouped-query keys and values go to torch unrepeated, small calls run as
float32 matrix products, both with the same log-probabilities and gradients as transformers' own attention."""

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
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_KEYS", 0)  # every call on the flash kernel
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


def counted(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


def test_small_calls_run_as_matrix_products_with_transformers_results(make_tiny_model, monkeypatch):
    model = make_tiny_model(attn_implementation="sdpa").train()
    batch = make_batch(model.config.vocab_size)
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # transformers' own attention, outside the scoring passes' block
        expected_logps = batching._score_completions(model, batch, temperature=0.7).logps
    model.zero_grad()
    plain = batching._score_completions(model, batch, temperature=0.7)
    (plain.logps * weights * batch["completion_mask"]).sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]

    products = counted(monkeypatch, attention, "matmul_attention")
    flash = counted(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")
    logps, grads = scored(model, batch, weights)
    assert products  # the masked calls (prompts, completions): all small
    assert len(flash) == model.config.num_hidden_layers  # the prefix's: causal without a mask, as before
    mask = batch["completion_mask"]
    assert torch.allclose(logps[mask], expected_logps[mask], atol=1e-5)
    for got, expected in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, expected, atol=1e-5)
    assert not getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "cpu_scoring_attention", False)  # restored after the pass

    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_KEYS", 0)  # too many keys: the flash kernel
    products.clear()
    flash.clear()
    scored(model, batch, weights)
    assert len(flash) > model.config.num_hidden_layers and not products


def test_matrix_products_stay_float32_under_bfloat16_autocast():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, n, 5, 8, generator=generator) for n in (6, 2, 2))
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool).tril(2)
    key, value = torch.cat([key, key[:, :, :2]], 2), torch.cat([value, value[:, :, :2]], 2)
    plain = attention.matmul_attention(query, key, value, mask, 0.35)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = attention.matmul_attention(query, key, value, mask, 0.35)
    assert torch.equal(plain, autocast)  # no matrix product rounded to bfloat16
    repeated = key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1)
    reference = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=mask, scale=0.35)
    assert torch.allclose(plain, reference, atol=1e-6)  # query heads 0-2 share key/value head 0, 3-5 head 1


def test_calls_the_products_cannot_take_stay_on_transformers_path():
    query, key = torch.zeros(2, 4, 3, 8), torch.zeros(2, 2, 5, 8)
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    assert attention._matmul_attention_fits(query, key, mask, (), {})
    blind = mask.clone()
    blind[1, 0, 2] = False  # a query that sees no key (padding): the flash kernel's convention, not a NaN
    assert not attention._matmul_attention_fits(query, key, blind, (), {})
    assert not attention._matmul_attention_fits(query, key, mask.float(), (), {})  # an additive mask
    assert not attention._matmul_attention_fits(query, key, None, (), {})  # causal without a mask
    assert not attention._matmul_attention_fits(query, key, mask, (0.1,), {})  # dropout
    assert not attention._matmul_attention_fits(query, key, mask, (), {"position_bias": torch.zeros(1)})
