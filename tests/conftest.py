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


def trl_chat_template(name: str) -> str:
    """One of TRL's bundled chat templates (``trl/chat_templates/<name>.jinja``)."""
    from importlib.resources import files

    return (files("trl") / "chat_templates" / f"{name}.jinja").read_text()


@pytest.fixture(scope="session")
def tool_tokenizer():
    """The embedded tokenizer with TRL's Qwen2.5 tool-calling template (it fits the ChatML tokens): the tokenizer a
    TRL user gives a tool-calling setup. Shared: do not mutate it in a test."""
    from trl_stepwise.models import load_tokenizer

    tokenizer = load_tokenizer()
    tokenizer.chat_template = trl_chat_template("qwen2_5")
    return tokenizer


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


@pytest.fixture(scope="session")
def embedded_policy():
    """The embedded SmolLM2-135M-Instruct (float32, eval): the weights the shared vLLM engine starts from."""
    from trl_stepwise.models import load_model

    return load_model(None).eval()


@pytest.fixture(scope="session")
def vllm_engine(embedded_policy, tokenizer):
    """One colocated vLLM engine for the whole test session (vLLM starts once per process; ~25 s on CPU). A test
    that pushes other weights puts the embedded model's back (``restore_vllm_weights``)."""
    from trl_stepwise.engines.factory import vllm_model_path
    from trl_stepwise.engines.vllm_engine import VLLMEngine

    return VLLMEngine(
        vllm_model_path(embedded_policy, tokenizer),
        tokenizer,
        dtype="float32",
        max_model_len=2048,
        kv_cache_space_gb=1,
        generation_config=embedded_policy.generation_config,
    )


@pytest.fixture
def restore_vllm_weights(embedded_policy, vllm_engine):
    """Push the embedded model's own weights back after a test that pushed others."""
    yield
    from trl_stepwise.engines.weights import policy_weights

    with policy_weights(embedded_policy) as weights:
        vllm_engine.sync_weights(weights)


@pytest.fixture(scope="session")
def vllm_server_url(tmp_path_factory):
    """A plain CPU vLLM server (``vllm serve`` with processed log-probs, no weight transfer: NCCL needs CUDA) on the
    embedded model, for the server rows of the combination matrix; started once, stopped at the end."""
    import socket
    import subprocess
    import sys
    import time

    import requests

    from trl_stepwise.models import embedded_model_dir

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_model_dir()),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "2048", "--logprobs-mode", "processed_logprobs",
    ]  # fmt: skip
    with log.open("w") as handle:
        server = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CPU vLLM server did not start: {log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
