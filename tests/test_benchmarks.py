"""Every benchmark runs its whole path in `--quick` mode, so a schema or API change breaks a test
and not a user; quick runs write their JSON elsewhere, never over benchmarks/results/."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(BENCHMARKS, "results")
# script -> where its --out points (a file, or for bench_train a folder); None: no --out
SCRIPTS = {"bench_bank.py": "bank.json", "bench_feed.py": "feed.json",
           "bench_scale_out.py": "scale-out.json", "bench_generate.py": "generate.json",
           "bench_extract.py": "extract.json", "bench_train.py": "train",
           "bench_scale.py": "scale.json", "bench_loader.py": None}
TIMEOUT_S = 300


def run_script(script: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def recorded_figures() -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(RESULTS)):
        with open(os.path.join(RESULTS, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def written_json(out: str) -> dict:
    if os.path.isdir(out):
        [name] = [n for n in os.listdir(out) if n.endswith(".json")]
        out = os.path.join(out, name)
    with open(out) as f:
        return json.load(f)


def test_every_benchmark_is_listed():
    scripts = {n for n in os.listdir(BENCHMARKS) if n.startswith("bench_") and n.endswith(".py")}
    assert scripts == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_mode_runs_whole_path(script, tmp_path):
    if script == "bench_loader.py":
        usage = run_script(script, "--help", cwd=str(tmp_path))
        if "--quick" not in usage.stdout:
            pytest.skip("bench_loader.py has no --quick yet (the lead adds it); runs once it does")
    before = recorded_figures()
    out = SCRIPTS[script]
    args = ["--quick"] + (["--out", str(tmp_path / out)] if out else [])
    done = run_script(script, *args, cwd=str(tmp_path))
    assert done.returncode == 0, f"{script} --quick failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    if out:
        assert written_json(str(tmp_path / out)), f"{script} wrote an empty result"
    assert recorded_figures() == before, f"{script} --quick changed benchmarks/results/"
