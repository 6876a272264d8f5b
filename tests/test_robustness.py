"""Hostile input and faults (issue 16): bounded decompression, image size caps before any
decoder, stale DALI indexes, one writer per shard set, vanished bank shards, unusable pipeline
outputs, image paths outside the image folder, dotted background keys.

Peak memory is measured in a fresh subprocess (resource.getrusage maxrss of the process and its
children), compared with the same process before the hostile input was read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
import zstandard
from test_loader_fixtures import default_backgrounds, write_backgrounds, write_bank, write_categories

from xpaste_stream import formats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])}


def claimed_jpeg(height: int, width: int) -> bytes:
    """A tiny valid-looking JPEG (8 x 8 pixels of data) whose frame header claims height x width."""
    data = bytearray(formats.encode_jpeg(np.zeros((8, 8, 3), np.uint8)))
    at = 2
    while data[at + 1] not in (0xC0, 0xC1, 0xC2):
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    data[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def zstd_bomb(size: int = 2 << 30) -> bytes:
    """~65 kB of zstd that declares (and holds) `size` zero bytes."""
    path = f"/tmp/xpaste-zstd-bomb-{size}.zst"
    if not os.path.exists(path):
        c = zstandard.ZstdCompressor(level=3)
        with open(path + ".tmp", "wb") as f, c.stream_writer(f, size=size) as w:
            block = bytes(1 << 24)
            for _ in range(size // len(block)):
                w.write(block)
        os.replace(path + ".tmp", path)
    with open(path, "rb") as f:
        return f.read()


def run_measured(code: str, timeout: float = 240) -> dict:
    """Run `code` in a fresh interpreter; it sets `result` (a dict). Returns it with `peak_mb`
    (maxrss of the process and its children after) and `before_mb` (maxrss when `mark()` ran)."""
    script = textwrap.dedent("""
        import json, resource
        def rss():
            return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                       resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        before = [0.0]
        def mark():
            before[0] = rss()
        result = {}
    """) + textwrap.dedent(code) + textwrap.dedent("""
        result["peak_mb"], result["before_mb"] = rss(), before[0]
        print("RESULT" + json.dumps(result, default=str))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(lines[-1][6:])


# -- 3: zstd bombs ---------------------------------------------------------------------------


def test_unzstd_refuses_a_declared_bomb_without_allocating():
    bomb = zstd_bomb()
    assert len(bomb) < 100_000 and zstandard.frame_content_size(bomb) == 2 << 30
    with pytest.raises(formats.FormatError, match="declares 2,147,483,648 bytes"):
        formats.unzstd(bomb, 1 << 20)
    quiet = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8 << 20))
    with pytest.raises(formats.FormatError, match="more than 1,048,576"):
        formats.unzstd(quiet, 1 << 20)
    assert formats.unzstd(quiet, 8 << 20) == bytes(8 << 20)


def bomb_backgrounds(folder: str) -> list[str]:
    """6 backgrounds: #1 with a 2 GiB ann.zst, #3 with a 2 GiB masks.zst."""
    samples = default_backgrounds(6)
    bomb = zstd_bomb()
    samples[1]["ann.zst"] = bomb
    samples[3]["masks.zst"] = bomb
    os.makedirs(folder, exist_ok=True)
    urls = write_backgrounds(folder, samples)
    write_categories(folder, {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    return urls


LOADER_RUN = """
    from xpaste_stream.loader import CopyPasteLoader, PasteConfig
    loader = CopyPasteLoader({urls!r}, {bank!r}, PasteConfig(output_size=128, max_pastes=4),
                             batch_size=3, workers={workers})
    mark()
    batches = list(loader)
    stats = loader.stats()
    result["images"] = sum(len(b.targets) for b in batches)
    result["corrupt"] = stats.get("backgrounds_corrupt", 0)
    result["skipped"] = stats.get("skipped", [])
    result["instances_corrupt"] = stats.get("instances_corrupt", 0)
    loader.close()
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_zstd_bomb_in_a_background_is_skipped_with_bounded_memory(tmp_path, workers):
    urls = bomb_backgrounds(str(tmp_path / "bg"))
    bank = write_bank(str(tmp_path))
    r = run_measured(LOADER_RUN.format(urls=urls, bank=bank, workers=workers))
    assert r["peak_mb"] - r["before_mb"] < 400, r  # old code: +2 GiB and more per process
    assert r["images"] == 6
    named = {s[1] for s in r["skipped"]}
    assert named <= {"img000000000001", "img000000000003"} and r["corrupt"] == len(r["skipped"]) >= 1
    assert all("zst" in s[2] for s in r["skipped"])


def test_zstd_bomb_in_inspect_and_evaluate_input_with_bounded_memory(tmp_path):
    urls = bomb_backgrounds(str(tmp_path / "bg"))
    r = run_measured(f"""
        from xpaste_stream import formats
        from xpaste_stream.inspect import inspect_shards
        from xpaste_stream.shards import iter_tar
        from xpaste_stream.train.evaluate import shard_ground_truth
        mark()
        report = inspect_shards({urls!r})
        result["broken"] = [(b["key"], b["detail"]) for b in report.broken]
        try:
            shard_ground_truth({urls!r}, {{"categories": []}})
        except formats.FormatError as e:
            result["evaluate"] = str(e)
    """)
    assert sorted(k for k, _ in r["broken"]) == ["img000000000001", "img000000000003"]
    assert "ann.zst" in r["evaluate"] and "2,147,483,648" in r["evaluate"]
    assert r["peak_mb"] - r["before_mb"] < 200, r


# -- 4: image dimensions -------------------------------------------------------------------------


def test_header_size_and_limits():
    assert formats.header_size(claimed_jpeg(60000, 60000)) == (60000, 60000)
    with pytest.raises(formats.FormatError, match="60000x60000 is over the image size limit"):
        formats.check_image_header(claimed_jpeg(60000, 60000), "x")
    formats.check_image_header(claimed_jpeg(480, 640))
    with pytest.raises(formats.FormatError, match="over the image size limit"):
        formats.check_image_dims(16000, 16000)  # 256 Mpx: over the pixel budget


def oversized_background(image_id: int, h: int, w: int) -> dict:
    """A background whose json and JPEG header both say h x w (the pixels are 8 x 8)."""
    s = formats.background_sample(formats.background_key(image_id), claimed_jpeg(h, w), "jpg",
                                  image_id=image_id, file_name=f"{image_id}.jpg", width=64,
                                  height=64, annotations=[], neg_category_ids=[],
                                  not_exhaustive_category_ids=[])
    meta = json.loads(s["json"])
    meta.update(width=w, height=h)
    s["json"] = formats.json_bytes(meta)
    return s


def test_oversized_backgrounds_are_skipped_named_and_memory_stays_bounded(tmp_path):
    samples = default_backgrounds(6)
    samples[1] = oversized_background(1, 60000, 60000)
    for i in (2, 3, 4, 5):
        samples[i] = oversized_background(i, 16000, 16000)
    bg = tmp_path / "bg"
    bg.mkdir()
    urls = write_backgrounds(str(bg), samples, per_shard=6)
    write_categories(str(bg), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    bank = write_bank(str(tmp_path))
    r = run_measured(LOADER_RUN.format(urls=urls, bank=bank, workers=0))
    assert r["images"] == 6 and r["corrupt"] >= 1
    assert all("over the image size limit" in s[2] for s in r["skipped"]), r["skipped"]
    assert {s[1] for s in r["skipped"]} <= {f"img{i:012d}" for i in range(1, 6)}
    assert r["peak_mb"] - r["before_mb"] < 400, r


def test_oversized_instance_is_skipped_not_a_crash(tmp_path):
    from test_loader_fixtures import instance

    from xpaste_stream.bank import build_index
    from xpaste_stream.shards import ShardWriter

    writer = ShardWriter(str(tmp_path / "inst" / "inst-{shard:06d}.tar"), maxcount=100)
    writer.resume()
    for n in range(6):
        s = instance(formats.image_key(1 + n % 3, n), 1 + n % 3, 20, 24, (200, 40, 40))
        if n == 0:
            s["jpg"] = claimed_jpeg(60000, 60000)
            meta = json.loads(s["json"])
            meta.update(width=60000, height=60000)
            s["json"] = formats.json_bytes(meta)
        writer.add(n, s)
    writer.close()
    summary = build_index([str(p) for p in sorted((tmp_path / "inst").glob("*.tar"))],
                          str(tmp_path / "bank"), workers=1, progress=False)
    bg = tmp_path / "bg"
    bg.mkdir()
    urls = write_backgrounds(str(bg), default_backgrounds(4))
    write_categories(str(bg), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    r = run_measured(LOADER_RUN.format(urls=urls, bank=str(tmp_path / "bank"), workers=0)
                     .replace("max_pastes=4", "min_pastes=6, max_pastes=6"))
    assert r["images"] == 6
    assert "image_too_large" in json.dumps(summary, default=str)
    assert r["peak_mb"] - r["before_mb"] < 400, r


@pytest.mark.parametrize("height,width", [(9000, 8000), (60000, 60000)])
def test_oversized_extract_input_is_skipped_before_decoding(height, width):
    r = run_measured(f"""
        import json, resource
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # 60000^2 RGB: 10.8 GB
        from xpaste_stream import formats
        from xpaste_stream.extract.stage import _decode
        sample = formats.image_sample("c00001-0000000", {claimed_jpeg(height, width)!r}, category_id=1,
                                      category="a", prompt="", seed=0, generator="t",
                                      width={width}, height={height})
        mark()
        out = _decode(sample)
        result["reason"] = getattr(out, "reason", None) or str(out)
    """)
    assert r["reason"] == "image_too_large"
    assert r["peak_mb"] - r["before_mb"] < 100, r  # decoding 9000 x 8000 RGB: 216 MB


def test_oversized_pack_coco_input_is_skipped_before_decoding(coco_dataset, tmp_path):
    """An image file whose header claims 60000 x 60000: refused from the annotation's size and
    from the header alone (the annotation telling the truth about the other one)."""
    import shutil

    annotations, images = coco_dataset
    clean = str(tmp_path / "clean")            # a run on it first: imports and caches warm
    shutil.copytree(os.path.dirname(annotations), clean)
    clean_annotations = os.path.join(clean, os.path.basename(annotations))
    with open(annotations) as f:
        doc = json.load(f)
    for n, im in enumerate(doc["images"][:2]):
        with open(os.path.join(images, im["file_name"]), "wb") as f:
            f.write(claimed_jpeg(60000, 60000))
        if n == 0:
            im.update(width=60000, height=60000)
    with open(annotations, "w") as f:
        json.dump(doc, f)
    out = str(tmp_path / "bg" / "bg-{shard:06d}.tar")
    r = run_measured(f"""
        from xpaste_stream.pack import PackCocoConfig, run_pack_coco
        run_pack_coco(PackCocoConfig({clean_annotations!r}, {os.path.join(clean, "images")!r},
                                     {out.replace("bg", "warm", 1)!r}, workers=1), progress=False)
        mark()
        summary = run_pack_coco(PackCocoConfig({annotations!r}, {images!r}, {out!r}, workers=1),
                                progress=False)
        result["failures"], result["samples"] = summary["failures"], summary["samples"]
    """)
    assert r["failures"] == {"image_too_large": 2}, r
    assert r["samples"] == len(doc["images"]) - 2
    assert r["peak_mb"] - r["before_mb"] < 100, r


def test_oversized_evaluate_input_is_skipped_before_decoding():
    r = run_measured(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # old code: 10.8 GB asked
        from xpaste_stream.train.evaluate import decoded
        from xpaste_stream import formats
        small = formats.encode_jpeg(__import__("numpy").zeros((16, 16, 3), "uint8"))
        mark()
        try:
            result["ids"] = [im.image_id for im in decoded([(1, {claimed_jpeg(60000, 60000)!r}),
                                                            (2, small)])]
        except Exception as e:
            result["error"] = type(e).__name__ + ": " + str(e)[:200]
    """)
    assert r.get("ids") == [2], r
    assert r["peak_mb"] - r["before_mb"] < 100, r


# -- 6: stale .idx ---------------------------------------------------------------------------------


def test_stale_index_is_refused_by_the_loader_and_reported_by_inspect(tmp_path):
    import shutil

    from xpaste_stream.inspect import inspect_shards
    from xpaste_stream.loader import CopyPasteLoader, LoaderError, PasteConfig

    bg = tmp_path / "bg"
    bg.mkdir()
    urls = write_backgrounds(str(bg), default_backgrounds(8), per_shard=4)
    write_categories(str(bg), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    shutil.copy(urls[1][:-4] + ".idx", urls[0][:-4] + ".idx")  # another shard's index
    bank = write_bank(str(tmp_path))
    with pytest.raises(LoaderError, match=r"bg-000000.idx is stale"):
        CopyPasteLoader(urls, bank, PasteConfig(output_size=128))
    report = inspect_shards(urls)
    assert [d["reason"] for d in report.damaged] == ["stale_index"]
    assert report.damaged[0]["shard"] == urls[0] and report.has_problems


# -- 7: one writer per shard set ---------------------------------------------------------------


def test_a_second_writer_is_refused_before_work_and_a_dead_ones_lock_taken_over(tmp_path):
    out = str(tmp_path / "gen" / "gen-{shard:06d}.tar")
    cmd = [sys.executable, "-m", "xpaste_stream.cli", "generate", "-o", out, "--num-categories",
           "4", "--images-per-category", "40", "--image-size", "128", "--maxcount", "20"]
    lock = tmp_path / "gen" / "gen-writer.lock"
    first = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 60

    def writing() -> bool:  # the lock taken, or (a version without locks) a shard begun
        return bool((lock.exists() and lock.read_text()) or list(lock.parent.glob("gen-0*.tar*")))

    while not writing() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # hold the first mid-run, whatever the machine's speed
    try:
        second = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr and "being written by another run" in second.stderr
    assert not lock.exists()  # released at the end
    # a lock left by a killed run: taken over with a message
    lock.write_text(json.dumps({"pid": 999999, "host": "h", "stage": "generate", "started": "t"}))
    again = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "taking over" in again.stderr and "pid 999999" in again.stderr


# -- 8: a bank shard that vanished ---------------------------------------------------------------


def test_vanished_bank_shard_is_refused_before_the_first_batch(tmp_path, capsys):
    from xpaste_stream.bank import BankError
    from xpaste_stream.cli import main
    from xpaste_stream.loader import CopyPasteLoader, PasteConfig

    bg = tmp_path / "bg"
    bg.mkdir()
    urls = write_backgrounds(str(bg), default_backgrounds(4))
    write_categories(str(bg), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    bank = write_bank(str(tmp_path))
    gone = sorted((tmp_path / "inst").glob("*.tar"))[0]
    gone.unlink()
    with pytest.raises(BankError, match=f"shard {gone} not found"):
        CopyPasteLoader(urls, bank, PasteConfig(output_size=128))
    code = main(["train", "--backgrounds", str(bg / "bg-*.tar"), "--bank", bank, "--backbone",
                 "tiny", "--size", "128", "--max-steps", "1", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and str(gone) in err and "Traceback" not in err


# -- 9: pipeline outputs checked before any stage ---------------------------------------------------


def test_unusable_later_output_is_refused_before_any_stage(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    toml = tmp_path / "p.toml"
    toml.write_text(textwrap.dedent(f"""
        [pipeline]
        name = "t"
        stages = ["scenes", "pack_coco"]
        [scenes]
        output = "{tmp_path / 'scenes'}"
        num_images = 4
        num_categories = 3
        height = 64
        width = 64
        [pack_coco]
        output = "{blocker}/bg/bg-{{shard:06d}}.tar"
        workers = 1
    """))
    for extra in (["--check"], []):
        out = subprocess.run([sys.executable, "-m", "xpaste_stream.cli", "run", str(toml), *extra],
                             env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "pack_coco.output" in out.stderr and "is a file, not a folder" in out.stderr
        assert not (tmp_path / "scenes").exists()
    from xpaste_stream.urls import output_problem

    assert "pseudo filesystem" in output_problem("/proc/self/out")


# -- 10: pack-coco file names outside the image folder ---------------------------------------------


def test_pack_coco_skips_file_names_outside_the_image_folder(tmp_path, coco_dataset):
    from xpaste_stream.pack import PackCocoConfig, run_pack_coco

    annotations, images = coco_dataset
    with open(annotations) as f:
        doc = json.load(f)
    first, second = doc["images"][0], doc["images"][1]
    outside = os.path.join(os.path.dirname(os.path.abspath(images)), "outside")
    os.makedirs(outside)
    for im, name in ((first, "../outside/a.jpg"), (second, os.path.join(outside, "b.jpg"))):
        src = os.path.join(images, im["file_name"])
        dst = os.path.normpath(os.path.join(images, name))
        os.replace(src, dst)
        im["file_name"] = name
    with open(annotations, "w") as f:
        json.dump(doc, f)
    summary = run_pack_coco(PackCocoConfig(annotations, images, str(tmp_path / "o1" / "bg-{shard:06d}.tar"),
                                           workers=1), progress=False)
    assert summary["failures"] == {"image_outside_folder": 2}
    allowed = run_pack_coco(PackCocoConfig(annotations, images, str(tmp_path / "o2" / "bg-{shard:06d}.tar"),
                                           workers=1, allow_outside_images=True), progress=False)
    assert allowed["failures"] == {} and allowed["samples"] == summary["samples"] + 2


# -- 11: a dotted background key ------------------------------------------------------------------


def test_dotted_background_key_is_named_as_such(tmp_path):
    import io

    from xpaste_stream.loader.backgrounds import BackgroundIndex, ShardFiles

    sample = default_backgrounds(1)[0]
    path = tmp_path / "bg-000000.tar"
    lines = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        entries = []
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            info = tarfile.TarInfo(f"img.0001.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            entries.append(f"0001.{ext} {tar.offset - (len(data) + 511) // 512 * 512} {len(data)} "
                           f"img.0001.{ext}")
        lines.append(" ".join(entries))
    (tmp_path / "bg-000000.idx").write_text("v1.2 1\n" + "\n".join(lines) + "\n")
    index = BackgroundIndex.build([str(path)])
    assert index.key == ["img.0001"]
    with pytest.raises(formats.FormatError, match="'img.0001' contains a dot"):
        ShardFiles().read(index, 0, "image")
