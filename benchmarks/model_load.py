"""First load (materialise the embedded GGUF model into the cache) versus a later load from the cache.

Each load runs in a fresh Python process with an empty temporary cache for the first one, so nothing is shared
between them. Prints a table and writes benchmarks/results/model_load.json.

    python benchmarks/model_load.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = (
    "import time; t = time.perf_counter();"
    "from trl_stepwise.models import load_model_and_tokenizer; load_model_and_tokenizer();"
    "print(time.perf_counter() - t)"
)


def timed_load(cache: str) -> float:
    """Seconds spent inside load_model_and_tokenizer() in a fresh process using ``cache``."""
    env = {**os.environ, "TRL_STEPWISE_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(cache)
        second = timed_load(cache)
    result = {"first_load_s": first, "cached_load_s": second, "speedup": first / second, "date": time.strftime("%F")}
    print(f"{'load':<22}{'seconds':>10}")
    print(f"{'first (materialise)':<22}{first:>10.2f}")
    print(f"{'cached':<22}{second:>10.2f}")
    print(f"speedup: {result['speedup']:.1f}x (target >= 3x)")
    out = Path(__file__).parent / "results" / "model_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
