"""The instance bank: index correctness, samplers, incremental builds, damaged and changed shards."""

from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing
import os
import pickle
import shutil

import numpy as np
import pytest

from xpaste_stream import formats, shards
from xpaste_stream.bank import BankError, InstanceBank, build_index, describe_bank, make_sampler
from xpaste_stream.bank import build as build_module
from xpaste_stream.bank import cli as bank_cli

# Very different counts per category; 155 instances, 4 shards of up to 40.
COUNTS = {1: 3, 2: 12, 3: 40, 7: 100}
PER_SHARD = 40
DRAWS = 200_000


def instance(key: str, category: int, rng: np.random.Generator, rgb=None, alpha=None,
             clip: float | None = 25.0) -> dict:
    h, w = int(rng.integers(5, 13)), int(rng.integers(4, 11))
    rgb = rng.integers(0, 256, (h, w, 3), np.uint8) if rgb is None else rgb
    alpha = rng.integers(0, 256, (h, w), np.uint8) if alpha is None else alpha
    return formats.instance_sample(key, rgb, alpha, category_id=category, category=f"cat{category}",
                                   clip_score=clip, source_key=f"src-{key}", generator="test",
                                   segmenter="test")


def write_shards(folder, samples: list[dict], per_shard: int = PER_SHARD) -> list[str]:
    return shards.write_samples(os.path.join(str(folder), "inst-{shard:06d}.tar"), samples, per_shard)


def standard_samples(seed: int = 0) -> list[dict]:
    """Categories interleaved (as a generator over many categories would write them)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in COUNTS.items()])
    rng.shuffle(labels)
    return [instance(f"i{i:05d}", int(c), rng, clip=None if i % 9 == 0 else float(20 + i % 10))
            for i, c in enumerate(labels)]


@pytest.fixture(scope="module")
def shard_paths(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"), standard_samples())


@pytest.fixture(scope="module")
def bank(shard_paths, tmp_path_factory) -> InstanceBank:
    out = str(tmp_path_factory.mktemp("bank"))
    build_index(shard_paths, out, workers=2, progress=False)
    return InstanceBank.open(out)


def scan_all(paths: list[str]) -> list[dict]:
    return [s for p in paths for s in shards.iter_tar(p)]


def bank_columns(path: str) -> dict[str, np.ndarray]:
    return {os.path.basename(f)[:-4]: np.load(f) for f in sorted(glob.glob(os.path.join(path, "*.npy")))}


# -- the index agrees with a full scan -----------------------------------------------------------


def test_every_offset_reads_back_the_exact_component_bytes(bank, shard_paths):
    scanned = scan_all(shard_paths)
    by_jpg = {s["jpg"]: s for s in scanned}
    assert len(by_jpg) == len(scanned) == bank.num_instances == sum(COUNTS.values())
    ids = np.arange(bank.num_instances)
    records = bank.read_many(ids)
    widths, heights = bank.sizes_of(ids)
    seen = set()
    for iid, record in enumerate(records):
        sample = by_jpg[record["jpg"]]
        meta = formats.read_instance_meta(sample)
        assert record["mask.lz4"] == sample["mask.lz4"]
        assert record["category_id"] == meta["category_id"] == bank.categories_of([iid])[0]
        assert (widths[iid], heights[iid]) == (meta["width"], meta["height"])
        score = bank.clip_scores_of([iid])[0]
        assert math.isnan(score) if meta["clip_score"] is None else score == pytest.approx(meta["clip_score"],
                                                                                            rel=1e-3)
        seen.add(sample["__key__"])
    assert len(seen) == len(scanned)
    assert bank.read(7) == records[7]


def test_categories_are_contiguous_sorted_ranges(bank):
    assert bank.category_ids.dtype == np.int32
    assert bank.category_ids.tolist() == sorted(COUNTS)
    for c, n in COUNTS.items():
        ids = bank.instances_of(c)
        assert len(ids) == n and np.all(np.diff(ids) == 1)
        assert np.all(bank.categories_of(ids) == c)
    assert len(bank.instances_of(999)) == 0
    with pytest.raises(BankError, match="out of range"):
        bank.read(bank.num_instances)


def test_manifest_and_size(bank, shard_paths):
    m = bank.manifest
    assert m["schema"] == "xpaste.bank/1"
    assert [s["path"] for s in m["shards"]] == shard_paths
    assert [s["instances"] for s in m["shards"]] == [40, 40, 40, 35]
    assert all(s["size"] == os.path.getsize(s["path"]) and s["mtime_ns"] for s in m["shards"])
    row_bytes = sum(np.load(f, mmap_mode="r").itemsize for f in glob.glob(bank.path + "/*.npy")
                    if not f.endswith(("categories.npy", "category_starts.npy")))
    assert row_bytes <= 32


# -- samplers --------------------------------------------------------------------------------------


def assert_frequencies(values: np.ndarray, expected: dict) -> None:
    """Each cell's count within 4.5 binomial standard deviations of n*p (fixed seeds: no flakes)."""
    n = len(values)
    found, counts = np.unique(values, return_counts=True)
    observed = dict(zip(found.tolist(), counts.tolist(), strict=True))
    assert set(observed) <= {k for k, p in expected.items() if p > 0}
    for key, p in expected.items():
        sd = math.sqrt(n * p * (1 - p))
        assert abs(observed.get(key, 0) - n * p) <= 4.5 * sd + 1, (key, observed.get(key, 0), n * p)


def category_draws(bank, sampler) -> np.ndarray:
    return bank.categories_of(sampler.draw(DRAWS))


def test_cas_is_uniform_over_categories_then_instances(bank):
    ids = make_sampler(bank, "cas", seed=1).draw(DRAWS)
    assert ids.dtype == np.int64
    assert_frequencies(bank.categories_of(ids), {c: 1 / len(COUNTS) for c in COUNTS})
    for c in (1, 7):  # uniform within the smallest and the largest category
        members = bank.instances_of(c)
        within = ids[np.isin(ids, members)]
        assert_frequencies(within, {int(i): 1 / len(members) for i in members})


def test_instance_sampler_is_uniform_over_instances(bank):
    ids = make_sampler(bank, "instance", seed=2).draw(DRAWS)
    total = sum(COUNTS.values())
    assert_frequencies(ids, {i: 1 / total for i in range(total)})


def lvis_factor(image_count: int, num_images: int) -> float:
    return max(1.0, math.sqrt(0.001 / (image_count / num_images)))


def test_repeat_factor_sampler_uses_the_categories_json(bank, tmp_path):
    num_images = 100_000
    meta = {"schema": formats.CATEGORIES_SCHEMA, "num_images": num_images, "categories": [
        {"id": 1, "name": "a", "frequency": "r", "image_count": 2},
        {"id": 2, "name": "b", "frequency": "c", "image_count": 30},
        {"id": 3, "name": "c", "frequency": "f", "image_count": 5000, "repeat_factor": 2.5},
        {"id": 7, "name": "d", "frequency": "r", "image_count": 0, "repeat_factor": None},
        {"id": 8, "name": "e", "frequency": "f", "image_count": 9000}]}
    path = tmp_path / "categories.json"
    path.write_text(json.dumps(meta))
    r = {1: lvis_factor(2, num_images), 2: lvis_factor(30, num_images), 3: 2.5,
         7: lvis_factor(1, num_images)}  # no training image: counted as seen once
    total = sum(r.values())
    sampler = make_sampler(bank, "repeat_factor", seed=3, category_meta=str(path))
    assert_frequencies(category_draws(bank, sampler), {c: w / total for c, w in r.items()})
    with pytest.raises(BankError, match="7"):
        make_sampler(bank, "repeat_factor", category_meta={"categories": meta["categories"][:3]})


def test_weights_sampler(bank):
    weights = {1: 1.0, 2: 0.0, 3: 3.0, 7: 6.0, 999: 50.0}  # 999 is not in the bank: ignored
    sampler = make_sampler(bank, "weights", seed=4, weights=weights)
    assert_frequencies(category_draws(bank, sampler), {1: 0.1, 2: 0.0, 3: 0.3, 7: 0.6})
    with pytest.raises(BankError, match="no category"):
        make_sampler(bank, "weights", weights={999: 1.0})


def test_category_subsets(bank):
    cas = make_sampler(bank, "cas", seed=5, categories=[2, 7, 999])
    assert cas.category_ids.tolist() == [2, 7]
    assert_frequencies(category_draws(bank, cas), {2: 0.5, 7: 0.5})
    per_instance = make_sampler(bank, "instance", seed=6, categories=[1, 3])
    assert_frequencies(category_draws(bank, per_instance), {1: 3 / 43, 3: 40 / 43})
    with pytest.raises(BankError, match="absent 998, 999"):
        make_sampler(bank, "cas", categories=[999, 998])


def test_streams_are_reproducible_and_independent_per_rank_and_worker(bank):
    draw = lambda **kw: make_sampler(bank, "instance", seed=11, **kw).draw(50_000)
    base = draw(rank=0, worker=0)
    assert np.array_equal(base, draw(rank=0, worker=0))
    others = [draw(rank=1, worker=0), draw(rank=0, worker=1), draw(rank=1, worker=1),
              make_sampler(bank, "instance", seed=12).draw(50_000)]
    p_equal = 1 / bank.num_instances  # chance two independent uniform draws coincide
    n = len(base)
    for other in others + [others[0][1:]]:  # also no shifted copies of one stream
        matches = int(np.sum(base[:len(other)] == other))
        assert abs(matches - n * p_equal) <= 4.5 * math.sqrt(n * p_equal) + 1, matches


def test_sampler_rejects_bad_arguments(bank):
    with pytest.raises(ValueError, match="unknown sampler kind"):
        make_sampler(bank, "zipf")
    with pytest.raises(ValueError, match="weights"):
        make_sampler(bank, "cas", weights={1: 1.0})
    with pytest.raises(ValueError, match="category_meta"):
        make_sampler(bank, "repeat_factor")


# -- builds: incremental, truncated, dedup, remote -------------------------------------------------


def test_incremental_update_reads_only_new_shards(shard_paths, tmp_path, monkeypatch):
    read = []
    scan = build_module.scan_shard
    monkeypatch.setattr(build_module, "scan_shard", lambda url, hash_images: read.append(url) or
                        scan(url, hash_images))
    out = str(tmp_path / "bank")
    first = build_index(shard_paths[:2], out, workers=1, progress=False)
    assert first["instances"] == 80 and read == shard_paths[:2]
    read.clear()
    second = build_index(shard_paths, out, workers=1, progress=False)
    assert read == second["shards_read"] == shard_paths[2:]
    assert second["shards_reused"] == 2 and second["instances"] == sum(COUNTS.values())
    fresh = str(tmp_path / "fresh")
    build_index(shard_paths, fresh, workers=2, progress=False)
    incremental, scratch = bank_columns(out), bank_columns(fresh)
    assert incremental.keys() == scratch.keys()
    for name in scratch:
        np.testing.assert_array_equal(incremental[name], scratch[name], err_msg=name)


def cut_in_middle_of_sample(original: str, shard: str, sample_index: int) -> None:
    """Cut a copy of a tar in the middle of one sample's jpg data (offsets from the DALI index)."""
    with open(shards.dali_index_path(original)) as f:
        line = f.read().splitlines()[1 + sample_index].split()
    fields = {line[i]: (int(line[i + 1]), int(line[i + 2])) for i in range(0, len(line), 4)}
    offset, size = fields["jpg"]
    with open(shard, "r+b") as f:
        f.truncate(offset + size // 2)


def test_truncated_shard_is_indexed_up_to_its_last_whole_sample(shard_paths, tmp_path):
    copies = [shutil.copy(p, tmp_path) for p in shard_paths]
    cut_in_middle_of_sample(shard_paths[1], copies[1], 17)
    whole = list(shards.iter_tar(shard_paths[1]))[:17]  # the samples before the cut
    damage: list[shards.TarDamage] = []
    assert len(list(shards.iter_tar(copies[1], damage))) <= 17 and damage  # a full scan sees it too
    summary = build_index(copies, str(tmp_path / "bank"), workers=2, progress=False)
    assert summary["truncated"][0]["shard"] == copies[1]
    assert summary["truncated"][0]["samples"] == 17 and "needs" in summary["truncated"][0]["error"]
    assert summary["instances"] == sum(COUNTS.values()) - (40 - 17)
    bank = InstanceBank.open(str(tmp_path / "bank"))
    assert bank.manifest["truncated"] == [copies[1]]
    assert bank.manifest["shards"][1]["instances"] == 17
    in_shard = bank.read_many(ids_in_shard(bank, 1))
    assert sorted(r["jpg"] for r in in_shard) == sorted(s["jpg"] for s in whole)
    assert sorted(r["mask.lz4"] for r in in_shard) == sorted(s["mask.lz4"] for s in whole)


def test_dedup_drops_an_exact_duplicate_within_its_category(tmp_path):
    rng = np.random.default_rng(3)
    rgb, alpha = rng.integers(0, 256, (9, 7, 3), np.uint8), rng.integers(0, 256, (9, 7), np.uint8)
    samples = [instance(f"u{i}", 1 + i % 2, rng) for i in range(10)]
    samples += [instance("orig", 5, rng, rgb, alpha), instance("copy", 5, rng, rgb, alpha),
                instance("other-category", 6, rng, rgb, alpha)]
    paths = write_shards(tmp_path, samples, per_shard=6)
    plain = build_index(paths, str(tmp_path / "plain"), progress=False)
    assert plain["instances"] == 13 and plain["duplicates_dropped"] == 0
    summary = build_index(paths, str(tmp_path / "dedup"), dedup=True, progress=False)
    assert summary["duplicates_dropped"] == 1 and summary["instances"] == 12
    bank = InstanceBank.open(str(tmp_path / "dedup"))
    assert bank.num_indexed == 13 and bank.manifest["dedup"]["dropped"] == 1
    assert len(bank.instances_of(5)) == 1 and len(bank.instances_of(6)) == 1
    dropped = bank.read(bank.num_instances)  # duplicates sit after the drawable ids
    assert dropped["category_id"] == 5 and dropped["jpg"] == bank.read(int(bank.instances_of(5)[0]))["jpg"]
    assert make_sampler(bank, "instance").draw(10_000).max() < bank.num_instances
    build_index(paths[:1], str(tmp_path / "grown"), dedup=True, progress=False)
    grown = build_index(paths, str(tmp_path / "grown"), dedup=True, progress=False)
    assert grown["shards_reused"] == 1 and grown["duplicates_dropped"] == 1
    incremental, scratch = bank_columns(str(tmp_path / "grown")), bank_columns(str(tmp_path / "dedup"))
    for name in scratch:
        np.testing.assert_array_equal(incremental[name], scratch[name], err_msg=name)


def test_remote_shards_through_fsspec(shard_paths, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    remote = []
    for p in shard_paths[:2]:
        url = f"memory://bank-test/{os.path.basename(p)}"
        fs.pipe(url, open(p, "rb").read())
        remote.append(url)
    out = str(tmp_path / "bank")
    assert build_index(remote, out, progress=False)["instances"] == 80
    bank = InstanceBank.open(out)
    expected = {s["jpg"]: s["mask.lz4"] for s in scan_all(shard_paths[:2])}
    for record in bank.read_many(np.arange(bank.num_instances)):
        assert expected[record["jpg"]] == record["mask.lz4"]
    fs.pipe(remote[0], open(shard_paths[0], "rb").read() + bytes(512))
    with pytest.raises(BankError, match=f"{remote[0]} changed"):
        InstanceBank.open(out).read_many(np.arange(bank.num_instances))
    fs.rm(remote[0])
    fs.rm(remote[1])


# -- shards that vanished or changed after indexing --------------------------------------------


@pytest.fixture
def private_bank(shard_paths, tmp_path) -> tuple[list[str], str]:
    copies = [shutil.copy(p, tmp_path) for p in shard_paths]
    out = str(tmp_path / "bank")
    build_index(copies, out, progress=False)
    return copies, out


def ids_in_shard(bank: InstanceBank, shard: int) -> np.ndarray:
    return np.flatnonzero(np.load(os.path.join(bank.path, "shard.npy")) == shard)


def test_vanished_shard_raises_naming_it(private_bank):
    copies, out = private_bank
    os.remove(copies[2])
    bank = InstanceBank.open(out)
    bank.read(int(ids_in_shard(bank, 0)[0]))  # the other shards still read
    with pytest.raises(BankError, match=f"shard {copies[2]} vanished"):
        bank.read(int(ids_in_shard(bank, 2)[0]))
    with pytest.raises(BankError, match=f"shard {copies[2]} not found"):
        build_index(copies, out, progress=False)


def test_modified_shard_raises_naming_it(private_bank):
    copies, out = private_bank
    stat = os.stat(copies[1])
    os.utime(copies[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    bank = InstanceBank.open(out)
    with pytest.raises(BankError, match=f"shard {copies[1]} changed.*mtime_ns"):
        bank.read(int(ids_in_shard(bank, 1)[0]))
    assert build_index(copies, out, progress=False)["shards_read"] == [copies[1]]
    assert InstanceBank.open(out).read(int(ids_in_shard(bank, 1)[0]))["jpg"]


def test_missing_bank_and_interrupted_build_are_clear_errors(private_bank, tmp_path):
    _, out = private_bank
    with pytest.raises(BankError, match="not an instance bank"):
        InstanceBank.open(str(tmp_path / "nothing"))
    np.save(os.path.join(out, "width.npy"), np.zeros(3, np.uint16))
    with pytest.raises(BankError, match="column width has 3 rows"):
        InstanceBank.open(out)


# -- processes, descriptors, command line, description ---------------------------------------------


def _read_in_child(bank: InstanceBank, iid: int) -> bytes:
    return bank.read(iid)["jpg"]


def test_bank_pickles_and_reads_in_forked_and_spawned_workers(bank):
    expected = bank.read(42)["jpg"]  # the parent has descriptors open before the fork
    clone = pickle.loads(pickle.dumps(bank))
    assert clone.read(42)["jpg"] == expected and clone.num_instances == bank.num_instances
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            assert pool.apply(_read_in_child, (bank, 42)) == expected
    assert bank.read(42)["jpg"] == expected  # the parent's descriptors survived the child


def test_open_descriptors_stay_bounded(bank):
    small = InstanceBank.open(bank.path, max_open_files=2)
    records = small.read_many(np.arange(small.num_instances))
    assert len(small._files) <= 2
    assert [r["jpg"] for r in records] == [r["jpg"] for r in bank.read_many(np.arange(bank.num_instances))]
    small.close()


def test_index_command_writes_bank_and_stats(shard_paths, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bank_cli.register(parser.add_subparsers())
    pattern = os.path.join(os.path.dirname(shard_paths[0]), "inst-{000000..000003}.tar")
    args = parser.parse_args(["index", pattern, "-o", str(tmp_path / "bank"), "--workers", "2",
                              "--quiet"])
    assert args.func(args) == 0
    assert "155 instances in 4 categories from 4 shards" in capsys.readouterr().out
    stats = json.loads((tmp_path / "bank" / "stats.json").read_text())
    assert stats["instances_per_category"] == {str(c): n for c, n in COUNTS.items()}


def test_describe_bank(bank, tmp_path):
    meta = {"schema": formats.CATEGORIES_SCHEMA, "categories": [
        {"id": 1, "frequency": "r"}, {"id": 2, "frequency": "r"}, {"id": 3, "frequency": "c"},
        {"id": 4, "frequency": "f"}, {"id": 7, "frequency": "f"}]}
    text = describe_bank(bank.path, category_meta=meta, plot=True)
    assert "155 drawable" in text
    assert "    r       2 / 2                15" in text  # frequency group r: 2 of 2 categories, 15 instances
    assert "    f       1 / 2               100" in text
    assert "64-127        1  #" in text and "2-3        1  #" in text
    png = os.path.join(bank.path, "instances_per_category.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bank_moved_with_its_shards_or_re_rooted_keeps_reading(tmp_path):
    """A bank copied together with its shards (new mtimes) finds them relative to itself;
    shards moved elsewhere are found with `shard_root`; a shard of another size is refused."""
    src = tmp_path / "a"
    (src / "inst").mkdir(parents=True)
    paths = write_shards(src / "inst", standard_samples()[:12], per_shard=5)
    build_index(paths, str(src / "bank"), workers=1, progress=False)
    before = [InstanceBank.open(str(src / "bank")).read(i) for i in range(12)]

    shutil.copytree(src, tmp_path / "b")
    for p in (tmp_path / "b" / "inst").glob("*.tar"):  # a plain copy: new mtimes
        os.utime(p, None)
    shutil.rmtree(src)
    moved = InstanceBank.open(str(tmp_path / "b" / "bank"))
    assert [moved.read(i) for i in range(12)] == before

    elsewhere = tmp_path / "c" / "deep"
    shutil.copytree(tmp_path / "b" / "inst", elsewhere)
    shutil.rmtree(tmp_path / "b" / "inst")
    with pytest.raises(BankError, match="vanished"):
        InstanceBank.open(str(tmp_path / "b" / "bank")).read(0)
    rerooted = InstanceBank.open(str(tmp_path / "b" / "bank"), shard_root=str(elsewhere))
    assert [rerooted.read(i) for i in range(12)] == before
    assert pickle.loads(pickle.dumps(rerooted)).read(3) == before[3]  # workers keep the root
    first = sorted(elsewhere.glob("*.tar"))[0]
    with open(first, "ab") as f:
        f.write(b"\0" * 1024)
    grown = InstanceBank.open(str(tmp_path / "b" / "bank"), shard_root=str(elsewhere))
    with pytest.raises(BankError, match="not the same shard"):
        [grown.read(i) for i in range(12)]


def test_in_memory_walk_equals_the_careful_walk_and_leaves_damage_to_it(shard_paths, tmp_path,
                                                                        monkeypatch):
    """A plain shard is walked in memory (tarscan._plain_members); the rows equal the careful
    header-by-header walk's. A header whose checksum no longer matches makes the in-memory walk
    decline, and the careful walk names the damage as before."""
    from xpaste_stream.bank import tarscan

    fast = tarscan.scan_shard(shard_paths[0])
    with open(shard_paths[0], "rb") as f:
        assert tarscan._plain_members(f.read()) is not None       # the fast path was taken
    careful_only = monkeypatch.context()
    with careful_only as m:
        m.setattr(tarscan, "_plain_members", lambda data: None)
        careful = tarscan.scan_shard(shard_paths[0])
    assert len(fast.rows) == 40 and fast.rows.tobytes() == careful.rows.tobytes()
    assert fast.truncated is None and fast.skipped == careful.skipped == []

    damaged = str(tmp_path / "inst-000000.tar")
    data = bytearray(open(shard_paths[0], "rb").read())
    header = tarscan._plain_members(bytes(data))[30][1] - 512    # the 31st member's header
    data[header + 60] ^= 0x01                # past the name's NUL: name and size read the same
    open(damaged, "wb").write(bytes(data))
    assert tarscan._plain_members(bytes(data)) is None
    scan = tarscan.scan_shard(damaged)
    assert scan.truncated is not None and "checksum" in scan.truncated
    assert len(scan.rows) == 10                                  # the 10 whole samples before it
