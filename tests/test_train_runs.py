"""Training runs that lose nothing and say what they do (issue 17, issue 16 item 11): a signal
saves a checkpoint first, a used output folder is refused, a resume says where it resumed and
log.jsonl keeps each step once, progress lines come by time; evaluation is exact with tied and
near-tied scores (issue 16 item 5)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_loader_fixtures import make_dataset

from xpaste_stream.cli import main
from xpaste_stream.loader import PasteConfig
from xpaste_stream.train import LabelMap, ModelConfig, TrainConfig, read_checkpoint, train
from xpaste_stream.train.evaluate import EvalConfig, evaluate, lvis_numpy_compat
from xpaste_stream.train.loop import TrainError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("runs")))


def tiny(urls, bank, **kw) -> TrainConfig:
    settings = {"backgrounds": urls, "bank": bank, "paste": PasteConfig(output_size=SIZE, max_pastes=4),
                "model": ModelConfig(backbone="tiny", image_size=SIZE), "batch_size": 2,
                "warmup_steps": 0, "loader_threads": 1, "loader_workers": 1, "log_every": 1,
                "seed": 1}
    return TrainConfig(**{**settings, **kw})


def train_argv(urls, bank, out, *extra) -> list[str]:
    return ["train", "--backgrounds", *urls, "--bank", bank, "--backbone", "tiny", "--size", str(SIZE),
            "--batch-size", "2", "--workers", "1", "--threads", "1", "--warmup", "0",
            "--output", str(out), *extra]


def logged_steps(out) -> list[int]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_before_training_stops(data, tmp_path, signum):
    urls, bank = data
    out = tmp_path / "out"
    argv = train_argv(urls, bank, out, "--max-steps", "100000", "--checkpoint-every", "100000",
                      "--log-every", "1")
    proc = subprocess.Popen([sys.executable, "-m", "xpaste_stream.cli", *argv], cwd=str(tmp_path),
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "log.jsonl").exists() and len(logged_steps(out)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 128 + signum, err
    saved = read_checkpoint(str(out / "last_checkpoint").replace("last_checkpoint", open(
        out / "last_checkpoint").read().strip()))
    assert saved["step"] >= 3 and saved["loader"] is not None
    assert f"at step {saved['step']}: checkpoint" in err and "--resume auto" in err
    assert "Traceback" not in err


def test_a_used_output_folder_is_refused_unless_resumed_or_overwritten(data, tmp_path, capsys):
    urls, bank = data
    out = tmp_path / "out"
    assert main(train_argv(urls, bank, out, "--max-steps", "1")) == 0
    before = sorted(os.listdir(out))
    assert main(train_argv(urls, bank, out, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume auto" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == before  # nothing written beside the old run
    assert main(train_argv(urls, bank, out, "--max-steps", "2", "--overwrite", "--log-every", "1")) == 0
    assert logged_steps(out) == [1, 2]
    assert main(["train", "--backgrounds", *urls, "--bank", bank, "--backbone", "tiny"]) == 2
    assert "--output FOLDER is required" in capsys.readouterr().err


def test_a_resume_says_where_and_the_log_holds_each_step_once(data, tmp_path, capsys):
    urls, bank = data
    out = str(tmp_path / "out")
    train(tiny(urls, bank, max_steps=5, checkpoint_every=2, output_dir=out))
    assert logged_steps(out) == [1, 2, 3, 4, 5]
    capsys.readouterr()
    train(tiny(urls, bank, max_steps=6, output_dir=out, resume=os.path.join(out, "checkpoint-00000002.pt")))
    err = capsys.readouterr().err
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # steps 3-5 logged once (issue 16 item 11)
    assert "resumed from step 2" in err


def test_a_resume_with_another_size_names_the_size(data, tmp_path):
    urls, bank = data
    out = str(tmp_path / "out")
    train(tiny(urls, bank, max_steps=1, output_dir=out))
    with pytest.raises(TrainError, match=f"trained at --size {SIZE}; this run asks for --size 96"):
        train(tiny(urls, bank, max_steps=2, output_dir=out, resume="auto",
                   paste=PasteConfig(output_size=96, max_pastes=4),
                   model=ModelConfig(backbone="tiny", image_size=96)))


def test_progress_lines_come_by_time(data, tmp_path, capsys):
    urls, bank = data
    train(tiny(urls, bank, max_steps=40, log_every=1000, progress_every=0.05))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: step")]
    assert lines, "no progress line"
    done = [line for line in lines if "loss" in line]
    assert done and "/40, loss " in done[-1] and " images/s, ETA " in done[-1]
    assert "0.0 images/s" not in done[-1]


def test_instance_shards_as_backgrounds_are_named_as_such(data, tmp_path):
    from xpaste_stream import formats
    from xpaste_stream.shards import ShardWriter

    writer = ShardWriter(str(tmp_path / "inst-{shard:02d}.tar"))
    writer.resume()
    rng = np.random.default_rng(0)
    writer.add(0, formats.instance_sample("k", rng.integers(0, 255, (6, 5, 3), np.uint8),
                                          rng.integers(0, 255, (6, 5), np.uint8), category_id=1,
                                          category="c", clip_score=None, source_key="g", generator="t",
                                          segmenter="t"))
    writer.close()
    with pytest.raises(TrainError, match="these are instance shards") as e:
        train(tiny([str(tmp_path / "inst-00.tar")], data[1], max_steps=1))
    assert "pack-coco" not in str(e.value).split("not background shards")[0]


def test_backbone_weights_with_the_tiny_backbone_are_refused(data, tmp_path, capsys):
    urls, bank = data
    torch.save({}, tmp_path / "w.pt")
    assert main(train_argv(urls, bank, tmp_path / "out", "--max-steps", "1",
                           "--backbone-weights", str(tmp_path / "w.pt"))) == 2
    assert "backbone 'tiny', which has no pretrained form" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- evaluation with tied and near-tied scores ---------------------------------------------------


def tie_dataset(folder) -> tuple[str, str]:
    """Four images, one object of category 1 each; LVIS fields so both evaluators read it."""
    os.makedirs(f"{folder}/images", exist_ok=True)
    images, annotations = [], []
    for i in range(1, 5):
        Image.new("RGB", (64, 64), (i * 40, 90, 90)).save(f"{folder}/images/{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64,
                       "neg_category_ids": [], "not_exhaustive_category_ids": []})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20],
                            "area": 400, "iscrowd": 0,
                            "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]})
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": 1, "name": "a", "frequency": "f", "image_count": 4,
                           "instance_count": 4, "synonyms": ["a"]}]}
    with open(f"{folder}/gt.json", "w") as f:
        json.dump(doc, f)
    return f"{folder}/gt.json", f"{folder}/images"


# per image: (score of a false positive far from the object, score of the true positive);
# the false positives of images 1-2 outrank the true positives of images 3-4 by less than 1e-5
SCORES = {1: (0.6000004, 0.3), 2: (0.5000004, 0.4), 3: (0.2, 0.6000009), 4: (0.1, 0.5000009)}


class TiePredictor:
    def __call__(self, images, image_ids):
        out = []
        for image_id in image_ids:
            fp, tp = SCORES[image_id]
            masks = torch.zeros(2, 1, 64, 64)
            masks[0, 0, 40:60, 40:60] = 1
            masks[1, 0, 10:30, 10:30] = 1
            out.append({"boxes": torch.tensor([[40.0, 40.0, 60.0, 60.0], [10.0, 10.0, 30.0, 30.0]]),
                        "scores": torch.tensor([fp, tp], dtype=torch.float64),
                        "labels": torch.tensor([1, 1]), "masks": masks})
        return out


def direct(kind: str, gt_path: str, predictions: list[dict]) -> dict:
    out = {}
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            if kind == "lvis":
                from lvis import LVIS, LVISEval, LVISResults

                with lvis_numpy_compat():
                    gt = LVIS(gt_path)
                    ev = LVISEval(gt, LVISResults(gt, copy.deepcopy(predictions), max_dets=300), iou_type)
                    ev.run()
                out[iou_type] = {k: float(v) for k, v in ev.get_results().items()}
            else:
                from pycocotools.coco import COCO
                from pycocotools.cocoeval import COCOeval

                gt = COCO(gt_path)
                ev = COCOeval(gt, gt.loadRes(copy.deepcopy(predictions)), iou_type)
                ev.params.maxDets = [1, 10, 100]
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                out[iou_type] = {"AP": float(ev.stats[0])}
    return out


def direct_predictions() -> list[dict]:
    """The predictor's detections as result entries, built here (not by the code under test):
    scores exactly as the model gives them (float32), xywh boxes, RLE masks."""
    from pycocotools import mask as mask_utils

    out = []
    for image_id, o in zip([1, 2, 3, 4], TiePredictor()(None, [1, 2, 3, 4]), strict=True):
        for box, score, mask in zip(o["boxes"].tolist(), o["scores"].float().tolist(), o["masks"],
                                    strict=True):
            rle = mask_utils.encode(np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8)))
            out.append({"image_id": image_id, "category_id": 1, "score": score,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}})
    return out


@pytest.mark.parametrize("kind", ["lvis", "coco"])
def test_evaluation_with_near_tied_scores_equals_the_evaluator_called_directly(kind, tmp_path):
    gt_path, images = tie_dataset(str(tmp_path))
    results = evaluate(EvalConfig(checkpoint="(ties)", annotations=gt_path, images=images,
                                  output=str(tmp_path / "eval"), evaluator=kind, batch_size=2),
                       predictor=TiePredictor(), labels=LabelMap([1]))
    expected = direct(kind, gt_path, direct_predictions())
    for iou_type in ("bbox", "segm"):
        got = results["metrics"][iou_type]
        assert got["AP"] == pytest.approx(expected[iou_type]["AP"], abs=1e-12), (iou_type, got)


def test_shards_packed_from_coco_are_scored_by_cocoeval(coco_dataset, tmp_path, capsys):
    """The evaluator follows the ground truth's format, not how it was passed: COCO packed
    into shards (whose categories get r/c/f groups from image counts) is still COCO."""
    from test_evaluate import categories_of, tiny_checkpoint

    from xpaste_stream.pack.coco import PackCocoConfig, run_pack_coco

    annotations, images = coco_dataset
    run_pack_coco(PackCocoConfig(annotations=annotations, images=images, workers=1,
                                 output=str(tmp_path / "bg" / "bg-{shard:06d}.tar")), progress=False)
    ckpt = tiny_checkpoint(str(tmp_path / "tiny.pt"), categories_of(annotations))
    common = {"checkpoint": ckpt, "device": "cpu", "score_threshold": 0.0, "max_images": 4}
    from_json = evaluate(EvalConfig(annotations=annotations, images=images, output=str(tmp_path / "a"),
                                    **common))
    from_shards = evaluate(EvalConfig(backgrounds=[str(tmp_path / "bg" / "bg-*.tar")],
                                      output=str(tmp_path / "b"), **common))
    assert from_json["evaluator"] == from_shards["evaluator"] == "coco"
    assert from_shards["metrics"]["bbox"]["AP"] == pytest.approx(from_json["metrics"]["bbox"]["AP"])
    forced = evaluate(EvalConfig(backgrounds=[str(tmp_path / "bg" / "bg-*.tar")], evaluator="lvis",
                                 output=str(tmp_path / "c"), **common))
    assert forced["evaluator"] == "lvis"
