"""pack-coco holds an LVIS-sized annotation file in bounded memory (benchmarks/bench_scale.py
measures it at full size: LVIS v1 train has ~100M polygon coordinates)."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np

from xpaste_stream.pack.coco import load_dataset, to_rle

POINTS = 40  # LVIS-like polygons: ~80 coordinates each


def write_lvis(path, num_annotations: int) -> None:
    rng = np.random.default_rng(0)
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 50.0, 40.0],
             "area": 1500.0, "iscrowd": 0,
             "segmentation": [np.round(rng.uniform(10, 50, 2 * POINTS), 2).tolist()]}
            for i in range(num_annotations)]
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
           "categories": [{"id": 1, "name": "thing", "frequency": "f"}], "annotations": anns}
    path.write_text(json.dumps(doc))


def test_polygons_load_compact(tmp_path):
    """Peak Python memory while loading stays near the file's size (old: ~5 KB per annotation:
    every coordinate a float object in a list, and the file held as bytes and as text)."""
    write_lvis(tmp_path / "warm.json", 1)
    load_dataset(str(tmp_path / "warm.json"))  # imports (lvis, pycocotools) are not the file's
    path = tmp_path / "lvis.json"
    n = 10_000
    write_lvis(path, n)
    tracemalloc.start()
    try:
        ds, is_lvis = load_dataset(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert is_lvis and len(ds.dataset["annotations"]) == n
    assert peak / n < 3000, f"{peak / n:.0f} bytes per annotation at peak"


def test_compact_polygons_give_the_same_masks(tmp_path):
    path = tmp_path / "lvis.json"
    write_lvis(path, 5)
    ds, _ = load_dataset(str(path))
    raw = json.loads(path.read_text())["annotations"]
    for loaded, original in zip(ds.dataset["annotations"], raw, strict=True):
        assert to_rle(loaded["segmentation"], 64, 64) == to_rle(original["segmentation"], 64, 64)
