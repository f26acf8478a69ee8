"""Model shapes the benchmarks build with random weights (nothing downloaded), shared by the scripts that need them."""

from __future__ import annotations

from typing import Any

# Llama-3.2-1B's configuration: the shape of the recipes' GPU model
LLAMA_3_2_1B: dict[str, Any] = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
