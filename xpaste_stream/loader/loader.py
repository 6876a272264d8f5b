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
- wire.py: what a worker sends for one sample, declared once and read by name;
- pipeline.py: the DALI pipelines that decode and jitter the backgrounds and decode a batch's
  instances in one call (GPU when `device_id` is set);
- composite.py: the batched compositor (one kernel source for the CPU and CUDA) and the real
  masks' LSJ;
- targets.py: occlusion-aware targets in torch on the same device.
Resuming is starting the next pipeline at a position: nothing depends on threads, workers,
ranks or the last run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali.backend import TensorListGPU

from .. import formats, urls
from ..config import check, torchrun_env
from .backgrounds import BackgroundIndex, BackgroundIndexError, ShardFiles
from .composite import (
    C_H,
    C_W,
    ObjectTargets,
    paste_batch,
    paste_table,
    real_masks,
    real_object_table,
)
from .config import LoaderConfig, PasteConfig
from .order import LoaderState, batches_per_rank, fingerprint
from .pipeline import INSTANCE_INPUT, OUTPUTS, background_pipeline, instance_pipeline
from .plan import PastePlan
from .sample import SampleSource
from .sources import LoaderCounters
from .targets import build_targets
from .wire import COUNTERS, plan_of, unpack_plans


class LoaderError(ValueError):
    """The loader's inputs do not fit together (bank vs categories, missing files, a state
    dict of another run), or its pipeline failed for good (workers kept dying)."""


class WorkerLost(RuntimeError):
    """A worker process died or a batch did not come within `LoaderConfig.batch_timeout`."""


log = logging.getLogger(__name__)


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
        env_rank, env_world, _ = torchrun_env()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
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
                                   self.paste, cfg, plan_hook)
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
        self._decoder = None                             # instance_pipeline, built on first use
        self._workers: set[int] = set()                  # pids of the live pipeline's workers
        self._owner = os.getpid()                        # forked workers hold copies of self
        self.restarts = 0                                # pipelines replaced after a lost worker

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
            alive = weakref.ref(self._pipe)
            self._pipe, self._pipe_next = None, None
            if alive() is not None:      # DALI stops the pipeline and its workers when it goes
                gc.unfreeze()            # (frozen when its workers forked, see _pipeline)
                gc.collect()
        self._decoder = None
        self._workers = set()

    def __del__(self):
        # only in the process that made the loader: a forked worker's copy of a loader must
        # not touch the parent's DALI pipelines (DALI aborts the worker)
        if getattr(self, "_owner", None) == os.getpid():
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
        pipe = self.background_pipeline(self.device_id)
        if cfg.workers:
            before = _child_pids()
            # forked workers must never finalise a copy of a DALI pipeline (DALI aborts them):
            # collect what is garbage here, and freeze the rest for the children (Python's
            # advice for fork without exec). It stays frozen here too until close(): the
            # parent's next full collection would otherwise write to every object the workers
            # share and copy those pages (measured: main's private memory +334 MB in one step
            # at batch ~12,750 of a 20k-batch run over 100k backgrounds, RSS unchanged).
            gc.collect()
            gc.freeze()
            pipe.start_py_workers()
            self._workers = _child_pids() - before
        pipe.build()
        self._pipe, self._pipe_next = pipe, (self.epoch, self.samples)
        return pipe

    def _worker_start(self) -> str:
        """How worker processes start. DALI refuses `fork` once the CUDA driver is initialised
        in the process, by anyone (torch, numba, DALI's own GPU pipeline: a second pipeline
        after a resume would find it so), so a GPU loader always spawns, and so does a CPU
        loader in a process where torch has started CUDA; otherwise fork (~1 s faster)."""
        start = self.config.worker_start
        if start != "auto":
            return start
        cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
        return "spawn" if self.device_id is not None or cuda_live else "fork"

    def background_pipeline(self, device_id: int | None, gpu: bool | None = None):
        """The (unbuilt) DALI pipeline of backgrounds this loader runs; `gpu` with
        `device_id` None defines the GPU graph without building it (to inspect it)."""
        cfg = self.config
        return background_pipeline(
            source=self.source, size=self.paste.output_size,
            gpu=device_id is not None if gpu is None else gpu, workers=cfg.workers,
            worker_prefetch=cfg.worker_prefetch, batch_size=cfg.batch_size,
            num_threads=cfg.num_threads, device_id=device_id, prefetch_queue_depth=cfg.prefetch,
            seed=cfg.seed, py_num_workers=max(1, cfg.workers), py_start_method=self._worker_start())

    def instance_pipeline(self, device_id: int | None, gpu: bool | None = None):
        """The (unbuilt) pipeline that decodes a batch's instances in one call (batch B x K)."""
        cfg = self.config
        return instance_pipeline(
            gpu=device_id is not None if gpu is None else gpu,
            batch_size=cfg.batch_size * self.paste.slots, num_threads=cfg.num_threads,
            device_id=device_id, prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)

    def _instance_decoder(self):
        if self._decoder is None:
            self._decoder = self.instance_pipeline(self.device_id)
            self._decoder.build()
        return self._decoder

    # -- batches --------------------------------------------------------------------------------

    def __iter__(self):
        """The rest of this rank's current epoch; afterwards the loader is at the next epoch."""
        pipe = self._pipeline()
        step = self.config.batch_size * self.world_size
        while True:
            try:
                outputs = self._run_bounded(pipe)
            except StopIteration:
                pipe.reset()
                self.epoch, self.samples = self.epoch + 1, 0
                self._pipe_next = (self.epoch, 0)
                return
            except WorkerLost as lost:
                pipe = self._replace_pipeline(lost)
                continue
            with self._torch_threads():
                batch = self._finish(outputs)
            self.samples += step
            self._pipe_next = (self.epoch, self.samples)
            yield batch

    def worker_pids(self) -> set[int]:
        """Process ids of the live pipeline's worker processes (empty before the first batch)."""
        return set(self._workers)

    def _run_bounded(self, pipe):
        """`pipe.run()`, watched: a worker that dies or a batch later than `batch_timeout`
        raises WorkerLost instead of waiting forever (DALI can wait on a lock a dead worker
        held). The run happens in a daemon thread, so a wait that never ends is left behind."""
        dead = sorted(p for p in self._workers if not _alive(p))
        if dead:   # replaced at once: batches it queued are made again, identically
            raise WorkerLost(f"loader worker process {', '.join(map(str, dead))} died")
        result: dict = {}
        done = threading.Event()

        def run():
            try:
                result["outputs"] = pipe.run()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                result["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name="xpaste-loader-run", daemon=True).start()
        timeout = self.config.batch_timeout
        deadline = time.monotonic() + timeout
        while not done.wait(0.2):
            dead = sorted(p for p in self._workers if not _alive(p))
            if dead:
                raise WorkerLost(f"loader worker process {', '.join(map(str, dead))} died")
            if time.monotonic() > deadline:
                raise WorkerLost(f"no batch within batch_timeout={timeout:g} s (a worker process "
                                 "or a read is stuck)")
        error = result.get("error")
        if error is None:
            return result["outputs"]
        dead = sorted(p for p in self._workers if not _alive(p))
        if dead and not isinstance(error, StopIteration):
            raise WorkerLost(f"loader worker process {', '.join(map(str, dead))} died ({error})")
        raise error

    def _replace_pipeline(self, lost: WorkerLost):
        """Kill the lost pipeline's workers and start a new pipeline at the same position; the
        batches are those an uninterrupted run gives (the order is a function of position)."""
        self.restarts += 1
        self.counters.add("worker_restarts")
        for pid in self._workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self._pipe, self._pipe_next, self._workers = None, None, set()   # the stuck one is left
        if self.restarts > self.config.worker_restarts or not self.config.workers:
            raise LoaderError(f"{lost}; the loader gave up after {self.restarts - 1} restart(s) "
                              f"(LoaderConfig.worker_restarts={self.config.worker_restarts})") from None
        log.warning("%s: restarting the pipeline at epoch %d, sample %d (restart %d of %d)", lost,
                    self.epoch, self.samples, self.restarts, self.config.worker_restarts)
        return self._pipeline()

    def stats(self) -> dict:
        """Counters: images, backgrounds skipped, instances pasted, kept, damaged, ... and
        `skipped`: the latest named skips as [shard, key, reason]."""
        return {**dict(sorted(self.counters.counts.items())), "skipped": list(self.counters.skipped)}

    def _finish(self, outputs) -> Batch:
        """Paste and build targets for one batch of `background_pipeline` outputs."""
        paste, size, device = self.paste, self.paste.output_size, self.device
        named = dict(zip(OUTPUTS, outputs, strict=True))
        records = unpack_plans(_samples(named["plan"]), paste.slots)
        plan = plan_of(records)
        canvas = to_torch(named["image"], device)
        background = canvas.permute(0, 2, 3, 1).cpu().numpy().copy() if self.config.debug else None

        active = plan.active
        src_sizes = records["src_size"][active].astype(np.int64)
        rgb_len = src_sizes[:, 0] * src_sizes[:, 1] * 3
        alpha_len = rgb_len // 3
        table = paste_table(plan, src_sizes, np.cumsum(rgb_len) - rgb_len,
                            np.cumsum(alpha_len) - alpha_len, paste)
        rgb = self._decode_instances(_samples(named["inst_jpegs"]), records, int(rgb_len.sum()))
        alpha = torch.from_numpy(_concat(_samples(named["inst_alphas"]))).to(device)
        pasted = paste_batch(canvas, table, rgb, alpha, paste)

        boxes = _samples(named["real_boxes"])
        counts = [len(x) for x in boxes]
        objects = real_object_table(np.concatenate(boxes).reshape(-1, 4), np.asarray(counts), plan, size)
        bits = torch.from_numpy(_concat(_samples(named["real_bits"]))).to(device)
        labels = _samples(named["real_labels"])
        targets = build_targets(ObjectTargets(objects, bits, table, pasted["scratch"], pasted["ids"], paste),
                                counts, labels, plan, paste)
        self._count(records["counters"], _samples(named["skipped"]), plan, targets, labels)
        debug = None
        if self.config.debug:
            real = real_masks(objects, bits, size)          # before occlusion
            debug = {"backgrounds": background,
                     "real_masks": [m.cpu().numpy() for m in torch.split(real, counts)],
                     "real_labels": labels, "crops": debug_crops(plan, table, pasted["scratch"])}
        return Batch(canvas, targets, plan, records["position"].copy(), self.epoch, debug)

    def _decode_instances(self, jpeg_blobs: list[np.ndarray], records: np.ndarray,
                          nbytes: int) -> torch.Tensor:
        """Every active slot's instance decoded by one call of the instance pipeline, as one
        flat RGB atlas (instance after instance, in (image, slot) order) on the device."""
        jpegs = []
        for blob, rec in zip(jpeg_blobs, records, strict=True):
            ends = np.cumsum(rec["jpg_len"][rec["ids"] >= 0])
            jpegs.extend(blob[e - n:e] for n, e in zip(rec["jpg_len"][rec["ids"] >= 0], ends, strict=True))
        atlas = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        if not jpegs:
            return atlas
        decoder = self._instance_decoder()
        decoder.feed_input(INSTANCE_INPUT, jpegs)
        (decoded,) = decoder.run()
        at = 0
        for sample, (h, w) in zip(_per_sample(decoded), records_src_size(records).tolist(), strict=True):
            if list(sample.shape()) != [h, w, 3]:
                raise LoaderError(f"an instance decoded to {sample.shape()}, its bank entry says "
                                  f"{h}x{w}: the bank does not match its shards; rebuild it")
            _copy_into(sample, atlas[at:at + h * w * 3].view(h, w, 3), self.device)
            at += h * w * 3
        return atlas
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


def records_src_size(records: np.ndarray) -> np.ndarray:
    """(P, 2) (h, w) of the batch's active slots' instances, in (image, slot) order."""
    return records["src_size"][records["ids"] >= 0]


def debug_crops(plan: PastePlan, table: np.ndarray, scratch: torch.Tensor) -> list[list[np.ndarray]]:
    """crops[k][i]: the resized, flipped RGBA instance of slot k of image i (numpy), a 1 x 1
    transparent pixel where the slot is empty."""
    b, k = plan.ids.shape
    crops = [[np.zeros((1, 1, 4), np.uint8) for _ in range(b)] for _ in range(k)]
    flat = scratch.cpu().numpy()
    at = 0
    for (i, slot), row in zip(zip(*np.nonzero(plan.active), strict=True), table, strict=True):
        h, w = int(row[C_H]), int(row[C_W])
        crops[slot][i] = flat[at:at + h * w].reshape(h, w, 4).copy()
        at += h * w
    return crops


def check_background_schema(index: BackgroundIndex, files: ShardFiles) -> None:
    """Refuse shards of another kind or an older background schema before any work, with what
    to do."""
    try:
        meta = json.loads(files.read(index, 0, "json"))
    except (formats.FormatError, ValueError, OSError):
        return  # a damaged first sample is skipped and counted like any other
    schema = meta.get("schema")
    if schema == formats.IMAGE_SCHEMA or schema in formats.INSTANCE_SCHEMAS:
        kind = "image" if schema == formats.IMAGE_SCHEMA else "instance"
        raise LoaderError(f"{index.urls[0]}: these are {kind} shards ({schema}), not background "
                          f"shards ({formats.BACKGROUND_SCHEMA}, pack-coco's output); instances "
                          "go in a bank (`xpaste-stream index`), backgrounds come from pack-coco")
    if schema != formats.BACKGROUND_SCHEMA:
        raise LoaderError(f"{index.urls[0]}: background schema {schema!r}, this "
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


def _child_pids() -> set[int]:
    """This process's children (Linux /proc; empty elsewhere: then no liveness watch)."""
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
    return pids


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList as one torch tensor on `device`, copied (DALI reuses buffers)."""
    if not tensor_list.is_dense_tensor():
        raise LoaderError("internal: a ragged DALI output where a dense batch was expected")
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


def _per_sample(tensor_list) -> list:
    """The samples of a (possibly ragged) TensorList, without `as_tensor`."""
    return [tensor_list[i] for i in range(len(tensor_list))]


def _copy_into(sample, out: torch.Tensor, device: torch.device) -> None:
    """One DALI sample (CPU or GPU tensor) into the flat torch slice `out` on `device`."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        feed_ndarray(sample, out, cuda_stream=torch.cuda.current_stream(device))
    else:
        out.copy_(torch.from_numpy(np.asarray(sample)))


def _samples(tensor_list) -> list[np.ndarray]:
    """The samples of a CPU TensorList as numpy arrays (copies: DALI reuses its buffers)."""
    return [tensor_list.at(i) for i in range(len(tensor_list))]


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.uint8)
