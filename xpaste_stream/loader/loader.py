"""CopyPasteLoader: composited batches for a training loop, in a few lines.

    with CopyPasteLoader("bg/bg-{000000..000009}.tar", "bank/", PasteConfig(output_size=640),
                         batch_size=16, device_id=0) as loader:   # rank / world from torchrun
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:                 # this rank's slice of the epoch's global order
                loss = model(batch.images.float() / 255, batch.targets)
            torch.save({"loader": loader.state_dict(), ...}, "ckpt.pt")  # any time, mid-epoch too

The loader composes parts with one job each:
- order.py: the epoch's global order, a pure function of (seed, epoch, data set), and each
  rank's slice of it; the state dict (epoch, global samples consumed, fingerprints);
- backgrounds.py: backgrounds addressed by (shard, offset, size) from the .idx files;
- sample.py: the sample function f(seed, epoch, position) -> inputs of one image (read, check,
  plan, fetch instances), run by DALI's parallel external source in worker processes;
- pipeline.py: the DALI graph that decodes, jitters and pastes (GPU when `device_id` is set);
- targets.py: occlusion-aware targets in torch on the same device.
Resuming is starting the next pipeline at a position: nothing depends on threads, workers,
ranks or the last run.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali.backend import TensorListGPU

from .. import formats, urls
from ..config import check
from .backgrounds import BackgroundIndex, BackgroundIndexError, ShardFiles
from .config import LoaderConfig, PasteConfig
from .order import LoaderState, batches_per_rank, fingerprint
from .pipeline import PASSTHROUGH, copy_paste_pipeline
from .plan import PastePlan
from .sample import COUNTERS, SampleSource, counts_from_rows, plan_from_rows
from .sources import LoaderCounters
from .targets import build_targets, lsj_crop_masks


class LoaderError(ValueError):
    """The loader's inputs do not fit together (bank vs categories, missing files, a state
    dict of another run)."""


@dataclass
class Batch:
    """One composited batch. `images`: (B, 3, S, S) uint8 on the loader's device; `targets`:
    torchvision detection dicts; `plan`: every random choice made; `positions`: the samples'
    global positions in the epoch's order; `debug`: with `LoaderConfig.debug`, the LSJ'd
    backgrounds (B, S, S, 3), the LSJ'd real masks per image and `crops[k][i]`, the resized
    and flipped RGBA instance of slot k of image i (numpy; a 1 x 1 transparent pixel where the
    slot is empty or its crop lies entirely off the canvas)."""

    images: torch.Tensor
    targets: list[dict]
    plan: PastePlan
    positions: np.ndarray
    epoch: int = 0
    debug: dict | None = None


class CopyPasteLoader:
    """Streams X-Paste composited batches; iterating gives the rest of the current epoch of
    this rank's slice (see order.py), then moves to the next epoch.

    `plan_hook(plan) -> plan` may edit a drawn plan's geometry (size, pos, flip) or empty slots
    (ids = -1) before it is executed: fixed placements for tests and debugging (it runs in the
    worker processes; with spawned workers it must be picklable)."""

    def __init__(self, background_urls, bank, paste: PasteConfig | None = None, *,
                 config: LoaderConfig | None = None, categories: str | None = None,
                 device_id: int | None = None, rank: int | None = None,
                 world_size: int | None = None, plan_hook=None, **overrides):
        from ..bank import InstanceBank

        self.paste = paste or PasteConfig()
        self.config = LoaderConfig(**{**(vars(config) if config else {}), **overrides})
        check(self.paste, "paste")
        check(self.config, "loader")
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} must be in [0, world_size={world_size})")
        self.urls = urls.expand(background_urls)
        missing = [u for u in self.urls if not urls.exists(u)]
        if not self.urls or missing:
            raise LoaderError(f"background shards not found: {missing or background_urls}")
        try:
            self.index = BackgroundIndex.build(self.urls)
        except BackgroundIndexError as e:
            raise LoaderError(str(e)) from None
        if not len(self.index):
            raise LoaderError(f"background shards {background_urls} hold no samples")
        self.bank = InstanceBank.open(bank) if isinstance(bank, (str, os.PathLike)) else bank
        getattr(self.bank, "check_shards", lambda: None)()  # a vanished shard: refused here
        self.categories_path = categories or os.path.join(os.path.dirname(self.urls[0]), "categories.json")
        self.categories_doc = formats.read_categories(self.categories_path)
        check_bank_matches(self.bank, self.categories_doc, self.categories_path)
        files = ShardFiles()
        check_background_schema(self.index, files)

        self.device_id, self.rank, self.world_size = device_id, rank, world_size
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        cfg = self.config
        factors = np.ones(len(self.index))
        if cfg.background_sampling == "repeat_factor":
            factors = self.index.repeat_factors(files)
        files.close()
        self.source = SampleSource(self.index, factors, self.bank, self.categories_doc,
                                   self.paste, cfg, plan_hook, device_alpha=device_id is not None)
        self.counters = LoaderCounters()
        self.fingerprints = {
            "dataset": self.index.fingerprint,
            "config": fingerprint(self.paste, cfg.shuffle, cfg.background_sampling, cfg.drop_last,
                                  cfg.instance_retries, self.bank.num_instances,
                                  getattr(self.bank, "manifest", {}).get("num_indexed"),
                                  self.categories_doc.get("categories"))}
        self.epoch, self.samples = 0, 0   # where the next batch comes from (global samples)
        self._pipe = None
        self._pipe_next: tuple[int, int] | None = None  # what the live pipeline gives next

    # -- order and state ------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (from its start) unless the loader is already in it."""
        if epoch != self.epoch:
            self.epoch, self.samples = int(epoch), 0

    def epoch_size(self, epoch: int | None = None) -> int:
        """Samples in the global order of `epoch` (all ranks; repeat factors applied)."""
        return self.source.epoch_size(self.epoch if epoch is None else epoch)

    def __len__(self) -> int:
        """Batches this rank still gets in the current epoch (the same on every rank)."""
        return batches_per_rank(self.epoch_size(), self.samples, self.config.batch_size,
                                self.world_size, self.config.drop_last)

    def state_dict(self) -> dict:
        """A small dict that resumes the global order exactly where the batches handed out so
        far end, with this or another world size."""
        return LoaderState(self.epoch, self.samples, self.config.seed, **self.fingerprints).to_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            st = LoaderState.from_dict(state)
        except ValueError as e:
            raise LoaderError(f"cannot resume: {e}") from None
        differs = [what for what, mine, theirs in (
            ("background data set", self.fingerprints["dataset"], st.dataset),
            ("seed", self.config.seed, st.seed),
            ("paste / order settings or bank", self.fingerprints["config"], st.config))
            if mine != theirs]
        if differs:
            raise LoaderError(f"cannot resume: the state was saved for another {', '.join(differs)}"
                              " (the rest of its epoch would be a different order)")
        self.epoch, self.samples = st.epoch, st.samples

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> CopyPasteLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the pipeline and its worker processes; the loader can be iterated again."""
        if self._pipe is not None:
            with contextlib.suppress(Exception):
                self._pipe._shutdown()
            self._pipe, self._pipe_next = None, None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _pipeline(self):
        """The live pipeline if it continues at (epoch, samples), else a new one started there."""
        if self._pipe is not None and self._pipe_next == (self.epoch, self.samples):
            return self._pipe
        self.close()
        cfg = self.config
        rank_samples = cfg.batch_size * len(self)
        self.source.set_run(self.epoch, self.samples, cfg.batch_size, self.rank, self.world_size,
                            rank_samples)
        start = cfg.worker_start
        if start == "auto":
            start = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
        pipe = copy_paste_pipeline(
            source=self.source, paste=self.paste, gpu=self.device_id is not None,
            workers=cfg.workers, debug=cfg.debug, worker_prefetch=cfg.worker_prefetch,
            batch_size=cfg.batch_size,
            num_threads=cfg.num_threads, device_id=self.device_id,
            prefetch_queue_depth=cfg.prefetch, seed=cfg.seed,
            py_num_workers=max(1, cfg.workers), py_start_method=start)
        if cfg.workers:
            pipe.start_py_workers()
        pipe.build()
        self._pipe, self._pipe_next = pipe, (self.epoch, self.samples)
        return pipe

    # -- batches --------------------------------------------------------------------------------

    def __iter__(self):
        """The rest of this rank's current epoch; afterwards the loader is at the next epoch."""
        pipe = self._pipeline()
        step = self.config.batch_size * self.world_size
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                pipe.reset()
                self.epoch, self.samples = self.epoch + 1, 0
                self._pipe_next = (self.epoch, 0)
                return
            with self._torch_threads():
                batch = self._finish(outputs)
            self.samples += step
            self._pipe_next = (self.epoch, self.samples)
            yield batch

    def stats(self) -> dict:
        """Counters: images, backgrounds skipped, instances pasted, kept, damaged, ... and
        `skipped`: the latest named skips as [shard, key, reason]."""
        return {**dict(sorted(self.counters.counts.items())), "skipped": list(self.counters.skipped)}

    def _finish(self, outputs) -> Batch:
        size = self.paste.output_size
        named = dict(zip(PASSTHROUGH, outputs[3:3 + len(PASSTHROUGH)], strict=True))
        rows = np.stack(_samples(named["plan_row"]))
        plan = plan_from_rows(rows, self.paste.slots)
        images = to_torch(outputs[0], self.device)
        ids, extents = to_torch(outputs[1], self.device), to_torch(outputs[2], self.device)
        boxes = ragged_to_torch(named["real_boxes"], self.device)
        bits = ragged_to_torch(named["real_bits"], self.device)
        labels = _samples(named["real_labels"])
        real = [lsj_crop_masks(boxes[i], bits[i], plan.image_sizes[i], plan.lsj_size[i],
                               plan.lsj_offset[i], bool(plan.lsj_flip[i]), size)
                for i in range(len(labels))]
        targets = build_targets(ids, extents, real, labels, plan, self.paste)
        self._count(counts_from_rows(rows, self.paste.slots), _samples(named["skipped"]), plan,
                    targets, labels)
        debug = None
        if self.config.debug:
            rest = outputs[3 + len(PASSTHROUGH):]
            debug = {"backgrounds": to_torch(rest[0], torch.device("cpu")).numpy(),
                     "real_masks": [m.cpu().numpy() for m in real], "real_labels": labels,
                     "crops": [_samples(out) for out in rest[1:]]}
        return Batch(images, targets, plan, rows[:, 8].copy(), self.epoch, debug)

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

    def _count(self, counts: np.ndarray, skipped: list[np.ndarray], plan: PastePlan,
               targets: list[dict], labels: list[np.ndarray]) -> None:
        c = self.counters
        for name, n in zip(COUNTERS, counts.sum(0).tolist(), strict=True):
            c.add(name, n)
        for raw in skipped:
            c.name(json.loads(raw.tobytes()))
        c.add("images", len(targets))
        c.add("pastes_planned", int(plan.active.sum()))
        pasted = sum(int(t["source"].sum()) for t in targets)
        c.add("pasted_kept", pasted)
        c.add("real_kept", sum(len(t["source"]) for t in targets) - pasted)
        c.add("real_annotations", sum(len(x) for x in labels))


def check_background_schema(index: BackgroundIndex, files: ShardFiles) -> None:
    """Refuse shards of an older background schema before any work, with what to do."""
    try:
        meta = json.loads(files.read(index, 0, "json"))
    except (formats.FormatError, ValueError, OSError):
        return  # a damaged first sample is skipped and counted like any other
    if meta.get("schema") != formats.BACKGROUND_SCHEMA:
        raise LoaderError(f"{index.urls[0]}: background schema {meta.get('schema')!r}, this "
                          f"version reads {formats.BACKGROUND_SCHEMA!r}; rerun `xpaste-stream "
                          "pack-coco` to rewrite the background shards")


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


def ragged_to_torch(tensor_list, device: torch.device) -> list[torch.Tensor]:
    """Per-sample tensors of a (possibly non-uniform) DALI TensorList on `device`, copied;
    GPU samples are copied on the device, on the current stream (no host round trip)."""
    if isinstance(tensor_list, TensorListGPU) and device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = []
        for i in range(len(tensor_list)):
            sample = tensor_list[i]
            t = torch.empty(sample.shape(), dtype=to_torch_type[sample.dtype], device=device)
            if t.numel():
                feed_ndarray(sample, t, cuda_stream=torch.cuda.current_stream(device))
            out.append(t)
        return out
    return [torch.from_numpy(a).to(device) for a in _samples(tensor_list)]
