"""Stage 1 generators beyond the procedural default: diffusers text-to-image and folder ingest.

The diffusers tests run a real StableDiffusionPipeline built in-process from tiny random-init
models (UNet, VAE, CLIP text encoder, a CLIP tokenizer from a hand-written vocabulary) and saved
to a folder: nothing is downloaded, and the stage loads it exactly as it would load SD 1.5.
"""

from __future__ import annotations

import io
import json
import os
import string
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import shard_files
from PIL import Image

from xpaste_stream import formats
from xpaste_stream.config import ConfigError
from xpaste_stream.generate import GenerateConfig, run_generate
from xpaste_stream.generate.folder import FolderConfig
from xpaste_stream.generate.text2image import (
    DiffusersConfig,
    DiffusersGenerator,
    ModelLoadError,
    image_seed,
)
from xpaste_stream.shards import iter_tar, read_stats, stats_path

SIZE = 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A Stable Diffusion pipeline with SD's layout (VAE factor 8, cross-attention UNet), tiny."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    letters = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + letters +
                                        [c + "</w>" for c in letters])}
    (root / "tok").mkdir()
    (root / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token a letter
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tok"), model_max_length=48)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(vocab), max_position_embeddings=48, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(root / "model"))
    return str(root / "model")


def diffusers_config(out, model: str, batch_size: int = 3, **kw) -> GenerateConfig:
    return GenerateConfig(output=str(out / "gen-{shard:04d}.tar"), generator="diffusers",
                          num_categories=3, images_per_category=2, image_size=SIZE, maxcount=2,
                          diffusers=DiffusersConfig(model=model, steps=3, batch_size=batch_size,
                                                    device="cpu"), **kw)


def read_all(folder) -> list[tuple[dict, np.ndarray]]:
    samples = [s for u in shard_files(folder) for s in iter_tar(u)]
    return [(formats.read_image_meta(s), np.asarray(Image.open(io.BytesIO(s["jpg"])))) for s in samples]


def assert_same_images(a, b) -> None:
    """Same metadata, same pixels up to float rounding.

    Batched and one-at-a-time runs start from identical noise, but CPU matmul kernels may sum in
    a different order for a different batch size (differences ~1e-6 in [0, 1]); after rounding
    to uint8 and JPEG that can move a few pixels by a level or two, never more.
    """
    assert [m for m, _ in a] == [m for m, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        diff = np.abs(x.astype(int) - y.astype(int))
        assert diff.max() <= 3 and diff.mean() < 0.05


def test_diffusers_shards_carry_the_recipe(tmp_path, tiny_model):
    summary = run_generate(diffusers_config(tmp_path, tiny_model), progress=False)
    assert summary["samples"] == 6 and summary["shards"] == 3 and summary["generator"] == "diffusers"
    got = read_all(tmp_path)
    metas = [m for m, _ in got]
    assert [(m["category_id"], formats.image_key(m["category_id"], i % 2)) for i, m in enumerate(metas)] \
        == [(c, f"c{c:05d}-{i:07d}") for c in (1, 2, 3) for i in (0, 1)]
    m = metas[2]
    assert m["prompt"] == "a photo of a single green square" and m["generator"] == "diffusers"
    assert (m["model"], m["scheduler"], m["steps"], m["guidance"], m["dtype"]) == \
        (tiny_model, "DPMSolverMultistepScheduler", 3, 7.5, "float32")
    assert m["seed"] == 0 and m["image_seed"] == image_seed(0, 2, 0)
    assert (m["width"], m["height"]) == (SIZE, SIZE) and got[2][1].shape == (SIZE, SIZE, 3)
    # different seeds give different images
    assert np.abs(got[0][1].astype(int) - got[1][1].astype(int)).mean() > 1


def test_diffusers_images_do_not_depend_on_batch_size_or_resume(tmp_path, tiny_model):
    run_generate(diffusers_config(tmp_path / "b3", tiny_model, batch_size=3), progress=False)
    run_generate(diffusers_config(tmp_path / "b1", tiny_model, batch_size=1), progress=False)
    reference = read_all(tmp_path / "b3")
    assert_same_images(reference, read_all(tmp_path / "b1"))

    # a run killed before its last shard finished: that shard's stats are missing
    first, last = shard_files(tmp_path / "b1")[0], shard_files(tmp_path / "b1")[-1]
    before = os.stat(first).st_mtime_ns
    os.remove(stats_path(last))
    summary = run_generate(diffusers_config(tmp_path / "b1", tiny_model, batch_size=2), progress=False)
    assert summary["samples"] == 6 and os.stat(first).st_mtime_ns == before
    assert read_stats(last)["input_start"] == 4  # category 3 restarted at its first image
    assert_same_images(reference, read_all(tmp_path / "b1"))

    # a finished run does not even load the model (its folder is away meanwhile)
    os.rename(tiny_model, tiny_model + ".away")
    try:
        assert run_generate(diffusers_config(tmp_path / "b1", tiny_model), progress=False)["samples"] == 6
    finally:
        os.rename(tiny_model + ".away", tiny_model)


def test_missing_model_fails_naming_it_and_how_to_get_it(tmp_path):
    cfg = diffusers_config(tmp_path, "some-org/not-downloaded-model")
    with pytest.raises(ModelLoadError, match="not in the local cache") as e:
        run_generate(cfg, progress=False)
    assert "'some-org/not-downloaded-model'" in str(e.value) and "hf download" in str(e.value)
    with pytest.raises(ModelLoadError, match="no-such-folder.*not found"):
        run_generate(diffusers_config(tmp_path, str(tmp_path / "no-such-folder")), progress=False)
    assert not shard_files(tmp_path)


def test_non_finite_outputs_are_counted_not_written(tmp_path, tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    cfg = diffusers_config(tmp_path, tiny_model)
    gen = DiffusersGenerator(cfg.diffusers, cfg.seed, cfg.image_size, pipe=pipe)
    summary = run_generate(cfg, progress=False, generator=gen)
    assert summary["samples"] == 0 and summary["failures"] == {"nan_output": 6}
    stats = json.loads(open(stats_path(str(tmp_path / "gen-0000.tar"))).read())
    assert stats["failed_samples"][0]["detail"].startswith("red_circle #0 (image_seed")


def test_folder_ingest(tmp_path):
    root = tmp_path / "crawl"
    for d in ("red_circle", "Green Square", "unknown_thing"):
        (root / d).mkdir(parents=True)
    rgba = np.zeros((80, 40, 4), np.uint8)
    rgba[20:60, 10:30] = (200, 30, 30, 255)  # an opaque object on a transparent background
    Image.fromarray(rgba).save(root / "red_circle" / "a.png")
    Image.new("RGB", (50, 30), (10, 200, 10)).save(root / "red_circle" / "b.jpg")
    (root / "red_circle" / "c.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "red_circle" / "notes.txt").write_text("not an image")
    Image.new("RGB", (200, 100), (0, 0, 255)).save(root / "Green Square" / "x.webp")
    Image.new("RGB", (8, 8)).save(root / "unknown_thing" / "z.jpg")

    cfg = GenerateConfig(output=str(tmp_path / "out" / "gen-{shard:04d}.tar"), generator="folder",
                         num_categories=3, images_per_category=10, image_size=SIZE, maxcount=100,
                         folder=FolderConfig(root=str(root)))
    with pytest.warns(UserWarning, match="unknown_thing"):
        summary = run_generate(cfg, progress=False)
    assert summary["samples"] == 3 and summary["failures"] == {"unreadable_image": 1}
    assert summary["unknown_folders"] == ["unknown_thing"] and summary["categories_without_images"] == 1
    stats = read_stats(shard_files(tmp_path / "out")[0])
    assert stats["failed_samples"][0]["detail"].startswith(str(root / "red_circle" / "c.jpg"))

    got = read_all(tmp_path / "out")
    metas = [m for m, _ in got]
    assert [os.path.basename(m["source"]) for m in metas] == ["a.png", "b.jpg", "x.webp"]
    assert {m["generator"] for m in metas} == {"folder"} and metas[2]["category"] == "green_square"
    assert [(m["width"], m["height"]) for m in metas] == [(32, 64), (50, 30), (64, 32)]
    alpha_png = got[0][1]
    assert alpha_png.shape == (64, 32, 3) and alpha_png[2, 2].min() > 240  # transparent -> white
    assert alpha_png[32, 16, 0] > 150 and alpha_png[32, 16, 1] < 80

    # images_per_category caps each category, in sorted file order
    capped = replace(cfg, output=str(tmp_path / "cap" / "gen-{shard:04d}.tar"), images_per_category=1)
    with pytest.warns(UserWarning):
        assert run_generate(capped, progress=False)["samples"] == 2
    assert [os.path.basename(m["source"]) for m, _ in read_all(tmp_path / "cap")] == ["a.png", "x.webp"]


def test_model_check_before_any_work(tmp_path, tiny_model):
    diffusers_config(tmp_path, tiny_model).check_models()  # a saved folder passes
    with pytest.raises(ConfigError, match="no model_index.json"):
        diffusers_config(tmp_path, str(tmp_path)).check_models()
    with pytest.raises(ConfigError, match="not in the local cache"):
        diffusers_config(tmp_path, "some-org/not-downloaded-model").check_models()
    assert not shard_files(tmp_path)
