"""The combination matrix (``tests/matrix_cells.py``): every cell trains right or is refused in one line.

A training cell runs 2 optimizer steps on the embedded model and asserts: no error, every trainable tensor changed,
nothing NaN, and the sampler's and the trainer's log-probs of the sampled tokens agree after an optimizer step. The
colocated vLLM cells share the session's engine (built through the trainer's own factory, so its checks run); the
server cells run against a CPU ``vllm serve`` started for the session. 2-process cells go through
``accelerate launch --multi_gpu --num_processes 2`` (DDP over gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matrix_cells import CELLS, GAP_TOLERANCE, Cell, run_cell, uncovered_pairs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _two_threads():
    """The cells train a 135M model: two torch threads (the machine's cores) make them ~35% faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_the_cells_cover_every_pair_of_values():
    assert uncovered_pairs(CELLS) == []


def _check_trained(result: dict, cell: Cell) -> None:
    assert result["refused"] is None, result["refused"]
    assert result["steps"] == 2
    assert result["trainable"] > 0 and result["unchanged"] == [], f"{cell.name}: not trained: {result['unchanged']}"
    assert result["finite"], f"{cell.name}: NaN or inf"
    gaps = result["gaps"]
    assert len(gaps) == 2 and all(g is not None for g in gaps), gaps
    assert gaps[-1] < GAP_TOLERANCE, f"{cell.name}: sampler and trainer disagree by {gaps[-1]:.4f} after a step"


TWO_PROCESS_CELLS = [c for c in CELLS if c.engine == "transformers" and c.processes == 2]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict[str, list[dict]]:
    """Every 2-process cell in one ``accelerate launch`` (the launch, imports and gloo start-up paid once), played
    the first time a 2-process cell asks; ``{cell name: [rank 0 result, rank 1 result]}``."""
    output_dir = tmp_path_factory.mktemp("two_process_cells")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "matrix_cells.py"), ",".join(c.name for c in TWO_PROCESS_CELLS), str(output_dir),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {
        c.name: [json.loads((output_dir / c.name / f"rank{r}.json").read_text()) for r in (0, 1)]
        for c in TWO_PROCESS_CELLS
    }


@pytest.fixture
def shared_vllm(monkeypatch, vllm_engine, restore_vllm_weights):
    """Colocated cells get the session's engine from the trainer's own factory (its checks still run)."""
    import trl_stepwise.engines.vllm_engine as vllm_engine_module

    monkeypatch.setattr(vllm_engine_module, "VLLMEngine", lambda *args, **kwargs: vllm_engine)
    return vllm_engine


@pytest.mark.parametrize("cell", [c for c in CELLS if c.engine == "transformers"], ids=lambda c: c.name)
def test_transformers_engine_cells(cell: Cell, tmp_path, request):
    if cell.processes == 2:
        ranks = request.getfixturevalue("two_process_results")[cell.name]
        assert [r["world_size"] for r in ranks] == [2, 2]
        for result in ranks:
            _check_trained(result, cell)
        return
    _check_trained(run_cell(cell, tmp_path), cell)


@pytest.mark.parametrize("cell", [c for c in CELLS if c.engine == "colocate"], ids=lambda c: c.name)
def test_colocated_vllm_cells(cell: Cell, tmp_path, shared_vllm):
    syncs = shared_vllm.weight_syncs
    result = run_cell(cell, tmp_path)
    if cell.refusal:
        assert result["refused"] and cell.refusal in result["refused"] and "\n" not in result["refused"]
        assert shared_vllm.weight_syncs == syncs  # refused before anything reached the engine
        return
    _check_trained(result, cell)
    assert shared_vllm.weight_syncs - syncs == 2  # the policy was pushed before each step's rollout


@pytest.mark.parametrize("cell", [c for c in CELLS if c.engine == "server"], ids=lambda c: c.name)
def test_server_cells_are_refused_in_one_line(cell: Cell, tmp_path, vllm_server_url):
    """CI's CPU server is a plain `vllm serve` (weight transfer is NCCL: CUDA only): training against it is refused at
    start, in one line that says how to start a server that can take weights; the GPU check covers the sync."""
    result = run_cell(cell, tmp_path, server_url=vllm_server_url)
    message = result["refused"]
    assert message and cell.refusal in message and "\n" not in message
    assert "trl vllm-serve" in message or cell.weights == "qlora"  # how to start a server that can take weights
    assert not (tmp_path / "rollouts.jsonl").exists()


def test_server_generation_samples_what_the_trainer_scores(tokenizer, embedded_policy, vllm_server_url):
    """Generation on the CPU server with top_p / top_k: the trainer's log-probs of the sampled tokens under the same
    filter match the server's (same weights), and greedy episodes match the transformers engine's."""
    from trl_stepwise.data import load_math_dataset
    from trl_stepwise.engines import SamplingConfig
    from trl_stepwise.engines.vllm_server import VLLMServerEngine
    from trl_stepwise.envs import MathEnv
    from trl_stepwise.prompting import PromptBuilder, load_system_prompt
    from trl_stepwise.rollout import StepwiseRollout
    from trl_stepwise.trainer.batching import pad_trajectories, score_completions

    shots = list(load_math_dataset("gsm8k", split="train", limit=10))
    builder = PromptBuilder(tokenizer, shots, k=1, system_prompt=load_system_prompt(None, "gsm8k"), flavour="gsm8k")
    problems = [dict(r) for r in load_math_dataset("gsm8k", split="test", limit=4)]
    engine = VLLMServerEngine(vllm_server_url, tokenizer, timeout=60)

    def make_env():
        return MathEnv("gsm8k", max_episode_tokens=64)

    sampling = SamplingConfig(temperature=0.8, top_p=0.9, top_k=50, max_step_tokens=32, seed=0)
    trajectories = StepwiseRollout(None, tokenizer, builder, sampling, engine=engine).run(make_env, problems * 2)
    batch = pad_trajectories(
        trajectories, tokenizer.pad_token_id, sampling_logps=[t.sampling_logps for t in trajectories]
    )
    with torch.no_grad():
        scores = score_completions(embedded_policy, batch, temperature=0.8, top_k=50, top_p=0.9)
    mask = batch["sampled_mask"]
    gap = (scores.sampling_logps[mask] - batch["sampling_logps"][mask]).abs().mean().item()
    assert mask.sum() > 20 and gap < GAP_TOLERANCE, gap

    greedy = SamplingConfig(temperature=0.0, max_step_tokens=32)
    served = StepwiseRollout(None, tokenizer, builder, greedy, engine=engine).run(make_env, problems)
    local = StepwiseRollout(embedded_policy, tokenizer, builder, greedy).run(make_env, problems)
    assert [t.completion_ids for t in served] == [t.completion_ids for t in local]
