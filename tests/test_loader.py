"""The copy-paste loader on CPU with the real DALI pipeline, against the numpy reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_loader_fixtures import (
    OBJECT_COLOURS,
    background,
    corrupt_instance_dataset,
    default_backgrounds,
    instance,
    make_dataset,
    mismatched_bank_dataset,
    write_backgrounds,
    write_bank,
    write_categories,
)

from xpaste_stream import formats
from xpaste_stream.bank import InstanceBank, build_index
from xpaste_stream.config import ConfigError, from_dict
from xpaste_stream.loader import CopyPasteLoader, LoaderError, PasteConfig, to_detectron2
from xpaste_stream.loader.plan import CategoryStats
from xpaste_stream.loader.reference import Paste, composite, pastes_of
from xpaste_stream.loader.sources import jpeg_size
from xpaste_stream.shards import ShardWriter


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("loader")))


def small(**kw) -> PasteConfig:
    return PasteConfig(**{"output_size": 128, "max_pastes": 6, **kw})


def epoch(loader) -> list:
    return list(loader)


def assert_matches_reference(batch, paste: PasteConfig) -> int:
    """Every image and target of the batch equals the reference on the same placements."""
    checked = 0
    for i, target in enumerate(batch.targets):
        image, ref = composite(batch.debug["backgrounds"][i], batch.debug["real_masks"][i],
                               batch.debug["real_labels"][i], pastes_of(batch, i), paste)
        np.testing.assert_array_equal(batch.images[i].permute(1, 2, 0).cpu().numpy(), image)
        for name in ("masks", "boxes", "labels", "source"):
            np.testing.assert_array_equal(target[name].cpu().numpy(), ref[name])
        checked += len(ref["labels"])
    return checked


needs_cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                                reason="no CUDA device: the GPU run needs one")
DEVICES = [pytest.param(None, id="cpu"), pytest.param(0, id="cuda", marks=needs_cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blending", ["hard", "alpha", "gaussian"])
def test_matches_reference(dataset, blending, device):
    urls, bank = dataset
    paste = small(blending=blending, max_pastes=8)
    loader = CopyPasteLoader(urls, bank, paste, batch_size=4, num_threads=2, debug=True, seed=3,
                             device_id=device)
    batches = epoch(loader)
    assert sum(len(b.targets) for b in batches) == 12  # 10 backgrounds, the last batch wraps
    objects = sum(assert_matches_reference(b, paste) for b in batches)
    sources = np.concatenate([t["source"].numpy() for b in batches for t in b.targets])
    assert objects > 20 and 0 < sources.mean() < 1  # real and pasted objects both present
    for b in batches:
        for t in b.targets:
            assert t["boxes"].dtype.is_floating_point and t["labels"].dtype == __import__("torch").int64
            assert t["masks"].shape[1:] == (128, 128)


def test_lsj_keeps_masks_on_their_pixels(dataset):
    """No pastes: every real mask sits on its object's colour after resize, crop and flip
    (objects are drawn in file order, so a later object hides an earlier one's colour)."""
    urls, bank = dataset
    loader = CopyPasteLoader(urls, bank, small(max_pastes=0, scale_range=(0.5, 1.5)),
                             batch_size=5, debug=True)
    seen = 0
    for b in loader:
        for i, t in enumerate(b.targets):
            img = b.images[i].permute(1, 2, 0).numpy().astype(int)
            np.testing.assert_array_equal(img, b.debug["backgrounds"][i])
            assert (t["source"] == 0).all()
            masks = t["masks"].numpy().astype(bool)
            for j, (m, c) in enumerate(zip(masks, t["labels"].tolist(), strict=True)):
                m = m & ~masks[j + 1:].any(0)
                inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
                pix = img[1:-1, 1:-1][inner]
                if len(pix):
                    close = np.abs(pix - OBJECT_COLOURS[c]).max(1) <= 40
                    assert close.mean() > 0.95
                    seen += 1
    assert seen > 5


@pytest.fixture(scope="module")
def edge_case_data(tmp_path_factory):
    """One 160x160 background with six objects laid out for the occlusion rules."""
    root = str(tmp_path_factory.mktemp("edges"))
    objects = [(1, 10, 5, 20, 15),     # A: fully covered by a paste
               (2, 60, 5, 40, 40),     # B: partly covered, 1000 px remain
               (1, 10, 50, 20, 10),    # C1: box moves exactly 10 px, 100 px remain -> kept
               (2, 50, 70, 20, 10),    # C2: box moves 11 px, 90 px remain -> dropped
               (3, 10, 90, 54, 7),     # D1: box moves 11 px, 301 px remain -> kept
               (1, 10, 110, 61, 6)]    # D2: box moves 11 px, 300 px remain -> dropped
    bg_dir = os.path.join(root, "bg")
    os.makedirs(bg_dir)
    urls = write_backgrounds(bg_dir, [background(7, 160, 160, objects)])
    write_categories(bg_dir, {1: (0.2, 0.05), 2: (0.2, 0.05), 3: (0.2, 0.05)})
    return urls, write_bank(root)


# (y, x, h, w) of each paste; P8 overlaps P1's corner, P7 hangs over the top-right border.
EDGE_PASTES = [(0, 5, 25, 30), (0, 85, 50, 25), (45, 20, 20, 20), (66, 59, 18, 21),
               (86, 53, 14, 17), (104, 60, 18, 20), (-10, 150, 30, 30), (0, 0, 10, 12)]


def fixed_placements(bank_dir: str):
    rect = int(InstanceBank.open(bank_dir).instances_of(1)[0])  # instance 0: a full rectangle

    def hook(plan):
        k = len(EDGE_PASTES)
        plan.ids[:] = -1
        plan.ids[:, :k] = rect
        plan.labels[:, :k] = 1
        plan.pos[:, :k] = [(y, x) for y, x, _, _ in EDGE_PASTES]
        plan.size[:, :k] = [(h, w) for _, _, h, w in EDGE_PASTES]
        plan.flip[:] = False
        return plan
    return hook


def test_occlusion_rules_on_fixed_placements(edge_case_data):
    urls, bank = edge_case_data
    paste = PasteConfig(output_size=160, scale_range=(1.0, 1.0), hflip_prob=0.0, max_pastes=10)
    loader = CopyPasteLoader(urls, bank, paste, batch_size=1, debug=True,
                             plan_hook=fixed_placements(bank))
    (batch,) = epoch(loader)
    assert_matches_reference(batch, paste)
    t = batch.targets[0]
    real = t["source"] == 0
    real_boxes = t["boxes"][real].tolist()
    real_area = t["masks"][real].flatten(1).sum(1).tolist()
    # A, C2 and D2 are dropped; B, C1, D1 kept with cleared masks and recomputed boxes
    assert real_boxes == [[60, 5, 85, 45], [10, 50, 20, 60], [10, 90, 53, 97]]
    assert real_area == [1000, 100, 301]
    pasted = t["boxes"][~real].tolist()
    assert len(pasted) == 8
    assert pasted[0] == [5, 0, 35, 25]          # P1 keeps its box: only its corner is covered
    assert pasted[6] == [150, 0, 160, 20]       # border paste cut to the canvas
    assert t["masks"][~real][0].sum() == 25 * 30 - 10 * 7  # P8 cleared P1's corner
    assert t["image_id"] == 7


def test_zero_pastes_and_empty_background(dataset):
    urls, bank = dataset
    loader = CopyPasteLoader(urls, bank, small(max_pastes=0), batch_size=10, debug=True,
                             shuffle=False)
    (batch,) = epoch(loader)
    assert not batch.plan.active.any()
    by_id = {t["image_id"]: t for t in batch.targets}
    assert len(by_id[0]["labels"]) == 0 and by_id[0]["masks"].shape == (0, 128, 128)
    assert_matches_reference(batch, small(max_pastes=0))


def test_empty_background_gets_only_pastes(dataset):
    urls, bank = dataset
    loader = CopyPasteLoader(urls, bank, small(min_pastes=3, max_pastes=3), batch_size=10,
                             shuffle=False)
    (batch,) = epoch(loader)
    empty = next(t for t in batch.targets if t["image_id"] == 0)
    assert len(empty["source"]) > 0 and (empty["source"] == 1).all()


def test_category_missing_from_bank_and_without_stats(dataset):
    """categories.json lists 4 (no instances in the bank) and 3 (no statistics)."""
    urls, bank = dataset
    loader = CopyPasteLoader(urls, bank, small(min_pastes=6), batch_size=5)
    labels = set()
    for b in loader:
        labels |= set(b.plan.labels[b.plan.active].tolist())
    assert labels <= {1, 2, 3} and 3 in labels
    stats = CategoryStats(loader.categories_doc, loader.paste)
    mean, std = stats.lookup(np.array([3, 2]))
    assert mean.tolist() == [0.2, 0.3] and std.tolist() == [0.1, 0.1]


def test_same_seed_same_batches(dataset):
    urls, bank = dataset

    def run(seed):
        loader = CopyPasteLoader(urls, bank, small(), batch_size=4, seed=seed)
        return [(b.images.numpy(), b.plan.ids, [t["boxes"].numpy() for t in b.targets])
                for b in epoch(loader)]

    a, b, c = run(1), run(1), run(2)
    for (ia, pa, ba), (ib, pb, bb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(pa, pb)
        for x, y in zip(ba, bb, strict=True):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


def test_two_ranks_disjoint_and_covering(dataset):
    urls, bank = dataset
    seen = []
    for rank in range(2):
        loader = CopyPasteLoader(urls, bank, small(max_pastes=1), batch_size=3, rank=rank,
                                 world_size=2, workers=0)
        assert len(loader) == 2  # ceil(10 / 6) global batches, the same on both ranks
        seen.append([np.concatenate([b.positions for b in epoch(loader)]) for _ in range(2)])
        assert loader.epoch == 2
    for e in range(2):
        r0, r1 = set(seen[0][e].tolist()), set(seen[1][e].tolist())
        assert not r0 & r1 and r0 | r1 == set(range(12))  # positions 10, 11 wrap to 0, 1


def test_corrupt_background_skipped_counted_and_named(tmp_path):
    samples = default_backgrounds(6)
    samples[2]["png"] = samples[2]["png"][:200]          # truncated
    samples[4]["png"] = b"\x89PNG not an image at all" * 4  # garbage
    middle = bytearray(samples[3]["png"])                 # damaged middle, markers intact
    middle[len(middle) // 2:len(middle) // 2 + 40] = bytes(40)
    samples[3]["png"] = bytes(middle)
    samples[5]["ann.zst"] = b"not zstd"                   # damaged annotations
    bg_dir = tmp_path / "bg"
    bg_dir.mkdir()
    urls = write_backgrounds(str(bg_dir), samples)
    write_categories(str(bg_dir), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    bank = write_bank(str(tmp_path))
    for workers in (0, 2):
        loader = CopyPasteLoader(urls, bank, small(), batch_size=4, workers=workers)
        ids = [t["image_id"] for b in epoch(loader) for t in b.targets]
        assert len(ids) == 8 and set(ids) <= {0, 1}
        order = loader.source.order(0)
        bad = {2, 3, 4, 5}
        expected = sum(int(order[p % 6]) in bad for p in range(8))
        stats = loader.stats()
        assert stats["backgrounds_corrupt"] == expected
        hit = [int(order[p % 6]) for p in range(8) if int(order[p % 6]) in bad]
        assert sorted(s[1] for s in stats["skipped"]) == sorted(f"img{i:012d}" for i in hit)
        assert all(s[0].endswith(".tar") and s[2].startswith("background:") for s in stats["skipped"])
        loader.close()


def test_corrupt_instances_redrawn_and_counted(tmp_path):
    urls, bank, corrupt_ids = corrupt_instance_dataset(str(tmp_path))
    assert len(corrupt_ids) == 3
    loader = CopyPasteLoader(urls, bank, small(min_pastes=6, max_pastes=6), batch_size=4)
    used = set()
    for b in loader:
        used |= set(b.plan.ids[b.plan.active].tolist())
    assert used and not used & corrupt_ids
    stats = loader.stats()
    assert stats["instances_corrupt"] > 0
    assert len(stats["skipped"]) == stats["instances_corrupt"]
    assert not any(s[1].startswith("instance ") for s in stats["skipped"]), stats["skipped"]
    assert all(s[0].endswith(".tar") and s[2].startswith("instance ") for s in stats["skipped"])
    opened = InstanceBank.open(bank)   # named by shard and sample key, as in the shards
    assert {tuple(s[:2]) for s in stats["skipped"]} <= {opened.where(i) for i in corrupt_ids}


def test_mismatched_bank_refused(tmp_path):
    urls, bank = mismatched_bank_dataset(str(tmp_path))
    with pytest.raises(LoaderError, match="categories that .* does not list .*7"):
        CopyPasteLoader(urls, bank, small())


def test_gaussian_blending_changes_edges_only(dataset):
    urls, bank = dataset
    hard, soft = (next(iter(CopyPasteLoader(urls, bank, small(blending=m), batch_size=4, seed=5)))
                  for m in ("hard", "gaussian"))
    for th, ts in zip(hard.targets, soft.targets, strict=True):
        np.testing.assert_array_equal(th["masks"].numpy(), ts["masks"].numpy())
    diff = (hard.images.int() - soft.images.int()).abs().amax(1)
    assert diff.any()
    pasted = sum(t["masks"][t["source"] == 1].sum(0) for t in hard.targets)
    assert diff.sum() > 0 and pasted.sum() > 0


def test_reference_places_crops_at_the_border():
    bg = np.zeros((8, 8, 3), np.uint8)
    crop = np.full((4, 4, 4), 255, np.uint8)
    image, t = composite(bg, np.zeros((0, 8, 8)), [], [Paste(crop, -2, 6, 5)], PasteConfig(output_size=8))
    assert t["boxes"].tolist() == [[6, 0, 8, 2]] and image[:2, 6:].min() == 255 and image.sum() == 255 * 12


def test_config_validation_and_from_dict():
    cfg = from_dict(PasteConfig, {"output_size": 640, "scale_range": [0.1, 2.0], "blending": "alpha"})
    assert cfg.scale_range == (0.1, 2.0) and cfg.slots == 19
    for bad in ({"output_size": 0}, {"scale_range": [2.0, 1.0]}, {"max_pastes": 300},
                {"blending": "soft"}, {"hflip_prob": 1.5}):
        with pytest.raises(ConfigError):
            from_dict(PasteConfig, bad)
    with pytest.raises(ValueError):
        PasteConfig(min_pastes=5, max_pastes=2).validate()


def test_detectron2_adapter_explains_when_missing(dataset):
    pytest.importorskip("torch")
    try:
        import detectron2  # noqa: F401
    except ImportError:
        urls, bank = dataset
        batch = next(iter(CopyPasteLoader(urls, bank, small(), batch_size=2)))
        with pytest.raises(ImportError, match="detectron2 is not installed; install it from https://github.com/facebookresearch/detectron2"):
            to_detectron2(batch)
    else:
        urls, bank = dataset
        batch = next(iter(CopyPasteLoader(urls, bank, small(), batch_size=2)))
        out = to_detectron2(batch)
        assert len(out) == 2 and len(out[0]["instances"]) == len(batch.targets[0]["labels"])


def test_pastes_off_and_across_every_border(edge_case_data):
    """Crops entirely off the canvas (skipped by the pipeline's condition) and crops hanging
    over each border, overlapping in paste order, still equal the reference."""
    urls, bank = edge_case_data
    rect = int(InstanceBank.open(bank).instances_of(1)[0])
    places = [(-40, -40, 30, 30), (150, 20, 30, 40), (20, -15, 30, 30), (140, 140, 40, 40),
              (10, 10, 30, 30), (170, 10, 20, 20), (30, 150, 20, 30)]

    def hook(plan):
        plan.ids[:] = -1
        plan.ids[:, :len(places)] = rect
        plan.labels[:, :len(places)] = 2
        plan.pos[:, :len(places)] = [(y, x) for y, x, _, _ in places]
        plan.size[:, :len(places)] = [(h, w) for _, _, h, w in places]
        plan.flip[:] = False
        return plan

    for blending in ("hard", "alpha", "gaussian"):
        paste = PasteConfig(output_size=160, scale_range=(1.0, 1.0), hflip_prob=0.0, max_pastes=8,
                            blending=blending)
        (batch,) = epoch(CopyPasteLoader(urls, bank, paste, batch_size=1, debug=True, plan_hook=hook))
        pasted = batch.targets[0]["boxes"][batch.targets[0]["source"] == 1].tolist()
        assert pasted == [[20, 150, 60, 160], [0, 20, 15, 50], [140, 140, 160, 160],
                          [10, 10, 40, 40], [150, 30, 160, 50]]  # xyxy; 2 pastes off the canvas
        assert_matches_reference(batch, paste)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blending", ["hard", "alpha", "gaussian"])
def test_nineteen_pastes_flipped_and_fully_covered(edge_case_data, blending, device):
    """19 pastes of one image (the most the recipe draws), every other one flipped, slot 3
    fully covered by slot 4, the last ones hanging over the borders: equal to the reference."""
    urls, bank = edge_case_data
    rect = int(InstanceBank.open(bank).instances_of(1)[0])
    rng = np.random.default_rng(4)
    places = [(int(y), int(x), int(h), int(w)) for y, x, h, w in
              zip(rng.integers(-20, 150, 19), rng.integers(-20, 150, 19),
                  rng.integers(6, 50, 19), rng.integers(6, 50, 19), strict=True)]
    places[3], places[4] = (40, 40, 20, 20), (38, 38, 24, 24)

    def hook(plan):
        plan.ids[:] = rect
        plan.labels[:] = 1 + np.arange(19) % 3
        plan.pos[:] = [(y, x) for y, x, _, _ in places]
        plan.size[:] = [(h, w) for _, _, h, w in places]
        plan.flip[:] = np.arange(19) % 2 == 1
        return plan

    paste = PasteConfig(output_size=160, scale_range=(1.0, 1.0), hflip_prob=0.0, max_pastes=19,
                        blending=blending)
    (batch,) = epoch(CopyPasteLoader(urls, bank, paste, batch_size=1, debug=True, plan_hook=hook,
                                     device_id=device))
    assert batch.plan.active.sum() == 19
    assert assert_matches_reference(batch, paste) > 0
    pasted_slots = batch.targets[0]["source"] == 1
    assert len(batch.targets[0]["labels"][pasted_slots]) < 19   # the covered one is dropped


def test_lsj_window_is_resize_crop_flip():
    """The one-ROI-resize LSJ equals resize, then window, then flip (to rounding)."""
    from nvidia.dali import fn, pipeline_def, types

    from xpaste_stream import formats
    from xpaste_stream.loader.plan import PastePlan, lsj_window

    rng = np.random.default_rng(0)
    image = cv2_smooth(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    size = 64
    cases = [((120, 180), (10, 100), True), ((30, 45), (0, 0), True), ((90, 135), (26, 0), False)]
    plan = PastePlan(np.zeros(3, np.int64), np.tile([60, 90], (3, 1)).astype(np.int32),
                     np.array([c[0] for c in cases], np.int32), np.array([c[1] for c in cases], np.int32),
                     np.array([c[2] for c in cases]), *(np.zeros((3, 1)),) * 5)
    window = lsj_window(plan, size)
    data = np.frombuffer(formats.encode_png(image), np.uint8)

    @pipeline_def
    def both():
        raw = fn.external_source(source=lambda: [data] * 3, batch=True)
        lsj_size, start, flip, roi_start, roi_end, out, pad = fn.external_source(
            source=lambda: (list(plan.lsj_size.astype(np.float32)), list(plan.lsj_offset),
                            list(plan.lsj_flip.astype(np.int32)), window["lsj_roi_start"],
                            window["lsj_roi_end"], window["lsj_out_size"], window["lsj_pad_start"]),
            num_outputs=7, batch=True)
        img = fn.decoders.image(raw, output_type=types.RGB)
        plain = fn.resize(img, resize_y=lsj_size[0], resize_x=lsj_size[1], antialias=True)
        plain = fn.flip(fn.slice(plain, start=start, shape=[size, size], axis_names="HW",
                                 out_of_bounds_policy="pad"), horizontal=flip)
        roi = fn.resize(img, roi_start=roi_start, roi_end=roi_end, resize_y=out[0], resize_x=out[1],
                        antialias=True)
        roi = fn.slice(roi, start=pad, shape=[size, size, 3], axes=[0, 1, 2], out_of_bounds_policy="pad")
        return plain, roi

    pipe = both(batch_size=3, num_threads=1, device_id=None)
    pipe.build()
    plain, roi = pipe.run()
    for i in range(3):
        diff = np.abs(np.array(plain.at(i)).astype(int) - np.array(roi.at(i)).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.05  # float rounding only


def cv2_smooth(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (7, 7), 2)


def test_torch_threads_restored_after_each_batch(dataset):
    import torch

    urls, bank = dataset
    before = torch.get_num_threads()
    loader = CopyPasteLoader(urls, bank, small(), batch_size=4, torch_threads=1)
    assert len(epoch(loader)) == 3 and torch.get_num_threads() == before


def test_damage_in_worker_processes_is_skipped_counted_and_named(tmp_path):
    """In worker processes: a background without its annotations member, a shard truncated
    under a stale index, instances whose JPEG body is random between valid markers or whose
    LZ4 alpha is garbage. No crash; exactly the damaged ones are named."""
    samples = default_backgrounds(8)
    del samples[1]["ann.zst"]
    bg_dir = tmp_path / "bg"
    bg_dir.mkdir()
    urls = write_backgrounds(str(bg_dir), samples, per_shard=4)
    write_categories(str(bg_dir), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    size = os.path.getsize(urls[1])
    with open(urls[1], "r+b") as f:     # cut the second shard in half; its .idx stays stale
        f.truncate(size // 2)
    from xpaste_stream.loader.backgrounds import BackgroundIndex

    index = BackgroundIndex.build(urls)
    cut = {index.key[i] for i in range(len(index)) if index.shard[i] == 1 and any(
        index.offset[c][i] + index.size[c][i] > size // 2 for c in ("image", "json", "ann.zst", "masks.zst"))}
    assert cut  # at least one sample lies past the cut

    inst_dir = tmp_path / "inst"
    writer = ShardWriter(str(inst_dir / "inst-{shard:06d}.tar"), maxcount=100)
    writer.resume()
    rng = np.random.default_rng(0)
    for n in range(9):
        s = instance(formats.image_key(1 + n % 3, n), 1 + n % 3, 24, 20, (200, 40, 40))
        if n == 0:   # random body between a valid SOI and EOI
            body = rng.integers(0, 256, len(s["jpg"]) - 4, dtype=np.uint8).tobytes()
            s["jpg"] = s["jpg"][:2] + body + b"\xff\xd9"
        if n == 1:   # garbage alpha
            s["mask.lz4"] = rng.integers(0, 256, len(s["mask.lz4"]), dtype=np.uint8).tobytes()
        writer.add(n, s)
    writer.close()
    build_index(sorted(str(p) for p in inst_dir.glob("*.tar")), str(tmp_path / "bank"),
                workers=1, progress=False)

    loader = CopyPasteLoader(urls, str(tmp_path / "bank"), small(min_pastes=6, max_pastes=6),
                             batch_size=4, workers=2)
    batches = epoch(loader)
    stats = loader.stats()
    assert sum(len(b.targets) for b in batches) == 8
    damaged = {samples[1]["__key__"]} | cut
    named_backgrounds = {s[1] for s in stats["skipped"] if s[2].startswith("background")}
    assert named_backgrounds <= damaged and named_backgrounds  # named where the order hit them
    order = loader.source.order(0)
    hit = [index.key[int(order[p % 8])] for p in range(8) if index.key[int(order[p % 8])] in damaged]
    assert stats["backgrounds_corrupt"] == len(hit) == len([s for s in stats["skipped"]
                                                           if s[2].startswith("background")])
    opened = InstanceBank.open(str(tmp_path / "bank"))
    expected_bad = set()
    for i in range(opened.num_instances):
        payload, (w, h) = opened.read(i), (int(v[0]) for v in opened.sizes_of([i]))
        try:
            formats.decode_alpha(payload["mask.lz4"], "mask.lz4", w, h)
            ok = jpeg_size(payload["jpg"]) == (h, w)
        except formats.FormatError:
            ok = False
        if not ok:
            expected_bad.add(i)
    assert len(expected_bad) == 2
    bad_instances = {s[1] for s in stats["skipped"] if s[2].startswith("instance")}
    assert bad_instances and bad_instances <= {opened.where(i)[1] for i in expected_bad}
    assert {opened.where(i)[1] for i in expected_bad} == {formats.image_key(1, 0), formats.image_key(2, 1)}
    used = {int(i) for b in batches for i in b.plan.ids[b.plan.active]}
    assert used and not used & expected_bad
    assert stats["instances_corrupt"] == len([s for s in stats["skipped"] if s[2].startswith("instance")])
    loader.close()


def test_instance_shards_as_backgrounds_are_named_as_such(tmp_path):
    """Instance shards passed as backgrounds: the loader says what they are, not 'rerun pack-coco'."""
    urls, bank, _ = corrupt_instance_dataset(str(tmp_path))
    instance_shards = sorted(str(p) for p in (tmp_path / "inst").glob("*.tar"))
    write_categories(str(tmp_path / "inst"), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    with pytest.raises(LoaderError, match=r"these are instance shards .* not background shards"):
        CopyPasteLoader(instance_shards, bank, small())
