"""The README's "Write your own environment" example is complete, short, and runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from trl_stepwise.envs import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_environment_example_runs(capsys):
    text = README.read_text(encoding="utf-8")
    code = re.search(r"<!-- env-example[^>]*-->\n```python\n(.*?)```", text, re.DOTALL).group(1)
    assert len(code.strip().splitlines()) < 40
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
        assert "reverse-word" in registry
    finally:
        registry.pop("reverse-word", None)
    assert "No. It starts with 'e'." in capsys.readouterr().out
