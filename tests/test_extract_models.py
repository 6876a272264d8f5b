"""Model-backed and plug-in segmenters, end to end through the command line, offline.

Every model is a tiny random-init transformers model built here, saved with save_pretrained to a
temporary folder and loaded back by path: the code path a user's local copy takes.
"""

from __future__ import annotations

import glob
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from xpaste_stream import formats, shards
from xpaste_stream.bank import InstanceBank
from xpaste_stream.cli import main
from xpaste_stream.extract.models import (
    ClipSegSegmenter,
    Sam3Segmenter,
    SamSegmenter,
    SemanticForegroundSegmenter,
    _load,
)
from xpaste_stream.extract.postprocess import clean_mask, tight_box
from xpaste_stream.extract.segmenters import PlainBackgroundSegmenter
from xpaste_stream.generate.procedural import draw_object, object_image, seed_for


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with one token per byte (no vocabulary file to download)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) for c in alphabet})
    vocab.update({c + "</w>": len(vocab) for c in alphabet})
    return CLIPTokenizer(vocab=vocab, merges=[])


TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def save_clipseg(folder: str) -> str:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    tok = tiny_tokenizer()
    cfg = CLIPSegConfig(text_config=dict(TEXT, vocab_size=len(tok)),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16, extract_layers=[1], reduce_dim=16,
                        decoder_num_attention_heads=2, decoder_intermediate_size=32)
    CLIPSegForImageSegmentation(cfg).save_pretrained(folder)
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}),
                     tokenizer=tok).save_pretrained(folder)
    return folder


def save_sam(folder: str, variant: str) -> str:
    import transformers as tf

    if variant == "sam2":
        backbone = tf.Sam2HieraDetConfig(
            hidden_size=16, num_attention_heads=1, image_size=[64, 64], blocks_per_stage=[1, 1, 2, 1],
            embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 1, 1],
            window_size_per_stage=[4, 4, 2, 2], global_attention_blocks=[3],
            window_positional_embedding_background_size=[2, 2])
        cfg = tf.Sam2Config(vision_config=dict(backbone_config=backbone, fpn_hidden_size=32,
                                               backbone_channel_list=[128, 64, 32, 16],
                                               backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]),
                            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16,
                                                       mask_input_channels=4),
                            mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                     iou_head_hidden_dim=16))
        tf.Sam2Model(cfg).save_pretrained(folder)
        processor = tf.Sam2Processor(image_processor=tf.Sam2ImageProcessor(
            size={"height": 64, "width": 64}, mask_size={"height": 16, "width": 16}), target_size=64)
    else:
        vision = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                      image_size=64, patch_size=8, mlp_dim=64, global_attn_indexes=[1], window_size=4,
                      num_pos_feats=8)
        parts = dict(vision_config=vision,
                     prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8,
                                                mask_input_channels=4),
                     mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                              mlp_dim=32, iou_head_hidden_dim=16, vit_dim=32))
        hq = variant == "sam_hq"
        model = (tf.SamHQModel(tf.SamHQConfig(**parts)) if hq else tf.SamModel(tf.SamConfig(**parts)))
        model.save_pretrained(folder)
        images = tf.SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                      mask_size={"longest_edge": 16},
                                      mask_pad_size={"height": 16, "width": 16})
        processor = (tf.SamHQProcessor if hq else tf.SamProcessor)(image_processor=images)
    processor.save_pretrained(folder)
    return folder


def save_sam3(folder: str) -> str:
    import transformers as tf

    tok = tiny_tokenizer()
    vit = tf.Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, window_size=2, global_attn_indexes=[1],
                           pretrain_image_size=28)
    small = dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = tf.Sam3Config(vision_config=dict(backbone_config=vit, fpn_hidden_size=32,
                                           backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]),
                        text_config=dict(TEXT, vocab_size=len(tok), projection_dim=32),
                        geometry_encoder_config=small, detr_encoder_config=small,
                        detr_decoder_config=dict(small, num_queries=8),
                        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2))
    tf.Sam3Model(cfg).save_pretrained(folder)
    tf.Sam3Processor(image_processor=tf.Sam3ImageProcessor(size={"height": 56, "width": 56}),
                     tokenizer=tok, target_size=56).save_pretrained(folder)
    return folder


def save_semantic(folder: str) -> str:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    labels = {0: "background", 1: "object"}
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                          num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
                          decoder_hidden_size=32, num_labels=2, id2label=labels,
                          label2id={v: k for k, v in labels.items()})
    SegformerForSemanticSegmentation(cfg).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


BUILDERS = {"clipseg": save_clipseg, "sam": lambda f: save_sam(f, "sam"),
            "sam_hq": lambda f: save_sam(f, "sam_hq"), "sam2": lambda f: save_sam(f, "sam2"),
            "sam3": save_sam3, "semantic-foreground": save_semantic}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    return {name: build(str(root / name)) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gen")
    assert main(["generate", "-o", str(folder / "gen-{shard:04d}.tar"), "--num-categories", "2",
                 "--images-per-category", "3", "--image-size", "64"]) == 0
    return str(folder / "gen-*.tar")


def _tars(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))


def metas(pattern: str) -> list[dict]:
    return [formats.read_instance_meta(s) for p in _tars(pattern) for s in shards.iter_tar(p)]


# segmenter name, model fixture key, extra CLI arguments
CASES = [("clipseg", "clipseg", []), ("sam", "sam", []), ("sam", "sam_hq", []),
         ("sam", "sam2", ["--option", "sam.prompt=clipseg"]), ("sam3", "sam3", []),
         ("semantic-foreground", "semantic-foreground", [])]


@pytest.mark.parametrize("name,model,extra", CASES, ids=[c[1] + "".join(c[2][1:]) for c in CASES])
def test_generate_extract_index_with_each_model_segmenter(name, model, extra, models, images, tmp_path):
    args = ["extract", images, "-o", str(tmp_path / "inst" / "inst-{shard:04d}.tar"),
            "--segmenters", name, "plain-background", "--model", f"{name}={models[model]}",
            "--device", "cpu", "--batch-size", "4", *extra]
    if "sam.prompt=clipseg" in extra:
        args += ["--option", f"sam.clipseg_model={json.dumps(models['clipseg'])}"]
    assert main(args) == 0
    found = metas(str(tmp_path / "inst" / "inst-*.tar"))
    stats = json.loads((tmp_path / "inst" / "inst-0000.stats.json").read_text())
    assert len(found) + sum(stats["failures"].values()) == 6 and found
    for meta in found:
        assert meta["selection"] == "segmenter-confidence"
        confidences = meta["candidate_confidences"]
        assert meta["segmenter"] in confidences and set(confidences) <= {name, "plain-background"}
        assert meta["confidence"] == max(confidences.values())
        assert all(0 <= c <= 1 for c in confidences.values())
    assert main(["index", str(tmp_path / "inst" / "inst-*.tar"), "-o", str(tmp_path / "bank"),
                 "--quiet", "--workers", "1"]) == 0
    assert InstanceBank.open(str(tmp_path / "bank")).num_instances == len(found)


def test_model_outputs_are_the_networks(models):
    """Each segmenter's mask and confidence are what its network computes, batched or not."""
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (48, 40, 3), np.uint8), rng.integers(0, 256, (32, 56, 3), np.uint8)]
    names = ["red_circle", "cup"]
    clipseg = ClipSegSegmenter(models["clipseg"], device="cpu")
    batched = clipseg.segment(imgs, names)
    single = [clipseg.segment([img], [n])[0] for img, n in zip(imgs, names, strict=True)]
    for a, b, img in zip(batched, single, imgs, strict=True):
        assert a.alpha.shape == img.shape[:2] and np.abs(a.alpha.astype(int) - b.alpha).max() <= 1
    assert sorted(clipseg._text) == ["cup", "red_circle"]  # one text embedding per category
    net, proc = _load("clipseg", models["clipseg"], "cpu", "float32", True)
    inputs = proc(text=["red circle"], images=[imgs[0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = net(**inputs).logits.reshape(1, 1, 32, 32)
    expected = torch.nn.functional.interpolate(logits.sigmoid(), size=(48, 40), mode="bilinear")[0, 0]
    assert np.abs(batched[0].alpha.astype(float) - expected.numpy() * 255).max() <= 1.0

    sam = SamSegmenter(models["sam"], device="cpu")
    prior = clean_mask(PlainBackgroundSegmenter()(imgs[0]))
    box = tight_box(prior) or (4.0, 4.8, 36.0, 43.2)
    assert sam.boxes(imgs[:1], names[:1]) == [[float(v) for v in box]]
    net, proc = _load("sam", models["sam"], "cpu", "float32", True)
    inputs = proc(images=[imgs[0]], input_boxes=[[list(map(float, box))]], return_tensors="pt")
    with torch.no_grad():
        iou = net(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                  multimask_output=True).iou_scores[0, 0]
    assert sam.segment(imgs[:1], names[:1])[0].confidence == pytest.approx(
        float(iou.max().clamp(0, 1)), abs=1e-5)

    sam3 = Sam3Segmenter(models["sam3"], device="cpu")
    result = sam3.segment(imgs, names)
    assert [r.alpha.shape for r in result] == [i.shape[:2] for i in imgs]
    net, proc = _load("sam3", models["sam3"], "cpu", "float32", True)
    with torch.no_grad():
        out = net(**proc(images=[imgs[1]], text=["cup"], return_tensors="pt"))
    best = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid()).max()
    assert result[1].confidence == pytest.approx(float(best), abs=1e-5)

    fg = SemanticForegroundSegmenter(models["semantic-foreground"], device="cpu")
    net, proc = _load("semantic-foreground", models["semantic-foreground"], "cpu", "float32", True)
    with torch.no_grad():
        probs = net(**proc(images=[imgs[1]], return_tensors="pt")).logits.softmax(dim=1)[:, 0:1]
    expected = 1 - torch.nn.functional.interpolate(probs, size=(32, 56), mode="bilinear")[0, 0]
    assert np.abs(fg.segment(imgs, names)[1].alpha.astype(float) - expected.numpy() * 255).max() <= 1.0


def test_missing_model_fails_before_any_work_naming_it(tmp_path, images, capsys, monkeypatch):
    out = tmp_path / "inst"
    absent = str(tmp_path / "no-such-sam")
    assert main(["extract", images, "-o", str(out / "i-{shard:04d}.tar"), "--segmenters", "sam",
                 "--model", f"sam={absent}"]) == 2
    err = capsys.readouterr().err
    assert "'sam'" in err and absent in err and not out.exists()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["extract", images, "-o", str(out / "i-{shard:04d}.tar"), "--segmenters",
                 "plain-background", "clipseg"]) == 2
    err = capsys.readouterr().err
    assert "CIDAS/clipseg-rd64-refined" in err and "not in the local Hugging Face cache" in err
    assert not out.exists()


PLUGIN = '''
import numpy as np
from xpaste_stream.extract.segmenters import SegmentResult


class CentreBox:
    """A test plug-in: the central box of every image, with a fixed confidence."""

    name = "centre-box"

    def __init__(self, margin=0.25, confidence=1.0):
        self.margin, self.confidence = margin, confidence

    def segment(self, images, categories):
        out = []
        for rgb in images:
            h, w = rgb.shape[:2]
            alpha = np.zeros((h, w), np.uint8)
            dy, dx = int(h * self.margin), int(w * self.margin)
            alpha[dy:h - dy, dx:w - dx] = 255
            out.append(SegmentResult(alpha, self.confidence))
        return out
'''


def test_plugin_segmenter_by_dotted_path_and_entry_point(tmp_path, images, monkeypatch):
    (tmp_path / "myplug.py").write_text(PLUGIN)
    dist = tmp_path / "myplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[xpaste_stream.segmenters]\nbox = myplug:CentreBox\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, extra, winner in (("myplug:CentreBox", [], "centre-box"),  # tie: listed first wins
                                ("box", ["--option", "box.confidence=0.5"], "plain-background")):
        out = tmp_path / spec.replace(":", "_")
        assert main(["extract", images, "-o", str(out / "i-{shard:04d}.tar"), "--segmenters", spec,
                     "plain-background", "--option", f"{spec}.margin=0.3", *extra]) == 0
        found = metas(str(out / "i-*.tar"))
        assert len(found) == 6 and {m["segmenter"] for m in found} == {winner}
        if winner == "centre-box":  # the plug-in's own mask: the central 40 % square of 64 px
            assert {(m["width"], m["height"]) for m in found} == {(26, 26)}
    assert main(["extract", images, "-o", str(tmp_path / "x" / "i-{shard:04d}.tar"),
                 "--segmenters", "myplug:Nope"]) == 2


def known_mask(category_id: int, index: int, seed: int, size: int) -> np.ndarray:
    """The shape the procedural generator drew (its own drawing steps, replayed)."""
    rng = seed_for(seed, category_id, index)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    radius = size * float(rng.uniform(0.18, 0.4))
    cx, cy = (size / 2 + rng.uniform(-0.1, 0.1, 2) * size).tolist()
    _, mask = draw_object(img, category_id, rng, cx, cy, radius)
    assert np.array_equal(np.asarray(img), object_image(category_id, index, seed, size))  # replay is exact
    return mask


def test_classical_default_matches_the_generated_shapes(tmp_path):
    size = 128
    assert main(["generate", "-o", str(tmp_path / "g-{shard:04d}.tar"), "--num-categories", "10",
                 "--images-per-category", "2", "--image-size", str(size)]) == 0
    assert main(["extract", str(tmp_path / "g-*.tar"), "-o", str(tmp_path / "i-{shard:04d}.tar")]) == 0
    ious = []
    for path in _tars(str(tmp_path / "i-*.tar")):
        for s in shards.iter_tar(path):
            meta = formats.read_instance_meta(s)
            category, index = (int(p[1:]) if p.startswith("c") else int(p) for p in s["__key__"].split("-"))
            truth = known_mask(category, index, 0, size)
            x, y, w, h = meta["source_box"]
            found = np.zeros((size, size), bool)
            found[y:y + h, x:x + w] = formats.decode_alpha(s["mask.lz4"], "mask.lz4", w, h) >= 128
            ious.append((found & truth).sum() / (found | truth).sum())
    assert len(ious) >= 16  # a few small shapes fall under the 5 % area rule
    assert min(ious) >= 0.9 and np.mean(ious) >= 0.95, sorted(ious)[:3]


def test_selection_rule_prefers_the_confident_segmenter_on_cluttered_images():
    """On a cluttered photo the classical default's confidence (border plainness) is low."""
    rng = np.random.default_rng(1)
    plain = np.full((64, 64, 3), 255, np.uint8)
    ImageDraw.Draw(pil := Image.fromarray(plain)).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    cluttered = rng.integers(0, 256, (64, 64, 3), np.uint8)
    results = PlainBackgroundSegmenter().segment([np.asarray(pil), cluttered], ["a", "b"])
    conf = [r.confidence for r in results]
    assert conf[0] == 1.0 and conf[1] < 0.5
