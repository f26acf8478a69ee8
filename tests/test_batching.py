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


def unchunked_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """The straightforward float32 formula the chunked version must match."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_chunked_logprobs_match_the_full_log_softmax_in_value_and_gradient(make_tiny_model, monkeypatch, temperature):
    from trl_stepwise.trainer import batching, vocab_logprobs

    model = make_tiny_model().train()
    batch = make_batch(model.config.vocab_size)
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(2))
    captured = {}

    def keep_logits(module, inputs, output):
        output.logits.retain_grad()
        captured["logits"] = output.logits

    model.register_forward_hook(keep_logits)
    # chunks of 2 positions: several chunks per row, and a short last one (7, 6 and 5 columns)
    monkeypatch.setattr(vocab_logprobs, "CHUNK_ELEMENTS", 2 * model.config.vocab_size)
    got, entropy = completion_logprobs(model, batch, temperature=temperature, with_entropy=True)
    (got * weights).sum().backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    got_logit_grad = captured["logits"].grad.clone()
    model.zero_grad()

    logits = captured["logits"].detach().requires_grad_(True)
    targets = batch["input_ids"][:, -int(batch["completion_width"]) :]
    expected = unchunked_logprobs(logits[:, :-1], targets, temperature)
    (expected * weights).sum().backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got_logit_grad, logits.grad, atol=1e-6)
    scaled = logits.detach()[:, :-1] / (temperature if temperature > 0 else 1.0)
    expected_entropy = -(scaled.softmax(-1) * scaled.log_softmax(-1)).sum(-1)
    assert torch.allclose(entropy, expected_entropy, atol=1e-5)

    model.zero_grad()  # the unchunked formula in the model's forward: the same gradient of every weight
    monkeypatch.setattr(batching, "selective_log_softmax", lambda lg, t, s: unchunked_logprobs(lg, t, temperature))
    again = completion_logprobs(model, batch, temperature=temperature)
    (again * weights).sum().backward()
    for got_grad, p in zip(got_grads, model.parameters(), strict=True):
        assert torch.allclose(got_grad, p.grad, atol=1e-6)


def test_chunked_logprobs_of_bfloat16_logits_are_computed_in_float32():
    from trl_stepwise.trainer.batching import selective_log_softmax

    logits = (torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(3)) * 4).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    got = selective_log_softmax(logits, targets)
    got.sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    expected = unchunked_logprobs(reference, targets, 1.0)
    expected.sum().backward()
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-6)
    assert logits.grad.dtype == torch.bfloat16 and torch.equal(logits.grad, reference.grad)


def ragged_batch(vocab: int, completions: tuple[int, ...] = (40, 3, 38, 2, 4, 3), prefix: int = 20) -> dict:
    """Rows whose completions differ tenfold in length, forced tokens among them, behind a shared prefix."""
    batch = pad_trajectories(ragged_trajectories(vocab, completions, prefix), pad_id=0)
    assert batch["prefix_ids"].shape[1] == prefix  # the shared-prefix path is exercised
    return batch


def ragged_trajectories(
    vocab: int, completions: tuple[int, ...], prefix: int, group_prompts: tuple[int, ...] = (), seed: int = 3
) -> list[Trajectory]:
    """Rows behind a shared prefix, each with a prompt of its own (1-3 tokens); with ``group_prompts`` (one length per
    group, consecutive rows in equal groups) the rows of a group share their whole prompt instead."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    shared = ids(prefix)
    questions = [ids(n) for n in group_prompts]
    group_size = len(completions) // len(group_prompts) if group_prompts else 1
    trajectories = []
    for i, width in enumerate(completions):
        mask = [j % 5 != 4 for j in range(width)]  # every fifth token forced (a tool result, a reply)
        trajectories.append(
            Trajectory(
                episode=Episode(
                    episode_id=i, group_id=i // group_size if group_prompts else 0, row={"question": "", "answer": ""}
                ),
                prompt_ids=shared + (questions[i // group_size] if group_prompts else ids(1 + i % 3)),
                completion_ids=ids(width),
                policy_mask=mask,
                step_index=[0] * width,
            )
        )
    return trajectories


def test_rows_of_very_different_lengths_are_scored_in_length_buckets_and_a_uniform_batch_in_one():
    from trl_stepwise.trainer.batching import length_buckets

    ragged = ragged_batch(50)
    buckets = length_buckets(ragged["attention_mask"], int(ragged["completion_width"]))
    assert sorted(r for b in buckets for r in b) == list(range(6))
    assert buckets == [[1, 3, 4, 5], [0, 2]]  # the short rows apart from the long ones
    uniform = ragged_batch(50, completions=(9, 8, 9, 8))
    assert [b for b in length_buckets(uniform["attention_mask"], int(uniform["completion_width"]))] == [[0, 1, 2, 3]]
    # an accelerator splits only where whole rows of padding would go
    assert len(length_buckets(ragged["attention_mask"], int(ragged["completion_width"]), device_type="cuda")) == 1


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_length_buckets_give_the_one_padded_forward_pass_in_value_and_gradient(make_tiny_model, monkeypatch, top_p):
    from trl_stepwise.trainer import batching

    model = make_tiny_model().train()
    batch = ragged_batch(model.config.vocab_size)
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(4))
    mask = batch["completion_mask"]

    def scored(call_cost: int):
        monkeypatch.setattr(batching, "BUCKET_CALL_COST_TOKENS", {"cpu": call_cost})
        model.zero_grad()
        scores = batching.score_completions(model, batch, temperature=0.7, with_entropy=True, top_p=top_p)
        (scores.logps * weights * mask).sum().backward()
        return scores, [p.grad.clone() for p in model.parameters()]

    calls = []
    model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(call_columns(kwargs).shape), with_kwargs=True
    )
    one, one_grads = scored(10**9)
    assert len(calls) == 2  # the prefix, then every row in one call
    padded_tokens = calls[1].numel()
    calls.clear()
    split, split_grads = scored(0)
    assert len(calls) > 2  # the prefix once, then one call per bucket
    assert sum(shape.numel() for shape in calls[1:]) < padded_tokens / 2
    for name in ("logps", "entropy", "sampling_logps"):
        got, expected = getattr(split, name), getattr(one, name)
        assert torch.allclose(got[mask], expected[mask], atol=1e-5), name
    for a, b in zip(split_grads, one_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def call_columns(kwargs: dict) -> torch.Tensor:
    """A forward call's new tokens as (rows, columns): its token ids, or its input embeddings without the hidden
    dimension (the scoring passes look the embeddings of a whole batch up at once)."""
    return kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"][..., 0]


def grouped_batch(vocab: int, prefix: int = 20) -> dict:
    """Two groups of three episodes: each group's rows share their whole prompt (of different lengths: 5 and 2
    tokens after the shared prefix), completions of ragged lengths."""
    trajectories = ragged_trajectories(vocab, (30, 3, 12, 2, 25, 6), prefix, group_prompts=(5, 2), seed=7)
    return pad_trajectories(trajectories, pad_id=0)


@pytest.mark.parametrize("call_cost", [0, 10**9])
def test_a_groups_prompt_is_encoded_once_with_the_same_values_and_gradients(make_tiny_model, monkeypatch, call_cost):
    """Rows that share their prompt (a group's episodes) continue one encoding of it: the forward calls hold each
    prompt once and then only completion tokens, and the log-probs, entropy and gradients are those of encoding every
    row whole."""
    from trl_stepwise.trainer import batching

    monkeypatch.setattr(batching, "BUCKET_CALL_COST_TOKENS", {"cpu": call_cost})
    model = make_tiny_model().train()
    batch = grouped_batch(model.config.vocab_size)
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(4))
    mask = batch["completion_mask"]
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(call_columns(kwargs)), with_kwargs=True)

    def scored():
        calls.clear()
        model.zero_grad()
        scores = batching.score_completions(model, batch, temperature=0.7, with_entropy=True, top_p=0.8)
        (scores.logps * weights * mask).sum().backward()
        return scores, [p.grad.clone() for p in model.parameters()], list(calls)

    shared, shared_grads, shared_calls = scored()
    monkeypatch.setattr(batching, "encode_prompts", lambda *args: None)  # every row encodes its own prompt
    whole, whole_grads, whole_calls = scored()
    assert shared_calls[1].shape == (2, 5)  # the two distinct prompts, once each (left-padded to 5)
    completion_tokens = sum(c.numel() for c in shared_calls[2:])
    assert completion_tokens <= 6 * int(batch["completion_width"])  # the rows' calls hold completions only
    assert sum(c.numel() for c in shared_calls) < sum(c.numel() for c in whole_calls)
    for name in ("logps", "entropy", "sampling_logps"):
        got, expected = getattr(shared, name), getattr(whole, name)
        assert torch.allclose(got[mask], expected[mask], atol=1e-5), name
    for a, b in zip(shared_grads, whole_grads, strict=True):  # the embeddings' gradients reach ~13: summed in
        assert torch.allclose(a, b, atol=1e-4)  # another order, they differ by up to ~3e-5


@pytest.mark.parametrize("make_batch", [ragged_batch, grouped_batch], ids=["own_prompts", "group_prompts"])
def test_a_sharded_process_makes_as_many_calls_as_the_busiest_and_scores_the_same(
    make_tiny_model, monkeypatch, make_batch
):
    """Under sharding every process makes the calls the process with the most buckets makes (here: 2 more than this
    one wants), the extra ones on a padding token at zero weight: the same numbers and gradients; the padding calls
    and the shared prefix's call are in the backward graph through their outputs (FSDP2 gathers a layer's weights for
    backward when its output's gradient arrives: through the prefix's cache alone it would not)."""
    from trl_stepwise.trainer import batching

    model = make_tiny_model().train()
    batch = make_batch(model.config.vocab_size)
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(5))
    mask = batch["completion_mask"]
    monkeypatch.setattr(batching, "BUCKET_CALL_COST_TOKENS", {"cpu": 0})
    agreed = []
    monkeypatch.setattr(batching, "agreed_count", lambda count, processes: agreed.append(count) or count + 2)
    calls, backward = [], []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(call_columns(kwargs)), with_kwargs=True)
    model.model.norm.register_full_backward_hook(lambda *args: backward.append(1))  # once per call in the graph

    def scored(sharded_over: int):
        calls.clear()
        backward.clear()
        model.zero_grad()
        scores = batching.score_completions(
            model, batch, temperature=0.7, with_entropy=True, sharded_over=sharded_over
        )
        (scores.logps * weights * mask).sum().backward()
        return scores, [p.grad.clone() for p in model.parameters()], list(calls), len(backward)

    alone, alone_grads, alone_calls, alone_backward = scored(0)
    sharded, sharded_grads, sharded_calls, sharded_backward = scored(2)
    assert sharded_backward == alone_backward + 3  # the 2 padding calls, and the shared prefix's (through its cache)
    assert agreed == [len(alone_calls)] and len(sharded_calls) == len(alone_calls) + 2
    assert [c.shape for c in sharded_calls].count(torch.Size([1, 1])) == 2  # the padding calls: one token each
    for name in ("logps", "entropy"):
        assert torch.equal(getattr(sharded, name), getattr(alone, name)), name
    for a, b in zip(sharded_grads, alone_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_a_sharded_process_scores_as_many_chunks_as_the_busiest_each_through_the_same_calls(
    make_tiny_model, monkeypatch
):
    """Another process has one log-prob chunk more: this one scores a copy of its last chunk in its place (and drops
    the result), so the extra chunk makes the calls and the per-chunk agreement a real one makes there."""
    from trl_stepwise.trainer import batching

    model = make_tiny_model()
    trajectories = ragged_trajectories(model.config.vocab_size, (40, 3, 38, 2, 4, 3), prefix=20)
    chunks = len(batching.chunks_by_tokens(trajectories, 200))
    assert chunks > 1
    alone = batching.sequence_logps(model, trajectories, pad_id=0, max_tokens=200, temperature=0.7)
    agreements = []

    def agreed(count: int, processes: int) -> int:  # the first agreement is the chunk count: one more elsewhere
        agreements.append(count)
        return count + 1 if len(agreements) == 1 else count

    monkeypatch.setattr(batching, "agreed_count", agreed)
    sharded = batching.sequence_logps(model, trajectories, pad_id=0, max_tokens=200, temperature=0.7, sharded_over=2)
    assert sharded == alone
    assert agreements[0] == chunks and len(agreements) == 1 + chunks + 1  # then one per scored chunk, the extra too


def test_only_the_first_length_bucket_goes_through_the_ddp_wrapper(make_tiny_model, gloo_world, monkeypatch):
    from trl_stepwise.trainer import batching

    monkeypatch.setattr(batching, "BUCKET_CALL_COST_TOKENS", {"cpu": 0})
    plain, inner = make_tiny_model(), make_tiny_model()
    batch = ragged_batch(plain.config.vocab_size)
    mask = batch["completion_mask"].float()
    wrapped = DistributedDataParallel(inner)
    wrapped_calls = []
    wrapped.register_forward_pre_hook(lambda module, args: wrapped_calls.append(1))

    expected = completion_logprobs(plain, batch)
    (expected * mask).sum().backward()
    got = completion_logprobs(wrapped, batch, prefix_model=inner)
    (got * mask).sum().backward()

    assert len(wrapped_calls) == 1
    assert torch.allclose(got * mask, expected * mask, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), inner.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_log_prob_chunks_count_the_shared_prefix_once():
    """16 rows behind a 300-token few-shot prefix, 40 tokens of their own: 300 + 16 x 40 = 940 tokens are encoded,
    so one chunk of 1000 holds them all (counting the prefix per row, 16 x 340 = 5440, would split them in six)."""
    from trl_stepwise.trainer.batching import chunks_by_tokens

    trajectories = ragged_trajectories(500, completions=(30,) * 16, prefix=300)  # own prompt 1-3, completion 30
    assert [len(c) for c in chunks_by_tokens(trajectories, 1000)] == [16]
    assert [len(c) for c in chunks_by_tokens(trajectories, 600)] == [9, 7]  # 300 + 9 x 33 = 597


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
    """A call's vocabulary-sized logits are neither cut (the position that predicts nothing) nor joined (the prompt's
    last logits): either would copy them forward and fill a zeroed gradient of their size backward."""
    from trl_stepwise.trainer import batching

    monkeypatch.setattr(batching, "BUCKET_CALL_COST_TOKENS", {"cpu": 0})  # several buckets
    if not group_prompts:
        monkeypatch.setattr(batching, "encode_prompts", lambda *args: None)
    model = make_tiny_model().train()
    batch = grouped_batch(model.config.vocab_size)
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
    """The prefix, the prompts and every length bucket take their embeddings from one lookup: one dense embedding
    backward per pass, not one per forward call."""
    from trl_stepwise.trainer import batching

    monkeypatch.setattr(batching, "BUCKET_CALL_COST_TOKENS", {"cpu": 0})
    model = make_tiny_model().train()
    batch = grouped_batch(model.config.vocab_size)
    lookups, calls = [], []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: lookups.append(args[0].numel()))
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    scores = batching.score_completions(model, batch, temperature=0.7)
    scores.logps.sum().backward()
    assert len(calls) >= 4  # the prefix, the prompts and at least two length buckets
    assert lookups == [batch["prefix_ids"].numel() + batch["input_ids"].numel()]


def test_the_entropy_from_the_log_softmax_pass_is_the_softmax_entropy(monkeypatch):
    from trl_stepwise.trainer import vocab_logprobs
    from trl_stepwise.trainer.vocab_logprobs import log_softmax_and_entropy, selective_log_softmax

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
