"""Extraction throughput: batched (segment + CLIP score) vs a naive one-image-at-a-time loop.

    python benchmarks/bench_extract.py [--images N] [--batch-size B] [--device cpu|cuda] [--quick]

Two settings, each timed both ways on the same decoded samples (procedural images):
- `clip+clipseg`: segmenter CLIPSeg (rd64 architecture, ViT-B/16 at 352 px);
- `clip+clipseg+sam`: CLIPSeg and SAM (ViT-B image encoder at 1024 px, box prompt from the
  plain-background prior).
Every candidate mask is scored by CLIP ViT-L/14 and the best kept. All models are the real
architectures with random weights (speed does not depend on the weights; nothing is downloaded),
saved with save_pretrained and loaded back through the user path; fp16 on a GPU, float32 on CPU.
Batched = `extract_batch` over B images (one segmenter call and one CLIP forward per batch);
naive = `extract_one` per image. Shard reading and writing are left out of both.
Writes benchmarks/results/extract-<device>.json. `--quick`: the same path with tiny CLIP,
CLIPSeg and SAM configs on 2 images of 64 px, result in a temp file (checks the path only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import open_clip
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xpaste_stream.extract import ClipScorer, ExtractConfig, Rejected, extract_batch, extract_one  # noqa: E402
from xpaste_stream.extract.stage import make_segmenters  # noqa: E402
from xpaste_stream.generate import GenerateConfig, run_generate  # noqa: E402
from xpaste_stream.shards import iter_tar  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_samples(n: int, size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        per_category = 4
        cfg = GenerateConfig(output=os.path.join(tmp, "gen-{shard:04d}.tar"), maxcount=n,
                             num_categories=-(-n // per_category), images_per_category=per_category,
                             image_size=size)
        run_generate(cfg, progress=False)
        return [s for s in iter_tar(os.path.join(tmp, "gen-0000.tar"))][:n]


def byte_tokenizer():
    """A CLIP tokenizer with one token per byte: no vocabulary download; the model keeps CLIP's
    49408-entry embedding, so the text encoder's cost is the real one."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    vocab.update({c: i for i, c in enumerate(alphabet)})
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    return CLIPTokenizer(vocab=vocab, merges=[])


TINY_CLIP = "xpaste-bench-tiny-clip"  # --quick
TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                "patch_size": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                              "layers": 1}}


def tiny_model_configs(vocab_size: int = 49408) -> dict:
    """CLIPSeg and SAM configs of a few layers (--quick)."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, vocab_size=vocab_size)
    clipseg = dict(text_config=text,
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=32, patch_size=8),
                   projection_dim=16, extract_layers=[1], reduce_dim=16,
                   decoder_num_attention_heads=2, decoder_intermediate_size=32)
    vision = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                  image_size=64, patch_size=8, mlp_dim=64, global_attn_indexes=[1], window_size=4,
                  num_pos_feats=8)
    sam = dict(vision_config=vision,
               prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
               mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        mlp_dim=32, iou_head_hidden_dim=16, vit_dim=32))
    return {"clipseg": clipseg, "sam": sam}


def save_models(folder: str, tiny: bool = False) -> dict[str, str]:
    """CLIPSeg (rd64-refined architecture) and SAM ViT-B, random weights, as local folders
    (tiny: a few layers each, for --quick)."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    tiny_cfg = tiny_model_configs() if tiny else {"clipseg": {"reduce_dim": 64}, "sam": {}}
    side = 32 if tiny else 352
    clipseg = os.path.join(folder, "clipseg")
    CLIPSegForImageSegmentation(CLIPSegConfig(**tiny_cfg["clipseg"])).save_pretrained(clipseg)
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": side, "width": side}),
                     tokenizer=tokenizer).save_pretrained(clipseg)
    sam = os.path.join(folder, "sam")
    SamModel(SamConfig(**tiny_cfg["sam"])).save_pretrained(sam)
    images = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                               mask_size={"longest_edge": 16},
                               mask_pad_size={"height": 16, "width": 16}) if tiny else SamImageProcessor()
    SamProcessor(image_processor=images).save_pretrained(sam)
    return {"clipseg": clipseg, "sam": sam}


def timed(fn, gpu: bool) -> tuple[float, list]:
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(samples: list[dict], cfg: ExtractConfig, scorer: ClipScorer, gpu: bool) -> dict:
    segmenters = make_segmenters(cfg)
    extract_batch(samples[:2], segmenters, scorer, cfg)  # warm-up: kernels, text embeddings
    b = cfg.batch_size
    naive_s, naive = timed(lambda: [extract_one(s, segmenters, scorer, cfg) for s in samples], gpu)
    batched_s, batched = timed(lambda: [r for i in range(0, len(samples), b)
                                        for r in extract_batch(samples[i:i + b], segmenters, scorer, cfg)],
                               gpu)
    kept = [(a, c) for a, c in zip(naive, batched, strict=True) if not isinstance(a, Rejected)
            and not isinstance(c, Rejected)]
    gap = max((abs(json.loads(a["json"])["clip_score"] - json.loads(c["json"])["clip_score"])
               for a, c in kept), default=0.0)
    same = sum(json.loads(a["json"])["segmenter"] == json.loads(c["json"])["segmenter"] for a, c in kept)
    return {"segmenters": cfg.segmenters,
            "naive": {"seconds": round(naive_s, 3), "images_per_s": round(len(samples) / naive_s, 3)},
            "batched": {"seconds": round(batched_s, 3), "images_per_s": round(len(samples) / batched_s, 3)},
            "ratio": round(naive_s / batched_s, 3),
            "check": {"both_kept": len(kept), "same_winner": same, "of": len(samples),
                      "max_score_difference": round(gap, 4)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=None, help="default 2 on CPU, 256 on GPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default 2 on CPU, 32 on GPU")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--model", default="ViT-L-14")
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/extract-DEVICE"
                                               ".json; --quick: a temp file)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 images: checks the path only")
    args = ap.parse_args()
    if args.quick:
        from quickmode import one_thread

        one_thread()
        args.images, args.batch_size, args.image_size, args.model = 2, 2, 64, TINY_CLIP
        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = os.path.join(tmp, f"{TINY_CLIP}.json")
            with open(cfg_path, "w") as f:
                json.dump(TINY_CLIP_CFG, f)
            open_clip.add_model_config(cfg_path)
    gpu = args.device.startswith("cuda")
    images = args.images or (256 if gpu else 2)
    batch_size = args.batch_size or (32 if gpu else 2)
    samples = make_samples(images, args.image_size)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
    scorer = ClipScorer(model, preprocess, open_clip.get_tokenizer(args.model), device=args.device,
                        fp16=gpu)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_models(tmp, tiny=args.quick)
        options = {"clipseg": {"model": paths["clipseg"]}, "sam": {"model": paths["sam"]}}
        for label, names in (("clip+clipseg", ["clipseg"]), ("clip+clipseg+sam", ["clipseg", "sam"])):
            cfg = ExtractConfig(inputs=["in-memory"], segmenters=names, scorer="clip",
                                batch_size=batch_size, device=args.device,
                                segmenter_options={n: options[n] for n in names},
                                min_area_ratio=0.0, max_area_ratio=1.0)  # random weights: keep all
            runs[label] = measure(samples, cfg, scorer, gpu)
            print(label, json.dumps(runs[label]), flush=True)
    device = torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})"
    result = {
        "benchmark": "extract: batched vs naive one-image-at-a-time",
        "device": device,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"images": len(samples), "image_size": args.image_size, "batch_size": batch_size,
                     "masks_per_image": "one per segmenter, all CLIP-scored",
                     "order": "per setting: warm-up, then naive, then batched",
                     "clip_model": f"{args.model} (open_clip, real architecture, random weights)",
                     "clipseg": "CLIPSegConfig(reduce_dim=64): rd64 architecture, random weights, 352 px",
                     "sam": "SamConfig(): ViT-B image encoder, 1024 px, random weights",
                     "area_rule": "off (random weights make arbitrary masks)",
                     "precision": "fp16" if gpu else "fp32", "torch_threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "io": "excluded (samples decoded from memory)"},
        "runs": runs,
    }
    path = args.out or (os.path.join(tempfile.gettempdir(), "extract-quick.json") if args.quick else
                        os.path.join(RESULTS, f"extract-{'gpu' if gpu else 'cpu'}.json"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
