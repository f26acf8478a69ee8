"""Bad input to every recipe and to ``trl-stepwise evaluate``: one line on stderr, exit code 2, before any model loads.

The cases live in ``tests/bad_inputs.py`` (which also runs them as separate processes); here they run in-process with
model loading forbidden, so each costs a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_inputs import CASES, Case, make_fixtures

from trl_stepwise import cli, models, recipe, sft
from trl_stepwise.trainer import builders
from trl_stepwise.trainer import trainer as trainer_module


def _forbidden(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was checked")


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (models, builders, sft):
        monkeypatch.setattr(module, "load_model", _forbidden)
    monkeypatch.setattr(trainer_module.StepwiseReinforceTrainer, "__init__", _forbidden)


def run_in_process(case: Case, tmp: Path) -> int:
    argv = case.args(tmp)
    mains = {
        "reinforce": lambda: recipe.main(argv, prog="reinforce_gsm8k.py"),
        "math": lambda: recipe.main(argv, "reinforce_math.py", default_dataset="math", default_eval_dataset="math500"),
        "sft": lambda: sft.main(argv, prog="sft_gsm8k.py"),
        "evaluate": lambda: cli.main(["evaluate", *argv]),
    }
    try:
        return mains[case.command]()
    except SystemExit as exit_:  # argparse's own usage errors
        return exit_.code


def test_there_are_at_least_30_cases_over_every_command() -> None:
    assert len(CASES) >= 30
    assert {c.command for c in CASES} == {"reinforce", "math", "sft", "evaluate"}
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_before_any_model(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_model_loading
) -> None:
    monkeypatch.chdir(tmp_path)
    make_fixtures(tmp_path)
    before = set(tmp_path.rglob("*"))
    code = run_in_process(case, tmp_path)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(word in err for word in case.words), err
    assert set(tmp_path.rglob("*")) == before  # wrote nothing (no output_dir, no run files)


@pytest.mark.slow
def test_bad_inputs_script_reports_every_case_as_one_line(tmp_path: Path) -> None:
    """The script itself, on a recipe's case and the CLI's (each a separate process, as a user runs it); every case
    runs in process above."""
    import bad_inputs

    first = {c.command: c for c in reversed(CASES)}  # the first case of each command
    picked = [first["reinforce"], first["evaluate"]]  # the two entry points: a recipe and the CLI
    for case in picked:
        case_, code, stderr, wrote = bad_inputs.run_case(case, tmp_path)
        assert bad_inputs.is_one_line_error(code, stderr, wrote, case_), (case.name, code, stderr)
