"""Training through the real loader on CPU: a tiny Mask R-CNN learns, a mid-epoch checkpoint
resumes with the same batches, pasted objects can be left out of a loss term, bad inputs
are refused before the first step."""

from __future__ import annotations

import os

import pytest
import torch
from test_loader_fixtures import (
    make_dataset,
    mismatched_bank_dataset,
)

from xpaste_stream.cli import main
from xpaste_stream.loader import LoaderError, PasteConfig
from xpaste_stream.train import (
    CheckpointError,
    LabelMap,
    ModelConfig,
    ModelError,
    TrainConfig,
    build_model,
    read_checkpoint,
    save_checkpoint,
    set_pasted_losses,
    train,
)

SIZE = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """10 backgrounds in 3 shards (categories 1-4), a bank of categories 1-3."""
    return make_dataset(str(tmp_path_factory.mktemp("train")))


def tiny(urls, bank, **kw) -> TrainConfig:
    settings = {"backgrounds": urls, "bank": bank, "paste": PasteConfig(output_size=SIZE, max_pastes=6),
                "model": ModelConfig(backbone="tiny", image_size=SIZE), "batch_size": 4,
                "lr": 0.02, "warmup_steps": 0, "loader_threads": 1, "loader_workers": 1, "log_every": 10,
                "seed": 1}
    return TrainConfig(**{**settings, **kw})


def run(cfg: TrainConfig):
    records = []
    result = train(cfg, on_step=records.append)
    return result, records


def test_tiny_maskrcnn_loss_decreases_through_the_loader(data):
    urls, bank = data
    result, records = run(tiny(*data, max_steps=20))
    assert result.steps == 20 and [r.step for r in records] == list(range(1, 21))
    first = sum(r.loss for r in records[:5]) / 5
    last = sum(r.loss for r in records[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(records[0].losses)
    seen = {i for r in records for i in r.image_ids}
    assert seen == set(range(10))  # several epochs: every background was used
    assert 0 < result.data_wait_fraction < 1 and result.images_per_s > 0


def test_resume_mid_epoch_continues_with_the_same_batches(data, tmp_path):
    """10 backgrounds, batch 4: an epoch is 3 steps; the checkpoint at step 2 is mid-epoch."""
    urls, bank = data
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    _, straight = run(tiny(urls, bank, max_steps=6, checkpoint_every=2, output_dir=out_a))
    mid = os.path.join(out_a, "checkpoint-00000002.pt")
    state = read_checkpoint(mid)
    assert state["step"] == 2 and state["epoch"] == 0 and state["loader"] is not None
    assert state["optimizer"] is not None and state["model"]
    result, resumed = run(tiny(urls, bank, max_steps=6, checkpoint_every=2, output_dir=out_b, resume=mid))
    assert [r.step for r in resumed] == [3, 4, 5, 6] and result.steps == 6
    expected = {r.step: r for r in straight}
    for r in resumed:
        assert r.image_ids == expected[r.step].image_ids
        assert r.plan_digest == expected[r.step].plan_digest
        assert r.epoch == expected[r.step].epoch
    # same weights, optimizer, RNG and batch: the first resumed step computes the same loss
    assert resumed[0].loss == pytest.approx(expected[3].loss, rel=1e-4)


def test_resume_auto_in_a_fresh_folder_starts_from_scratch(data, tmp_path):
    result, records = run(tiny(*data, max_steps=2, output_dir=str(tmp_path), resume="auto"))
    assert records[0].step == 1 and result.last_checkpoint.endswith("checkpoint-00000002.pt")
    assert os.path.isfile(os.path.join(tmp_path, "log.jsonl"))


def test_label_map_round_trip_and_unknown_ids():
    labels = LabelMap([1203, 1, 5])
    assert labels.num_classes == 4 and labels.category_ids == [1, 5, 1203]
    ids = torch.tensor([5, 1203, 1, 5])
    assert labels.to_labels(ids).tolist() == [2, 3, 1, 2]
    assert labels.to_category_ids(labels.to_labels(ids)).tolist() == ids.tolist()
    with pytest.raises(ModelError, match=r"category ids \[7, 2000\] are not among"):
        labels.to_labels(torch.tensor([1, 7, 2000]))


def synthetic_targets(source: list[int]) -> tuple[list[torch.Tensor], list[dict]]:
    """One 64 x 64 image with one square object per entry of `source`."""
    image = torch.rand(3, 64, 64)
    boxes, masks = [], []
    for i in range(len(source)):
        x0 = 4 + 28 * i
        m = torch.zeros(64, 64, dtype=torch.uint8)
        m[10:34, x0:x0 + 24] = 1
        masks.append(m)
        boxes.append([x0, 10, x0 + 24, 34])
    return [image], [{"boxes": torch.tensor(boxes, dtype=torch.float32),
                      "labels": torch.ones(len(source), dtype=torch.int64), "masks": torch.stack(masks),
                      "source": torch.tensor(source, dtype=torch.uint8)}]


def losses_of(model, source: list[int], box: bool, mask: bool) -> dict:
    set_pasted_losses(model, box=box, mask=mask)
    torch.manual_seed(0)  # the same image and proposal sampling in every call
    images, targets = synthetic_targets(source)
    return {k: float(v.detach()) for k, v in model(images, targets).items()}


def test_pasted_objects_left_out_of_box_and_mask_losses():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", image_size=64), 3).train()
    pasted_on = losses_of(model, [1, 1], box=True, mask=True)
    pasted_off = losses_of(model, [1, 1], box=False, mask=False)
    assert pasted_on["loss_mask"] > 0 and pasted_on["loss_box_reg"] > 0
    assert pasted_off["loss_mask"] == 0 and pasted_off["loss_box_reg"] == 0
    assert pasted_off["loss_classifier"] == pytest.approx(pasted_on["loss_classifier"])
    only_mask = losses_of(model, [1, 1], box=True, mask=False)
    assert only_mask["loss_box_reg"] == pytest.approx(pasted_on["loss_box_reg"])
    assert only_mask["loss_mask"] == 0
    # real objects are never affected by the switch
    real_on = losses_of(model, [0, 0], box=True, mask=True)
    real_off = losses_of(model, [0, 0], box=False, mask=False)
    assert real_off == pytest.approx(real_on)
    # mixed: only the pasted object's share goes
    mixed_off = losses_of(model, [0, 1], box=False, mask=False)
    mixed_on = losses_of(model, [0, 1], box=True, mask=True)
    assert 0 < mixed_off["loss_mask"] and 0 < mixed_off["loss_box_reg"] < mixed_on["loss_box_reg"]


def test_shard_urls_matching_nothing_refused(data, tmp_path):
    _, bank = data
    with pytest.raises(LoaderError, match="background shards not found"):
        train(tiny([str(tmp_path / "nowhere" / "bg-*.tar")], bank, max_steps=1))


def test_bank_for_other_categories_refused(tmp_path):
    urls, bank = mismatched_bank_dataset(str(tmp_path))
    with pytest.raises(LoaderError, match=r"categories that .* does not list \(7\)"):
        train(tiny(urls, bank, max_steps=1))


def test_checkpoint_of_another_model_refused_before_training(data, tmp_path):
    urls, bank = data
    other_categories = str(tmp_path / "other.pt")
    model = build_model(ModelConfig(backbone="tiny", image_size=SIZE), 9)
    save_checkpoint(other_categories, model=model, model_cfg=ModelConfig(backbone="tiny", image_size=SIZE),
                    labels=LabelMap(range(1, 9)), categories=[{"id": i} for i in range(1, 9)],
                    loader_state={"epoch": 0})
    steps = []
    with pytest.raises(CheckpointError, match="checkpoint of another model: trained for 8 categories"):
        train(tiny(urls, bank, max_steps=1, resume=other_categories), on_step=steps.append)
    other_backbone = str(tmp_path / "r18.pt")
    save_checkpoint(other_backbone, model=model, model_cfg=ModelConfig(backbone="resnet18", image_size=SIZE),
                    labels=LabelMap(range(1, 5)), categories=[{"id": i} for i in range(1, 5)],
                    loader_state={"epoch": 0})
    with pytest.raises(CheckpointError, match="backbone 'resnet18', this run builds 'tiny'"):
        train(tiny(urls, bank, max_steps=1, resume=other_backbone), on_step=steps.append)
    plain = str(tmp_path / "plain.pt")
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not an xpaste-stream training checkpoint"):
        train(tiny(urls, bank, max_steps=1, resume=plain), on_step=steps.append)
    assert steps == []


def test_pretrained_weights_of_another_model_refused(data, tmp_path):
    urls, bank = data
    weights = str(tmp_path / "tiny.pt")
    torch.save(build_model(ModelConfig(backbone="tiny", image_size=SIZE), 5).state_dict(), weights)
    resnet = ModelConfig(backbone="resnet18", image_size=SIZE, weights=weights)
    cfg = tiny(urls, bank, max_steps=1, model=resnet)
    with pytest.raises(ModelError, match=f"{weights}: weights of another model"):
        train(cfg)


def test_pretrained_detector_weights_for_other_classes_keep_the_rest(tmp_path):
    """COCO-style weights (91 classes) into a 5-class model: all but the class layers load."""
    from xpaste_stream.train.model import load_detector_weights

    cfg = ModelConfig(backbone="tiny", image_size=64)
    source = build_model(cfg, 91)
    path = str(tmp_path / "coco.pt")
    torch.save({"model": source.state_dict()}, path)
    target = build_model(cfg, 5)
    skipped = load_detector_weights(target, path)
    assert skipped and all(k.startswith("roi_heads.") and "predictor" in k for k in skipped)
    ours, theirs = target.state_dict(), source.state_dict()
    assert torch.equal(ours["backbone.0.weight"], theirs["backbone.0.weight"])
    assert ours["roi_heads.box_predictor.cls_score.weight"].shape[0] == 5


def test_train_command_reports_bad_input_in_one_line(data, tmp_path, capsys):
    _, bank = data
    code = main(["train", "--backgrounds", str(tmp_path / "none-*.tar"), "--bank", bank,
                 "--backbone", "tiny", "--size", "128", "--max-steps", "1",
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "xpaste-stream train: error: background shards not found" in err


def test_config_checks_size_and_resume():
    from xpaste_stream.config import ConfigError, check

    with pytest.raises(ConfigError, match="must equal paste.output_size"):
        check(TrainConfig(backgrounds=["x"], bank="b", paste=PasteConfig(output_size=256),
                          model=ModelConfig(image_size=128)), "train")
    with pytest.raises(ConfigError, match="needs an output_dir"):
        check(TrainConfig(backgrounds=["x"], bank="b", resume="auto"), "train")
