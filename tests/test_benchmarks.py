"""Every benchmark runs its whole path in `--quick` mode, so a schema or API change breaks a test
and not a user; quick runs write their JSON elsewhere, never over benchmarks/results/.

The quick runs start together, two at a time (each on one compute thread, `quickmode.py`: two
cores' worth, as on CI), longest first, and each test waits for its own: about half
the time of one after the other (8 runs, ~108 s in a row on the 2-core machine)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

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
LONGEST_FIRST = ("bench_scale_out.py", "bench_scale.py", "bench_extract.py", "bench_train.py",
                 "bench_generate.py", "bench_loader.py", "bench_feed.py", "bench_bank.py")
AT_ONCE = 2


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


def quick_run(script: str, folder: str) -> subprocess.CompletedProcess:
    os.makedirs(folder, exist_ok=True)
    out = SCRIPTS[script]
    args = ["--quick"] + (["--out", os.path.join(folder, out)] if out else [])
    return run_script(script, *args, cwd=folder)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> tuple[dict, str, dict[str, Future]]:
    """Every quick run, started at once (AT_ONCE at a time): the recorded figures before
    them, their folder, and each script's run."""
    before = recorded_figures()
    folder = str(tmp_path_factory.mktemp("quick"))
    pool = ThreadPoolExecutor(AT_ONCE)
    runs = {s: pool.submit(quick_run, s, os.path.join(folder, s[:-3])) for s in LONGEST_FIRST}
    yield before, folder, runs
    pool.shutdown(cancel_futures=True)


def test_every_benchmark_is_listed():
    scripts = {n for n in os.listdir(BENCHMARKS) if n.startswith("bench_") and n.endswith(".py")}
    assert scripts == set(SCRIPTS) == set(LONGEST_FIRST)


@pytest.mark.parametrize("script", LONGEST_FIRST)
def test_quick_mode_runs_whole_path(script, quick_runs):
    before, folder, runs = quick_runs
    done = runs[script].result(timeout=len(LONGEST_FIRST) * TIMEOUT_S)
    assert done.returncode == 0, f"{script} --quick failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    out = SCRIPTS[script]
    if out:
        assert written_json(os.path.join(folder, script[:-3], out)), f"{script} wrote an empty result"
    changed = sorted(n for n, digest in recorded_figures().items() if before.get(n) != digest)
    assert not changed, f"a --quick run (this one: {script}, or one beside it) changed {changed}"
