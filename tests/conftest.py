"""Shared fixtures: the embedded tokenizer and tiny random Llama models that share its vocabulary.

The tiny models (2 layers, hidden size 32) run a training step in well under a second on CPU, so trainer tests use
them for everything except the few ``slow`` tests that need the real embedded model.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=2048,
)


_DEFAULT_THREADS = torch.get_num_threads()
TEST_THREADS = int(os.environ.get("TRL_STEPWISE_TEST_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """One torch thread by default (``TRL_STEPWISE_TEST_THREADS`` overrides): tiny models only lose time to thread
    sync, and on a busy 2-core machine two threads made the 135M training test 6x slower (217 s vs 38 s)."""
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(_DEFAULT_THREADS)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (left padding, pad token set). Shared: do not mutate it in a test."""
    from trl_stepwise.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_model(tokenizer) -> Callable[..., torch.nn.Module]:
    """Factory: ``make_tiny_model(seed=0, **config_overrides)`` -> a fresh random ``LlamaForCausalLM`` (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0, **overrides):
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **{**TINY_CONFIG, **overrides},
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float()

    return make


@pytest.fixture
def tiny_model(make_tiny_model):
    """A fresh tiny random model for one test."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model, tokenizer, tmp_path_factory):
    """A tiny random model and the embedded tokenizer saved with ``save_pretrained``: load it by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def arithmetic_problems():
    """32 level-1 arithmetic problems (question/answer/solution): short prompts, instant to generate."""
    from trl_stepwise.data import load_math_dataset

    return load_math_dataset("arithmetic:level=1,n=32")
