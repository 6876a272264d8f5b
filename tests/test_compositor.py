"""Compositor v3 (loader/composite.py): CPU drivers, CUDA drivers (simulated here, real on a
GPU), the numpy reference, the size of the DALI graphs and the loader's host syncs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from compositor_cases import differences, expected, make_case, run_compositor
from test_loader_fixtures import make_dataset

from xpaste_stream.loader import CopyPasteLoader, PasteConfig
from xpaste_stream.loader.pipeline import graph_operators
from xpaste_stream.loader.targets import HOST_SYNCS

HERE = os.path.dirname(os.path.abspath(__file__))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU run needs one")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("compositor")))


def test_case_is_demanding():
    """The shared case really has what the equality tests claim to cover."""
    case = make_case(11, 40, "hard")
    plan, want = case["plan"], expected(case)
    assert plan.active.sum(1).tolist() == [0, 19, 4]
    assert plan.flip[plan.active].any() and not plan.flip[plan.active].all()
    pos, size = plan.pos[plan.active], plan.size[plan.active]
    assert (pos[:, 0] < 0).any() and (pos[:, 1] < 0).any()                   # over top, left
    assert (pos[:, 0] + size[:, 0] > 40).any() and (pos[:, 1] + size[:, 1] > 40).any()
    assert not (want["ids"][1] == 6).any() and (want["ids"][1] == 7).any()   # slot 5 fully covered
    assert len(np.unique(want["ids"][1])) > 8
    assert len(want["real_masks"]) > 0 and want["real_masks"].any()
    n_real = len(want["real_masks"])
    assert (want["stats"][:n_real, 0] < want["real_masks"].sum((1, 2))).any()   # occluded
    assert (want["stats"][n_real:, 0] == 0).any() and (want["stats"][n_real:, 0] > 0).any()
    assert want["keep"].any() and not want["keep"].all()
    assert (want["image"] != case["background"]).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blending", ["hard", "alpha", "gaussian"])
def test_compositor_equals_reference(blending, device):
    """Image, id map, resampled instances, real masks, visible masks and their boxes and areas
    equal the reference exactly, for all three blendings (integer arithmetic throughout)."""
    case = make_case(11, 40, blending)
    got, want = run_compositor(case, device), expected(case)
    assert differences(got, want) == dict.fromkeys(want, 0)


def test_cuda_drivers_equal_cpu_drivers_under_the_simulator():
    """The CUDA kernels (the code a GPU runs), under numba's CUDA simulator, give the CPU
    drivers' and the reference's outputs bit for bit."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    done = subprocess.run([sys.executable, os.path.join(HERE, "compositor_cases.py"), "cuda-sim", "16"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    for blending in ("hard", "alpha", "gaussian"):
        for against in ("vs_reference", "vs_cpu"):
            assert set(verdict[blending][against].values()) == {0}, (blending, against, verdict)


def test_graph_size_does_not_depend_on_the_number_of_slots(dataset):
    """The GPU and CPU graphs have the same operators for K = 1 and K = 19: 19 nodes for the
    backgrounds (10 of them the outputs of the one external source) and 2 for the instances;
    v2 had 1,089 at K = 19."""
    urls, bank = dataset
    seen = {}
    for k in (1, 19):
        loader = CopyPasteLoader(urls, bank, PasteConfig(output_size=64, max_pastes=k),
                                 batch_size=2, workers=0)
        for gpu in (False, True):
            background = graph_operators(loader.background_pipeline(None, gpu=gpu))
            instances = graph_operators(loader.instance_pipeline(None, gpu=gpu))
            seen[k, gpu] = background + instances
            assert len(background) <= 19 and len(instances) <= 2
            decoders = [d for name, d in background + instances if name == "decoders__Image"]
            assert decoders == (["gpu", "gpu"] if gpu else ["cpu", "cpu"])
            assert not {name for name, _ in seen[k, gpu]} & {"MultiPaste", "Inflate", "Resize_"}
    assert seen[1, True] == seen[19, True] and seen[1, False] == seen[19, False]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_host_sync_per_batch(dataset, workers):
    """Pasting and target building bring one tensor back from the device per batch (the keep
    decisions); counted on the CPU path at the one place the loader does it."""
    urls, bank = dataset
    loader = CopyPasteLoader(urls, bank, PasteConfig(output_size=96, min_pastes=3, max_pastes=6),
                             batch_size=3, workers=workers)
    before = HOST_SYNCS.count
    batches = list(loader)
    assert len(batches) == 4 and HOST_SYNCS.count - before == len(batches)
    loader.close()


@needs_cuda
def test_cpu_and_gpu_batches_agree(dataset):
    """The same batch composited on the CPU and the GPU: targets equal, images equal except
    where DALI's CPU and GPU resize of the background round differently (at most 1)."""
    urls, bank = dataset
    paste = PasteConfig(output_size=128, min_pastes=5, max_pastes=8)
    cpu, gpu = (next(iter(CopyPasteLoader(urls, bank, paste, batch_size=4, device_id=d, seed=2)))
                for d in (None, 0))
    diff = (cpu.images.int() - gpu.images.cpu().int()).abs()
    assert diff.max() <= 1, f"{int((diff > 0).sum())} pixels differ, by up to {int(diff.max())}"
    for a, b in zip(cpu.targets, gpu.targets, strict=True):
        for name in ("boxes", "labels", "masks", "source", "area"):
            assert torch.equal(a[name], b[name].cpu()), name
