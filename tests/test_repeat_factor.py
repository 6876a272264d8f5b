"""Repeat-factor sampling of backgrounds: per-epoch index files that DALI's reader follows."""

from __future__ import annotations

import json
import math

import numpy as np
from nvidia.dali import fn, pipeline_def

from xpaste_stream.loader.repeat_factor import (
    epoch_repeats,
    sample_repeat_factors,
    write_epoch_indexes,
)
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


def test_dali_reads_each_sample_as_often_as_drawn(tmp_path):
    factors = [1.0, 3.0, 1.5, 1.0, 2.0]
    url = write_shard(tmp_path, factors)
    np.testing.assert_array_equal(sample_repeat_factors(url), factors)
    paths, total = write_epoch_indexes([url], [np.array(factors)], seed=0, epoch=2,
                                       folder=str(tmp_path / "rf"))
    expected = epoch_repeats(np.array(factors), 0 * 100_003 + 0, 2)
    assert total == expected.sum()

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def reader():
        return fn.readers.webdataset(paths=[url], index_paths=paths, ext=["json"],
                                     random_shuffle=False, name="bg")

    pipe = reader()
    pipe.build()
    assert pipe.epoch_size("bg") == total
    seen = [json.loads(bytes(pipe.run()[0].at(0)))["i"] for _ in range(total)]
    assert np.bincount(seen, minlength=len(factors)).tolist() == expected.tolist()


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
        loader = CopyPasteLoader(urls, bank, paste, batch_size=2, num_threads=1,
                                 background_sampling=sampling)
        for epoch in range(2):
            ids = sorted(t["image_id"] for b in loader for t in b.targets)
            assert ids == expected, (sampling, epoch)
            assert loader.epoch_size(epoch) == len(expected)
