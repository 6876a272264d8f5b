"""CLIP scoring and the X-Paste filter, with a tiny random-init open_clip model (no download).

The model is registered with open_clip from a config file and its weights are saved to a
checkpoint that the scorer loads through `pretrained=<path>`, the way a local copy of the real
weights is loaded on a machine without network.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from xpaste_stream import formats, shards
from xpaste_stream.bank import InstanceBank, build_index
from xpaste_stream.bank import cli as bank_cli
from xpaste_stream.config import ConfigError, from_dict
from xpaste_stream.extract import ClipConfig, ClipScorer, ClipWeightsMissing, ExtractConfig
from xpaste_stream.extract.postprocess import clean_mask, tight_box
from xpaste_stream.extract.segmenters import PlainBackgroundSegmenter
from xpaste_stream.extract.stage import extract_batch, run_extract
from xpaste_stream.generate import GenerateConfig, run_generate

TINY = "xpaste-test-tiny-clip"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                           "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 1}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    path = folder / "tiny.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def scorer(checkpoint) -> ClipScorer:
    return ClipScorer.load(ClipConfig(model=TINY, pretrained=checkpoint, device="cpu"))


def crop(seed: int, h: int = 40, w: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    alpha = np.zeros((h, w), np.uint8)
    alpha[5:-5, 4:-4] = rng.integers(128, 256, (h - 10, w - 8))
    return rng.integers(0, 256, (h, w, 3), np.uint8), alpha


def test_score_is_100_times_cosine_of_object_on_white(scorer, checkpoint):
    rgb, alpha = crop(1)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=checkpoint)
    on_white = np.where(alpha[..., None] >= 128, rgb, 255).astype(np.uint8)
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.fromarray(on_white))[None])
        text = model.encode_text(open_clip.get_tokenizer(TINY)(["a photo of hot dog"]))
    expected = 100 * torch.nn.functional.cosine_similarity(image, text).item()
    assert scorer.score([(rgb, alpha, "hot_dog")])[0] == pytest.approx(expected, abs=1e-3)


def test_pixels_outside_the_mask_do_not_matter(scorer):
    rgb, alpha = crop(2)
    alpha[0, :] = 127  # just below the binarisation threshold: background
    other = rgb.copy()
    other[alpha < 128] = 255 - other[alpha < 128]
    inside = rgb.copy()
    inside[alpha >= 128] //= 2
    a, b, c = scorer.score([(rgb, alpha, "cup"), (other, alpha, "cup"), (inside, alpha, "cup")])
    assert a == pytest.approx(b, abs=1e-5)
    assert abs(a - c) > 1e-3  # the object itself does change the score


def test_batched_scores_equal_one_by_one(scorer):
    items = [(*crop(10 + i, 30 + 3 * i, 20 + 5 * i), name)
             for i, name in enumerate(["cup", "hot_dog", "cup", "apple", "zebra"])]
    batched = scorer.score(items)
    single = [scorer.score([item])[0] for item in items]
    assert batched == pytest.approx(single, abs=1e-3)
    assert len(set(np.round(batched, 3))) == len(items)


def two_mask_image() -> np.ndarray:
    """A red square with a pale grey ring: a tolerance of 40 keeps the square, 10 the ring too."""
    img = np.full((96, 96, 3), 255, np.uint8)
    img[20:76, 20:76] = 230
    img[34:62, 34:62] = (200, 20, 20)
    return img


def test_the_best_scoring_segmenter_wins(scorer):
    segmenters = {"tight": PlainBackgroundSegmenter(tolerance=40),
                  "loose": PlainBackgroundSegmenter(tolerance=10)}
    for name, segmenter in segmenters.items():
        segmenter.name = name
    jpg = formats.encode_jpeg(two_mask_image())
    sample = formats.image_sample("k0", jpg, category_id=3, category="red_square", prompt="p",
                                  seed=0, generator="test", width=96, height=96)
    decoded = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))  # what extract sees
    cfg = ExtractConfig(inputs=["unused"], scorer="clip")
    for target, other in (("tight", "loose"), ("loose", "tight")):
        # point the category's text embedding at one candidate's image: that one scores 100
        mask = clean_mask(segmenters[target](decoded))
        x0, y0, x1, y1 = tight_box(mask)
        crop_ = (decoded[y0:y1, x0:x1], mask[y0:y1, x0:x1])
        scorer._text["red_square"] = scorer.image_embedding([crop_])[0]
        result = extract_batch([sample], list(segmenters.values()), scorer, cfg)[0]
        meta = formats.read_instance_meta(result)
        assert meta["segmenter"] == target and meta["clip_score"] == pytest.approx(100, abs=1e-2)
        assert meta["candidate_scores"][other] < 99.9
        assert meta["clip_score"] == max(meta["candidate_scores"].values())
    scorer._text.clear()
    # without a scorer the first segmenter's mask is kept, unscored
    loose_first = [segmenters["loose"], segmenters["tight"]]
    meta = formats.read_instance_meta(extract_batch([sample], loose_first, None, cfg)[0])
    assert meta["segmenter"] == "loose" and meta["clip_score"] is None


def test_extract_stage_scores_batches_and_resumes(checkpoint, tmp_path):
    run_generate(GenerateConfig(output=str(tmp_path / "img" / "gen-{shard:04d}.tar"),
                                num_categories=3, images_per_category=3, image_size=96, maxcount=4),
                 progress=False)
    cfg = from_dict(ExtractConfig, {
        "inputs": [str(tmp_path / "img" / "gen-*.tar")],
        "output": str(tmp_path / "inst" / "inst-{shard:04d}.tar"),
        "segmenters": ["plain-background", "grabcut"], "scorer": "clip", "batch_size": 4,
        "maxcount": 3, "clip": {"model": TINY, "pretrained": checkpoint, "device": "cpu"}}, "extract")
    summary = run_extract(cfg, progress=False)
    assert summary["samples"] + summary["failed"] == 9 and summary["samples"] >= 7
    paths = sorted(glob.glob(str(tmp_path / "inst" / "inst-*.tar")))
    first = [formats.read_instance_meta(s) for p in paths for s in shards.iter_tar(p)]
    for meta in first:
        scores = meta["candidate_scores"]
        assert meta["segmenter"] in scores and meta["clip_score"] == max(scores.values())
    # an interrupted run (last shard lost) resumes at its first input, batches realigned
    os.remove(shards.stats_path(paths[-1]))
    os.remove(paths[-1])
    run_extract(cfg, progress=False)
    again = [formats.read_instance_meta(s) for p in paths for s in shards.iter_tar(p)]
    assert [m["source_key"] for m in again] == [m["source_key"] for m in first]
    assert [m["clip_score"] for m in again] == pytest.approx([m["clip_score"] for m in first],
                                                             abs=1e-2)


def test_extract_config_rules():
    several = from_dict(ExtractConfig, {"inputs": ["x"], "segmenters": ["plain-background", "grabcut"]})
    assert several.scorer == "none"  # without CLIP the best mask is chosen by confidence
    with pytest.raises(ConfigError, match="extract.clip: prompt"):
        from_dict(ExtractConfig, {"inputs": ["x"], "clip": {"prompt": "no placeholder"}}, "extract")
    cfg = from_dict(ExtractConfig, {"inputs": ["x"], "segmenters": ["grabcut"]})
    assert cfg.segmenters == ["grabcut"]
    default = ExtractConfig(inputs=["x"])
    assert default.scorer == "none" and default.clip == ClipConfig()
    assert (default.clip.model, default.clip.pretrained, default.clip.prompt) == \
        ("ViT-L-14", "openai", "a photo of {name}")


def test_missing_weights_fail_offline_with_a_clear_message(tmp_path, checkpoint):
    with pytest.raises(ClipWeightsMissing, match="neither a file nor a known tag"):
        ClipScorer.load(ClipConfig(model=TINY, pretrained=str(tmp_path / "absent.pt")))
    with pytest.raises(ClipWeightsMissing, match=r"ViT-L-14/openai are not on this machine.*"
                                                 r"set pretrained to its path"):
        ClipScorer.load(ClipConfig(cache_dir=str(tmp_path / "empty-cache")))


# -- the per-category relaxed bar, applied at index time --------------------------------------

# category -> scores (None: unscored); multiples of 0.25, exact in the float16 column
SCORES = {1: [25.0, 22.0, 20.5, 19.0, None, 21.0],
          2: [18.0, 17.5, 17.0, 16.75, 12.0],   # best below min_clip: relaxed to 17, not emptied
          3: [30.0, 29.25, 28.5, 21.0, 20.75]}


def filter_samples() -> list[dict]:
    rng = np.random.default_rng(0)
    items = [(c, s) for c, scores in SCORES.items() for s in scores]
    order = rng.permutation(len(items))  # categories interleaved across shards
    out = []
    for i in order:
        c, s = items[i]
        rgb = rng.integers(0, 256, (6, 5, 3), np.uint8)
        out.append(formats.instance_sample(f"i{i:03d}", rgb, np.full((6, 5), 255, np.uint8),
                                           category_id=c, category=f"cat{c}", clip_score=s,
                                           source_key="s", generator="test", segmenter="test"))
    return out


def write_shards(folder, samples, per_shard=5) -> list[str]:
    return shards.write_samples(os.path.join(str(folder), "inst-{shard:04d}.tar"), samples, per_shard)


def kept_by_rule(scores: dict[int, list], min_clip: float) -> dict[int, list]:
    out = {}
    for c, values in scores.items():
        scored = [s for s in values if s is not None]
        bar = min(min_clip, max(scored) - 1) if scored else -np.inf
        out[c] = sorted((s for s in values if s is None or s >= bar), key=lambda s: (s is None, s))
    return out


def bank_scores(bank: InstanceBank) -> dict[int, list]:
    out = {}
    for c in bank.category_ids.tolist():
        values = [None if np.isnan(v) else float(v) for v in bank.clip_scores_of(bank.instances_of(c))]
        out[c] = sorted(values, key=lambda s: (s is None, s))
    return out


def test_index_keeps_exactly_the_instances_over_the_relaxed_bar(tmp_path):
    paths = write_shards(tmp_path / "shards", filter_samples())
    summary = build_index(paths, str(tmp_path / "bank"), workers=1, progress=False, min_clip=21)
    bank = InstanceBank.open(str(tmp_path / "bank"))
    expected = kept_by_rule(SCORES, 21)
    assert expected[2] == [17.0, 17.5, 18.0]
    assert bank_scores(bank) == expected
    total, kept = sum(map(len, SCORES.values())), sum(map(len, expected.values()))
    assert bank.num_instances == kept and bank.num_indexed == total
    clip = bank.manifest["clip_filter"]
    assert clip == {"min_clip": 21, "dropped": total - kept, "unscored_kept": 1}
    assert summary["clip_filter"] == clip and bank.manifest["num_duplicates"] == 0
    # dropped rows stay readable after the drawable ones, never inside a category's range
    dropped = bank.clip_scores_of(np.arange(bank.num_instances, bank.num_indexed))
    assert sorted(dropped.tolist()) == [12.0, 16.75, 19.0, 20.5, 20.75]
    stats = json.loads((tmp_path / "bank" / "stats.json").read_text())
    assert stats["clip_filter"] == clip
    assert stats["instances_per_category"] == {str(c): len(v) for c, v in expected.items()}


def test_filtered_incremental_build_equals_fresh(tmp_path):
    paths = write_shards(tmp_path / "shards", filter_samples())
    inc, fresh = str(tmp_path / "inc"), str(tmp_path / "fresh")
    build_index(paths[:1], inc, workers=1, progress=False, min_clip=21, dedup=True)
    second = build_index(paths, inc, workers=1, progress=False, min_clip=21, dedup=True)
    assert second["shards_reused"] == 1
    build_index(paths, fresh, workers=2, progress=False, min_clip=21, dedup=True)
    for name in os.listdir(fresh):
        if name.endswith(".npy"):
            assert np.array_equal(np.load(os.path.join(inc, name)), np.load(os.path.join(fresh, name)),
                                  equal_nan=True), name
    a, b = (json.load(open(os.path.join(d, "manifest.json"))) for d in (inc, fresh))
    assert {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}
    # changing the bar re-reads nothing: the dropped rows are still indexed
    third = build_index(paths, inc, workers=1, progress=False, min_clip=100, dedup=True)
    assert third["shards_read"] == [] and bank_scores(InstanceBank.open(inc)) == kept_by_rule(SCORES, 100)


def test_index_command_min_clip(tmp_path, capsys):
    paths = write_shards(tmp_path / "shards", filter_samples())
    parser = argparse.ArgumentParser()
    bank_cli.register(parser.add_subparsers())
    args = parser.parse_args(["index", *paths, "-o", str(tmp_path / "bank"), "--min-clip", "21",
                              "--quiet", "--workers", "1"])
    assert args.func(args) == 0
    assert "CLIP filter (min 21, relaxed per category): 5 dropped, 1 unscored kept" in \
        capsys.readouterr().out
