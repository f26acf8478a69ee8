"""Step rewards from a judge language model: a 1-10 score or yes/no questions, read from token probabilities.

Reading probabilities instead of parsing sampled text gives a smooth, deterministic reward even from a small judge:

- ``score``: the judge is asked for a 1-10 rating; the reward is the expected rating under its next-token
  distribution over the ten answers, scaled to [0, 1]. Tokenizers that write "10" as one token are read in one
  position; digit-splitting ones ("1", "0") are read from two positions of the same forward pass (the prompt is
  followed by "1", so P("10") = P("1") * P("0" | "1") and P("1") = P("1") * (1 - P("0" | "1"))).
- ``yes_no``: several questions, each read as P(yes) / (P(yes) + P(no)) over the first tokens of "Yes"/"yes" and
  "No"/"no", averaged.

Every judged step of a rollout batch goes through one batched forward pass per question (chunked by
``batch_size``). The judge never trains: it is frozen, held outside the optimizer, and may live on another device
(``device``) or in 4-bit (``quantization_config``). Anything with a ``score(items) -> list[float]`` method can stand
in for it (e.g. a client of a judge served by another process).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trl_stepwise.models import load_model, load_tokenizer

JUDGE_MODES = ("score", "yes_no")
BUNDLED_JUDGE_PROMPTS = {"score": "judge_score.txt", "yes_no": "judge_yes_no.txt"}
BUNDLED_QUESTIONS = "judge_questions.txt"
YES_WORDS = ("Yes", "yes", "YES")
NO_WORDS = ("No", "no", "NO")


@dataclass
class JudgeItem:
    """One step to judge, with the problem and the steps written before it."""

    question: str
    previous_steps: Sequence[str]
    step: str


@dataclass
class ScoreTokens:
    """Token ids that spell the ratings 1..10 as the first answer token(s).

    ``first_ids[s - 1]`` is the first token of rating ``s``. ``ten_suffix_id`` is set when "10" is written as the
    token of "1" followed by this token (digit-splitting tokenizers); it is None when "10" is a token of its own.
    """

    first_ids: list[int]
    ten_suffix_id: int | None = None


def score_tokens(tokenizer: PreTrainedTokenizerBase) -> ScoreTokens:
    """Find how the tokenizer writes 1..10; clear error for tokenizers where a rating is not one or two tokens."""
    encoded = [tokenizer.encode(str(s), add_special_tokens=False) for s in range(1, 11)]
    if any(len(ids) != 1 for ids in encoded[:9]):
        raise ValueError(
            "The judge's tokenizer does not write each of the ratings 1-9 as a single token; use --judge_mode yes_no "
            "or a judge model whose tokenizer has single-digit tokens."
        )
    first = [ids[0] for ids in encoded[:9]]
    ten = encoded[9]
    if len(ten) == 1:
        return ScoreTokens(first + ten)
    if len(ten) == 2 and ten[0] == first[0]:
        return ScoreTokens(first + [first[0]], ten_suffix_id=ten[1])
    raise ValueError("The judge's tokenizer writes '10' in an unexpected way; use --judge_mode yes_no instead.")


def rating_distribution(
    first_logits: torch.Tensor, second_logits: torch.Tensor | None, tokens: ScoreTokens
) -> torch.Tensor:
    """Probabilities (..., 10) of the ratings 1..10, renormalised over the ten answers.

    ``first_logits`` are the logits of the first answer token; ``second_logits`` those after a "1" (only needed,
    and only read, when ``tokens.ten_suffix_id`` is set).
    """
    probs = torch.softmax(first_logits.float(), dim=-1)
    ratings = probs[..., tokens.first_ids].clone()
    if tokens.ten_suffix_id is not None:
        if second_logits is None:
            raise ValueError("This tokenizer splits '10' into two tokens: pass the logits after '1' too.")
        p_zero = torch.softmax(second_logits.float(), dim=-1)[..., tokens.ten_suffix_id]
        p_one = probs[..., tokens.first_ids[0]]
        ratings[..., 0] = p_one * (1.0 - p_zero)
        ratings[..., 9] = p_one * p_zero
    return ratings / ratings.sum(-1, keepdim=True).clamp(min=1e-12)


def expected_rating(ratings: torch.Tensor) -> torch.Tensor:
    """Expected rating in [1, 10] scaled to [0, 1]."""
    values = torch.arange(1, 11, dtype=ratings.dtype, device=ratings.device)
    return ((ratings * values).sum(-1) - 1.0) / 9.0


def word_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """Distinct tokens of those words the tokenizer writes as one token (else the first word's first token).

    Multi-token spellings are skipped: their first token (e.g. "Y" of "YES") also starts unrelated words.
    """
    ids: list[int] = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids or tokenizer.encode(words[0], add_special_tokens=False)[:1]


def yes_probability(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """P(yes) / (P(yes) + P(no)) from the logits of the first answer token."""
    probs = torch.softmax(logits.float(), dim=-1)
    yes = probs[..., list(yes_ids)].sum(-1)
    no = probs[..., list(no_ids)].sum(-1)
    return yes / (yes + no).clamp(min=1e-12)


def load_judge_prompt(mode: str, path: str | None = None) -> str:
    """The judge's user-message template (bundled for ``mode``, or a file); it must contain ``{step}``."""
    if mode not in JUDGE_MODES:
        raise ValueError(f"judge_mode={mode!r}; choose one of {', '.join(JUDGE_MODES)}.")
    if path is None:
        text = resources.files("trl_stepwise").joinpath("prompts", BUNDLED_JUDGE_PROMPTS[mode]).read_text("utf-8")
    elif Path(path).is_file():
        text = Path(path).read_text("utf-8")
    else:
        raise ValueError(f"Judge prompt file {path!r} does not exist.")
    needed = ["{question}", "{previous_steps}", "{step}"] + (["{criterion}"] if mode == "yes_no" else [])
    missing = [field for field in needed if field not in text]
    if missing:
        raise ValueError(
            f"The {mode} judge prompt must contain the placeholders {', '.join(needed)}; "
            f"missing: {', '.join(missing)}."
        )
    return text.strip()


def load_judge_questions(path: str | None = None) -> list[str]:
    """Yes/no questions, one per line (``#`` comments and blank lines skipped)."""
    if path is None:
        text = resources.files("trl_stepwise").joinpath("prompts", BUNDLED_QUESTIONS).read_text("utf-8")
    elif Path(path).is_file():
        text = Path(path).read_text("utf-8")
    else:
        raise ValueError(f"Judge questions file {path!r} does not exist.")
    questions = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not questions:
        raise ValueError(f"No judge questions found in {path or BUNDLED_QUESTIONS} (one question per line).")
    return questions


class StepJudge:
    """A frozen causal LM that scores reasoning steps; ``score(items)`` returns one reward in [0, 1] per item."""

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        mode: str = "score",
        prompt: str | None = None,
        questions: Sequence[str] | str | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        quantization_config: Any = None,
    ) -> None:
        if isinstance(model, PreTrainedModel):
            name = getattr(model.config, "_name_or_path", None)
        else:
            # quantized weights cannot be moved after loading: bitsandbytes places them on the device while loading
            placement = {"device_map": {"": device}} if quantization_config is not None and device is not None else {}
            name, model = model, load_model(model, quantization_config=quantization_config, **placement)
        self.tokenizer = tokenizer or load_tokenizer(name)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if device is not None and quantization_config is None:
            model = model.to(device)
        self.model = model.eval().requires_grad_(False)
        self.template = load_judge_prompt(mode, prompt)
        self.mode = mode
        self.batch_size = max(1, batch_size)
        if mode == "yes_no":
            self.questions = (
                list(questions) if not isinstance(questions, str | None) else load_judge_questions(questions)
            )
            self.yes_ids = word_ids(self.tokenizer, YES_WORDS)
            self.no_ids = word_ids(self.tokenizer, NO_WORDS)
        else:
            self.questions = [""]
            self.rating_tokens = score_tokens(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def render(self, item: JudgeItem, criterion: str = "") -> str:
        """The judge's prompt for one step, ending where the judge's answer starts."""
        previous = "".join(s if s.endswith("\n") else s + "\n" for s in item.previous_steps).strip() or "(none)"
        content = self.template.format(
            question=item.question.strip(), previous_steps=previous, step=item.step.strip(), criterion=criterion
        )
        messages = [{"role": "user", "content": content}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return content + "\nAnswer: "

    @torch.no_grad()
    def score(self, items: Sequence[JudgeItem]) -> list[float]:
        """One reward in [0, 1] per item: the scaled expected rating, or the mean P(yes) over the questions."""
        if not items:
            return []
        totals = torch.zeros(len(items), dtype=torch.float64)
        for criterion in self.questions:
            texts = [self.render(item, criterion) for item in items]
            totals += self._read(texts).double()
        return (totals / len(self.questions)).tolist()

    def _read(self, texts: list[str]) -> torch.Tensor:
        """Per text, the reward read from one forward pass (batched, longest first, by ``batch_size``)."""
        encoded = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        split_ten = self.mode == "score" and self.rating_tokens.ten_suffix_id is not None
        if split_ten:  # read P("0" | "1") from the same pass
            encoded = [ids + [self.rating_tokens.first_ids[0]] for ids in encoded]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        out = torch.empty(len(encoded))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            logits = self._last_logits([encoded[i] for i in index], 2 if split_ten else 1)
            if self.mode == "yes_no":
                values = yes_probability(logits[:, -1], self.yes_ids, self.no_ids)
            else:
                second = logits[:, -1] if split_ten else None
                first = logits[:, -2] if split_ten else logits[:, -1]
                values = expected_rating(rating_distribution(first, second, self.rating_tokens))
            out[index] = values.cpu()
        return out

    def _last_logits(self, rows: list[list[int]], keep: int) -> torch.Tensor:
        """Logits (B, keep, V) of the last ``keep`` positions of left-padded rows."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        output = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
        )
        return output.logits[:, -keep:].float()


def judge_items(question: str, steps: Sequence[str]) -> list[JudgeItem]:
    """One item per step of an episode: the step with the steps before it."""
    return [JudgeItem(question, list(steps[:k]), step) for k, step in enumerate(steps)]


__all__ = [
    "JudgeItem",
    "ScoreTokens",
    "StepJudge",
    "expected_rating",
    "judge_items",
    "load_judge_prompt",
    "load_judge_questions",
    "rating_distribution",
    "score_tokens",
    "word_ids",
    "yes_probability",
]
