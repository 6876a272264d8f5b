"""Loader v2 as a streaming engine: one global order for any world size and worker count,
exact mid-epoch resume from a state dict, and equality with the independent reference.

Tests taking `device` also run on GPU 0 when CUDA is present (skipped with a reason otherwise):
`python3 -m pytest -q tests/test_loader_order.py tests/test_loader.py -k "cuda or not cpu"`.
"""

from __future__ import annotations

import gc
import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch
from test_loader_fixtures import make_dataset

from xpaste_stream.bank import InstanceBank
from xpaste_stream.loader import CopyPasteLoader, LoaderError, PasteConfig
from xpaste_stream.loader.reference import composite, independent_inputs

DEVICES = [pytest.param(None, id="cpu"),
           pytest.param(0, id="cuda", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device: the GPU run needs one"))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("order")))


def paste(**kw) -> PasteConfig:
    return PasteConfig(**{"output_size": 96, "max_pastes": 5, **kw})


def plan_hash(batch, i: int) -> str:
    p = batch.plan
    parts = [p.image_ids[i], p.lsj_size[i], p.lsj_offset[i], p.lsj_flip[i], p.ids[i], p.size[i],
             p.pos[i], p.flip[i]]
    return hashlib.sha1(b"".join(np.ascontiguousarray(x).tobytes() for x in parts)).hexdigest()[:12]


def global_sequence(urls, bank, world: int, workers: int, device=None, epochs: int = 2,
                    **kw) -> list[list[tuple[int, str]]]:
    """Per epoch, (position, plan hash) of every sample, in global order (ranks merged)."""
    per_rank = []
    for rank in range(world):
        with CopyPasteLoader(urls, bank, paste(), batch_size=2, rank=rank, world_size=world,
                             workers=workers, device_id=device, **kw) as loader:
            per_rank.append([[(int(b.positions[i]), plan_hash(b, i)) for b in loader
                              for i in range(len(b.targets))] for _ in range(epochs)])
    return [sorted(x for r in range(world) for x in per_rank[r][e]) for e in range(epochs)]


@pytest.mark.parametrize("device", DEVICES)
def test_global_order_same_for_world_sizes_and_workers(dataset, device):
    urls, bank = dataset
    base = global_sequence(urls, bank, world=1, workers=1, device=device)
    assert base[0] != base[1]  # each epoch its own order and plans
    for world, workers in ((1, 2), (2, 1), (4, 2)):
        got = global_sequence(urls, bank, world=world, workers=workers, device=device)
        for e in range(2):
            n = min(len(got[e]), len(base[e]))
            # positions past the epoch end wrap: compare the positions both runs have
            common = {p for p, _ in got[e]} & {p for p, _ in base[e]}
            assert len(common) >= 10 and n >= 10
            assert [x for x in got[e] if x[0] in common] == [x for x in base[e] if x[0] in common]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resume_world", [1, 2])
def test_resume_mid_epoch_continues_exactly(dataset, device, resume_world):
    urls, bank = dataset
    whole = global_sequence(urls, bank, world=1, workers=1, device=device, epochs=2)
    whole = [x for epoch in whole for x in epoch]
    with CopyPasteLoader(urls, bank, paste(), batch_size=2, workers=1, device_id=device) as first:
        taken = []
        for k, b in enumerate(first):
            taken += [(int(b.positions[i]), plan_hash(b, i)) for i in range(len(b.targets))]
            if k == 2:
                break
        state = first.state_dict()
    assert state["epoch"] == 0 and state["samples"] == 6
    rest = []
    for rank in range(resume_world):
        with CopyPasteLoader(urls, bank, paste(), batch_size=2, rank=rank, workers=1,
                             world_size=resume_world, device_id=device) as loader:
            loader.load_state_dict(state)
            rest.append([(int(b.positions[i]), plan_hash(b, i)) for _ in range(2) for b in loader
                         for i in range(len(b.targets))])
    if resume_world == 1:
        assert taken + rest[0] == whole
    else:  # the rest of epoch 0 split between two ranks: the same samples, none twice
        epoch0 = sorted(taken + [x for r in rest for x in r if x in whole[:12]])
        assert epoch0 == sorted(whole[:12])


def test_state_dict_refused_for_another_run(dataset, tmp_path):
    urls, bank = dataset
    with CopyPasteLoader(urls, bank, paste(), batch_size=2, workers=0) as loader:
        state = loader.state_dict()
    for other, match in ((dict(seed=1), "seed"), (dict(paste_=paste(max_pastes=3)), "paste")):
        p = other.pop("paste_", paste())
        with CopyPasteLoader(urls, bank, p, batch_size=2, workers=0, **other) as loader:
            with pytest.raises(LoaderError, match=match):
                loader.load_state_dict(state)
    with CopyPasteLoader(urls[:2], bank, paste(), batch_size=2, workers=0) as loader:
        with pytest.raises(LoaderError, match="background data set"):
            loader.load_state_dict(state)
        with pytest.raises(LoaderError, match="not a loader state"):
            loader.load_state_dict({"epoch": 1})


def test_lifecycle_len_set_epoch_and_torchrun_env(dataset, monkeypatch):
    urls, bank = dataset
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with CopyPasteLoader(urls, bank, paste(), batch_size=2, workers=1) as loader:
        assert (loader.rank, loader.world_size) == (1, 2)
        assert len(loader) == 3 and len(list(loader)) == 3 and loader.epoch == 1
        loader.set_epoch(5)
        assert loader.state_dict()["epoch"] == 5 and len(list(loader)) == 3
        pipe, workers = loader._pipe, loader.worker_pids()
        # what its forked workers share stays frozen in this process (no copy-on-write by
        # this process's collections) until close()
        assert gc.get_freeze_count() > 0 and workers
    assert loader._pipe is None and pipe is not None  # closed on leaving the block
    assert gc.get_freeze_count() == 0
    with CopyPasteLoader(urls, bank, paste(), batch_size=4, workers=0, drop_last=True,
                         rank=0, world_size=1) as loader:
        assert len(loader) == 2 and sum(len(b.targets) for b in loader) == 8


def raw_samples(urls) -> dict[int, dict]:
    """Background samples by image id, read with plain tarfile (not the loader's reader)."""
    out = {}
    for url in urls:
        with tarfile.open(url) as tar:
            grouped: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                grouped.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
        for sample in grouped.values():
            out[int(key_id(sample))] = sample
    return out


def key_id(sample: dict) -> int:
    import json

    return json.load(io.BytesIO(sample["json"]))["image_id"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blending", ["hard", "alpha", "gaussian"])
def test_equals_independent_reference_with_flips(dataset, device, blending):
    """Composited images and targets equal the reference made from the raw shard samples and
    encoded instances (its own decode, LSJ, resize, flips), with every background and every
    instance flipped in one run and none in the other."""
    urls, bank = dataset
    samples, opened = raw_samples(urls), InstanceBank.open(bank)
    checked = 0
    for flip in (0.0, 1.0):
        p = paste(blending=blending, hflip_prob=flip, instance_hflip_prob=flip, max_pastes=6,
                  scale_range=(0.8, 1.6))
        with CopyPasteLoader(urls, bank, p, batch_size=5, workers=1, device_id=device) as loader:
            for batch in loader:
                for i, target in enumerate(batch.targets):
                    inputs = independent_inputs(samples[int(batch.plan.image_ids[i])], batch.plan,
                                                i, opened, p)
                    image, ref = composite(*inputs, p)
                    got = batch.images[i].permute(1, 2, 0).cpu().numpy().astype(int)
                    diff = np.abs(got - image.astype(int))
                    assert diff.mean() < 2.0 and (diff > 12).mean() < 0.02, (diff.mean(), flip)
                    assert target["labels"].tolist() == ref["labels"].tolist()
                    assert target["source"].tolist() == ref["source"].tolist()
                    masks = target["masks"].cpu().numpy().astype(bool)
                    for m, r in zip(masks, ref["masks"].astype(bool), strict=True):
                        assert (m & r).sum() / max(1, (m | r).sum()) > 0.9
                    np.testing.assert_allclose(target["boxes"].cpu().numpy(), ref["boxes"], atol=1.0)
                    checked += len(ref["labels"])
    assert checked > 30
