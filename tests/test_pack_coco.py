"""pack-coco: round trip through webdataset, DALI and tar; category statistics; bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import webdataset as wds
from helpers import shard_files
from pycocotools.coco import COCO

from xpaste_stream import cli, errors, formats, shards
from xpaste_stream.pack import PackCocoConfig, run_pack_coco


def pack(annotations: str, images: str, out, **kw) -> dict:
    cfg = PackCocoConfig(annotations=annotations, images=images,
                         output=str(out / "bg-{shard:06d}.tar"), maxcount=5, workers=1, **kw)
    return run_pack_coco(cfg, progress=False)


def original_masks(coco: COCO, image_id: int) -> np.ndarray:
    anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
    if not anns:
        return np.zeros((0,), np.uint8)
    return np.stack([coco.annToMask(a) for a in anns])


def read_with_dali(urls: list[str]) -> list[dict]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def reader():
        return tuple(fn.readers.webdataset(paths=urls, index_paths=[shards.dali_index_path(u) for u in urls],
                                     ext=["jpg", "json", "ann.zst"], random_shuffle=False,
                                     name="bg"))

    pipe = reader()
    pipe.build()
    n = pipe.epoch_size("bg")
    out = []
    for _ in range(n):
        jpg, meta, ann = (o.at(0).tobytes() for o in pipe.run())
        out.append({"jpg": jpg, "json": meta, "ann.zst": ann})
    return out


def test_round_trip_webdataset_dali_and_tar(lvis_dataset, tmp_path):
    annotations, images = lvis_dataset
    summary = pack(annotations, images, tmp_path / "out")
    coco = COCO(annotations)
    assert summary["samples"] == len(coco.imgs) and summary["failed"] == 0
    urls = shard_files(tmp_path / "out")

    plain = list(wds.WebDataset(urls, shardshuffle=False))
    dali = read_with_dali(urls)
    untar = tmp_path / "untar"
    untar.mkdir()
    for u in urls:
        subprocess.run(["tar", "-xf", u, "-C", str(untar)], check=True)
    assert len(plain) == len(dali) == len(coco.imgs)

    for sample, dali_sample in zip(plain, dali, strict=True):
        meta, anns = formats.read_background(sample)
        image_id = meta["image_id"]
        with open(os.path.join(images, coco.imgs[image_id]["file_name"]), "rb") as f:
            source = f.read()
        key = sample["__key__"]
        from_tar = {ext: (untar / f"{key}.{ext}").read_bytes() for ext in ("jpg", "json", "ann.zst")}
        for ext in ("jpg", "json", "ann.zst"):
            assert sample[ext] == dali_sample[ext] == from_tar[ext], (key, ext)
        assert sample["jpg"] == source  # image bytes stored as they were
        masks = formats.decode_masks(sorted(anns, key=lambda a: a["id"]), meta["height"], meta["width"])
        expected = original_masks(coco, image_id)
        assert masks.shape[0] == len(expected)
        if len(expected):
            np.testing.assert_array_equal(masks, expected)
        src_anns = {a["id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))}
        for a in anns:
            assert a["category_id"] == src_anns[a["id"]]["category_id"]
            assert a["bbox"] == pytest.approx(src_anns[a["id"]]["bbox"])
        assert meta["neg_category_ids"] == sorted(coco.imgs[image_id]["neg_category_ids"])


def test_category_statistics(lvis_dataset, tmp_path):
    annotations, images = lvis_dataset
    pack(annotations, images, tmp_path / "out")
    cats = formats.read_categories(str(tmp_path / "out" / "categories.json"))
    with open(annotations) as f:
        doc = json.load(f)
    n_images = len(doc["images"])
    size = {im["id"]: im["width"] * im["height"] for im in doc["images"]}
    assert {c["frequency"] for c in cats["categories"]} == {"r", "c", "f"}
    for c in cats["categories"]:
        anns = [a for a in doc["annotations"] if a["category_id"] == c["id"]]
        ratios = [math.sqrt(a["bbox"][2] * a["bbox"][3] / size[a["image_id"]]) for a in anns]
        image_count = len({a["image_id"] for a in anns})
        assert c["image_count"] == image_count and c["instance_count"] == len(anns)
        if anns:  # one instance too: a measured std of 0, never null
            assert c["scale_mean"] == pytest.approx(np.mean(ratios))
            assert c["scale_std"] == pytest.approx(np.std(ratios))
        else:
            assert c["scale_mean"] is None and c["scale_std"] is None
        if image_count:
            assert c["repeat_factor"] == pytest.approx(max(1.0, math.sqrt(0.001 / (image_count / n_images))))
        source = next(s for s in doc["categories"] if s["id"] == c["id"])
        assert c["frequency"] == source["frequency"] and c["synonyms"] == source["synonyms"]


def test_coco_format_and_parallel_workers_agree(coco_dataset, tmp_path):
    annotations, images = coco_dataset
    pack(annotations, images, tmp_path / "one")
    cfg = PackCocoConfig(annotations=annotations, images=images, maxcount=5, workers=2,
                         output=str(tmp_path / "two" / "bg-{shard:06d}.tar"))
    run_pack_coco(cfg, progress=False)
    one, two = shard_files(tmp_path / "one"), shard_files(tmp_path / "two")
    assert [open(a, "rb").read() for a in one] == [open(b, "rb").read() for b in two]
    cats = formats.read_categories(str(tmp_path / "one" / "categories.json"))
    assert cats["dataset"] == "coco"
    # COCO has no frequency groups: derived from image counts with the LVIS thresholds
    assert all(c["frequency"] == "r" for c in cats["categories"])


def test_bad_inputs_are_counted_and_the_run_goes_on(lvis_dataset, tmp_path):
    annotations, images = lvis_dataset
    with open(annotations) as f:
        doc = json.load(f)
    files = sorted(os.listdir(images))
    os.remove(os.path.join(images, files[0]))                      # missing image
    with open(os.path.join(images, files[1]), "r+b") as f:         # corrupt JPEG
        f.truncate(200)
    victim = next(a for a in doc["annotations"] if a["image_id"] == 3)
    victim["category_id"] = 999                                     # unknown category
    with open(annotations, "w") as f:
        json.dump(doc, f)

    summary = pack(annotations, images, tmp_path / "out")
    # the unknown category costs its annotation, not its image
    assert summary["failures"] == {"missing_image": 1, "corrupt_image": 1}
    assert summary["dropped"] == {"unknown_category": 1}
    assert summary["samples"] == len(doc["images"]) - 2
    stats = [shards.read_stats(u) for u in shard_files(tmp_path / "out")]
    failed = {os.path.basename(f["source"]): f for s in stats for f in s["failed_samples"]}
    assert set(failed) == {files[0], files[1]}
    assert failed[files[0]]["key"] == formats.background_key(int(files[0].split(".")[0]))
    [dropped] = [d for s in stats for d in s["dropped_parts"]]
    assert dropped["key"] == formats.background_key(3) and f"annotation {victim['id']}" in dropped["detail"]
    kept = {s["__key__"]: s for u in shard_files(tmp_path / "out") for s in shards.iter_tar(u)}
    meta, anns = formats.read_background(kept[formats.background_key(3)])
    assert victim["id"] not in {a["id"] for a in anns}
    assert len(anns) == sum(1 for a in doc["annotations"] if a["image_id"] == 3) - 1
    rejects = errors.read_rejects(summary["rejects"])
    assert sorted(r["what"] for r in rejects) == ["part", "sample", "sample"]


def test_unreadable_json_fails_before_any_work(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    (tmp_path / "imgs").mkdir()
    out = str(tmp_path / "o" / "bg-{shard:04d}.tar")
    code = cli.main(["pack-coco", str(bad), str(tmp_path / "imgs"), "-o", out])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "not valid JSON" in err
    assert not (tmp_path / "o").exists()


def test_missing_image_folder_is_a_config_error(lvis_dataset, tmp_path, capsys):
    annotations, images = lvis_dataset
    shutil.rmtree(images)
    code = cli.main(["pack-coco", annotations, images, "-o", str(tmp_path / "o" / "bg-{shard:04d}.tar")])
    assert code == 2 and "image folder" in capsys.readouterr().err
