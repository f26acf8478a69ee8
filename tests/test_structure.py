"""The package's shape: one environment API, with no trace of the retired math-env text API."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import trl_stepwise.envs as envs

REPO = Path(__file__).resolve().parent.parent
# The retired text API (reset(question, answer) / 4-tuple step / batched stepping) and its modules.
RETIRED = ("StepwiseMathEnv", "EnvBatch", "StepAction", "StepwiseEnv", "Observation", "ArithmeticWordProblemEnv")
RETIRED_MODULES = ("math_gym", "arithmetic_env", "envs.batch", "envs/batch")
SCANNED = ("trl_stepwise", "recipes", "benchmarks")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".json"}


def _files() -> list[Path]:
    files = [REPO / "README.md"]
    for folder in SCANNED:
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return files


def test_no_retired_environment_api_name_remains():
    pattern = re.compile(r"\b(?:" + "|".join(RETIRED) + r")\b|" + "|".join(map(re.escape, RETIRED_MODULES)))
    hits = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in _files()
        for number, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == [], "retired environment API names remain:\n" + "\n".join(hits)


def test_retired_modules_and_exports_are_gone():
    for name in ("math_gym.py", "arithmetic_env.py", "batch.py"):
        assert not (REPO / "trl_stepwise" / "envs" / name).exists(), name
    assert not set(RETIRED) & set(dir(envs))


# The layering, bottom up: data (problems, grading, prompts) < environments < engines and rollout < trainer.
DATA_LAYER = (
    "data",
    "flavours",
    "countdown",
    "arithmetic",
    "arithmetic_stories",
    "grading",
    "calculator",
    "prompting",
)
ABOVE_DATA = ("trl_stepwise.envs", "trl_stepwise.engines", "trl_stepwise.rollout", "trl_stepwise.trainer")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}


def test_the_data_layer_imports_no_environment_engine_or_trainer():
    wrong = {
        f"{module}.py imports {name}"
        for module in DATA_LAYER
        for name in _imports(REPO / "trl_stepwise" / f"{module}.py")
        if name.startswith(ABOVE_DATA)
    }
    assert wrong == set()


def test_one_shared_prefix_helper_and_one_stop_policy():
    sources = {p: p.read_text("utf-8") for p in (REPO / "trl_stepwise").rglob("*.py")}
    assert [
        p.name for p, s in sources.items() if "def shared_prefix_length" in s or "def _shared_prefix_length" in s
    ] == ["kv_cache.py"]
    assert not [p.name for p, s in sources.items() if "cheap_stops" in s or re.search(r"\bstreams\s*=", s)]


def test_the_trainer_imports_from_the_package_root_and_lazily():
    """``from trl_stepwise import StepwiseReinforceTrainer`` as ``from trl import GRPOTrainer``; a bare
    ``import trl_stepwise`` loads neither torch nor transformers."""
    code = (
        "import sys, trl_stepwise\n"
        "assert not {'torch', 'transformers', 'trl'} & set(sys.modules), sorted(sys.modules)\n"
        "from trl_stepwise import Env, StepwiseReinforceConfig, StepwiseReinforceTrainer, make\n"
        "from trl_stepwise.trainer import StepwiseReinforceTrainer as T\n"
        "assert StepwiseReinforceTrainer is T and make('countdown').reset(seed=1)[0]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# Who may not import whom (the arrows point down: recipes > trainer > rollout / algorithms > engines, environments).
FORBIDDEN = {
    "envs": ("engines", "rollout", "trainer", "algorithms", "recipe", "cli", "evaluation"),
    "engines": ("envs", "rollout", "trainer", "algorithms", "recipe", "cli", "evaluation"),
    "rollout": ("trainer", "algorithms", "recipe", "cli", "evaluation"),
    "algorithms": ("trainer", "rollout", "envs", "engines", "recipe", "cli"),
    "trainer": ("recipe", "cli"),
}


def _modules(name: str) -> list[Path]:
    root = REPO / "trl_stepwise"
    return sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / f"{name}.py"]


def test_the_layers_import_one_way():
    wrong = []
    for layer, above in FORBIDDEN.items():
        banned = tuple(f"trl_stepwise.{name}" for name in above)
        for path in _modules(layer):
            wrong += [f"{path.relative_to(REPO)} imports {n}" for n in _imports(path) if n.startswith(banned)]
    assert wrong == []


def test_no_package_file_holds_two_ideas_by_length():
    long = {
        str(p.relative_to(REPO)): n
        for p in (REPO / "trl_stepwise").rglob("*.py")
        if (n := len(p.read_text("utf-8").splitlines())) > 500
    }
    assert long == {}, f"files above 500 lines: {long}"
