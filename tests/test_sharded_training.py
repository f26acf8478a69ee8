"""FSDP2 on 2 CPU processes (torch's ``fully_shard`` on gloo, through transformers' ``distributed_config``): the
sharded path trains like one process, pushes the gathered policy to the engine, and resumes from its shards."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_global_normalisation import assert_same_training, fixed_episodes, run_one_and_two_processes


@pytest.fixture(scope="module")
def episodes(tiny_model_dir, tokenizer, tmp_path_factory):
    return fixed_episodes(tiny_model_dir, tokenizer, tmp_path_factory.mktemp("gen"))


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=atol) for k in a)


def losses_and_kl(log_history: list[dict]) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["kl"]) for e in log_history if "loss" in e]


@pytest.mark.slow
def test_fsdp2_full_weights_train_push_and_resume_like_one_process(tiny_model_dir, episodes, tmp_path):
    one, two = run_one_and_two_processes(tmp_path, tiny_model_dir, episodes, "fsdp2")
    assert two["sharded"] and not one["sharded"]
    assert_same_training(one, two)  # the sharded reference scored the KL of step 2
    # the engine receives the whole policy: exactly the gathered state, and what one process pushes
    assert two["pushed"].keys() == two["gathered"].keys()
    assert all(torch.equal(two["pushed"][k], two["gathered"][k]) for k in two["gathered"])
    assert close(two["pushed"], one["pushed"])
    # resumed from checkpoint-2 (weights, Adam state and the reference refreshed at step 2, all from shards)
    assert close(two["resumed"], two["straight"])
    assert not close(two["straight"], two["gathered"], atol=1e-4)  # the 4 steps moved the weights
    straight, resumed = losses_and_kl(two["straight_logs"]), losses_and_kl(two["resumed_logs"])
    assert [s for s, _, _ in resumed] == [1, 2, 3, 4]
    for (_, loss_a, kl_a), (_, loss_b, kl_b) in zip(straight, resumed, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and kl_b == pytest.approx(kl_a, rel=1e-4, abs=1e-9)
    assert resumed[2][2] == 0.0 and resumed[3][2] > 0  # step 3 scored against the restored (refreshed) reference
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    for folder in ("sharded_model", "sharded_optimizer", "sharded_reference"):
        assert (checkpoint / folder / ".metadata").is_file(), folder
    exported = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")  # consolidated, loadable
    assert close(exported, {k: v for k, v in two["straight"].items() if k in exported}, atol=0.0)


@pytest.mark.slow
def test_fsdp2_lora_trains_and_pushes_the_merged_policy_like_one_process(tiny_model_dir, episodes, tmp_path):
    one, two = run_one_and_two_processes(tmp_path, tiny_model_dir, episodes, "fsdp2-peft")
    assert two["sharded"]
    assert_same_training(one, two)  # the adapter-free base as reference, the adapter averaged over processes
    assert close(two["pushed"], one["pushed"])  # merged weights; one process's equal peft's merge (test_weights.py)
    assert not any("lora" in k for k in two["pushed"])
    assert close(two["resumed"], two["straight"])
