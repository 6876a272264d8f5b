"""Stages 1-2 on the embedded defaults, pipeline files, configuration checks and inspect."""

from __future__ import annotations

import io
import json
import os
import shutil
import textwrap

import numpy as np
import pytest
from helpers import shard_files
from PIL import Image

from xpaste_stream import cli, formats
from xpaste_stream.config import ConfigError, from_dict
from xpaste_stream.extract import ExtractConfig, run_extract
from xpaste_stream.extract.postprocess import clean_mask, tight_box
from xpaste_stream.generate import GenerateConfig, run_generate
from xpaste_stream.loader import PasteConfig
from xpaste_stream.pipeline import load_pipeline, loader_from_pipeline
from xpaste_stream.shards import ShardWriter, iter_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(out, **kw) -> dict:
    cfg = GenerateConfig(output=str(out / "gen-{shard:04d}.tar"), num_categories=4,
                         images_per_category=3, image_size=128, maxcount=5, **kw)
    return run_generate(cfg, progress=False)


def test_generation_is_deterministic_and_described(tmp_path):
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    a, b = shard_files(tmp_path / "a"), shard_files(tmp_path / "b")
    assert len(a) == 3 and [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    samples = [s for u in a for s in iter_tar(u)]
    metas = [formats.read_image_meta(s) for s in samples]
    assert [m["category_id"] for m in metas] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert metas[3]["prompt"] == "a photo of a single green square"
    assert metas[0]["generator"] == "procedural" and metas[0]["width"] == 128


def test_clean_mask_keeps_the_largest_blob_with_holes_filled():
    alpha = np.zeros((40, 40), np.uint8)
    alpha[5:25, 5:25] = 200       # big square ...
    alpha[10:15, 10:15] = 0       # ... with a hole
    alpha[30:35, 30:35] = 255     # small separate blob
    alpha[0:3, 30:33] = 127       # below the threshold
    mask = clean_mask(alpha)
    assert mask[12, 12] == 255 and mask[32, 32] == 0 and mask[1, 31] == 0
    assert int((mask > 0).sum()) == 400
    assert tight_box(mask) == (5, 5, 25, 25)
    assert tight_box(np.zeros((4, 4), np.uint8)) is None


def test_extraction_cuts_objects_out(tmp_path):
    generate(tmp_path / "img")
    cfg = ExtractConfig(inputs=[str(tmp_path / "img" / "gen-*.tar")],
                        output=str(tmp_path / "inst" / "inst-{shard:04d}.tar"), maxcount=100)
    summary = run_extract(cfg, progress=False)
    assert summary["samples"] + summary["failed"] == 12 and summary["samples"] >= 9
    for s in iter_tar(shard_files(tmp_path / "inst")[0]):
        meta = formats.read_instance_meta(s)
        rgb = np.asarray(Image.open(io.BytesIO(s["jpg"])))
        component, mask = formats.instance_mask(s)
        alpha = formats.decode_alpha(mask, component, meta["width"], meta["height"])
        assert rgb.shape[:2] == alpha.shape == (meta["height"], meta["width"])
        assert set(np.unique(alpha)) <= {0, 255}
        assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()
        assert meta["area"] == int((alpha > 0).sum()) and meta["segmenter"] == "plain-background"
        # the object is coloured, not the white background
        assert np.abs(rgb[alpha > 0].astype(int) - 255).max(axis=1).mean() > 60


def test_extraction_counts_unreadable_images(tmp_path):
    writer = ShardWriter(str(tmp_path / "img" / "gen-{shard:04d}.tar"))
    writer.resume()
    good = np.full((64, 64, 3), 255, np.uint8)
    good[16:48, 16:48] = (200, 30, 30)
    for i, jpg in enumerate([formats.encode_jpeg(good), b"\xff\xd8 not a jpeg",
                             formats.encode_jpeg(np.full((64, 64, 3), 255, np.uint8))]):
        writer.add(i, formats.image_sample(f"k{i}", jpg, category_id=1, category="x", prompt="p",
                                           seed=0, generator="test", width=64, height=64))
    writer.close()
    summary = run_extract(ExtractConfig(inputs=[str(tmp_path / "img" / "gen-0000.tar")],
                                        output=str(tmp_path / "inst" / "i-{shard:04d}.tar")),
                          progress=False)
    assert summary["samples"] == 1
    assert summary["failures"] == {"unreadable_image": 1, "empty_mask": 1}


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    cases = {
        "unknown key": ('[pipeline]\nstages=["generate"]\n[generate]\noutptu="x"\n', "outptu"),
        "wrong type": ('[pipeline]\nstages=["generate"]\n[generate]\nimage_size="big"\n',
                       "generate.image_size"),
        "bad value": ('[pipeline]\nstages=["generate"]\n[generate]\nimages_per_category=0\n',
                      "images_per_category"),
        "unknown generator": ('[pipeline]\nstages=["generate"]\n[generate]\ngenerator="dalle"\n',
                              "'procedural'"),
        "missing table": ('[pipeline]\nstages=["extract"]\n', "no [extract] table"),
        "stage order": ('[pipeline]\nstages=["index","generate"]\n[generate]\n[index]\ninputs=["x"]\n',
                        "order"),
        "not toml": ("[pipeline\n", "not valid TOML"),
    }
    for name, (text, needle) in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_pipeline(str(bad))
        assert str(bad) in str(e.value) and needle in str(e.value), name


def test_shipped_pipeline_files_parse(tmp_path):
    demo = load_pipeline(os.path.join(REPO, "pipelines", "demo.toml"))
    assert demo.pipeline.stages[0] == "scenes" and demo.extract.min_area_ratio == 0.05
    with pytest.raises(ConfigError, match="categories.json not found"):
        load_pipeline(os.path.join(REPO, "pipelines", "xpaste.toml"))
    with pytest.raises(ConfigError, match="lvis_v1_train.json not found"):
        load_pipeline(os.path.join(REPO, "pipelines", "lvis-backgrounds.toml"))
    # with its input in place the preset parses, and keeps the original recipe
    os.makedirs(tmp_path / "shards" / "lvis-train")
    (tmp_path / "shards" / "lvis-train" / "categories.json").write_text('{"categories": []}')
    cwd = os.getcwd()
    preset = os.path.join(REPO, "pipelines", "xpaste.toml")
    try:
        os.chdir(tmp_path)
        with pytest.raises(ConfigError, match="stable-diffusion-v1-5") as missing:  # never fetched
            load_pipeline(preset)
        assert "xpaste.toml.generate" in str(missing.value)
        cfg = load_pipeline(preset, check_models=False)
    finally:
        os.chdir(cwd)
    assert cfg.generate.prompt_template == "a photo of a single {name}"
    e = cfg.extract
    assert (e.mask_threshold, e.min_area_ratio, e.max_area_ratio) == (128, 0.05, 0.95)
    assert cfg.loader.paste == PasteConfig()  # the preset spells out the defaults: the recipe
    assert (cfg.extract.scorer, cfg.extract.clip.model, cfg.index.min_clip) == ("clip", "ViT-L-14", 21.0)
    d = cfg.generate.diffusers
    assert (cfg.generate.generator, d.steps, d.guidance, d.scheduler) == \
        ("diffusers", 50, 7.5, "dpm-solver-multistep")


def test_run_pipeline_from_the_command_line_resumes(tmp_path, capsys):
    toml = tmp_path / "p.toml"
    toml.write_text(textwrap.dedent(f"""
        [pipeline]
        stages = ["scenes", "pack_coco", "generate", "extract", "index"]
        [scenes]
        output = "{tmp_path}/scenes"
        num_categories = 3
        num_images = 6
        height = 64
        width = 96
        [pack_coco]
        output = "{tmp_path}/bg/bg-{{shard:04d}}.tar"
        workers = 1
        [generate]
        output = "{tmp_path}/img/gen-{{shard:04d}}.tar"
        num_categories = 3
        images_per_category = 4
        image_size = 96
        [extract]
        inputs = ["{tmp_path}/img/gen-*.tar"]
        output = "{tmp_path}/inst/inst-{{shard:04d}}.tar"
        [index]
        inputs = ["{tmp_path}/inst/inst-*.tar"]
        output = "{tmp_path}/bank"
        workers = 1
        [loader]
        backgrounds = ["{tmp_path}/bg/bg-*.tar"]
        bank = "{tmp_path}/bank"
        [loader.paste]
        output_size = 64
        [loader.batching]
        batch_size = 3
        num_threads = 1
    """))
    assert cli.main(["run", str(toml), "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["pack_coco"]["samples"] == 6 and first["generate"]["samples"] == 12
    assert first["index"]["instances"] == first["extract"]["samples"] > 0
    assert cli.main(["run", str(toml), "--quiet"]) == 0  # everything done: nothing rewritten
    second = json.loads(capsys.readouterr().out)
    assert second["generate"]["samples"] == 12 and second["scenes"]["resumed"]
    assert cli.main(["inspect", str(tmp_path / "bg" / "bg-*.tar")]) == 0
    assert "6 samples" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "bank")]) == 0
    assert "instances" in capsys.readouterr().out

    loader = loader_from_pipeline(str(toml))  # the pipeline's outputs feed the training loader
    batches = list(loader)
    assert [tuple(b.images.shape) for b in batches] == [(3, 3, 64, 64), (3, 3, 64, 64)]
    labels = {int(v) for b in batches for t in b.targets for v in t["labels"]}
    assert labels <= {1, 2, 3}


def test_inspect_reports_broken_samples_and_damaged_shards(tmp_path, capsys):
    generate(tmp_path / "img")
    first, second = shard_files(tmp_path / "img")[:2]
    writer = ShardWriter(str(tmp_path / "odd" / "odd-{shard:02d}.tar"))
    writer.resume()
    writer.add(0, {"__key__": "nojson", "jpg": b"x"})
    writer.add(1, {"__key__": "badjson", "jpg": b"x", "json": b"{nope"})
    writer.close()
    shutil.copy(second, tmp_path / "cut.tar")
    with open(tmp_path / "cut.tar", "r+b") as f:
        f.truncate(os.path.getsize(second) // 3)
    urls = [first, str(tmp_path / "odd" / "odd-00.tar"), str(tmp_path / "cut.tar"),
            str(tmp_path / "gone.tar")]
    assert cli.main(["inspect", "--json", *urls]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == [str(tmp_path / "gone.tar")]
    assert [d["shard"] for d in report["damaged"]] == [str(tmp_path / "cut.tar")]
    problems = {b["key"]: b["reason"] for b in report["broken"]}
    assert problems == {"nojson": "missing_component", "badjson": "unreadable_json"}
    assert report["schemas"] == {formats.IMAGE_SCHEMA: report["samples"] - 2}
    assert report["without_stats"] == [str(tmp_path / "cut.tar")]


def test_from_dict_checks_nested_types():
    with pytest.raises(ConfigError, match=r"extract\.inputs\[1\]"):
        from_dict(ExtractConfig, {"inputs": ["a", 3]}, "extract")


def test_inspect_reads_stats_finds_duplicates_and_speaks_json_for_every_kind(tmp_path, capsys):
    from xpaste_stream.bank import build_index

    writer = ShardWriter(str(tmp_path / "a" / "a-{shard:02d}.tar"), maxcount=2)
    writer.resume()
    rng = np.random.default_rng(0)
    make = lambda key: formats.instance_sample(  # noqa: E731
        key, rng.integers(0, 255, (6, 5, 3), np.uint8), rng.integers(0, 255, (6, 5), np.uint8),
        category_id=1, category="c", clip_score=None, source_key=key, generator="t", segmenter="t")
    writer.add(0, make("k0"))
    writer.fail(1, "empty_mask", "nothing there", source="gen-0.tar", key="g1")
    writer.add(2, make("k1"))
    writer.add(3, make("k0"))  # the same key again, in the next shard
    writer.close()
    paths = shard_files(tmp_path / "a")
    assert cli.main(["inspect", "--json", *paths]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["recorded_failures"] == {"empty_mask": 1}
    assert report["recorded_failed"][0]["key"] == "g1"
    assert [(d["key"], d["shard"]) for d in report["duplicates"]] == [("k0", paths[1])]
    assert report["broken"] == [] and report["damaged"] == []

    stats = json.loads(open(paths[0].replace(".tar", ".stats.json")).read())
    stats["count"] = 5
    open(paths[0].replace(".tar", ".stats.json"), "w").write(json.dumps(stats))
    assert cli.main(["inspect", "--json", paths[0]]) == 1
    assert json.loads(capsys.readouterr().out)["damaged"][0]["reason"] == "stats_mismatch"

    build_index(paths, str(tmp_path / "bank"), workers=1, progress=False)
    assert cli.main(["inspect", "--json", str(tmp_path / "bank")]) == 1
    bank = json.loads(capsys.readouterr().out)
    assert (bank["kind"], bank["indexed"], bank["ok"]) == ("bank", 3, False)
    # "k0" was cut from one source sample, and the bank holds it twice
    assert [(p["reason"], p["key"]) for p in bank["problems"]] == [("same_source_sample", "k0")]
    with open(paths[1], "ab") as f:
        f.write(bytes(512))
    assert cli.main(["inspect", "--json", str(tmp_path / "bank")]) == 1
    assert json.loads(capsys.readouterr().out)["problems"][0]["reason"] == "shard_changed"

    cats = {"schema": formats.CATEGORIES_SCHEMA, "dataset": "coco", "num_images": 3, "categories": [
        {"id": 1, "name": "a", "image_count": 1, "instance_count": 1, "scale_mean": 0.2,
         "scale_std": None, "repeat_factor": 1.0}]}
    (tmp_path / "categories.json").write_text(json.dumps(cats))
    assert cli.main(["inspect", "--json", str(tmp_path / "categories.json")]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "categories" and doc["problems"][0]["reason"] == "missing_scale"


def test_a_pipeline_stops_at_the_first_stage_its_error_policy_fails(tmp_path, capsys):
    writer = ShardWriter(str(tmp_path / "img" / "gen-{shard:04d}.tar"))
    writer.resume()
    good = np.full((48, 48, 3), 255, np.uint8)
    good[10:38, 12:36] = (200, 30, 30)
    for i, jpg in enumerate([formats.encode_jpeg(good)] * 3 + [b"\xff\xd8 not a jpeg"]):
        writer.add(i, formats.image_sample(f"k{i}", jpg, category_id=1, category="x", prompt="p",
                                           seed=0, generator="test", width=48, height=48))
    writer.close()
    toml = tmp_path / "p.toml"
    toml.write_text(textwrap.dedent(f"""
        [pipeline]
        stages = ["extract", "index"]
        errors = {{max_failed_fraction = 0.2}}
        [extract]
        inputs = ["{tmp_path}/img/gen-*.tar"]
        output = "{tmp_path}/inst/inst-{{shard:04d}}.tar"
        [index]
        inputs = ["{tmp_path}/inst/inst-*.tar"]
        output = "{tmp_path}/bank"
    """))
    assert cli.main(["run", str(toml), "--quiet"]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert results["failed"]["stage"] == "extract" and "index" not in results
    assert "1 of 4 inputs skipped (25 %), at most 20 % allowed" in captured.err and "k3" in captured.err
    assert not (tmp_path / "bank").exists()
    # the flag overrides the file; the rerun resumes extract and goes on to index
    assert cli.main(["run", str(toml), "--quiet", "--max-failed-fraction", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["index"]["instances"] == 3
