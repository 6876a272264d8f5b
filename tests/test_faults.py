"""The error policy end to end: every stage x every damage, through the command line.

Base sets are 3 shards of 4 samples; the damage hits shard 1 (sample 1, or the shard, or the
cut at sample 2). For each stage and damage: no crash, exactly the damaged samples skipped and
named (rejects list and console), every other sample delivered and counted, and the exit status
the policy says (0: a few samples skipped; 1: a damaged shard, or inspect finding anything;
2: refused before work). Stages whose inputs are files, not shards, take the analogous damage:

| damage                  | pack-coco (image files, json)   | generate --generator folder     |
|-------------------------|---------------------------------|---------------------------------|
| random body, markers ok | JPEG: SOI + random + EOI        | the same                        |
| empty member            | empty image file                | empty image file                |
| missing component       | image file gone                 | a link whose target is gone     |
| dotted key              | image id 2.5 (no key possible)  | file `a.b.c.jpg`: not damage    |
| truncated, with index   | JPEG cut in half                | JPEG cut in half                |
| truncated, no index     | annotation json cut in half     | PNG cut in half                 |
| non-tar file            | text file as an image           | text file as an image           |
| wrong-stage shard       | a shard as the annotation file  | a shard as --categories         |
| missing shard           | annotation file gone            | --folder gone                   |
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import make_dataset
from helpers import shard_files

from xpaste_stream import cli, errors, formats, shards

SHARDS, PER_SHARD = 3, 4
DAMAGES = ("random_body", "empty_member", "missing_component", "dotted_key", "truncated_with_index",
           "truncated_without_index", "non_tar", "wrong_stage", "missing_shard")
TRUNCATIONS = ("truncated_with_index", "truncated_without_index")
REFUSED = ("non_tar", "wrong_stage", "missing_shard")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- clean sets ---------------------------------------------------------------------------------


def image_samples() -> list[dict]:
    """Plain-background squares: the classical segmenter cuts every one out."""
    out = []
    for n in range(SHARDS * PER_SHARD):
        cat, index = 1 + n // PER_SHARD, n % PER_SHARD
        rgb = np.full((48, 48, 3), 255, np.uint8)
        rgb[10 + index:34, 12:36 - index] = (40 * cat, 200 - 30 * index, 90)
        out.append(formats.image_sample(formats.image_key(cat, index), formats.encode_jpeg(rgb),
                                        category_id=cat, category=f"cat{cat}", prompt="p", seed=0,
                                        generator="test", width=48, height=48))
    return out


def instance_samples() -> list[dict]:
    rng = np.random.default_rng(0)
    return [formats.instance_sample(f"i{n:05d}", rng.integers(0, 256, (9, 7, 3), np.uint8),
                                    rng.integers(0, 256, (9, 7), np.uint8), category_id=1 + n % 3,
                                    category="c", clip_score=25.0, source_key=f"s{n}",
                                    generator="test", segmenter="test")
            for n in range(SHARDS * PER_SHARD)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("clean")
    return {kind: shards.write_samples(str(root / kind / f"{kind}-{{shard:04d}}.tar"), make(), PER_SHARD)
            for kind, make in (("image", image_samples), ("instance", instance_samples))}


# -- damage -----------------------------------------------------------------------------------


@dataclass
class Expect:
    named: set[str] = field(default_factory=set)  # sample keys skipped and named
    unnamed: int = 0                               # samples skipped whose key nobody can know
    lost_shard: bool = False                       # the damaged shard is reported bad


def copy_set(paths: list[str], folder) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    out = []
    for p in paths:
        for side in (p, shards.dali_index_path(p), shards.stats_path(p)):
            shutil.copy(side, folder)
        out.append(os.path.join(str(folder), os.path.basename(p)))
    return out


def read_members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_members(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for side in (shards.dali_index_path(path), shards.stats_path(path)):
        os.remove(side)  # they describe the shard as it was written, not as damaged


def random_body(component: str, n: int = 3000) -> bytes:
    """Random bytes inside the format's own start and end markers: only a decoder can tell."""
    body = np.random.default_rng(7).integers(0, 256, n, np.uint8).tobytes()
    if component == "json":
        return b"{" + body + b"}"
    if component.endswith("png"):
        return b"\x89PNG\r\n\x1a\n" + body + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return b"\xff\xd8\xff\xe0" + body + b"\xff\xd9"


def keys_of(path: str) -> list[str]:
    return [s["__key__"] for s in shards.iter_tar(path)]


def damage_set(paths: list[str], damage: str, component: str, other_kind: str) -> Expect:
    """Damage shard 1 of a copied set in place; return what a stage should skip."""
    target = paths[1]
    keys = keys_of(target)
    key = keys[1]
    members = read_members(target)
    if damage in ("random_body", "empty_member", "missing_component", "dotted_key"):
        dotted = key[:3] + "." + key[3:]
        edited = []
        for name, data in members:
            if not name.startswith(key + "."):
                edited.append((name, data))
            elif damage == "dotted_key":
                edited.append((dotted + name[len(key):], data))
            elif name == f"{key}.{component}":
                if damage != "missing_component":
                    edited.append((name, random_body(component) if damage == "random_body" else b""))
            else:
                edited.append((name, data))
        write_members(target, edited)
        return Expect(named={dotted if damage == "dotted_key" else key})
    if damage in TRUNCATIONS:
        with open(shards.dali_index_path(target)) as f:
            line = f.read().splitlines()[1 + 2].split()
        offset, size = int(line[1]), int(line[2])  # the first component of sample 2
        with open(target, "r+b") as f:
            f.truncate(offset + size // 2)
        if damage == "truncated_with_index":
            return Expect(named={keys[2], keys[3]}, lost_shard=True)
        os.remove(shards.dali_index_path(target))
        return Expect(named={keys[2]}, unnamed=1, lost_shard=True)
    if damage == "non_tar":
        with open(target, "wb") as f:
            f.write(b"this is not a tar file\n" * 40)
    elif damage == "wrong_stage":
        shutil.copy(other_kind, target)
        keys = keys_of(target)
    elif damage == "missing_shard":
        os.remove(target)
    return Expect(named=set(keys), lost_shard=True)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample_rejects(path: str | None) -> tuple[set[str], int]:
    """(named keys, unnamed count) of the sample records of a rejects list."""
    records = [r for r in errors.read_rejects(path) if r["what"] == "sample"] if path else []
    return {r["key"] for r in records if r["key"]}, sum(1 for r in records if not r["key"])


# -- the shard stages and inspect --------------------------------------------------------------


def check_refused(code: int, err: str, target: str, out_dir) -> None:
    assert code == errors.EXIT_USAGE, err
    assert target in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out_dir) or not shard_files(out_dir)


@pytest.mark.parametrize("damage", DAMAGES)
def test_extract_fault_matrix(clean, tmp_path, capsys, damage):
    paths = copy_set(clean["image"], tmp_path / "in")
    expect = damage_set(paths, damage, "jpg", clean["instance"][0])
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "extract", *paths, "-o", str(out / "inst-{shard:04d}.tar"),
                                "--rejects", "list")
    if damage in REFUSED:
        return check_refused(code, err, paths[1], out)
    summary = json.loads(stdout)
    named, unnamed = sample_rejects(summary["rejects"])
    assert (named, unnamed) == (expect.named, expect.unnamed)
    delivered = SHARDS * PER_SHARD - len(expect.named) - expect.unnamed
    assert summary["samples"] == delivered and summary["failed"] == len(expect.named) + expect.unnamed
    assert sum(len(keys_of(p)) for p in shard_files(out)) == delivered
    assert all(k in err for k in expect.named) and summary["rejects"] in err
    assert code == (errors.EXIT_FAILED if expect.lost_shard else errors.EXIT_OK), err


@pytest.mark.parametrize("damage", DAMAGES)
def test_index_fault_matrix(clean, tmp_path, capsys, damage):
    component = {"random_body": "json", "empty_member": "jpg", "missing_component": "json"}.get(damage)
    paths = copy_set(clean["instance"], tmp_path / "in")
    expect = damage_set(paths, damage, component, clean["image"][0])
    bank = tmp_path / "bank"
    code, stdout, err = run_cli(capsys, "index", *paths, "-o", str(bank), "--workers", "1", "--quiet")
    if damage in REFUSED:
        assert code == errors.EXIT_USAGE and paths[1] in err and "Traceback" not in err, err
        assert not os.path.exists(bank / "manifest.json")
        return
    named, unnamed = sample_rejects(str(bank / "rejects.jsonl"))
    assert (named, unnamed) == (expect.named, expect.unnamed)
    stats = json.loads((bank / "stats.json").read_text())
    assert stats["indexed"] == SHARDS * PER_SHARD - len(expect.named) - expect.unnamed
    assert stats["failed"] == len(expect.named) + expect.unnamed
    reasons = set(stats["failures"])
    assert reasons == ({"truncated"} if damage in TRUNCATIONS else
                       {{"random_body": "unreadable_json", "empty_member": "empty_component",
                         "missing_component": "missing_component", "dotted_key": "dotted_key"}[damage]})
    assert all(k in err for k in expect.named) and str(bank / "rejects.jsonl") in err
    assert code == (errors.EXIT_FAILED if expect.lost_shard else errors.EXIT_OK), err


@pytest.mark.parametrize("damage", DAMAGES)
def test_inspect_fault_matrix(clean, tmp_path, capsys, damage):
    paths = copy_set(clean["instance"], tmp_path / "in")
    expect = damage_set(paths, damage, "jpg", clean["image"][0])
    code, stdout, err = run_cli(capsys, "inspect", "--json", *paths)
    report = json.loads(stdout)
    assert code == errors.EXIT_FAILED and not report["ok"]
    broken = {b["key"]: b["reason"] for b in report["broken"]}
    if damage == "missing_shard":
        assert report["missing"] == [paths[1]] and report["samples"] == 8 and not broken
    elif damage == "non_tar":
        assert [(d["shard"], d["reason"]) for d in report["damaged"]] == [(paths[1], "unreadable_shard")]
        assert report["samples"] == 8 and not broken
    elif damage == "wrong_stage":
        assert broken == dict.fromkeys(expect.named, "wrong_schema") and report["samples"] == 12
    elif damage in TRUNCATIONS:
        [cut] = report["damaged"]
        assert cut["shard"] == paths[1] and set(cut["lost_keys"]) == expect.named
        assert cut["lost"] == len(expect.named) + expect.unnamed and report["samples"] == 10
        assert not broken
    else:
        reason = {"random_body": "undecodable", "empty_member": "empty_component",
                  "missing_component": "missing_component", "dotted_key": "dotted_key"}[damage]
        assert broken == dict.fromkeys(expect.named, reason) and report["samples"] == 12
    text_code, text, _ = run_cli(capsys, "inspect", *paths)
    named = {paths[1]} if damage in ("missing_shard", "non_tar") else expect.named
    assert text_code == code and all(k in text for k in named)


# -- pack-coco and folder ingest ----------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[str, str]:
    path = make_dataset(str(tmp_path_factory.mktemp("scenes")), lvis=True)
    return path, os.path.join(os.path.dirname(path), "images")


def copy_scenes(scenes, tmp_path) -> tuple[str, str, dict]:
    shutil.copytree(os.path.dirname(scenes[0]), tmp_path / "scenes")
    annotations = str(tmp_path / "scenes" / "annotations.json")
    with open(annotations) as f:
        return annotations, str(tmp_path / "scenes" / "images"), json.load(f)


def cut_in_half(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def damage_file(path: str, damage: str) -> None:
    """One of the per-file damages of the table in the module docstring."""
    if damage == "random_body":
        open(path, "wb").write(random_body("jpg"))
    elif damage == "empty_member":
        open(path, "wb").close()
    elif damage in TRUNCATIONS:
        cut_in_half(path)
    elif damage == "non_tar":
        open(path, "w").write("not an image\n")


@pytest.mark.parametrize("damage", DAMAGES)
def test_pack_coco_fault_matrix(scenes, tmp_path, capsys, damage):
    annotations, images, doc = copy_scenes(scenes, tmp_path)
    victim = doc["images"][1]
    path = os.path.join(images, victim["file_name"])
    out = tmp_path / "out"
    args = [annotations, images, "-o", str(out / "bg-{shard:04d}.tar"), "--workers", "1"]
    key: str | None = formats.background_key(victim["id"])
    if damage == "truncated_without_index":
        cut_in_half(annotations)
    elif damage == "wrong_stage":
        shard = shards.write_samples(str(tmp_path / "s-{shard:02d}.tar"), image_samples())[0]
        shutil.copy(shard, annotations)
    elif damage == "missing_shard":
        os.remove(annotations)
    elif damage == "missing_component":
        os.remove(path)
    elif damage == "dotted_key":
        for entry in [victim] + [a for a in doc["annotations"] if a["image_id"] == victim["id"]]:
            entry["id" if entry is victim else "image_id"] = victim["id"] + 0.5
        json.dump(doc, open(annotations, "w"))
        key = None
    else:
        damage_file(path, damage)
    code, stdout, err = run_cli(capsys, "pack-coco", *args)
    if damage in ("truncated_without_index", "wrong_stage", "missing_shard"):
        assert code == errors.EXIT_USAGE and annotations in err and "Traceback" not in err, err
        assert not out.exists()
        return
    summary = json.loads(stdout)
    records = [r for r in errors.read_rejects(summary["rejects"]) if r["what"] == "sample"]
    assert [(r["source"], r["key"]) for r in records] == [(path, key)]
    assert summary["samples"] == len(doc["images"]) - 1 and summary["failed"] == 1
    assert path in err and code == errors.EXIT_OK, err


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> tuple[str, str]:
    """ROOT/<category>/ with 3 JPEGs and 1 PNG each, and the categories file naming them."""
    root = tmp_path_factory.mktemp("crawl")
    from PIL import Image

    for c, name in enumerate(("red_ball", "blue_box"), start=1):
        os.makedirs(root / "folder" / name)
        for i in range(4):
            rgb = np.full((40, 56, 3), 250, np.uint8)
            rgb[8:30, 10 + i:40] = (200, 40 * c, 30)
            Image.fromarray(rgb).save(root / "folder" / name / f"img{i}.{'png' if i == 3 else 'jpg'}")
    cats = root / "categories.json"
    names = [{"id": 1, "name": "red_ball"}, {"id": 2, "name": "blue_box"}]
    cats.write_text(json.dumps({"categories": names}))
    return str(root / "folder"), str(cats)


@pytest.mark.parametrize("damage", DAMAGES)
def test_folder_generate_fault_matrix(crawl, tmp_path, capsys, damage):
    root = str(tmp_path / "folder")
    shutil.copytree(crawl[0], root)
    categories = crawl[1]
    name = "img3.png" if damage == "truncated_without_index" else "img1.jpg"
    path = os.path.join(root, "blue_box", name)
    out = tmp_path / "out"
    named: set[tuple[str, str]] = {(path, formats.image_key(2, 3 if name == "img3.png" else 1))}
    if damage == "missing_component":
        os.remove(path)
        os.symlink(str(tmp_path / "gone.jpg"), path)
    elif damage == "dotted_key":
        os.rename(path, os.path.join(root, "blue_box", "img1.b.c.jpg"))
        named = set()
    elif damage == "wrong_stage":
        categories = shards.write_samples(str(tmp_path / "s-{shard:02d}.tar"), image_samples())[0]
    elif damage == "missing_shard":
        shutil.rmtree(root)
    else:
        damage_file(path, damage)
    code, stdout, err = run_cli(capsys, "generate", "--generator", "folder", "--folder", root,
                                "--categories", categories, "--images-per-category", "10",
                                "--image-size", "64", "-o", str(out / "gen-{shard:04d}.tar"))
    if damage in ("wrong_stage", "missing_shard"):
        assert code == errors.EXIT_USAGE and "Traceback" not in err, err
        assert (categories if damage == "wrong_stage" else root) in err and not out.exists()
        return
    summary = json.loads(stdout)
    records = [r for r in errors.read_rejects(summary["rejects"]) if r["what"] == "sample"] \
        if summary["rejects"] else []
    assert {(r["source"], r["key"]) for r in records} == named
    assert summary["samples"] == 8 - len(named) and summary["failed"] == len(named)
    assert all(p in err for p, _ in named) and code == errors.EXIT_OK, err


# -- thresholds, checks before work, stopping ---------------------------------------------------


def test_failure_thresholds_decide_the_exit_status(clean, tmp_path, capsys):
    paths = copy_set(clean["instance"], tmp_path / "in")
    damage_set(paths, "truncated_with_index", "", "")
    args = ["index", *paths, "--workers", "1", "--quiet"]
    assert run_cli(capsys, *args, "-o", str(tmp_path / "a"), "--max-bad-shards", "1")[0] == 0
    code, _, err = run_cli(capsys, *args, "-o", str(tmp_path / "b"), "--max-failed-fraction", "0.1")
    assert code == errors.EXIT_FAILED
    assert "index: FAILED" in err and "2 of 12 inputs skipped" in err and "bad input shard" in err
    # more than half of the samples unusable: failed, and the console names the first N
    broken = shards.write_samples(str(tmp_path / "bad" / "b-{shard:02d}.tar"),
                                  [{"__key__": f"k{n}", "jpg": b"x", "mask.png": b"x"} for n in range(7)]
                                  + instance_samples()[:3])
    code, _, err = run_cli(capsys, "index", *broken, "-o", str(tmp_path / "c"), "--quiet",
                           "--show-skips", "4")
    assert code == errors.EXIT_FAILED and "7 of 10 inputs skipped (70 %)" in err
    assert "k3" in err and "k4" not in err and "3 more; full list:" in err


def test_checks_before_work(tmp_path, capsys, lvis_dataset):
    code, _, err = run_cli(capsys, "extract", str(tmp_path / "nothing-*.tar"),
                           "-o", str(tmp_path / "o-{shard:02d}.tar"))
    assert code == errors.EXIT_USAGE and "matches no files" in err
    assert run_cli(capsys, "index", str(tmp_path / "none-*.tar"), "-o", str(tmp_path / "b"))[0] == 2
    assert run_cli(capsys, "inspect", str(tmp_path / "none-*.tar"))[0] == errors.EXIT_USAGE
    # an output pattern without a shard field: refused before categories.json is written
    code, _, err = run_cli(capsys, "pack-coco", *lvis_dataset, "-o", str(tmp_path / "bg" / "bg.tar"))
    assert code == errors.EXIT_USAGE and "shard-number placeholder" in err
    assert not (tmp_path / "bg").exists()
    # a diffusers model that is not here: refused before the progress bar starts
    code, _, err = run_cli(capsys, "generate", "--generator", "diffusers", "--model", str(tmp_path / "sd"),
                           "-o", str(tmp_path / "gen" / "g-{shard:02d}.tar"))
    assert code == errors.EXIT_USAGE and "model_index.json" in err and "%|" not in err
    assert not (tmp_path / "gen").exists()
    # a GPU this machine does not have: refused before any demo data is built
    code, _, err = run_cli(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--device", "99")
    assert code == errors.EXIT_USAGE and "--device cuda:99" in err and not (tmp_path / "demo").exists()
    # --debug shows the traceback the plain message hides
    code, _, err = run_cli(capsys, "--debug", "pack-coco", *lvis_dataset, "-o", str(tmp_path / "x.tar"))
    assert code == errors.EXIT_USAGE and "Traceback" in err


def test_pack_coco_inputs_of_the_wrong_kind(tmp_path, capsys):
    cats = {"schema": formats.CATEGORIES_SCHEMA, "categories": []}
    (tmp_path / "categories.json").write_text(json.dumps(cats))
    (tmp_path / "images").mkdir()
    code, _, err = run_cli(capsys, "pack-coco", str(tmp_path / "categories.json"), str(tmp_path / "images"),
                           "-o", str(tmp_path / "o" / "bg-{shard:02d}.tar"))
    assert code == errors.EXIT_USAGE and "not a COCO/LVIS annotation file" in err


SLOW_GENERATE = ["generate", "--num-categories", "2", "--images-per-category", "4000",
                 "--image-size", "64", "--maxcount", "5"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_cleanly(tmp_path, signum):
    out = tmp_path / "gen"
    proc = subprocess.Popen([sys.executable, "-m", "xpaste_stream.cli", *SLOW_GENERATE,
                             "-o", str(out / "g-{shard:04d}.tar")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "g-0001.stats.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert "stopped by" in last and "rerun the same command to resume" in last
    assert "Traceback" not in err
    done = [s for s in os.listdir(out) if s.endswith(".stats.json")]
    assert len(done) >= 2 and len([t for t in os.listdir(out) if t.endswith(".tar")]) == len(done)


# -- pack-coco counting ------------------------------------------------------------------------


def pack(annotations: str, images: str, out) -> dict:
    from xpaste_stream.pack import PackCocoConfig, run_pack_coco

    return run_pack_coco(PackCocoConfig(annotations=annotations, images=images, workers=1, maxcount=5,
                                        output=str(out / "bg-{shard:04d}.tar")), progress=False)


def test_pack_coco_counts_packed_images_only(scenes, tmp_path):
    annotations, images, doc = copy_scenes(scenes, tmp_path)
    by_image: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    with_objects = [im for im in doc["images"] if by_image.get(im["id"])]
    gone, broken, odd = with_objects[0], with_objects[1], with_objects[2]
    os.remove(os.path.join(images, gone["file_name"]))
    cut_in_half(os.path.join(images, broken["file_name"]))
    unknown = by_image[odd["id"]][0]
    unknown["category_id"] = 999
    # one category keeps exactly one instance (on an image that is packed)
    counts = {}
    for a in doc["annotations"]:
        counts.setdefault(a["category_id"], []).append(a)
    single_cat = next(c for c, anns in sorted(counts.items()) if c != 999 and len(anns) > 1)
    keep = next(a for a in counts[single_cat] if a["image_id"] not in (gone["id"], broken["id"]))
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] != single_cat or a is keep]
    json.dump(doc, open(annotations, "w"))

    summary = pack(annotations, images, tmp_path / "out")

    # expectations computed here, from the json alone
    packed = {im["id"]: im for im in doc["images"] if im["id"] not in (gone["id"], broken["id"])}
    kept = [a for a in doc["annotations"] if a["image_id"] in packed and a["category_id"] != 999]
    t = 0.001
    factor = {}
    cats = formats.read_categories(str(tmp_path / "out" / "categories.json"))
    assert cats["num_images"] == len(packed) == summary["samples"]
    for c in cats["categories"]:
        anns = [a for a in kept if a["category_id"] == c["id"]]
        image_count = len({a["image_id"] for a in anns})
        ratios = [math.sqrt(a["bbox"][2] * a["bbox"][3] / (packed[a["image_id"]]["width"]
                                                            * packed[a["image_id"]]["height"])) for a in anns]
        assert (c["image_count"], c["instance_count"]) == (image_count, len(anns))
        factor[c["id"]] = max(1.0, math.sqrt(t / (image_count / len(packed)))) if image_count else None
        assert c["repeat_factor"] == pytest.approx(factor[c["id"]])
        if anns:
            assert c["scale_mean"] == pytest.approx(np.mean(ratios))
            assert c["scale_std"] == pytest.approx(np.std(ratios))
    single = next(c for c in cats["categories"] if c["id"] == single_cat)
    assert single["instance_count"] == 1 and single["scale_std"] == 0.0 and single["scale_mean"] > 0
    assert summary["failures"] == {"missing_image": 1, "corrupt_image": 1}
    assert summary["dropped"] == {"unknown_category": 1}

    samples = {s["__key__"]: s for p in shard_files(tmp_path / "out") for s in shards.iter_tar(p)}
    assert set(samples) == {formats.background_key(i) for i in packed}
    for image_id in packed:
        meta, anns = formats.read_background(samples[formats.background_key(image_id)])
        mine = [a for a in kept if a["image_id"] == image_id]
        assert sorted(a["id"] for a in anns) == sorted(a["id"] for a in mine)
        expected_rf = max([factor[a["category_id"]] for a in mine], default=1.0)
        assert meta["repeat_factor"] == pytest.approx(expected_rf, abs=1e-6)
    stats = [shards.read_stats(p) for p in shard_files(tmp_path / "out")]
    [dropped] = [d for s in stats for d in s["dropped_parts"]]
    assert dropped["key"] == formats.background_key(odd["id"]) and "999" in dropped["detail"]
