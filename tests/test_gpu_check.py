"""``benchmarks/gpu_check.py`` on CPU with the tiny shape, so the prepared GPU check cannot rot between GPU loans.

The check runs in a subprocess, as on the GPU machine; one run hides trl, datasets, math-verify, bitsandbytes and
vLLM from the import system (that machine has none of them) to prove it needs only torch, transformers, peft and
accelerate there. The vLLM row starts a colocated CPU engine (~25 s), so it is ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
# What the GPU machine lacks: a PathFinder that finds none of these, so find_spec says None and import fails
HIDE = """
import importlib.machinery, runpy, sys
HIDDEN = {hidden!r}
class Hide(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""
NOT_ON_GPU_MACHINE = ("trl", "datasets", "math_verify", "latex2sympy2_extended", "bitsandbytes", "vllm", "pandas")


def run_check(tmp_path: Path, *args: str, hide: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, dict]:
    flags = ["--shape", "tiny", "--device", "cpu", "--wheels", str(tmp_path / "no-wheels")]
    flags += ["--output", str(tmp_path / "gpu_check.json")]
    output = tmp_path / "gpu_check.quick.json"  # a smoke run never writes over a GPU result
    prefix = ["-c", HIDE.format(hidden=set(hide), script=str(SCRIPT))] if hide else [str(SCRIPT)]
    result = subprocess.run(
        [sys.executable, *prefix, *flags, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert output.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(output.read_text())


def statuses(report: dict) -> dict[str, str]:
    return {row["row"]: row["status"] for row in report["rows"]}


def assert_ok_row(row: dict) -> None:
    assert row["status"] == "ok", row
    assert 0.0 <= row["logprob_diff"] <= row["tolerance"]
    changed, total = row["params_changed"].split("/")
    assert changed == total and int(total) > 0
    assert row["step_s"] > 0 and row["gen_s"] > 0 and row["peak_gib"] > 0


def test_tiny_cpu_rows_pass_and_print_the_table(tmp_path):
    rows = "full_fp32,full_bf16,lora_bf16,qlora_4bit,fsdp2_full"
    result, report = run_check(tmp_path, "--rows", rows)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = statuses(report)
    for name in ("full_fp32", "full_bf16", "lora_bf16", "fsdp2_full"):
        assert_ok_row(next(r for r in report["rows"] if r["row"] == name))
    lora = next(r for r in report["rows"] if r["row"] == "lora_bf16")
    assert lora["checks"]["policy_weights_vs_merge_max_abs_diff"] == 0.0
    fsdp2 = next(r for r in report["rows"] if r["row"] == "fsdp2_full")  # gathered pushes before every rollout
    assert fsdp2["checks"]["pushes"] == 2 and fsdp2["checks"]["checkpoint_roundtrip_max_abs_diff"] == 0.0
    if importlib.util.find_spec("bitsandbytes") is None:
        assert found["qlora_4bit"].startswith("skipped: bitsandbytes not installed")
    else:  # 4-bit on bitsandbytes' CPU backend; vLLM with a 4-bit base must be refused
        assert_ok_row(next(r for r in report["rows"] if r["row"] == "qlora_4bit"))
        assert found["vllm_qlora"].startswith("refused (expected)")
    assert report["smoke_run"] and report["failed"] == []
    table = report["table"]
    assert table.splitlines()[0].startswith("| row") and table in result.stdout
    for name in found:
        assert f"| {name} " in table


def test_runs_with_only_torch_transformers_peft_accelerate(tmp_path):
    """As on the GPU machine: no trl, datasets, math-verify, bitsandbytes or vLLM; the rows that need them skip."""
    result, report = run_check(tmp_path, hide=NOT_ON_GPU_MACHINE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = statuses(report)
    for name in ("full_fp32", "full_bf16", "lora_bf16", "fsdp2_full"):
        assert_ok_row(next(r for r in report["rows"] if r["row"] == name))
    assert found["qlora_4bit"].startswith("skipped: bitsandbytes not installed")
    assert found["vllm_lora"].startswith("skipped: vllm not installed")
    assert "trl missing" in report["batching_import"] and "datasets missing" in report["batching_import"]
    assert report["machine"]["versions"]["trl"] is None and report["machine"]["versions"]["datasets"] is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_row_pushes_weights_and_follows_the_policy(tmp_path):
    result, report = run_check(tmp_path, "--rows", "vllm_lora")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = report["rows"][0]
    assert_ok_row(row)
    checks = row["checks"]
    assert len(checks["weight_push_s"]) == 3  # before each of the 2 rollouts, and after the last step
    assert checks["logprob_diff_after_last_push"] < checks["logprob_diff_before_last_push"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_failed_row_is_reported_and_gives_exit_code_1(tmp_path, monkeypatch):
    check = load_script()

    def broken(ctx, row, bf16):
        raise check.CheckFailed("parameters did not change")

    monkeypatch.setattr(check, "row_full", broken)
    output = tmp_path / "out.quick.json"
    args = ["--shape", "tiny", "--device", "cpu", "--rows", "full_fp32", "--wheels", str(tmp_path), "--output"]
    assert check.main([*args, str(output)]) == 1
    report = json.loads(output.read_text())
    assert report["failed"] == ["full_fp32"]
    assert report["rows"][0]["status"] == "FAILED: CheckFailed: parameters did not change"


def test_carried_wheels_are_unpacked_onto_sys_path(tmp_path, monkeypatch):
    check = load_script()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "carried_pkg-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("carried_pkg/__init__.py", "VALUE = 42\n")
        wheel.writestr(
            "carried_pkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: carried-pkg\nVersion: 0.1\n"
        )
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert check.unpack_wheels(wheels, tmp_path / "site") == ["carried_pkg-0.1-py3-none-any.whl"]
    try:
        import carried_pkg

        assert carried_pkg.VALUE == 42 and Path(carried_pkg.__file__).is_relative_to(tmp_path / "site")
    finally:
        sys.modules.pop("carried_pkg", None)
    assert check.unpack_wheels(tmp_path / "empty") == []


def test_unknown_rows_are_refused():
    check = load_script()
    with pytest.raises(SystemExit):
        check.parse_args(["--rows", "full_fp32,fp8"])
