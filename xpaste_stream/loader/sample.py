"""The sample function: f(seed, epoch, position) -> everything the DALI graph needs for one image.

It is stateless apart from caches: the background is read by (shard, offset, size), the paste
plan is drawn from `Generator(SeedSequence([seed, epoch, position]))`, instance bytes come from
the bank. DALI's parallel external source calls it in worker processes (sample mode); tests
call `SampleSource.sample` directly. Per image it does, on the host:
- read + check the background bytes (sources.py), its json, annotations and box-cropped masks
  (unpacked from bits: ~box area of work per object, no full-resolution decode);
- draw LSJ, the number of pastes, instances (corrupt bytes: redrawn from the same generator),
  sizes, positions and flips;
- check each instance's JPEG headers and inflate its alpha (LZ4, ~8 us), so the main process
  gets raw alphas and JPEG bytes that its one batched decoder call can take (wire.py).
A damaged background is skipped, counted and named at its own position, and the next position
of the epoch's order stands in for it, so the batch stays full and the order deterministic.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import zstandard

from .. import formats
from .backgrounds import BackgroundIndex, ShardFiles
from .config import LoaderConfig, PasteConfig
from .order import batches_per_rank, epoch_order, position
from .plan import CategoryStats, Planner, assemble, lsj_window
from .sources import image_size, jpeg_size
from .wire import COUNTERS, WIRE, pack_plan

MAX_SUBSTITUTES = 64
# what damaged bytes raise while a sample is read and parsed (json, zstd, mask bits, struct)
DAMAGE = (formats.FormatError, ValueError, KeyError, TypeError, IndexError, OSError,
          zstandard.ZstdError, struct.error)


class SampleError(RuntimeError):
    """A sample cannot be made at all (e.g. every background tried was damaged)."""


class SampleSource:
    """DALI's callable: `source(SampleInfo)` -> the arrays of `wire.WIRE`, for the rank's
    epoch `run` (set before the pipeline starts; see `CopyPasteLoader`)."""

    def __init__(self, index: BackgroundIndex, factors: np.ndarray, bank, categories_doc: dict,
                 paste: PasteConfig, config: LoaderConfig, plan_hook=None):
        from ..bank import make_sampler

        self.index, self.factors = index, factors
        self.bank = bank
        self.paste, self.config = paste, config
        self.planner = Planner(paste, CategoryStats(categories_doc, paste))
        self.sampler = make_sampler(bank, kind=paste.category_sampling, seed=config.seed,
                                    category_meta=categories_doc
                                    if paste.category_sampling == "repeat_factor" else None)
        self.plan_hook = plan_hook
        self.files = ShardFiles()
        self.run = (0, 0, 1, 0, 1, 0)  # epoch, start, batch size, rank, world size, samples
        self._orders: dict[int, np.ndarray] = {}

    # -- what DALI calls ------------------------------------------------------------------------

    def set_run(self, epoch: int, start: int, batch_size: int, rank: int, world_size: int,
                samples: int) -> None:
        """The epoch a (new) pipeline serves: `samples` rank-local samples from global
        position `start`; DALI's later epochs (after `reset`) continue at epoch + 1 from 0."""
        self.run = (epoch, start, batch_size, rank, world_size, samples)

    def __call__(self, info) -> tuple:
        epoch0, start, batch, rank, world, samples = self.run
        epoch = epoch0 + info.epoch_idx
        if info.epoch_idx:  # later epochs of the same pipeline start at their beginning
            start, samples = 0, self.rank_samples(epoch, 0, batch, world)
        if info.idx_in_epoch >= samples:
            raise StopIteration
        pos = position(start, info.idx_in_epoch, batch, rank, world)
        columns = self.sample(epoch, pos)
        return tuple(columns[name] for name in WIRE)

    # -- the sample function --------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.factors, self.config.seed, epoch,
                                               self.config.shuffle)}
        return self._orders[epoch]

    def epoch_size(self, epoch: int) -> int:
        return len(self.order(epoch))

    def rank_samples(self, epoch: int, start: int, batch_size: int, world_size: int) -> int:
        return batch_size * batches_per_rank(self.epoch_size(epoch), start, batch_size,
                                             world_size, self.config.drop_last)

    def sample(self, epoch: int, pos: int) -> dict[str, np.ndarray]:
        """All arrays of `wire.WIRE` for the sample at global position `pos` of `epoch`."""
        counts = dict.fromkeys(COUNTERS, 0)
        skipped: list[list[str]] = []
        background = self._background(epoch, pos, counts, skipped)
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, epoch, pos, 0x5A]))
        plan, payloads = self._plan(background, rng, counts, skipped)
        active = [payloads[int(i)] for i in plan.ids[0] if i >= 0]
        src_size = np.zeros((self.paste.slots, 2), np.int32)
        jpg_len = np.zeros(self.paste.slots, np.int64)
        src_size[plan.active[0]] = [a.shape for _, a in active] or np.zeros((0, 2))
        jpg_len[plan.active[0]] = [len(j) for j, _ in active]
        window = {name: value[0] for name, value in lsj_window(plan, self.paste.output_size).items()}
        return {
            "bg_bytes": background["data"],
            "lsj_roi": np.concatenate([window["lsj_roi_start"], window["lsj_roi_end"],
                                       window["lsj_out_size"]]).astype(np.float32),
            "lsj_pad": window["lsj_pad_start"].astype(np.int32),
            "plan": pack_plan(plan, pos, background["index"], src_size, jpg_len, counts),
            "inst_jpegs": np.concatenate([j for j, _ in active] or [np.zeros(0, np.uint8)]),
            "inst_alphas": np.concatenate([a.reshape(-1) for _, a in active]
                                          or [np.zeros(0, np.uint8)]),
            "real_boxes": background["boxes"], "real_bits": background["bits"],
            "real_labels": background["labels"],
            "skipped": np.frombuffer(json.dumps(skipped).encode(), np.uint8)}

    def _background(self, epoch: int, pos: int, counts: dict, skipped: list) -> dict:
        order = self.order(epoch)
        for attempt in range(MAX_SUBSTITUTES):
            i = int(order[(pos + attempt) % len(order)])
            try:
                background = self.read_background(i)
            except DAMAGE as e:
                if attempt == 0:  # each damaged background is counted at its own position
                    counts["backgrounds_corrupt"] += 1
                    skipped.append([self.index.urls[int(self.index.shard[i])], self.index.key[i],
                                    f"background: {e}"])
                continue
            counts["backgrounds_substituted"] += int(attempt > 0)
            return background
        raise SampleError(f"{MAX_SUBSTITUTES} backgrounds in a row from position {pos} of epoch "
                          f"{epoch} are damaged; check the shards with `xpaste-stream inspect`")

    def read_background(self, i: int) -> dict:
        """Background i, checked: bytes, size, image id, real objects (boxes, packed masks)."""
        index, files = self.index, self.files
        data = files.read(index, i, "image")
        meta, anns = formats.read_background({"__key__": index.key[i], "json": files.read(index, i, "json"),
                                              "ann.zst": files.read(index, i, "ann.zst")})
        h, w = int(meta["height"]), int(meta["width"])
        formats.check_image_dims(h, w, "background")  # before DALI's decoder sees the bytes
        if image_size(data) != (h, w):
            raise formats.FormatError(f"image bytes damaged or not {h}x{w} as its json says")
        boxes = np.asarray([a["mask_box"] for a in anns], np.int32).reshape(-1, 4)
        if len(boxes) and ((boxes[:, :2] < 0) | (boxes[:, 0:1] + boxes[:, 2:3] > h)
                           | (boxes[:, 1:2] + boxes[:, 3:4] > w)).any():
            raise formats.FormatError("an annotation's mask box lies outside the image")
        packed = formats.unzstd(files.read(index, i, "masks.zst"), formats.mask_crops_bound(boxes),
                                "masks.zst")
        bits = packed_mask_crops(boxes, packed)
        labels = np.asarray([a["category_id"] for a in anns], np.int64)
        if self.paste.drop_crowd:
            keep = np.asarray([not a.get("iscrowd") for a in anns], bool)
            if not keep.all():
                nbytes = (boxes[:, 2].astype(np.int64) * boxes[:, 3] + 7) // 8
                ends = np.cumsum(nbytes)
                bits = np.concatenate([bits[e - n:e] for n, e, k in zip(nbytes, ends, keep, strict=True)
                                       if k] or [np.zeros(0, np.uint8)])
                boxes, labels = boxes[keep], labels[keep]
        return {"data": np.frombuffer(data, np.uint8), "size": (h, w), "index": i,
                "image_id": int(meta["image_id"]), "boxes": boxes, "bits": bits, "labels": labels}

    def _plan(self, background: dict, rng: np.random.Generator, counts: dict, skipped: list):
        """The one-image plan and the {instance id: (JPEG bytes, alpha (h, w))} it uses."""
        planner, bank, paste = self.planner, self.bank, self.paste
        sizes = np.asarray([background["size"]], np.int32)
        lsj = planner.draw_lsj(sizes, rng)
        n = planner.draw_counts(1, rng)
        ids, payloads = self._draw_instances(int(n[0]), rng, counts, skipped)
        usable = ids >= 0
        known = np.where(usable, ids, 0)
        labels = bank.categories_of(known).astype(np.int64)
        inst_w, inst_h = bank.sizes_of(known)
        placed = planner.place(n, ids, labels, inst_w, inst_h, rng)
        counts["pastes_too_small"] += int((usable & ~placed["ok"]).sum())
        placed["ok"] &= usable
        plan = assemble([background["image_id"]], sizes, lsj, n, ids, labels, placed, paste.slots)
        fetched = dict(zip(ids.tolist(), payloads, strict=True))
        if self.plan_hook is not None:
            plan = self.plan_hook(plan)
            extra = sorted(set(plan.ids[plan.active].tolist()) - set(fetched))
            fetched.update(zip(extra, (self._decoded(bank.read(i), i) for i in extra), strict=True))
        return plan, fetched

    def _draw_instances(self, n: int, rng: np.random.Generator, counts: dict, skipped: list):
        """n instance ids and their (jpeg bytes, alpha) payloads; an id whose bytes stay damaged
        after `instance_retries` redraws comes back as -1 (its slot stays empty)."""
        ids = self.sampler.draw(n, rng) if n else np.zeros(0, np.int64)
        payloads: list = [None] * n
        todo = list(range(n))
        for attempt in range(self.config.instance_retries + 1):
            if attempt:
                ids[todo] = self.sampler.draw(len(todo), rng)
            bad = []
            for j, p in zip(todo, self.bank.read_many(ids[todo]) if todo else [], strict=True):
                payloads[j] = self._decoded(p, int(ids[j]))
                if payloads[j] is None:
                    bad.append(j)
                    counts["instances_corrupt"] += 1
                    skipped.append([*self._instance_name(int(ids[j])),
                                    f"instance {int(ids[j])}: damaged jpg or mask"])
            todo = bad
            if not todo:
                break
        counts["instances_given_up"] += len(todo)
        ids[todo] = -1
        return ids, payloads

    def _decoded(self, payload: dict, iid: int):
        """(JPEG bytes, alpha (h, w) uint8) when the JPEG headers are intact and the mask
        decodes to the instance's size, else None (a /1 bank's PNG alpha is decoded too)."""
        w, h = (int(v[0]) for v in self.bank.sizes_of([iid]))
        if jpeg_size(payload["jpg"]) != (h, w):
            return None
        try:
            component, data = formats.instance_mask(payload)
            alpha = formats.decode_alpha(data, component, w, h)
        except formats.FormatError:
            return None
        return np.frombuffer(payload["jpg"], np.uint8), alpha

    def _instance_name(self, iid: int) -> tuple[str, str]:
        """(shard, key) of a damaged instance (a bank without `where`: its path, "instance N")."""
        where = getattr(self.bank, "where", None)
        return where(iid) if where else (str(getattr(self.bank, "path", "bank")), f"instance {iid}")


def packed_mask_crops(boxes: np.ndarray, packed: bytes) -> np.ndarray:
    """The packed bits of `masks.zst` as uint8, checked against the boxes (each crop's bits
    start on a byte); raises FormatError when they do not match."""
    bits = np.frombuffer(packed, np.uint8)
    need = int(((boxes[:, 2].astype(np.int64) * boxes[:, 3] + 7) // 8).sum())
    if need != len(bits):
        raise formats.FormatError(f"masks.zst holds {len(bits)} bytes, its boxes need {need}")
    return bits
