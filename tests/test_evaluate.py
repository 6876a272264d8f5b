"""`evaluate`: predictions of a checkpoint scored by LVISEval / COCOeval exactly as a direct
call scores them; ground-truth predictions score AP 1; shards give the same as json + folder."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from xpaste_stream.cli import main
from xpaste_stream.pack.coco import PackCocoConfig, load_dataset, run_pack_coco
from xpaste_stream.train import CheckpointError, LabelMap, ModelConfig, build_model, save_checkpoint
from xpaste_stream.train.evaluate import EvalConfig, EvalError, evaluate, format_table, lvis_numpy_compat

SIZE = 128


def tiny_checkpoint(path: str, categories: list[dict]) -> str:
    cfg = ModelConfig(backbone="tiny", image_size=SIZE)
    labels = LabelMap(c["id"] for c in categories)
    torch.manual_seed(0)
    return save_checkpoint(path, model=build_model(cfg, labels.num_classes), model_cfg=cfg, labels=labels,
                           categories=categories, step=7)


def categories_of(annotations: str) -> list[dict]:
    with open(annotations) as f:
        return json.load(f)["categories"]


def direct_lvis_eval(annotations: str, predictions: str) -> dict:
    from lvis import LVIS, LVISEval, LVISResults

    out = {}
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()), lvis_numpy_compat():  # lvis 0.5.3 vs numpy 2
            gt = LVIS(annotations)
            ev = LVISEval(gt, LVISResults(gt, predictions, max_dets=300), iou_type)
            ev.run()
        out[iou_type] = dict(ev.get_results())
    return out


def test_evaluate_command_equals_a_direct_lvis_eval(lvis_dataset, tmp_path, capsys):
    annotations, images = lvis_dataset
    ckpt = tiny_checkpoint(str(tmp_path / "tiny.pt"), categories_of(annotations))
    out = str(tmp_path / "eval")
    code = main(["evaluate", ckpt, "--annotations", annotations, "--images", images, "--output", out,
                 "--device", "cpu", "--score-thresh", "0"])
    printed = capsys.readouterr().out
    assert code == 0
    with open(f"{out}/results.json") as f:
        results = json.load(f)
    assert results["evaluator"] == "lvis" and results["step"] == 7 and results["images"] == 12
    assert results["detections"] > 12  # an untrained model, but plenty of scored boxes
    direct = direct_lvis_eval(annotations, f"{out}/predictions.json")
    for iou_type in ("bbox", "segm"):
        assert results["metrics"][iou_type] == pytest.approx(direct[iou_type], abs=0, rel=0)
        assert {"AP", "APr", "APc", "APf"} <= set(results["metrics"][iou_type])
    header = printed.splitlines()[1]
    assert all(c in header for c in ("AP", "APr", "APc", "APf")) and "bbox" in printed and "segm" in printed


class GroundTruthPredictor:
    """Returns each image's ground truth as a detector's output (contiguous labels)."""

    def __init__(self, annotations: str, labels: LabelMap):
        with contextlib.redirect_stdout(io.StringIO()):
            self.ds, self.lvis = load_dataset(annotations)
        self.labels = labels
        self.calls = 0

    def __call__(self, images, image_ids):
        self.calls += 1
        outputs = []
        for image, image_id in zip(images, image_ids, strict=True):
            doc = self.ds.dataset
            anns = [a for a in doc["annotations"] if a["image_id"] == image_id]
            to_mask = self.ds.ann_to_mask if self.lvis else self.ds.annToMask
            masks = np.stack([to_mask(a) for a in anns]) if anns else np.zeros((0, *image.shape[1:]))
            assert masks.shape[1:] == image.shape[1:]
            xywh = [a["bbox"] for a in anns]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in xywh]).view(-1, 4)
            outputs.append({"boxes": boxes, "scores": torch.ones(len(anns)),
                            "labels": self.labels.to_labels(torch.tensor([a["category_id"] for a in anns],
                                                                         dtype=torch.int64)),
                            "masks": torch.from_numpy(masks).float()[:, None]})
        return outputs


@pytest.mark.parametrize("kind", ["lvis", "coco"])
def test_ground_truth_as_predictions_scores_ap_one(kind, lvis_dataset, coco_dataset, tmp_path):
    """Category ids, box format and masks survive the trip model output -> results -> evaluator."""
    annotations, images = lvis_dataset if kind == "lvis" else coco_dataset
    # a category map with gaps and another order than the file's: ids must still come back right
    labels = LabelMap([c["id"] for c in categories_of(annotations)] + [500, 77])
    predictor = GroundTruthPredictor(annotations, labels)
    results = evaluate(EvalConfig(checkpoint="(ground truth)", annotations=annotations, images=images,
                                  output=str(tmp_path), batch_size=5), predictor=predictor, labels=labels)
    assert results["evaluator"] == kind and predictor.calls == 3  # 12 images in batches of 5
    for iou_type in ("bbox", "segm"):
        assert results["metrics"][iou_type]["AP"] == pytest.approx(1.0), (iou_type, results["metrics"])
    if kind == "lvis":
        assert results["metrics"]["segm"]["APf"] == pytest.approx(1.0)
    table = format_table(results["metrics"])
    assert "100.00" in table.splitlines()[1]


def test_evaluate_on_background_shards_equals_json_and_folder(lvis_dataset, tmp_path):
    annotations, images = lvis_dataset
    shards = str(tmp_path / "bg" / "bg-{shard:06d}.tar")
    run_pack_coco(PackCocoConfig(annotations=annotations, images=images, output=shards, maxcount=5,
                                 workers=1), progress=False)
    ckpt = tiny_checkpoint(str(tmp_path / "tiny.pt"), categories_of(annotations))
    common = {"checkpoint": ckpt, "device": "cpu", "score_threshold": 0.0}
    from_json = evaluate(EvalConfig(annotations=annotations, images=images, output=str(tmp_path / "a"),
                                    **common))
    from_shards = evaluate(EvalConfig(backgrounds=[str(tmp_path / "bg" / "bg-*.tar")],
                                      output=str(tmp_path / "b"), **common))
    assert from_shards["evaluator"] == "lvis" and from_shards["images"] == 12
    for iou_type in ("bbox", "segm"):
        assert from_shards["metrics"][iou_type] == pytest.approx(from_json["metrics"][iou_type])
    assert from_json["metrics"]["bbox"]["AP"] > 0  # not a comparison of zeros


def test_evaluate_refuses_bad_inputs(lvis_dataset, tmp_path, capsys):
    annotations, images = lvis_dataset
    few = tiny_checkpoint(str(tmp_path / "few.pt"), categories_of(annotations)[:3])
    with pytest.raises(EvalError, match="model trained for 3 categories; the evaluation data has 5 others"):
        evaluate(EvalConfig(checkpoint=few, annotations=annotations, images=images, output=str(tmp_path)))
    plain = str(tmp_path / "plain.pt")
    torch.save(build_model(ModelConfig(backbone="tiny", image_size=SIZE), 3).state_dict(), plain)
    with pytest.raises(CheckpointError, match="not an xpaste-stream training checkpoint"):
        evaluate(EvalConfig(checkpoint=plain, annotations=annotations, images=images, output=str(tmp_path)))
    code = main(["evaluate", plain, "--backgrounds", str(tmp_path / "none-*.tar"), "--output", str(tmp_path)])
    assert code == 2 and "background shards not found" in capsys.readouterr().err
