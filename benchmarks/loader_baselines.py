"""Copy-paste baselines the loader is measured against (benchmarks only, never used in training).

- `PerImageCopyPaste`: the original X-Paste way, one image at a time on the CPU as in its
  detectron2 dataset mapper: OpenCV decode, LSJ, and for every pasted instance full-canvas
  arrays (image and mask), with every earlier object's mask updated and its box recomputed.
- `BatchTorchCopyPaste`: a batch-level torch version: per-image decode and resize, then one
  batched "over" blend and the same batched target update as the loader.
Both execute the loader's own plans (`planned_work`: the sample function's plans, with the
backgrounds' masks decoded at full resolution from their RLE, as the original holds them), so
the work per image is equal.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from xpaste_stream import formats
from xpaste_stream.loader.config import PasteConfig
from xpaste_stream.loader.sample import plan_from_rows
from xpaste_stream.loader.targets import build_targets, extents_of, id_map, lsj_masks


class Background:
    """A background as the original's mapper holds it: bytes, full-resolution masks, labels."""

    def __init__(self, data: bytes, masks: np.ndarray, labels: np.ndarray):
        self.data, self.masks, self.labels = np.frombuffer(data, np.uint8), masks, labels


def alpha_of(payload: dict, width: int, height: int) -> np.ndarray:
    component, data = formats.instance_mask(payload)
    return formats.decode_alpha(data, component, width, height)


def planned_work(loader, batches: int) -> list:
    """[(backgrounds, plan, payloads per image in slot order)] of the loader's first `batches`
    batches of epoch 0 (rank 0 of one), drawn by its sample function."""
    source, files, b = loader.source, loader.source.files, loader.config.batch_size
    out = []
    for g in range(batches):
        cols = [source.sample(0, g * b + i) for i in range(b)]
        plan = plan_from_rows(np.stack([c["plan_row"] for c in cols]), loader.paste.slots)
        backgrounds, payloads = [], []
        for i, c in enumerate(cols):
            index = int(c["plan_row"][9])
            sample = {"__key__": loader.index.key[index], "json": files.read(loader.index, index, "json"),
                      "ann.zst": files.read(loader.index, index, "ann.zst")}
            meta, anns = formats.read_background(sample)
            if loader.paste.drop_crowd:
                anns = [a for a in anns if not a.get("iscrowd")]
            masks = formats.decode_masks(anns, meta["height"], meta["width"])
            backgrounds.append(Background(files.read(loader.index, index, "image"), masks,
                                          np.asarray([a["category_id"] for a in anns], np.int64)))
            ids = plan.ids[i][plan.ids[i] >= 0]
            payloads.append([{**loader.bank.read(int(iid)), "size": loader.bank.sizes_of([iid])}
                             for iid in ids])
        out.append((backgrounds, plan, payloads))
    return out


class PerImageCopyPaste:
    """Original-style per-image copy-paste; returns (image, masks, boxes, labels)."""

    def __init__(self, paste: PasteConfig):
        self.paste = paste

    def __call__(self, bg, plan, i: int, payloads: list[dict]):
        s, p = self.paste.output_size, self.paste
        image = cv2.imdecode(np.frombuffer(bg.data.tobytes(), np.uint8), cv2.IMREAD_COLOR)
        (nh, nw), (y0, x0) = plan.lsj_size[i], plan.lsj_offset[i]
        image = self._lsj(cv2.resize(image, (int(nw), int(nh)), interpolation=cv2.INTER_LINEAR),
                          y0, x0, plan.lsj_flip[i])
        masks = [self._lsj(cv2.resize(m, (int(nw), int(nh)), interpolation=cv2.INTER_NEAREST),
                           y0, x0, plan.lsj_flip[i]).astype(bool) for m in bg.masks]
        labels = list(bg.labels)
        boxes = [_box(m) for m in masks]
        for k, payload in enumerate(payloads):
            rgb = cv2.imdecode(np.frombuffer(payload["jpg"], np.uint8), cv2.IMREAD_COLOR)
            alpha = alpha_of(payload, int(payload["size"][0][0]), int(payload["size"][1][0]))
            h, w = (int(v) for v in plan.size[i, k])
            rgb, alpha = cv2.resize(rgb, (w, h)), cv2.resize(alpha, (w, h))
            if plan.flip[i, k]:
                rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
            full_rgb = np.zeros((s, s, 3), np.uint8)
            full_mask = np.zeros((s, s), bool)
            y, x = (int(v) for v in plan.pos[i, k])
            top, left, bottom, right = max(y, 0), max(x, 0), min(y + h, s), min(x + w, s)
            if bottom <= top or right <= left:
                continue
            full_rgb[top:bottom, left:right] = rgb[top - y:bottom - y, left - x:right - x]
            inside = alpha[top - y:bottom - y, left - x:right - x]
            full_mask[top:bottom, left:right] = inside >= p.mask_threshold
            image = np.where(full_mask[:, :, None], full_rgb, image)
            kept = []
            for j, m in enumerate(masks):
                m = m & ~full_mask
                new = _box(m)
                area = int(m.sum())
                moved = np.abs(new - boxes[j]).max()
                if area > 0 and (moved <= p.keep_max_box_shift or area > p.keep_min_area):
                    kept.append(j)
                masks[j] = m
            masks = [masks[j] for j in kept]
            boxes = [boxes[j] for j in kept]
            labels = [labels[j] for j in kept]
            masks.append(full_mask)
            boxes.append(_box(full_mask))
            labels.append(int(plan.labels[i, k]))
        return image, masks, [_box(m) for m in masks], labels

    def _lsj(self, image, y0, x0, flip):
        s = self.paste.output_size
        out = np.zeros((s, s) + image.shape[2:], image.dtype)
        crop = image[y0:y0 + s, x0:x0 + s]
        out[:crop.shape[0], :crop.shape[1]] = crop
        return out[:, ::-1] if flip else out


class BatchTorchCopyPaste:
    """Batch-level torch copy-paste: per-image decode/resize, batched blend and targets."""

    def __init__(self, paste: PasteConfig):
        self.paste = paste

    def __call__(self, backgrounds, plan, payloads_by_image: list[list[dict]]):
        from torchvision.io import ImageReadMode, decode_image

        s, k_slots = self.paste.output_size, self.paste.slots
        b = len(backgrounds)
        canvas = torch.zeros((b, 3, s, s), dtype=torch.float32)
        layers = torch.zeros((b, k_slots, 4, s, s), dtype=torch.float32)
        for i, bg in enumerate(backgrounds):
            img = decode_image(torch.from_numpy(bg.data.copy()), ImageReadMode.RGB).float()[None]
            (nh, nw), (y0, x0) = plan.lsj_size[i], plan.lsj_offset[i]
            img = F.interpolate(img, size=(int(nh), int(nw)), mode="bilinear", antialias=True)[0]
            crop = img[:, y0:y0 + s, x0:x0 + s]
            canvas[i, :, :crop.shape[1], :crop.shape[2]] = crop
            if plan.lsj_flip[i]:
                canvas[i] = canvas[i].flip(-1)
            for k, payload in enumerate(payloads_by_image[i]):
                self._place(layers[i, k], payload, plan.size[i, k], plan.pos[i, k], plan.flip[i, k])
        weight = (layers[:, :, 3:] >= self.paste.mask_threshold).float()
        for k in range(k_slots):  # "over" in paste order, batched over images
            canvas = canvas + weight[:, k] * (layers[:, k, :3] - canvas)
        real = [lsj_masks(torch.from_numpy(bg.masks), plan.lsj_size[i], plan.lsj_offset[i],
                          bool(plan.lsj_flip[i]), s) for i, bg in enumerate(backgrounds)]
        slot_masks = weight[:, :, 0].to(torch.uint8)
        targets = build_targets(id_map(slot_masks), extents_of(slot_masks), real,
                                [bg.labels for bg in backgrounds], plan, self.paste)
        return canvas.round().to(torch.uint8), targets

    def _place(self, layer, payload, size, pos, flip):
        from torchvision.io import ImageReadMode, decode_image

        s = self.paste.output_size
        rgb = decode_image(torch.frombuffer(bytearray(payload["jpg"]), dtype=torch.uint8), ImageReadMode.RGB)
        alpha = torch.from_numpy(alpha_of(payload, int(payload["size"][0][0]),
                                          int(payload["size"][1][0])).copy())[None]
        h, w = (int(v) for v in size)
        rgba = F.interpolate(torch.cat([rgb, alpha]).float()[None], size=(h, w), mode="bilinear",
                             antialias=True)[0]
        if flip:
            rgba = rgba.flip(-1)
        y, x = (int(v) for v in pos)
        top, left, bottom, right = max(y, 0), max(x, 0), min(y + h, s), min(x + w, s)
        if bottom > top and right > left:
            layer[:, top:bottom, left:right] = rgba[:, top - y:bottom - y, left - x:right - x]


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros(4, np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
