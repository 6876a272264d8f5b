"""`xpaste-stream report`: bad inputs counted by reason and named, grids, bank mode, refusal."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from xpaste_stream import formats, shards
from xpaste_stream.cli import main
from xpaste_stream.extract import ExtractConfig, run_extract
from xpaste_stream.report import checkerboard


def image(size: int, colour=(200, 30, 30), frame: int | None = None) -> np.ndarray:
    """White with a coloured square (or, with `frame`, coloured but for a white frame)."""
    img = np.full((size, size, 3), 255, np.uint8)
    if frame is None:
        img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = colour
    else:
        img[frame:-frame, frame:-frame] = colour
    return img


def tall_green() -> np.ndarray:
    img = np.full((64, 64, 3), 255, np.uint8)
    img[6:58, 24:40] = (20, 160, 40)
    img[6:58, 24:32] = (10, 90, 20)  # texture, so its difference hash differs from a flat square
    return img


def sample(key: str, rgb: np.ndarray | None, category_id: int, category: str, jpg: bytes | None = None):
    jpg = jpg if jpg is not None else formats.encode_jpeg(rgb)
    return formats.image_sample(key, jpg, category_id=category_id, category=category, prompt="p",
                                seed=0, generator="test", width=64, height=64)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    good = formats.encode_jpeg(image(64))
    samples = [
        sample("c00001-0000000", None, 1, "red_square", good),
        sample("c00001-0000001", None, 1, "red_square", good),           # a duplicate, for --dedup
        sample("c00001-0000002", tall_green(), 1, "red_square"),
        sample("c00001-0000003", None, 1, "red_square", b"\xff\xd8 not a jpeg"),  # corrupt image
        {"__key__": "c00001-0000004", "jpg": good},                        # missing metadata
        sample("c00002-0000000", np.full((64, 64, 3), 255, np.uint8), 2, "blank_thing"),  # empty mask
        sample("c00002-0000001", image(320, frame=3), 2, "blank_thing"),  # mask ~ the whole image
    ]
    shards.write_samples(str(root / "img" / "gen-{shard:04d}.tar"), samples, maxcount=4)
    summary = run_extract(ExtractConfig(inputs=[str(root / "img" / "gen-*.tar")], maxcount=2,
                                        output=str(root / "inst" / "inst-{shard:04d}.tar")), progress=False)
    return root, summary


def test_extract_goes_on_and_counts_bad_inputs_by_reason(extracted):
    _, summary = extracted
    assert summary["samples"] == 3
    assert summary["failures"] == {"unreadable_image": 1, "missing_metadata": 1, "empty_mask": 1,
                                   "mask_too_large": 1}


def test_report_names_every_reject_and_the_empty_category(extracted, tmp_path):
    root, _ = extracted
    out = tmp_path / "rep"
    assert main(["report", str(root / "inst" / "inst-*.tar"), "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 3 and summary["rejected"] == 4
    assert summary["rejected_by_reason"] == summary["extract_failures_in_stats"] == {
        "unreadable_image": 1, "missing_metadata": 1, "empty_mask": 1, "mask_too_large": 1}
    cats = summary["categories"]
    assert cats["1"]["kept"] == 3 and cats["1"]["rejected_by_reason"] == {"unreadable_image": 1}
    assert cats["2"] == {**cats["2"], "kept": 0, "name": "blank_thing",
                         "rejected_by_reason": {"empty_mask": 1, "mask_too_large": 1}}
    named = {(r["key"], r["reason"]) for c in cats.values() for r in c["rejected_samples"]}
    assert named == {("c00001-0000003", "unreadable_image"), ("c00001-0000004", "missing_metadata"),
                     ("c00002-0000000", "empty_mask"), ("c00002-0000001", "mask_too_large")}
    assert all(r["shard"].endswith(".tar") for c in cats.values() for r in c["rejected_samples"])
    assert summary["zero_survivor_categories"] == [
        {"id": 2, "name": "blank_thing", "rejected_by_reason": {"empty_mask": 1, "mask_too_large": 1}}]
    assert summary["segmenter_wins"] == {"plain-background": 3}
    assert summary["selection_rules"] == {"segmenter-confidence": 3}
    assert summary["mask"]["area_ratio"]["count"] == 3
    assert summary["mask"]["area_ratio"]["min"] == pytest.approx(52 * 16 / 64 ** 2, abs=0.02)
    for name in ("masks.png", "segmenters.png"):
        assert (out / name).stat().st_size > 1000
    assert not (out / "clip_scores.png").exists()  # no scorer ran: no empty CLIP axes
    kept = np.asarray(Image.open(out / "grids" / "kept" / "00001-red_square.png").convert("RGB"))
    rejected = np.asarray(Image.open(out / "grids" / "rejected" / "00002-blank_thing.png").convert("RGB"))
    assert kept.shape[:2] == (64, 3 * 64) and rejected.shape[:2] == (64, 2 * 64)
    # transparent corners show the checkerboard; the cut-outs' colours are there
    assert np.array_equal(kept[:8, :8], checkerboard(8, 8)) and (kept[..., 0] > 150).sum() > 100
    assert ((kept[..., 1] > 120) & (kept[..., 0] < 80)).sum() > 100  # the green one


def test_report_on_a_bank_counts_index_drops_and_refuses_to_write_into_it(extracted, tmp_path, capsys):
    root, _ = extracted
    bank = str(root / "bank")
    assert main(["index", str(root / "inst" / "inst-*.tar"), "-o", bank, "--dedup", "--quiet",
                 "--workers", "1"]) == 0
    assert main(["report", bank, "-o", os.path.join(bank, "report")]) == 2
    assert "never written into a bank folder" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(bank, "report"))
    out = tmp_path / "bank-report"
    assert main(["report", bank, "-o", str(out), "--grid-size", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bank"] == bank and summary["kept"] == 2
    assert summary["categories"]["1"]["rejected_by_reason"] == {"unreadable_image": 1, "index_duplicate": 1}
    assert not (out / "grids").exists()
