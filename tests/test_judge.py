"""Judge step rewards: probabilities read by hand, batching, prompt files, and the trainer's use of the rewards."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_training import make_config

from trl_stepwise.judge import (
    JudgeItem,
    ScoreTokens,
    StepJudge,
    expected_rating,
    judge_items,
    load_judge_prompt,
    load_judge_questions,
    rating_distribution,
    score_tokens,
    word_ids,
    yes_probability,
)
from trl_stepwise.trainer import StepwiseReinforceTrainer

VOCAB = 16


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_expected_rating_with_single_token_ratings_matches_hand_computation():
    tokens = ScoreTokens(first_ids=list(range(1, 11)))  # token i spells rating i
    logits = torch.zeros(VOCAB)
    logits[3], logits[7], logits[10], logits[12] = 2.0, 1.0, 0.5, 5.0  # 12 is not a rating: renormalised away
    p = _softmax(logits.tolist())
    mass = sum(p[1:11])
    expected = sum(r * p[r] for r in range(1, 11)) / mass
    ratings = rating_distribution(logits, None, tokens)
    assert ratings.sum().item() == pytest.approx(1.0)
    assert ratings[2].item() == pytest.approx(p[3] / mass)
    assert expected_rating(ratings).item() == pytest.approx((expected - 1) / 9)


def test_expected_rating_with_digit_split_ten_reads_the_second_position():
    # ratings 1..9 are tokens 1..9; "10" is token 1 ("1") followed by token 0 ("0")
    tokens = ScoreTokens(first_ids=list(range(1, 10)) + [1], ten_suffix_id=0)
    first = torch.zeros(VOCAB)
    first[1], first[9] = 3.0, 1.0
    second = torch.zeros(VOCAB)
    second[0] = 2.0  # after "1": P("0") decides between rating 1 and rating 10
    p1 = _softmax(first.tolist())
    p2 = _softmax(second.tolist())
    hand = {r: p1[r] for r in range(2, 10)}
    hand[1] = p1[1] * (1 - p2[0])
    hand[10] = p1[1] * p2[0]
    total = sum(hand.values())
    ratings = rating_distribution(first, second, tokens)
    for r in range(1, 11):
        assert ratings[r - 1].item() == pytest.approx(hand[r] / total)
    mean = sum(r * v for r, v in hand.items()) / total
    assert expected_rating(ratings).item() == pytest.approx((mean - 1) / 9)


def test_certain_ratings_map_to_the_ends_of_the_unit_interval():
    tokens = ScoreTokens(first_ids=list(range(1, 11)))
    top, bottom = torch.full((VOCAB,), -50.0), torch.full((VOCAB,), -50.0)
    top[10], bottom[1] = 50.0, 50.0
    scores = expected_rating(rating_distribution(torch.stack([top, bottom]), None, tokens))
    assert scores.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_yes_probability_matches_hand_computation():
    logits = torch.zeros(VOCAB)
    logits[2], logits[3], logits[4], logits[5] = 1.0, 0.5, 2.0, 4.0  # yes: 2, 3; no: 4; 5 is unrelated
    p = _softmax(logits.tolist())
    hand = (p[2] + p[3]) / (p[2] + p[3] + p[4])
    assert yes_probability(logits, [2, 3], [4]).item() == pytest.approx(hand)


def test_embedded_tokenizer_splits_ten_and_has_single_token_yes_no(tokenizer):
    tokens = score_tokens(tokenizer)
    assert tokens.ten_suffix_id == tokenizer.encode("0", add_special_tokens=False)[0]
    assert tokens.first_ids[9] == tokens.first_ids[0]
    yes = word_ids(tokenizer, ["Yes", "yes", "YES"])
    assert all(len(tokenizer.decode([i]).strip()) > 1 for i in yes)  # no bare "Y" from a multi-token spelling


@pytest.fixture
def judge_items_sample() -> list[JudgeItem]:
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    steps = ["He buys 4 more: 3 + 4 = <<3+4=7>>7\n", "The answer is: 7\n"]
    items = judge_items(question, steps)
    items.append(JudgeItem("What is 12 times 12, then divided by 4?", [], "12 * 12 = <<12*12=144>>144\n"))
    return items


@pytest.mark.parametrize("mode", ["score", "yes_no"])
def test_batched_scores_equal_one_at_a_time(mode, make_tiny_model, tokenizer, judge_items_sample):
    model = make_tiny_model(seed=3)
    batched = StepJudge(model, tokenizer, mode=mode, batch_size=8).score(judge_items_sample)
    single = StepJudge(model, tokenizer, mode=mode, batch_size=1).score(judge_items_sample)
    assert batched == pytest.approx(single, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in batched)
    assert len(set(round(s, 6) for s in batched)) > 1  # different prompts give different scores


def test_yes_no_score_is_the_mean_over_questions(make_tiny_model, tokenizer, judge_items_sample):
    model = make_tiny_model(seed=4)
    questions = ["Is the step correct?", "Does the step make progress?"]
    both = StepJudge(model, tokenizer, mode="yes_no", questions=questions).score(judge_items_sample)
    each = [StepJudge(model, tokenizer, mode="yes_no", questions=[q]).score(judge_items_sample) for q in questions]
    assert both == pytest.approx([(a + b) / 2 for a, b in zip(*each, strict=True)], abs=1e-6)


def test_judge_prompt_and_questions_files(tmp_path):
    assert "{step}" in load_judge_prompt("score")
    assert len(load_judge_questions()) == 3
    bad = tmp_path / "prompt.txt"
    bad.write_text("Rate {step} from 1 to 10.")
    with pytest.raises(ValueError, match="missing: \\{question\\}, \\{previous_steps\\}"):
        load_judge_prompt("score", str(bad))
    questions = tmp_path / "questions.txt"
    questions.write_text("# comment\n\nIs it right?\nIs it short?\n")
    assert load_judge_questions(str(questions)) == ["Is it right?", "Is it short?"]
    with pytest.raises(ValueError, match="does not exist"):
        load_judge_prompt("yes_no", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="judge_mode"):
        load_judge_prompt("stars")


class ConstantJudge:
    """A judge that gives every step the same score and records what it was asked."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.items: list[JudgeItem] = []

    def score(self, items):
        self.items.extend(items)
        return [self.value] * len(items)


def test_judge_rewards_flow_into_per_step_returns(tmp_path, tiny_model, tokenizer, arithmetic_problems):
    config = make_config(
        tmp_path, baseline="none", kl_coef=0.0, answer_reward_weight=0.0, judge_weight=2.0, log_rollouts=False
    )
    judge = ConstantJudge(0.25)
    trainer = StepwiseReinforceTrainer(
        model=tiny_model, args=config, train_dataset=arithmetic_problems, processing_class=tokenizer, judge=judge
    )
    problems = [dict(r) for r in arithmetic_problems.select(range(2))]
    (batch,) = trainer._generate_and_score(problems, 1)
    assert len(judge.items) >= 4  # every step of the 4 episodes was judged, with the problem it belongs to
    assert {item.question for item in judge.items} == {p["question"] for p in problems}
    # baseline none, gamma 1: each token's advantage is 2.0 * 0.25 * (steps from its own step to the end)
    advantages = batch["advantages"][batch["completion_mask"]]
    allowed = {0.5 * k for k in range(1, config.max_episode_steps + 1)}
    assert set(round(a, 6) for a in advantages.tolist()) <= allowed
    assert trainer.metrics.values["judge/step_score"] == [pytest.approx(0.25)]


def test_judge_weights_never_change_during_training(tmp_path, make_tiny_model, tokenizer, arithmetic_problems):
    judge = StepJudge(make_tiny_model(seed=7), tokenizer, mode="score")
    before = {k: v.clone() for k, v in judge.model.state_dict().items()}
    policy = make_tiny_model(seed=0)
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    config = make_config(tmp_path, max_steps=2, judge_weight=1.0)
    trainer = StepwiseReinforceTrainer(
        model=policy, args=config, train_dataset=arithmetic_problems, processing_class=tokenizer, judge=judge
    )
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in judge.model.state_dict().items())
    assert not all(torch.equal(policy_before[k], v) for k, v in policy.state_dict().items())
    assert not any(p.requires_grad for p in judge.model.parameters())
    logged = [h for h in trainer.state.log_history if "judge/step_score" in h]
    assert logged and all(0.0 <= h["judge/step_score"] <= 1.0 for h in logged)


def test_judge_built_from_config_by_path(tmp_path, tiny_model, tiny_model_dir, tokenizer, arithmetic_problems):
    config = make_config(tmp_path, judge_model=str(tiny_model_dir), judge_mode="yes_no", judge_batch_size=4)
    trainer = StepwiseReinforceTrainer(
        model=tiny_model, args=config, train_dataset=arithmetic_problems, processing_class=tokenizer
    )
    assert isinstance(trainer.judge, StepJudge) and trainer.judge.mode == "yes_no"
    assert trainer.judge.model is not trainer.model


def test_config_rejects_unknown_judge_mode(tmp_path):
    with pytest.raises(ValueError, match="judge_mode='stars'; choose score or yes_no"):
        make_config(tmp_path, judge_mode="stars")
