"""Ray across nodes on this machine: a head (no CPUs: it runs no unit) and two worker nodes of
one CPU each, started as separate Ray nodes on 127.0.0.1 (ray.cluster_utils); one worker node
is killed mid-run. The run completes (its units run again on the other node) and writes what a
local run writes."""

from __future__ import annotations

import glob
import os
import shutil
import threading
import time

import pytest
from helpers import ext_config, gen_config, snapshot

from xpaste_stream.executors import ExecutorConfig
from xpaste_stream.extract import run_extract
from xpaste_stream.generate import run_generate

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
RAY_2 = ExecutorConfig(executor="ray", workers=2)


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    path = os.pathsep.join(p for p in (TESTS, REPO, os.environ.get("PYTHONPATH")) if p)
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=head.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})
    yield head
    ray.shutdown()
    head.shutdown()


@pytest.fixture
def two_nodes(cluster):
    """Two live worker nodes (a node left by the test before is used again: start-up is slow)."""
    while len(cluster.worker_nodes) < 2:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return sorted(cluster.worker_nodes, key=lambda node: node.node_id)


def kill_when(cluster, node, condition, timeout: float = 60.0) -> threading.Thread:
    """Remove `node` (its raylet and workers, SIGKILL) once `condition()` holds; polled."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                cluster.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_extract_survives_losing_a_node_mid_run(cluster, two_nodes, tmp_path):
    run_generate(gen_config(tmp_path / "img", num_categories=6), progress=False)
    log, out = tmp_path / "segment.log", tmp_path / "out"
    spec = "slow_segmenter:Slow"
    cfg = ext_config(str(tmp_path / "img" / "gen-*.tar"), out, batch_size=2, segmenters=[spec],
                     segmenter_options={spec: {"delay": 0.3, "log": str(log)}}, device="cpu")
    run_extract(cfg, progress=False)
    local = snapshot(out)
    shutil.rmtree(out)
    log.unlink()

    doomed = two_nodes[0].node_id

    def lines() -> list[tuple[str, str]]:
        return [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []

    def inside_a_unit() -> bool:
        """A unit is finished somewhere, and the doomed node has begun one (its first batch of
        two logged, the second not)."""
        mine = [c for n, c in lines() if n == doomed]
        return bool(glob.glob(str(out / "inst-*.stats.json"))) and bool(mine) and \
            mine.count(mine[-1]) == 1

    killer = kill_when(cluster, two_nodes[0], inside_a_unit)
    summary = run_extract(cfg, progress=False, executor=RAY_2)
    killer.join(60)
    assert two_nodes[0] not in cluster.worker_nodes, "the node was not killed mid-run"
    on_doomed = {c for n, c in lines() if n == doomed}
    elsewhere = {c for n, c in lines() if n != doomed}
    assert on_doomed & elsewhere, "no unit of the lost node ran again on the other one"
    assert summary["units_run"] == 6 and summary["samples"] + summary["failed"] == 24
    assert snapshot(out) == local


def test_generate_survives_losing_a_node_mid_run(cluster, two_nodes, tmp_path):
    out = tmp_path / "out"
    cfg = gen_config(out, num_categories=6, images_per_category=8, image_size=512)
    run_generate(cfg, progress=False)
    local = snapshot(out)
    shutil.rmtree(out)
    killer = kill_when(cluster, two_nodes[0],
                       lambda: len(glob.glob(str(out / "gen-*.stats.json"))) >= 3)
    summary = run_generate(cfg, progress=False, executor=RAY_2)
    killer.join(60)
    assert two_nodes[0] not in cluster.worker_nodes, "the node was not killed mid-run"
    assert summary["units_run"] == 12 and summary["samples"] == 48
    assert snapshot(out) == local
