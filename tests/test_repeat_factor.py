"""Repeat-factor sampling of backgrounds: the epoch order repeats each background by its factor."""

from __future__ import annotations

import json
import math

import numpy as np

from xpaste_stream.loader.backgrounds import BackgroundIndex, ShardFiles
from xpaste_stream.loader.order import epoch_order, epoch_repeats
from xpaste_stream.shards import write_samples


def write_shard(folder, factors: list[float]) -> str:
    samples = [{"__key__": f"s{i:03d}", "jpg": bytes([i]) * 10,
                "json": json.dumps({"repeat_factor": r, "i": i}).encode()} for i, r in enumerate(factors)]
    (url,) = write_samples(str(folder / "bg-{shard:06d}.tar"), samples)
    return url


def test_repeats_follow_floor_plus_bernoulli():
    factors = np.array([1.0, 1.25, 2.5, 4.0])
    draws = np.stack([epoch_repeats(factors, seed=1, epoch=e) for e in range(4000)])
    assert (draws[:, 0] == 1).all() and (draws[:, 3] == 4).all()
    assert set(np.unique(draws[:, 1])) == {1, 2} and set(np.unique(draws[:, 2])) == {2, 3}
    # mean of floor(r) + Bernoulli(frac r) is r; 5 standard errors of the Bernoulli part
    for j, r in ((1, 1.25), (2, 2.5)):
        frac = r - math.floor(r)
        assert abs(draws[:, j].mean() - r) < 5 * math.sqrt(frac * (1 - frac) / len(draws))
    np.testing.assert_array_equal(epoch_repeats(factors, 1, 7), epoch_repeats(factors, 1, 7))


def test_epoch_order_holds_each_background_as_often_as_drawn(tmp_path):
    factors = [1.0, 3.0, 1.5, 1.0, 2.0]
    url = write_shard(tmp_path, factors)
    index = BackgroundIndex.build([url])
    read = index.repeat_factors(ShardFiles())
    np.testing.assert_array_equal(read, factors)
    assert [json.loads(ShardFiles().read(index, i, "json"))["i"] for i in range(5)] == list(range(5))
    order = epoch_order(read, seed=0, epoch=2)
    expected = epoch_repeats(np.array(factors), 0, 2)
    assert np.bincount(order, minlength=len(factors)).tolist() == expected.tolist()
    assert not np.array_equal(order, np.sort(order)) or len(set(order.tolist())) == 1
    np.testing.assert_array_equal(np.sort(epoch_order(read, 0, 2, shuffle=False)), np.sort(order))


def test_loader_repeats_backgrounds_by_their_factor(tmp_path):
    from test_loader_fixtures import default_backgrounds, write_backgrounds, write_bank, write_categories

    from xpaste_stream import formats
    from xpaste_stream.loader import CopyPasteLoader, PasteConfig

    samples = default_backgrounds(6)
    meta = json.loads(samples[2]["json"])
    meta["repeat_factor"] = 3.0  # a rare-category image: 3 times per epoch
    samples[2]["json"] = formats.json_bytes(meta)
    bg = tmp_path / "bg"
    bg.mkdir()
    urls = write_backgrounds(str(bg), samples, per_shard=3)
    write_categories(str(bg), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    bank = write_bank(str(tmp_path))
    paste = PasteConfig(output_size=32, max_pastes=1)
    for sampling, expected in (("repeat_factor", [0, 1, 2, 2, 2, 3, 4, 5]),
                               ("uniform", [0, 1, 2, 3, 4, 5])):
        loader = CopyPasteLoader(urls, bank, paste, batch_size=2, num_threads=1, workers=0,
                                 background_sampling=sampling)
        for epoch in range(2):
            assert loader.epoch_size(epoch) == len(expected)
            ids = sorted(t["image_id"] for b in loader for t in b.targets)
            assert ids == expected, (sampling, epoch)
