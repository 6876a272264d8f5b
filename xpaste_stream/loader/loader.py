"""CopyPasteLoader: composited batches for a training loop, in a few lines.

    loader = CopyPasteLoader("bg/bg-{000000..000009}.tar", "bank/", PasteConfig(output_size=640),
                             batch_size=16, device_id=0, rank=rank, world_size=world_size)
    for batch in loader:                       # one epoch of this rank's backgrounds
        loss = model(batch.images.float() / 255, batch.targets)

Three stages run concurrently:
1. a producer thread reads backgrounds (DALI reader pipeline, CPU), checks them, decodes their
   RLE annotations, draws the paste plan and fetches instance bytes from the bank, or, with
   `PasteConfig.instance_pool`, takes decoded instances from the pool it refreshes (pool.py);
2. the DALI compositing pipeline (GPU when `device_id` is set) decodes, jitters and pastes;
3. the calling thread turns its outputs into targets with torch on the same device.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import shutil
import tempfile
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import torch
from nvidia.dali.backend import TensorListGPU

from .. import formats, urls
from ..config import check
from .config import LoaderConfig, PasteConfig
from .pipeline import copy_paste_pipeline, crop_padding, input_names
from .plan import CategoryStats, PastePlan, Planner, assemble, lsj_window, paste_geometry
from .pool import PLACEHOLDER_RGBA, InstancePool, decode_rgba
from .repeat_factor import sample_repeat_factors, shard_repeats, write_epoch_indexes
from .sources import Background, InstanceFetcher, LoaderCounters, background_reader, parse_background
from .targets import build_targets, lsj_masks


class LoaderError(ValueError):
    """The loader's inputs do not fit together (bank vs categories, missing files)."""


@dataclass
class Batch:
    """One composited batch. `images`: (B, 3, S, S) uint8 on the loader's device; `targets`:
    torchvision detection dicts; `plan`: every random choice made; `debug`: with
    `LoaderConfig.debug`, the LSJ'd backgrounds (B, S, S, 3), the LSJ'd real masks per image
    and `crops[k][i]`, the resized and flipped RGBA instance of slot k of image i (numpy; a
    1 x 1 transparent pixel where the slot is empty or its crop lies entirely off the canvas)."""

    images: torch.Tensor
    targets: list[dict]
    plan: PastePlan
    debug: dict | None = None


@dataclass
class _Planned:
    backgrounds: list[Background]
    plan: PastePlan
    inputs: tuple = field(repr=False)
    counts: Counter = field(default_factory=Counter)  # skips made while producing this batch


@dataclass
class _EpochEnd:
    counts: Counter = field(default_factory=Counter)


class CopyPasteLoader:
    """Streams X-Paste composited batches; iterate for one epoch of this rank's backgrounds.

    `plan_hook(plan) -> plan` may edit a drawn plan's geometry (size, pos, flip) or empty slots
    (ids = -1) before it is executed: fixed placements for tests and debugging."""

    def __init__(self, background_urls, bank, paste: PasteConfig | None = None, *,
                 config: LoaderConfig | None = None, categories: str | None = None,
                 device_id: int | None = None, rank: int = 0, world_size: int = 1,
                 plan_hook=None, **overrides):
        from ..bank import InstanceBank, make_sampler

        self.paste = paste or PasteConfig()
        self.config = LoaderConfig(**{**(vars(config) if config else {}), **overrides})
        check(self.paste, "paste")
        check(self.config, "loader")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} must be in [0, world_size={world_size})")
        self.urls = urls.expand(background_urls)
        missing = [u for u in self.urls if not urls.exists(u)]
        if not self.urls or missing:
            raise LoaderError(f"background shards not found: {missing or background_urls}")
        self.bank = InstanceBank.open(bank) if isinstance(bank, (str, os.PathLike)) else bank
        self.categories_path = categories or os.path.join(os.path.dirname(self.urls[0]), "categories.json")
        self.categories_doc = formats.read_categories(self.categories_path)
        check_bank_matches(self.bank, self.categories_doc, self.categories_path)

        self.device_id, self.rank, self.world_size = device_id, rank, world_size
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.plan_hook = plan_hook
        self.counters = LoaderCounters()   # what the training thread has received
        self._producing = LoaderCounters()  # skips since the last item the producer handed over
        seed = self.config.seed
        self.planner = Planner(self.paste, CategoryStats(self.categories_doc, self.paste), seed, rank)
        sampler = make_sampler(self.bank, kind=self.paste.category_sampling, seed=seed, rank=rank,
                               category_meta=self.categories_doc
                               if self.paste.category_sampling == "repeat_factor" else None)
        self.fetcher = InstanceFetcher(self.bank, sampler, self.config.instance_retries,
                                       self._producing)
        self.pool = None  # decoded instances; filled by the producer thread at the first batch
        if self.paste.instance_pool:
            self.pool = InstancePool(self.fetcher, self.paste.instance_pool,
                                     self.paste.instance_pool_refresh, seed, rank)

        cfg = self.config
        # repeat-factor sampling: per-sample factors once; all 1 (COCO, frequent LVIS) = uniform
        self._repeat = None
        if cfg.background_sampling == "repeat_factor":
            factors = [sample_repeat_factors(u) for u in self.urls]
            if any((f != 1.0).any() for f in factors):
                self._repeat = factors
        self._reader_epoch: int | None = None
        self.reader = self._new_reader(shard_id=rank, epoch=0)
        self.pipe = copy_paste_pipeline(
            source=self._next_inputs, paste=self.paste, gpu=device_id is not None, debug=cfg.debug,
            batch_size=cfg.batch_size, num_threads=cfg.num_threads, device_id=device_id,
            prefetch_queue_depth=cfg.prefetch, seed=seed)
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.prefetch + 1)
        self._in_flight: deque[_Planned] = deque()
        self._thread: threading.Thread | None = None
        self._built = False
        self._index_dir: str | None = None

    # -- public -----------------------------------------------------------------------------

    def __iter__(self):
        """Batches until this rank's share of the backgrounds is used up (one epoch)."""
        self._start()
        while True:
            try:
                outputs = self.pipe.run()
            except StopIteration:
                self.pipe.reset()
                return
            with self._torch_threads():
                batch = self._finish(outputs, self._in_flight.popleft())
            yield batch

    def stats(self) -> dict:
        """Counters: backgrounds used and skipped, instances pasted, kept, corrupt, ..."""
        return dict(sorted(self.counters.counts.items()))

    def planned_batches(self, n: int) -> list[tuple[list[Background], PastePlan, list[list[dict]]]]:
        """The CPU-side work of `n` batches (read, check, plan, fetch) without compositing:
        (backgrounds, plan, payloads per image in slot order). For benchmarks and debugging;
        it draws from this loader's generators, so do not mix it with iterating the loader."""
        self._build_reader()
        self._use_epoch(0)
        out = []
        for backgrounds in self._epoch_backgrounds(n * self.config.batch_size):
            planned = self._plan_batch(backgrounds)
            ids = planned.plan.ids
            payloads = self.bank.read_many(ids[ids >= 0])
            rows, at = [], 0
            for i in range(len(ids)):
                count = int((ids[i] >= 0).sum())
                rows.append(payloads[at:at + count])
                at += count
            out.append((backgrounds, planned.plan, rows))
        return out

    def epoch_size(self, epoch: int = 0) -> int:
        """Backgrounds this rank reads in `epoch` (DALI moves each rank to the next shard of
        the data set every epoch, so over `world_size` epochs every rank sees everything)."""
        self._build_reader()
        if self._repeat is None:
            total = self.reader.reader_meta("backgrounds")["epoch_size"]
        else:
            total = int(sum(r.sum() for r in shard_repeats(self._repeat, self.config.seed, epoch)))
        shard = (self.rank + epoch) % self.world_size
        return total * (shard + 1) // self.world_size - total * shard // self.world_size

    # -- producer thread: read, check, plan, fetch ------------------------------------------

    def _new_reader(self, shard_id: int, epoch: int, index_paths: list[str] | None = None):
        cfg = self.config
        return background_reader(
            paths=self.urls, shard_id=shard_id, num_shards=self.world_size, shuffle=cfg.shuffle,
            shuffle_buffer=cfg.shuffle_buffer, index_paths=index_paths,
            batch_size=cfg.batch_size, num_threads=1, device_id=None,
            seed=cfg.seed * 1000 + self.rank + 7919 * epoch, prefetch_queue_depth=2)

    def _use_epoch(self, epoch: int) -> None:
        """With repeat factors, a fresh reader over this epoch's index files, started on the
        shard DALI's own rotation would give this rank (rank + epoch); otherwise nothing."""
        if self._repeat is None or self._reader_epoch == epoch:
            return
        if self._index_dir is None:
            self._index_dir = tempfile.mkdtemp(prefix="xpaste-rfs-")
            atexit.register(shutil.rmtree, self._index_dir, ignore_errors=True)
        folder = os.path.join(self._index_dir, f"rank{self.rank}")
        paths, _ = write_epoch_indexes(self.urls, self._repeat, self.config.seed, epoch, folder)
        self.reader = self._new_reader((self.rank + epoch) % self.world_size, epoch, paths)
        self.reader.build()
        self._reader_epoch = epoch

    def _build_reader(self) -> None:
        if not self._built:
            self.reader.build()
            self.pipe.build()
            self._built = True

    def _start(self) -> None:
        self._build_reader()
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="xpaste-planner", daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        try:
            epoch = 0
            while True:
                self._use_epoch(epoch)
                for backgrounds in self._epoch_backgrounds(self.epoch_size(epoch)):
                    self._hand_over(self._plan_batch(backgrounds))
                self._hand_over(_EpochEnd())
                epoch += 1
        except BaseException as e:  # handed to the training thread, raised there
            self._queue.put(e)

    def _hand_over(self, item) -> None:
        """Queue an item with the skips counted while making it, so that the training thread's
        counters cover exactly the batches (and epochs) it has received."""
        item.counts, self._producing.counts = self._producing.counts, Counter()
        self._queue.put(item)

    def _epoch_backgrounds(self, size: int):
        """Usable backgrounds of one epoch in batches; corrupt ones are skipped and counted."""
        pending: list[Background] = []
        read = 0
        while read < size:
            images, metas, anns = self.reader.run()
            take = min(len(images), size - read)
            for j in range(take):
                try:
                    pending.append(parse_background(np.array(images.at(j)), np.array(metas.at(j)).tobytes(),
                                                    np.array(anns.at(j)).tobytes(), self.paste.drop_crowd))
                except (formats.FormatError, ValueError, KeyError) as e:
                    self._producing.add("backgrounds_corrupt")
                    self._producing.add(f"backgrounds_corrupt:{type(e).__name__}")
            read += take
            while len(pending) >= self.config.batch_size:
                yield pending[:self.config.batch_size]
                pending = pending[self.config.batch_size:]
        if pending:
            yield pending

    def _plan_batch(self, backgrounds: list[Background]) -> _Planned:
        sizes = np.array([[bg.height, bg.width] for bg in backgrounds], np.int32)
        lsj = self.planner.draw_lsj(sizes)
        counts = self.planner.draw_counts(len(backgrounds))
        draw = self.pool.draw if self.pool else self.fetcher.draw
        ids, payloads = draw(int(counts.sum()))  # payloads: bytes, or decoded with the pool
        usable = ids >= 0
        known = np.where(usable, ids, 0)
        labels = self.bank.categories_of(known).astype(np.int64)
        inst_w, inst_h = self.bank.sizes_of(known)
        placed = self.planner.place(counts, ids, labels, inst_w, inst_h)
        self._producing.add("pastes_too_small", int((usable & ~placed["ok"]).sum()))
        placed["ok"] &= usable
        plan = assemble([bg.image_id for bg in backgrounds], sizes, lsj, counts, ids, labels,
                        placed, self.paste.slots)
        fetched = dict(zip(ids.tolist(), payloads, strict=True))
        if self.plan_hook is not None:
            plan = self.plan_hook(plan)
        return _Planned(backgrounds, plan, self._pipeline_inputs(backgrounds, plan, fetched))

    def _pipeline_inputs(self, backgrounds, plan: PastePlan, fetched: dict[int, dict]) -> tuple:
        """Per-sample arrays in the order of `pipeline.input_names`; empty slots get the
        transparent placeholder. Ids a plan hook put in are read here (unchecked)."""
        extra = sorted(set(plan.ids[plan.active].tolist()) - set(fetched))
        payloads = self.bank.read_many(extra) if extra else []
        if self.pool:
            payloads = [decode_rgba(p) for p in payloads]
        fetched.update(zip(extra, payloads, strict=True))
        fetched[-1] = PLACEHOLDER_RGBA if self.pool else self.fetcher.placeholder
        k_slots = self.paste.slots
        filled = [[fetched[int(plan.ids[i, k])] for k in range(k_slots)] for i in range(len(plan.ids))]
        size = self.paste.output_size
        geometry = paste_geometry(plan, size, crop_padding(self.paste))
        whole = np.broadcast_to(np.array([0, 0, size, size], np.int32), (*plan.ids.shape, 4))
        columns = {
            "bg_bytes": [bg.data for bg in backgrounds],
            **lsj_window(plan, size),
            "slot_size": list(plan.size.astype(np.float32)),
            "slot_flip": list(plan.flip.astype(np.int32)),
            "slot_pos": list(plan.pos.astype(np.int32)),
            "on_canvas": list(geometry["on"].astype(np.int32)),
            "crop_start": list(geometry["start"]),
            "crop_shape": list(geometry["shape"]),
            # multi_paste regions (B, K, 2, 2): the whole canvas, then the crop's on-canvas part
            "in_anchors": list(np.stack([whole[..., :2], geometry["paste_from"]], 2)),
            "out_anchors": list(np.stack([whole[..., :2], geometry["paste_to"]], 2)),
            "paste_shapes": list(np.stack([whole[..., 2:], geometry["extent"]], 2)),
        }
        for k in range(k_slots):
            if self.pool:
                columns[f"rgba{k}"] = [row[k] for row in filled]
            else:
                columns[f"jpg{k}"] = [_as_array(row[k]["jpg"]) for row in filled]
                columns[f"mask{k}"] = [_as_array(row[k]["mask.png"]) for row in filled]
        return tuple(columns[name] for name in input_names(k_slots, self.pool is not None))

    # -- DALI source and outputs -----------------------------------------------------------

    def _next_inputs(self):
        """External-source callback (called by DALI in the training thread)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self.counters.counts.update(item.counts)
        if isinstance(item, _EpochEnd):
            raise StopIteration
        self._in_flight.append(item)
        return item.inputs

    def _finish(self, outputs, planned: _Planned) -> Batch:
        plan, size = planned.plan, self.paste.output_size
        images = to_torch(outputs[0], self.device)
        ids, extents = to_torch(outputs[1], self.device), to_torch(outputs[2], self.device)
        real = [lsj_masks(torch.from_numpy(bg.masks).to(self.device), plan.lsj_size[i],
                          plan.lsj_offset[i], bool(plan.lsj_flip[i]), size)
                for i, bg in enumerate(planned.backgrounds)]
        targets = build_targets(ids, extents, real, [bg.labels for bg in planned.backgrounds],
                                plan, self.paste)
        self._count(planned, targets)
        debug = None
        if self.config.debug:
            debug = {"backgrounds": to_torch(outputs[3], torch.device("cpu")).numpy(),
                     "real_masks": [m.cpu().numpy() for m in real],
                     "real_labels": [bg.labels for bg in planned.backgrounds],
                     "crops": [_samples(out) for out in outputs[4:]]}
        return Batch(images, targets, plan, debug)

    @contextlib.contextmanager
    def _torch_threads(self):
        """`LoaderConfig.torch_threads` while targets are built on the CPU, then restored."""
        before, wanted = torch.get_num_threads(), self.config.torch_threads
        change = self.device.type == "cpu" and wanted and wanted != before
        if change:
            torch.set_num_threads(wanted)
        try:
            yield
        finally:
            if change:
                torch.set_num_threads(before)

    def _count(self, planned: _Planned, targets: list[dict]) -> None:
        c = self.counters
        c.add("images", len(targets))
        c.add("pastes_planned", int(planned.plan.active.sum()))
        pasted = sum(int(t["source"].sum()) for t in targets)
        c.add("pasted_kept", pasted)
        c.add("real_kept", sum(len(t["source"]) for t in targets) - pasted)
        c.add("real_annotations", sum(len(bg.labels) for bg in planned.backgrounds))


def check_bank_matches(bank, categories_doc: dict, where: str) -> None:
    """Refuse a bank built for other categories than the backgrounds' categories.json."""
    listed = {int(c["id"]) for c in categories_doc["categories"]}
    unknown = sorted(set(int(c) for c in bank.category_ids) - listed)
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        raise LoaderError(f"instance bank {getattr(bank, 'path', bank)} has {len(unknown)} categories "
                          f"that {where} does not list ({shown}): bank and backgrounds use different "
                          "category sets; build the bank from instances of these categories")
    if bank.num_instances == 0:
        raise LoaderError(f"instance bank {getattr(bank, 'path', bank)} holds no instances")


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A uniform DALI TensorList as one torch tensor on `device`, copied (DALI reuses buffers)."""
    gpu = isinstance(tensor_list, TensorListGPU)
    if gpu and device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    if gpu:
        tensor_list = tensor_list.as_cpu()
    return torch.from_numpy(np.array(tensor_list.as_tensor())).to(device)


def _samples(tensor_list) -> list[np.ndarray]:
    if isinstance(tensor_list, TensorListGPU):
        tensor_list = tensor_list.as_cpu()
    return [np.array(tensor_list.at(i)) for i in range(len(tensor_list))]


def _as_array(data) -> np.ndarray:
    return data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
