"""Log-probabilities of completion tokens: DDP-wrapped and checkpointed models, chunked log-softmax."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trl_stepwise.envs import Episode
from trl_stepwise.rollout import Trajectory
from trl_stepwise.trainer.batching import completion_logprobs, pad_trajectories


def make_batch(vocab: int, episodes: int = 3, prefix: int = 20, completion: int = 7) -> dict:
    generator = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    shared = ids(prefix)
    trajectories = []
    for i in range(episodes):
        width = completion - i  # rows of different lengths: right padding in the completion columns
        trajectories.append(
            Trajectory(
                episode=Episode(episode_id=i, group_id=0, row={"question": "", "answer": ""}),
                prompt_ids=shared + ids(2 + i),
                completion_ids=ids(width),
                policy_mask=[True] * width,
                step_index=[0] * width,
            )
        )
    batch = pad_trajectories(trajectories, pad_id=0)
    assert batch["prefix_ids"].shape[1] == prefix  # the shared-prefix path is exercised
    return batch


@pytest.fixture
def gloo_world():
    """A one-process gloo group, so a model can be wrapped in DistributedDataParallel on the CPU."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gradient_checkpointing_under_ddp_gives_the_plain_logprobs_and_gradients(make_tiny_model, gloo_world):
    plain = make_tiny_model()
    checkpointed = make_tiny_model()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.train(), checkpointed.train()
    batch = make_batch(plain.config.vocab_size)
    mask = batch["completion_mask"].float()

    expected = completion_logprobs(plain, batch)
    (expected * mask).sum().backward()
    wrapped = DistributedDataParallel(checkpointed)
    got = completion_logprobs(wrapped, batch, prefix_model=checkpointed)
    (got * mask).sum().backward()

    assert torch.allclose(got, expected, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
