"""The shard writer: DALI index files, cutting, atomic finish, resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile

import pytest
from helpers import shard_files

from xpaste_stream import formats, shards, urls
from xpaste_stream.shards import ShardWriter, iter_tar


def sample(i: int, size: int = 300) -> dict:
    return {"__key__": f"s{i:05d}", "bin": bytes([i % 251]) * (size + i),
            "json": json.dumps({"i": i}).encode()}


def write_all(pattern: str, n: int, **kw) -> dict:
    writer = ShardWriter(pattern, **kw)
    start = writer.resume()
    for i in range(start, n):
        writer.add(i, sample(i))
    return writer.close()


def test_keys_with_dots_are_refused():
    with pytest.raises(formats.FormatError, match="no dots"):
        formats.check_key("a.b")
    assert formats.check_key("img000000000042") == "img000000000042"


def test_dali_index_matches_wds2idx(tmp_path):
    write_all(str(tmp_path / "s-{shard:04d}.tar"), 7, maxcount=4)
    for tar in shard_files(tmp_path):
        ref = tmp_path / "ref.idx"
        subprocess.run([sys.executable, "-m", "wds2idx", tar, str(ref)], check=True,
                       capture_output=True)
        assert open(shards.dali_index_path(tar)).read() == ref.read_text()


def test_maxcount_and_maxsize_cut_shards(tmp_path):
    summary = write_all(str(tmp_path / "a-%03d.tar"), 10, maxcount=4)
    assert summary["shards"] == 3 and summary["samples"] == 10
    counts = [len(list(iter_tar(t))) for t in shard_files(tmp_path)]
    assert counts == [4, 4, 2]
    big = tmp_path / "big"
    write_all(str(big / "b-{shard:02d}.tar"), 10, maxcount=1000, maxsize=3000)
    sizes = [os.path.getsize(t) for t in shard_files(big)]
    assert len(sizes) > 2 and all(s <= 3000 + 2 * 10240 for s in sizes)
    keys = [s["__key__"] for t in shard_files(big) for s in iter_tar(t)]
    assert keys == [f"s{i:05d}" for i in range(10)]


def test_brace_pattern_names_and_limit(tmp_path):
    write_all(str(tmp_path / "x-{00..02}.tar"), 6, maxcount=2)
    assert [os.path.basename(t) for t in shard_files(tmp_path)] == ["x-00.tar", "x-01.tar", "x-02.tar"]
    with pytest.raises(ValueError, match="names only 3 shards"):
        write_all(str(tmp_path / "y-{00..02}.tar"), 7, maxcount=2)


def test_failures_are_counted_in_the_covering_shard(tmp_path):
    writer = ShardWriter(str(tmp_path / "f-{shard:02d}.tar"), maxcount=2)
    writer.resume()
    writer.add(0, sample(0))
    writer.fail(1, "corrupt_image", "x.jpg: truncated")
    writer.add(2, sample(2))
    writer.add(3, sample(3))
    summary = writer.close()
    stats = shards.read_stats(str(tmp_path / "f-00.tar"))
    assert stats["failures"] == {"corrupt_image": 1}
    assert stats["failed_samples"][0]["detail"] == "x.jpg: truncated"
    assert (stats["input_start"], stats["input_end"]) == (0, 3)
    assert summary == {**summary, "samples": 3, "failed": 1}


def test_remote_urls_through_fsspec(tmp_path):
    pattern = "memory://xpaste-test/m-{shard:03d}.tar"
    write_all(pattern, 5, maxcount=3)
    names = urls.expand("memory://xpaste-test/m-*.tar")
    assert [n.rsplit("/", 1)[-1] for n in names] == ["m-000.tar", "m-001.tar"]
    assert all(n.startswith("memory://") for n in names)
    keys = [s["__key__"] for u in names for s in iter_tar(u)]
    assert keys == [f"s{i:05d}" for i in range(5)]
    assert shards.read_stats(names[1])["count"] == 2


SLOW_WRITER = """
import json, sys, time
sys.path.insert(0, {root!r})
from xpaste_stream.shards import ShardWriter
def sample(i, size=300):
    return {{"__key__": f"s{{i:05d}}", "bin": bytes([i % 251]) * (size + i),
             "json": json.dumps({{"i": i}}).encode()}}
writer = ShardWriter({pattern!r}, maxcount=5)
start = writer.resume()
for i in range(start, 23):
    writer.add(i, sample(i))
    print(i, flush=True)
    time.sleep({delay})
writer.close()
"""


def run_writer(pattern: str, delay: float) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = SLOW_WRITER.format(root=root, pattern=pattern, delay=delay)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_resume_after_kill_gives_the_same_shards(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert run_writer(str(clean / "r-{shard:03d}.tar"), 0).wait() == 0

    proc = run_writer(str(killed / "r-{shard:03d}.tar"), 0.05)
    for line in proc.stdout:  # kill mid-shard: 12 written = two shards done, a third partial
        if int(line) == 12:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert len(shard_files(killed)) == 2
    assert not os.path.exists(killed / "r-002.stats.json")
    assert run_writer(str(killed / "r-{shard:03d}.tar"), 0).wait() == 0

    names = sorted(os.listdir(clean))
    assert names == sorted(os.listdir(killed))
    for name in names:
        if name.endswith((".tar", ".idx")):
            assert (clean / name).read_bytes() == (killed / name).read_bytes(), name
    keys = [s["__key__"] for t in shard_files(killed) for s in iter_tar(t)]
    assert keys == [f"s{i:05d}" for i in range(23)]


def test_iter_tar_reports_a_truncated_shard(tmp_path):
    write_all(str(tmp_path / "t-{shard:02d}.tar"), 6, maxcount=10)
    path = tmp_path / "t-00.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    damage: list = []
    got = list(iter_tar(str(path), damage))
    assert 0 < len(got) < 6 and len(damage) == 1 and damage[0].shard == str(path)
    assert all({"bin", "json"} <= set(s) for s in got)
    with pytest.raises(ValueError, match="damaged shard"):
        list(iter_tar(str(path)))


def test_indexed_read_gives_the_tar_samples_and_steps_aside_when_unsafe(tmp_path):
    write_all(str(tmp_path / "x-{shard:02d}.tar"), 9, maxcount=5)
    first, second = (str(tmp_path / f"x-0{k}.tar") for k in (0, 1))
    assert list(shards.iter_indexed(first)) == list(iter_tar(first))
    with open(shards.dali_index_path(second)) as f:
        other = f.read()
    with open(shards.dali_index_path(first), "w") as f:
        f.write(other)                                    # another shard's index: stale
    assert shards.iter_indexed(first) is None
    os.remove(shards.dali_index_path(first))
    assert shards.iter_indexed(first) is None             # no index
    last_data = int(other.splitlines()[-1].split()[-3])
    with open(second, "r+b") as f:
        f.truncate(last_data + 10)                        # cut short: iter_tar names the damage
    assert shards.iter_indexed(second) is None
    damage: list = []
    list(iter_tar(second, damage))
    assert len(damage) == 1 and damage[0].reason == "truncated_shard"


def test_writer_output_is_plain_tar(tmp_path):
    write_all(str(tmp_path / "p-{shard:02d}.tar"), 3)
    with tarfile.open(tmp_path / "p-00.tar") as tar:
        assert tar.getnames() == [f"s{i:05d}.{ext}" for i in range(3) for ext in ("bin", "json")]


def cut_before_sample(path: str, index: int) -> None:
    """Cut a shard where sample `index`'s first header starts (offsets from its DALI index)."""
    with open(shards.dali_index_path(path)) as f:
        offset = int(f.read().splitlines()[1 + index].split()[1]) - 512
    with open(path, "r+b") as f:
        f.truncate(offset)


def test_iter_tar_keeps_the_last_whole_sample_and_names_the_lost(tmp_path):
    write_all(str(tmp_path / "t-{shard:02d}.tar"), 6, maxcount=10)
    path = str(tmp_path / "t-00.tar")
    cut_before_sample(path, 3)
    damage: list = []
    assert [s["__key__"] for s in iter_tar(path, damage)] == ["s00000", "s00001", "s00002"]
    [d] = damage
    assert (d.samples, d.lost_keys, d.lost, d.reason) == (3, ["s00003", "s00004", "s00005"], 3,
                                                          "truncated_shard")
    os.remove(shards.dali_index_path(path))  # without the index: counted from the stats, unnamed
    damage = []
    assert len(list(iter_tar(path, damage))) == 3
    assert (damage[0].lost_keys, damage[0].lost) == ([], 3)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    damage = []
    assert list(iter_tar(str(garbage), damage)) == [] and damage[0].reason == "unreadable_shard"


def test_rejects_list_survives_resume(tmp_path):
    def feed(pattern: str, stop: int | None) -> ShardWriter:
        writer = ShardWriter(pattern, maxcount=3)
        start = writer.resume()
        for i in range(start, 14 if stop is None else stop):
            if i % 4 == 1:
                writer.fail(i, "corrupt_image", f"input {i}", source=f"src{i}", key=f"k{i}")
            else:
                writer.add(i, sample(i), source=f"src{i}", dropped=[("bad_part", "one")] if i == 6 else [])
        return writer

    clean = feed(str(tmp_path / "clean" / "c-{shard:02d}.tar"), None)
    summary = clean.close()
    feed(str(tmp_path / "cut" / "c-{shard:02d}.tar"), 8)  # interrupted: never closed
    resumed = feed(str(tmp_path / "cut" / "c-{shard:02d}.tar"), None)
    assert resumed.next_input > 0 and resumed.close()["failed"] == summary["failed"] == 4
    assert summary["dropped"] == {"bad_part": 1}
    from xpaste_stream import errors

    def records(folder: str) -> list[dict]:
        return [{**r, "output": os.path.basename(r["output"])}
                for r in errors.read_rejects(str(tmp_path / folder / "c-rejects.jsonl"))]

    whole = records("clean")
    assert whole == records("cut")
    assert [(r["what"], r["key"], r["input"]) for r in whole] == [
        ("sample", "k1", 1), ("sample", "k5", 5), ("part", "s00006", 6), ("sample", "k9", 9),
        ("sample", "k13", 13)]
    assert errors.rejects_path("out/bg-%06d.tar") == "out/bg-rejects.jsonl"
    assert errors.rejects_path("x-{00..02}.tar") == "x-rejects.jsonl"


def test_a_shard_is_cut_after_maxcount_failures(tmp_path):
    writer = ShardWriter(str(tmp_path / "f-{shard:02d}.tar"), maxcount=2)
    writer.resume()
    for i in range(3):
        writer.fail(i, "nan_output")
    writer.add(3, sample(3))
    summary = writer.close()
    first = shards.read_stats(str(tmp_path / "f-00.tar"))
    assert (first["shard"], first["count"], first["input_end"]) == (None, 0, 2)
    assert not os.path.exists(tmp_path / "f-00.tar") and summary["samples"] == 1 and summary["failed"] == 3
