"""The pool of decoded instances: sampling distribution, refresh, determinism, corrupt bytes.

The statistics are tested on the pool object (no DALI), one end-to-end run goes through the
loader. Pastes drawn from a pool are correlated: a fresh draw is pasted 1 / refresh times on
average, in clusters (an entry lives a geometric number of batches) whose second moment gives
a variance inflation ("design effect") of about 1 + 2 / refresh. Chi-square statistics are
divided by it, so the tolerances hold for correlated pastes.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_loader import assert_matches_reference, small
from test_loader_fixtures import (
    corrupt_instance_dataset,
    make_dataset,
)

from xpaste_stream.bank import InstanceBank, make_sampler
from xpaste_stream.loader import CopyPasteLoader
from xpaste_stream.loader.pool import InstancePool, decode_rgba
from xpaste_stream.loader.sources import InstanceFetcher, LoaderCounters

# chi-square quantiles at 1 - 1e-3 by degrees of freedom: each check's false alarm rate is 0.1 %
# (the seeds are fixed, so a passing test stays passing)
CHI2_999 = {2: 13.816, 8: 26.124}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("pool")))


def make_pool(bank_dir: str, size: int, refresh: float, seed: int = 0, **sampler_kw):
    bank = InstanceBank.open(bank_dir)
    sampler = make_sampler(bank, seed=seed, **{"kind": "cas", **sampler_kw})
    counters = LoaderCounters()
    fetcher = InstanceFetcher(bank, sampler, retries=4, counters=counters)
    return InstancePool(fetcher, size, refresh, seed, rank=0, progress=False), bank, sampler, counters


def design_effect(refresh: float) -> float:
    return 1 + 2 / refresh


def test_pool_pastes_follow_the_sampler(dataset):
    """20000 pastes from a 32-entry pool with skewed category weights: category and instance
    frequencies match the sampler's probabilities (chi-square over the design effect)."""
    _, bank_dir = dataset
    refresh = 0.5
    pool, bank, sampler, _ = make_pool(bank_dir, 32, refresh, kind="weights",
                                       weights={1: 6.0, 2: 3.0, 3: 1.0})
    ids = np.concatenate([pool.draw(50)[0] for _ in range(400)])
    p_cat = dict(zip(sampler.category_ids.tolist(), sampler.probabilities, strict=True))
    cats = bank.categories_of(ids)
    for observed_of, expected_p in (
            (lambda c: (cats == c).sum(), [p_cat[c] for c in (1, 2, 3)]),
            (lambda i: (ids == i).sum(),
             [p_cat[int(c)] / bank.category_counts()[j] for j, c in enumerate(bank.category_ids)
              for _ in range(bank.category_counts()[j])])):
        keys = (1, 2, 3) if len(expected_p) == 3 else range(bank.num_instances)
        observed = np.array([observed_of(k) for k in keys], float)
        expected = len(ids) * np.asarray(expected_p)
        stat = ((observed - expected) ** 2 / expected).sum() / design_effect(refresh)
        assert stat < CHI2_999[len(keys) - 1], (observed, expected)
    # the pool really correlates pastes (else the test above would not need the design effect)
    assert len(ids) > 20 * len(np.unique(ids))


def test_pool_detects_a_biased_draw(dataset):
    """Power check of the statistic above: a pool that favoured category 1 twice over fails."""
    _, bank_dir = dataset
    pool, bank, sampler, _ = make_pool(bank_dir, 32, 0.5)
    ids = np.concatenate([pool.draw(50)[0] for _ in range(400)])
    cats = bank.categories_of(ids)
    biased = np.concatenate([ids, ids[cats == 1]])  # category 1 counted twice
    observed = np.array([(bank.categories_of(biased) == c).sum() for c in (1, 2, 3)], float)
    expected = len(biased) * np.full(3, 1 / 3)
    stat = ((observed - expected) ** 2 / expected).sum() / design_effect(0.5)
    assert stat > CHI2_999[2]


def test_refresh_reaches_every_instance_and_decodes_once(dataset):
    _, bank_dir = dataset
    pool, bank, _, _ = make_pool(bank_dir, 4, 0.25)
    seen, decoded = set(), 4
    pool.fill()
    first = pool.ids.copy()
    for _ in range(60):
        ids, rgba = pool.draw(8)
        decoded += 2                                    # round(0.25 * 8) entries refreshed
        seen |= set(ids.tolist())
        for i, a in zip(ids.tolist(), rgba, strict=True):
            w, h = bank.sizes_of([i])
            assert a.shape == (h[0], w[0], 4) and a.dtype == np.uint8
    assert seen == set(range(bank.num_instances))
    assert pool.decoded == decoded and not np.array_equal(first, pool.ids)
    np.testing.assert_array_equal(pool.rgba[0], decode_rgba(bank.read(int(pool.ids[0]))))


def test_loader_with_pool_pastes_cas_categories(dataset):
    """End to end: pasted categories over 4 epochs are uniform (cas over the bank's 3)."""
    urls, bank_dir = dataset
    refresh = 0.25
    loader = CopyPasteLoader(urls, bank_dir, small(min_pastes=4, instance_pool=8,
                                                   instance_pool_refresh=refresh), batch_size=5)
    labels = np.concatenate([b.plan.labels[b.plan.active] for _ in range(4) for b in loader])
    observed = np.array([(labels == c).sum() for c in (1, 2, 3)], float)
    expected = len(labels) * np.full(3, 1 / 3)
    stat = ((observed - expected) ** 2 / expected).sum() / design_effect(refresh)
    assert len(labels) > 150 and stat < CHI2_999[2], observed
    assert loader.stats()["pastes_planned"] == len(labels)


def test_pool_same_seed_same_batches(dataset):
    urls, bank = dataset

    def run(seed):
        loader = CopyPasteLoader(urls, bank, small(instance_pool=6), batch_size=4, seed=seed)
        return [(b.images.numpy(), b.plan.ids) for _ in range(2) for b in loader]

    a, b, c = run(1), run(1), run(2)
    for (ia, pa), (ib, pb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(pa, pb)
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("blending", ["hard", "alpha"])
def test_pool_matches_reference(dataset, blending):
    urls, bank = dataset
    paste = small(blending=blending, max_pastes=8, instance_pool=6)
    loader = CopyPasteLoader(urls, bank, paste, batch_size=4, num_threads=2, debug=True, seed=3)
    batches = list(loader)
    assert sum(assert_matches_reference(b, paste) for b in batches) > 20


def test_pool_skips_and_counts_corrupt_instances(tmp_path):
    urls, bank, corrupt_ids = corrupt_instance_dataset(str(tmp_path))
    loader = CopyPasteLoader(urls, bank, small(min_pastes=6, max_pastes=6, instance_pool=8,
                                               instance_pool_refresh=1.0), batch_size=4)
    used = set()
    for _ in range(2):
        for b in loader:
            used |= set(b.plan.ids[b.plan.active].tolist())
    assert used and not used & corrupt_ids and not set(loader.pool.ids.tolist()) & corrupt_ids
    assert loader.stats()["instances_corrupt"] > 0


def test_pool_redraws_what_does_not_decode(dataset):
    """Bytes that pass the header checks but do not decode are counted and redrawn."""
    _, bank_dir = dataset
    pool, bank, _, counters = make_pool(bank_dir, 16, 0.25)
    read_many = bank.read_many

    calls = []

    def spoil_first_two(ids):  # first read: a JPEG body of zeros between valid start / end markers
        out = read_many(ids)
        for p in out[:0 if calls else 2]:
            p["jpg"] = p["jpg"][:3] + bytes(len(p["jpg"]) - 5) + p["jpg"][-2:]
        calls.append(len(ids))
        return out

    bank.read_many = spoil_first_two
    pool.fill()
    assert all(a is not None for a in pool.rgba) and counters.counts["instances_corrupt"] == 2
    assert calls == [16, 2] and pool.decoded == 18
