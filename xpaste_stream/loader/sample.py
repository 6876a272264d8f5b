"""The sample function: f(seed, epoch, position) -> everything the DALI graph needs for one image.

It is stateless apart from caches: the background is read by (shard, offset, size), the paste
plan is drawn from `Generator(SeedSequence([seed, epoch, position]))`, instance bytes come from
the bank. DALI's parallel external source calls it in worker processes (sample mode); tests
call `SampleSource.sample` directly. Per image it does, on the host:
- read + check the background bytes (sources.py), its json, annotations and box-cropped masks
  (unpacked from bits: ~box area of work per object, no full-resolution decode);
- draw LSJ, the number of pastes, instances (corrupt bytes: redrawn from the same generator),
  sizes, positions and flips;
- check each instance's JPEG headers and decode its alpha PNG (OpenCV; ~30 us for a typical
  mask), so the graph gets raw alpha: no PNG decoder in the graph, none on the CPU in GPU mode.
A damaged background is skipped, counted and named at its own position, and the next position
of the epoch's order stands in for it, so the batch stays full and the order deterministic.
"""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import zstandard

from .. import formats
from .backgrounds import BackgroundIndex, ShardFiles
from .config import LoaderConfig, PasteConfig
from .order import batches_per_rank, epoch_order, position
from .pipeline import crop_padding, input_names, pack_slots
from .plan import CategoryStats, PastePlan, Planner, assemble, lsj_window, paste_geometry
from .sources import image_size, jpeg_size

COUNTERS = ("backgrounds_corrupt", "backgrounds_substituted", "instances_corrupt",
            "instances_given_up", "pastes_too_small")
PLAN_HEAD = 10    # image_id, h, w, lsj_h, lsj_w, lsj_y, lsj_x, lsj_flip, position, background
PLAN_SLOT = 7     # id, label, h, w, y, x, flip
PLACEHOLDER_JPEG = np.frombuffer(formats.encode_jpeg(np.zeros((8, 8, 3), np.uint8)), np.uint8)
PLACEHOLDER_ALPHA = np.zeros((8, 8, 1), np.uint8)
PLACEHOLDER_LZ4 = np.frombuffer(formats.encode_alpha(PLACEHOLDER_ALPHA[:, :, 0]), np.uint8)
MAX_SUBSTITUTES = 64
# what damaged bytes raise while a sample is read and parsed (json, zstd, mask bits, struct)
DAMAGE = (formats.FormatError, ValueError, KeyError, TypeError, IndexError, OSError,
          zstandard.ZstdError, struct.error)


class SampleError(RuntimeError):
    """A sample cannot be made at all (e.g. every background tried was damaged)."""


class SampleSource:
    """DALI's callable: `source(SampleInfo)` -> the tuple of `pipeline.input_names`, for the
    rank's epoch `run` (set before the pipeline starts; see `CopyPasteLoader`)."""

    def __init__(self, index: BackgroundIndex, factors: np.ndarray, bank, categories_doc: dict,
                 paste: PasteConfig, config: LoaderConfig, plan_hook=None,
                 device_alpha: bool = False):
        from ..bank import make_sampler

        self.index, self.factors = index, factors
        self.bank = bank
        self.paste, self.config = paste, config
        self.planner = Planner(paste, CategoryStats(categories_doc, paste))
        self.sampler = make_sampler(bank, kind=paste.category_sampling, seed=config.seed,
                                    category_meta=categories_doc
                                    if paste.category_sampling == "repeat_factor" else None)
        self.plan_hook = plan_hook
        self.device_alpha = device_alpha  # alphas as LZ4 blocks, inflated on the GPU
        self.files = ShardFiles()
        self.names = input_names()
        self.run = (0, 0, 1, 0, 1, 0)  # epoch, start, batch size, rank, world size, samples
        self._orders: dict[int, np.ndarray] = {}

    def with_device_alpha(self, device_alpha: bool) -> SampleSource:
        """A copy giving the alphas as a GPU pipeline wants them (LZ4 blocks) or raw."""
        other = copy.copy(self)
        other.device_alpha = device_alpha
        return other

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
        return tuple(columns[name] for name in self.names)

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
        """All inputs of the sample at global position `pos` of `epoch`, by name."""
        counts = dict.fromkeys(COUNTERS, 0)
        skipped: list[list[str]] = []
        background = self._background(epoch, pos, counts, skipped)
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, epoch, pos, 0x5A]))
        plan, alphas, jpegs = self._plan(background, rng, counts, skipped)
        columns = self._graph_inputs(background, plan, jpegs, alphas)
        head = [background["image_id"], *background["size"], *plan.lsj_size[0],
                *plan.lsj_offset[0], int(plan.lsj_flip[0]), pos, background["index"]]
        slots = np.stack([plan.ids[0], plan.labels[0], plan.size[0, :, 0], plan.size[0, :, 1],
                          plan.pos[0, :, 0], plan.pos[0, :, 1], plan.flip[0].astype(np.int64)], 1)
        columns.update(
            real_boxes=background["boxes"], real_bits=background["bits"],
            real_labels=background["labels"],
            plan_row=np.concatenate([np.asarray(head, np.int64), slots.reshape(-1),
                                     np.asarray([counts[c] for c in COUNTERS], np.int64)]),
            skipped=np.frombuffer(json.dumps(skipped).encode(), np.uint8))
        return columns

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
        bits = formats.unzstd_masks(files.read(index, i, "masks.zst"), boxes)
        labels = np.asarray([a["category_id"] for a in anns], np.int64)
        if self.paste.drop_crowd:
            keep = np.asarray([not a.get("iscrowd") for a in anns], bool)
            if not keep.all():
                areas = boxes[:, 2].astype(np.int64) * boxes[:, 3]
                ends = np.cumsum(areas)
                bits = np.concatenate([bits[e - a:e] for a, e, k in zip(areas, ends, keep, strict=True)
                                       if k] or [np.zeros(0, np.uint8)])
                boxes, labels = boxes[keep], labels[keep]
        if len(boxes) and ((boxes[:, 0] + boxes[:, 2] > h) | (boxes[:, 1] + boxes[:, 3] > w)).any():
            raise formats.FormatError("an annotation's mask box lies outside the image")
        return {"data": np.frombuffer(data, np.uint8), "size": (h, w), "index": i,
                "image_id": int(meta["image_id"]), "boxes": boxes, "bits": bits, "labels": labels}

    def _plan(self, background: dict, rng: np.random.Generator, counts: dict, skipped: list):
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
        jpegs, alphas = [], []
        for k in range(paste.slots):
            iid = int(plan.ids[0, k])
            empty = PLACEHOLDER_LZ4 if self.device_alpha else PLACEHOLDER_ALPHA
            jpg, alpha = fetched[iid] if iid >= 0 else (PLACEHOLDER_JPEG, empty)
            jpegs.append(jpg)
            alphas.append(alpha)
        return plan, alphas, jpegs

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
                    skipped.append([self._instance_shard(int(ids[j])), f"instance {int(ids[j])}",
                                    "instance: damaged jpg or mask"])
            todo = bad
            if not todo:
                break
        counts["instances_given_up"] += len(todo)
        ids[todo] = -1
        return ids, payloads

    def _decoded(self, payload: dict, iid: int):
        """(JPEG bytes, alpha) when the JPEG headers are intact and the mask decodes to the
        instance's size, else None. The alpha goes to the graph raw, (h, w, 1), or on a GPU as
        the LZ4 block the device inflates (checked here by inflating it, ~8 us; a /1 bank's
        PNG is decoded and recompressed)."""
        w, h = (int(v[0]) for v in self.bank.sizes_of([iid]))
        if jpeg_size(payload["jpg"]) != (h, w):
            return None
        try:
            component, data = formats.instance_mask(payload)
            alpha = formats.decode_alpha(data, component, w, h)
        except formats.FormatError:
            return None
        if self.device_alpha:
            block = data if component == "mask.lz4" else formats.encode_alpha(alpha)
            return np.frombuffer(payload["jpg"], np.uint8), np.frombuffer(block, np.uint8)
        return np.frombuffer(payload["jpg"], np.uint8), alpha[:, :, None]

    def _alpha_shapes(self, plan: PastePlan) -> np.ndarray:
        """(K, 3) int32 (h, w, 1) of each slot's alpha (8 x 8 for the placeholder): what the GPU
        inflates each LZ4 block to."""
        ids = plan.ids[0]
        w, h = self.bank.sizes_of(np.maximum(ids, 0))
        active = ids >= 0
        return np.stack([np.where(active, h, 8), np.where(active, w, 8),
                         np.ones_like(ids)], 1).astype(np.int32)

    def _instance_shard(self, iid: int) -> str:
        try:
            return self.bank.shards[int(self.bank._columns["shard"][iid])]["path"]
        except (AttributeError, KeyError, IndexError):
            return str(getattr(self.bank, "path", "bank"))

    def _graph_inputs(self, background: dict, plan: PastePlan, jpegs, alphas) -> dict:
        """The arrays of pipeline.GRAPH_INPUTS (layout documented there)."""
        size, k = self.paste.output_size, self.paste.slots
        geometry = paste_geometry(plan, size, crop_padding(self.paste))
        whole = np.broadcast_to(np.array([0, 0, size, size], np.int32), (k, 4))
        window = {name: value[0] for name, value in lsj_window(plan, size).items()}
        jpg_len = np.array([len(j) for j in jpegs])
        alpha_len = np.array([a.size for a in alphas])
        slot_ints = pack_slots({
            "flip": plan.flip[0], "pos": plan.pos[0], "on": geometry["on"][0],
            "crop_start": geometry["start"][0], "crop_shape": geometry["shape"][0],
            # multi_paste regions: the whole canvas, then the crop's on-canvas part
            "in_anchors": np.concatenate([whole[:, :2], geometry["paste_from"][0]], 1),
            "out_anchors": np.concatenate([whole[:, :2], geometry["paste_to"][0]], 1),
            "paste_shapes": np.concatenate([whole[:, 2:], geometry["extent"][0]], 1),
            "jpg_at": np.stack([np.cumsum(jpg_len) - jpg_len, jpg_len], 1),
            "alpha_at": np.stack([np.cumsum(alpha_len) - alpha_len, alpha_len], 1),
            "alpha_shape": self._alpha_shapes(plan)})
        return {
            "bg_bytes": background["data"],
            "lsj_roi": np.concatenate([window["lsj_roi_start"], window["lsj_roi_end"],
                                       window["lsj_out_size"]]).astype(np.float32),
            "lsj_pad": window["lsj_pad_start"].astype(np.int32),
            "slot_size": plan.size[0].astype(np.float32),
            "slot_ints": slot_ints,
            "jpg_blob": np.concatenate(jpegs),
            "alpha_blob": np.concatenate([a.reshape(-1) for a in alphas]),
        }


def counts_from_rows(rows: np.ndarray, slots: int) -> np.ndarray:
    """(B, len(COUNTERS)) skip counters from the per-sample `plan_row` vectors."""
    return rows[:, PLAN_HEAD + PLAN_SLOT * slots:]


def plan_from_rows(rows: np.ndarray, slots: int) -> PastePlan:
    """The batch's PastePlan from the per-sample `plan_row` vectors (B, PLAN_HEAD + 7K + C)."""
    head = rows[:, :PLAN_HEAD]
    slot = rows[:, PLAN_HEAD:PLAN_HEAD + PLAN_SLOT * slots].reshape(len(rows), slots, PLAN_SLOT)
    return PastePlan(
        image_ids=head[:, 0].copy(), image_sizes=head[:, 1:3].astype(np.int32),
        lsj_size=head[:, 3:5].astype(np.int32), lsj_offset=head[:, 5:7].astype(np.int32),
        lsj_flip=head[:, 7].astype(bool), ids=slot[..., 0].copy(), labels=slot[..., 1].copy(),
        size=slot[..., 2:4].astype(np.int32), pos=slot[..., 4:6].astype(np.int32),
        flip=slot[..., 6].astype(bool))
