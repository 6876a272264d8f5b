"""Benchmark stage 1 text-to-image: the batched stage vs a naive one-image-at-a-time loop.

    python benchmarks/bench_generate.py [--images 8] [--batch-size 8] [--size N] [--steps N] [--quick]

Both sides use one StableDiffusionPipeline with the real SD 1.5 architectures (UNet, VAE, CLIP
ViT-L/14 text encoder; configs written below) and random weights: speed does not depend on the
weights, and nothing is downloaded. The tokenizer is a letter-level stand-in (CLIP's vocabulary
cannot be downloaded); prompts are padded to 77 tokens as with the real one, so the text encoder
does the same work. Equal settings on both sides: model, scheduler (DPM-Solver multistep),
steps, guidance, size, per-image seeds, JPEG encoding and shard writing.

- batched: `run_generate` (the stage) with a `DiffusersGenerator` around the pipeline;
- naive: a loop calling the pipeline with one prompt per call, then encoding and writing.

On a GPU: 512 px, 50 steps, fp16 (the recipe). On the CPU the defaults shrink size and steps so
the run ends in minutes on 2 cores; the settings in the result say what was measured. Writes
benchmarks/results/generate-<device>.json. `--quick`: the same path with tiny UNet / VAE / text
encoder configs, 2 images of 64 px, 2 steps, result in a temp file (checks the path only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import string
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xpaste_stream import formats  # noqa: E402
from xpaste_stream.generate import GenerateConfig, run_generate  # noqa: E402
from xpaste_stream.generate.base import WorkItem  # noqa: E402
from xpaste_stream.generate.text2image import DiffusersConfig, DiffusersGenerator, image_seed  # noqa: E402
from xpaste_stream.shards import ShardWriter  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5) component configs.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.18215)
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon")
# --quick: the same component classes, tiny
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                scaling_factor=0.18215)
TINY_TEXT = dict(CLIP_L14_TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, projection_dim=32)
NAMES = ["red_circle", "tennis_racket", "coffee_mug", "giraffe", "teapot", "bicycle", "umbrella",
         "toaster", "violin", "pineapple", "lamp", "kite"]


def build_pipeline(device: str, dtype: torch.dtype, workdir: str, tiny: bool = False):
    """SD 1.5 architectures with random weights; only the tokenizer is a stand-in."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + letters +
                                        [c + "</w>" for c in letters])}
    with open(os.path.join(workdir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(workdir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else CLIP_L14_TEXT)))
    return StableDiffusionPipeline(
        vae=vae.to(device, dtype), text_encoder=text_encoder.to(device, dtype),
        tokenizer=CLIPTokenizer.from_pretrained(workdir, model_max_length=77),
        unet=unet.to(device, dtype), scheduler=DPMSolverMultistepScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def naive_loop(pipe, cfg: GenerateConfig, items: list[tuple[int, str, int]]) -> None:
    """What one writes first: one prompt per pipeline call, encode, write."""
    d = cfg.diffusers
    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount)
    writer.resume()
    for position, (cat_id, name, index) in enumerate(items):
        prompt = cfg.prompt_template.format(name=name.replace("_", " "))
        g = torch.Generator("cpu").manual_seed(image_seed(cfg.seed, cat_id, index))
        image = pipe(prompt, num_inference_steps=d.steps, guidance_scale=d.guidance,
                     height=cfg.image_size, width=cfg.image_size, generator=g, output_type="np").images[0]
        rgb = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        writer.add(position, formats.image_sample(
            formats.image_key(cat_id, index), formats.encode_jpeg(rgb, cfg.jpeg_quality),
            category_id=cat_id, category=name, prompt=prompt, seed=cfg.seed, generator="diffusers",
            width=cfg.image_size, height=cfg.image_size))
    writer.close()


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32 if gpu else 8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=512 if gpu else 128)
    p.add_argument("--steps", type=int, default=50 if gpu else 4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/generate-DEVICE"
                                              ".json; --quick: a temp file)")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 images: checks the path only")
    args = p.parse_args()
    if args.quick:
        from quickmode import one_thread

        one_thread()
        args.images, args.batch_size, args.size, args.steps = 2, 2, 64, 2
    device = "cuda" if gpu else "cpu"
    dtype = torch.float16 if gpu else torch.float32
    if not gpu and not args.quick:
        torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipe = build_pipeline(device, dtype, tmp, tiny=args.quick)
        build_s = time.perf_counter() - t0
        # one image per category: every prompt differs, as in a real run
        names = [NAMES[i % len(NAMES)] + (f"_{i}" if i >= len(NAMES) else "") for i in range(args.images)]
        cats_file = os.path.join(tmp, "categories.json")
        with open(cats_file, "w") as f:
            json.dump({"categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}, f)
        cfg = GenerateConfig(
            output=os.path.join(tmp, "batched", "gen-{shard:06d}.tar"), generator="diffusers",
            categories=cats_file, images_per_category=1, image_size=args.size, maxcount=1000,
            diffusers=DiffusersConfig(model="random-init SD 1.5 architecture", steps=args.steps,
                                      guidance=args.guidance, batch_size=args.batch_size, device=device))
        gen = DiffusersGenerator(cfg.diffusers, cfg.seed, cfg.image_size, pipe=pipe)
        items = [(i + 1, n, 0) for i, n in enumerate(names)]

        # warm-up at both batch shapes (allocator, kernels, autotuning): not timed
        naive_loop(pipe, replace(cfg, output=os.path.join(tmp, "warm", "gen-{shard:06d}.tar")), items[:1])
        gen.generate([WorkItem(i, c, n, 0, n) for i, (c, n, _) in enumerate(items[:args.batch_size])])

        def timed(fn) -> float:
            if gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if gpu:
                torch.cuda.synchronize()
            return time.perf_counter() - t

        naive_s = timed(lambda: naive_loop(
            pipe, replace(cfg, output=os.path.join(tmp, "naive", "gen-{shard:06d}.tar")), items))
        batched_s = timed(lambda: run_generate(cfg, progress=False, generator=gen))

    naive_ips, batched_ips = args.images / naive_s, args.images / batched_s
    cpu = platform.processor() or platform.machine()
    device_name = torch.cuda.get_device_name(0) if gpu else f"cpu: {cpu}, {os.cpu_count()} cores"
    result = {
        "benchmark": "generate",
        "device": device_name,
        "settings": {
            "model": "tiny UNet / VAE / text encoder (--quick)" if args.quick else
                     "SD 1.5 architectures (UNet 860M, VAE, CLIP ViT-L/14 text), random weights",
            "tokenizer": "letter-level stand-in, prompts padded to 77 tokens",
            "scheduler": "DPMSolverMultistepScheduler", "steps": args.steps, "guidance": args.guidance,
            "size": args.size, "dtype": str(dtype).removeprefix("torch."), "images": args.images,
            "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # > cores: others competed
            "reduced": None if gpu else "CPU run: size and steps reduced from the recipe's 512 px / 50 "
                                        "steps so it finishes in minutes on 2 cores",
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "figures": {"naive_images_per_s": round(naive_ips, 4), "batched_images_per_s": round(batched_ips, 4),
                    "naive_seconds": round(naive_s, 2), "batched_seconds": round(batched_s, 2),
                    "pipeline_build_seconds": round(build_s, 1)},
        "target": {"batched_over_naive": 2.0},
        "ratio": round(batched_ips / naive_ips, 3),
    }
    path = args.out or (os.path.join(tempfile.gettempdir(), "generate-quick.json") if args.quick else
                        os.path.join(RESULTS, f"generate-{'gpu' if gpu else 'cpu'}.json"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
