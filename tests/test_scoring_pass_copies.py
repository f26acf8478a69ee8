"""The scoring passes copy nothing vocabulary-sized and look the input embeddings up once.

A forward call's logits (rows x columns x vocabulary) go straight into the chunked log-softmax, so neither cutting off
the position that predicts nothing nor joining the prompt's last logits copies them (forward) or fills a zeroed
gradient of their size (backward); and the prefix, the prompts and every length bucket take their input embeddings
from one lookup, so the pass has one embedding backward (a dense vocabulary x hidden gradient) instead of one per
forward call.
"""

from __future__ import annotations

import pytest
import torch

from trl_stepwise.envs import Episode
from trl_stepwise.rollout import Trajectory
from trl_stepwise.trainer import batching
from trl_stepwise.trainer.batching import pad_trajectories
from trl_stepwise.trainer.vocab_logprobs import log_softmax_and_entropy, selective_log_softmax


def grouped_trajectories(vocab: int, completions=(30, 3, 12, 2, 25, 6), prefix: int = 20) -> list[Trajectory]:
    """Two groups of three episodes behind a shared prefix; each group's rows share their prompt."""
    generator = torch.Generator().manual_seed(11)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    shared, prompts = ids(prefix), [ids(5), ids(2)]
    return [
        Trajectory(
            episode=Episode(episode_id=i, group_id=i // 3, row={"question": "", "answer": ""}),
            prompt_ids=shared + prompts[i // 3],
            completion_ids=ids(width),
            policy_mask=[True] * width,
            step_index=[0] * width,
        )
        for i, width in enumerate(completions)
    ]


def graph_nodes(root) -> list:
    seen, stack, nodes = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


@pytest.mark.parametrize("group_prompts", [True, False], ids=["prompts_encoded_once", "own_prompts"])
def test_each_calls_logits_go_straight_into_the_chunked_log_softmax(make_tiny_model, monkeypatch, group_prompts):
    monkeypatch.setattr(batching, "BUCKET_CALL_COST_TOKENS", {"cpu": 0})  # several buckets
    if not group_prompts:
        monkeypatch.setattr(batching, "encode_prompts", lambda *args: None)
    model = make_tiny_model().train()
    batch = pad_trajectories(grouped_trajectories(model.config.vocab_size), pad_id=0)
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out.logits))
    scores = batching.score_completions(model, batch, temperature=0.7, with_entropy=True)

    bucket_logits = [logits for logits in outputs if logits.shape[1] > 1]  # the prefix and prompts keep one column
    assert len(bucket_logits) >= 2
    consumers = {}
    for node in graph_nodes(scores.logps.grad_fn):
        for next_node, _ in node.next_functions:
            consumers.setdefault(next_node, set()).add(type(node).__name__)
    for logits in bucket_logits:
        assert consumers[logits.grad_fn] == {"_SelectiveLogSoftmaxBackward"}


def test_the_input_embeddings_are_looked_up_once_per_pass(make_tiny_model, monkeypatch):
    monkeypatch.setattr(batching, "BUCKET_CALL_COST_TOKENS", {"cpu": 0})
    model = make_tiny_model().train()
    batch = pad_trajectories(grouped_trajectories(model.config.vocab_size), pad_id=0)
    lookups, calls = [], []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: lookups.append(args[0].numel()))
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    scores = batching.score_completions(model, batch, temperature=0.7)
    scores.logps.sum().backward()
    assert len(calls) >= 4  # the prefix, the prompts and at least two length buckets
    assert lookups == [batch["prefix_ids"].numel() + batch["input_ids"].numel()]


def test_the_entropy_from_the_log_softmax_pass_is_the_softmax_entropy(monkeypatch):
    from trl_stepwise.trainer import vocab_logprobs

    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 7, 50, generator=generator) * 4).requires_grad_(True)
    targets = torch.randint(0, 50, (3, 7), generator=generator)
    monkeypatch.setattr(vocab_logprobs, "CHUNK_ELEMENTS", 4 * 50)  # chunks cut across rows (21 positions, 4 each)
    logps, entropy = log_softmax_and_entropy(logits, targets, 1 / 0.7)
    scaled = logits.detach() / 0.7
    assert torch.allclose(entropy, -(scaled.softmax(-1) * scaled.log_softmax(-1)).sum(-1), atol=1e-5)
    assert not entropy.requires_grad
    weights = torch.randn(3, 7, generator=generator)
    (logps * weights).sum().backward()
    alone = logits.detach().clone().requires_grad_(True)
    again = selective_log_softmax(alone, targets, 1 / 0.7)
    (again * weights).sum().backward()
    assert torch.equal(logps, again) and torch.equal(logits.grad, alone.grad)
    expected = scaled.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(logps, expected, atol=1e-6)
