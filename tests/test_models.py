"""Model loading: the embedded SmolLM2-135M-Instruct (materialised from its GGUF), aliases, saving, 4-bit options."""

from __future__ import annotations

import pytest
import torch

from trl_stepwise import models
from trl_stepwise.models import (
    EMBEDDED_MODEL_ALIAS,
    ModelLoadError,
    build_quantization_config,
    embedded_model_dir,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_name,
)


@pytest.fixture(scope="module")
def embedded():
    return load_model_and_tokenizer()


@pytest.mark.slow
def test_default_is_the_embedded_model(embedded):
    from transformers import LlamaForCausalLM

    model, tokenizer = embedded
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == 49152 and len(tokenizer) == 49152
    assert model.dtype == torch.float32
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_greedy_chat_answer(embedded):
    model, tokenizer = embedded
    messages = [{"role": "user", "content": "What is 7 + 5? Answer with a number."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "12" in answer, answer


@pytest.mark.slow
def test_save_pretrained_round_trip(embedded, tmp_path):
    model, tokenizer = embedded
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_model_and_tokenizer(str(tmp_path))
    ids = tokenizer("Tom has 3 apples and buys 4 more.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template


def test_alias_resolves_to_the_embedded_folder():
    folder = str(embedded_model_dir())
    assert resolve_model_name(EMBEDDED_MODEL_ALIAS) == folder
    assert resolve_model_name("SmolLM2-135M-Instruct") == folder  # case-insensitive
    assert resolve_model_name(None) == resolve_model_name("") == folder
    assert resolve_model_name("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"  # hub ids pass through
    assert load_tokenizer(EMBEDDED_MODEL_ALIAS).name_or_path == load_tokenizer().name_or_path == folder


@pytest.mark.slow
def test_materialises_into_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    folder = embedded_model_dir()
    assert folder == tmp_path / EMBEDDED_MODEL_ALIAS
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert [p.name for p in tmp_path.iterdir()] == [EMBEDDED_MODEL_ALIAS]  # no staging folder left behind
    tokenizer = load_tokenizer()
    assert tokenizer.name_or_path == str(folder) and tokenizer.chat_template
    # the same weights as the shared cache the other tests use
    from safetensors import safe_open

    monkeypatch.delenv(models.CACHE_ENV_VAR)
    reference = embedded_model_dir()
    if reference != folder:
        with (
            safe_open(folder / "model.safetensors", "pt") as new,
            safe_open(reference / "model.safetensors", "pt") as old,
        ):
            assert set(new.keys()) == set(old.keys())
            for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
                assert torch.equal(new.get_tensor(key), old.get_tensor(key))
    # a second call reuses the folder instead of converting again
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: pytest.fail("materialised twice"))
    assert embedded_model_dir() == folder


def test_4bit_without_peft_names_peft():
    with pytest.raises(ValueError, match="--use_peft"):
        build_quantization_config(load_in_4bit=True)
    with pytest.raises(ValueError, match="not both"):
        build_quantization_config(load_in_4bit=True, load_in_8bit=True, use_peft=True)
    assert build_quantization_config() is None


def test_4bit_with_peft_is_nf4():
    from transformers import BitsAndBytesConfig

    config = build_quantization_config(load_in_4bit=True, use_peft=True)
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant


def test_missing_local_path_is_a_clear_model_load_error(tmp_path):
    missing = tmp_path / "no-such-model"
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelLoadError, match="the local path does not exist") as info:
            load(str(missing))
        assert str(missing) in str(info.value) and EMBEDDED_MODEL_ALIAS in str(info.value)
