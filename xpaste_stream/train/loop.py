"""Train a torchvision Mask R-CNN from background shard URLs + an instance bank through
CopyPasteLoader: one GPU, DDP under torchrun, or the CPU; mixed precision on GPU; checkpoints
that hold the loader's state so a restarted job resumes mid-epoch with the same batches.

    train(TrainConfig(backgrounds=["bg/bg-{000000..000117}.tar"], bank="bank", output_dir="runs/r50"))
    torchrun --nproc-per-node 8 -m xpaste_stream.cli train ...   # same code, one rank per GPU

Each step is timed in two parts: waiting for the loader's batch (`next()`, targets included)
and the model step. The log reports loss terms, images/s and the data-wait fraction of the
step time, the figure that says whether the loader keeps the GPU busy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from .. import errors, formats, urls
from ..config import check, parse_device, torchrun_env
from ..loader import CopyPasteLoader, PasteConfig
from .checkpoint import (
    LATEST,
    check_identity,
    checkpoint_name,
    latest_checkpoint,
    load_model_state,
    mark_latest,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .model import LabelMap, ModelConfig, build_model, model_identity, set_pasted_losses


class TrainError(ValueError):
    """Training settings that cannot work (named setting, what is wrong)."""


@dataclass
class TrainConfig:
    """One training run. Batch size is per rank; the loader's output size is the model's."""

    backgrounds: list[str]                 # background shard URLs / brace or glob patterns
    bank: str                              # instance bank folder
    output_dir: str | None = None          # checkpoints and log.jsonl; None: nothing written
    categories: str | None = None          # default: categories.json beside the shards
    paste: PasteConfig = field(default_factory=PasteConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 2
    epochs: int = 1
    max_steps: int = 0                     # > 0: stop after this many steps (epochs ignored)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100                # linear warm-up from lr / 1000
    lr_steps: tuple[int, ...] = ()         # lr x 0.1 at each of these steps
    clip_grad_norm: float = 0.0            # 0: off
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, off on CPU
    device: str = "auto"                   # auto, cpu, cuda or cuda:N (config.parse_device)
    seed: int = 0
    loader_threads: int = 4                # DALI threads per process
    loader_workers: int = 2                # processes doing the loader's host work per rank
    pasted_box_loss: bool = True           # False: pasted objects out of the box-regression loss
    pasted_mask_loss: bool = True          # False: pasted objects out of the mask loss
    log_every: int = 20
    checkpoint_every: int = 1000           # steps; the last step, and a run stopped by Ctrl-C /
                                           # SIGTERM, are always saved
    resume: str | None = None              # a checkpoint file, or "auto": output_dir's newest
    overwrite: bool = False                # an output_dir of an earlier run: start over in it
    progress_every: float = 5.0            # seconds between progress lines on stderr (0: none)

    def validate(self) -> None:
        if not self.backgrounds:
            raise ValueError("backgrounds: give at least one shard URL or pattern")
        for name in ("batch_size", "epochs", "log_every", "checkpoint_every", "loader_threads",
                     "loader_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        if self.max_steps < 0 or self.warmup_steps < 0 or self.clip_grad_norm < 0:
            raise ValueError("max_steps, warmup_steps and clip_grad_norm must be >= 0")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr {self.lr} must be > 0 and weight_decay >= 0")
        if self.resume == "auto" and not self.output_dir:
            raise ValueError("resume = 'auto' needs an output_dir to look in")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other (continue, or start over)")
        if self.progress_every < 0:
            raise ValueError(f"progress_every {self.progress_every} must be >= 0 seconds")
        self.device = parse_device(self.device)
        if self.model.image_size != self.paste.output_size:
            raise ValueError(f"model.image_size {self.model.image_size} must equal "
                             f"paste.output_size {self.paste.output_size} (the loader's canvas)")


@dataclass
class StepRecord:
    """What one step saw and cost (handed to `on_step`; tests and benchmarks read it)."""

    step: int
    epoch: int
    loss: float
    losses: dict[str, float]
    image_ids: list[int]
    plan_digest: str
    wait_s: float       # waiting for the loader's batch
    step_s: float       # wait + forward, backward, optimizer step
    images: int         # images in this step, all ranks


@dataclass
class TrainResult:
    steps: int
    epoch: int
    last_checkpoint: str | None
    images_per_s: float
    data_wait_fraction: float


@dataclass
class Runtime:
    """Where this process runs: its rank, the world and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def loader_device(self) -> int | None:
        return self.device.index if self.device.type == "cuda" else None


def init_runtime(device: str) -> Runtime:
    """Rank and world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process
    group per job (NCCL on GPUs, gloo on the CPU)."""
    rank, world, local = torchrun_env()
    device = parse_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {device!r} asked for, but CUDA is not available here")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    index = int(device[5:]) if device.startswith("cuda:") and world == 1 else local  # DDP: LOCAL_RANK
    where = torch.device("cuda", index) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    return Runtime(rank, world, local, where, owns)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then x0.1 at each of `lr_steps` (detectron2's WarmupMultiStepLR)."""
    lr = cfg.lr * 0.1 ** sum(step >= s for s in cfg.lr_steps)
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        lr *= 0.001 * (1 - alpha) + alpha
    return lr


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def model_targets(targets: list[dict], labels: LabelMap) -> list[dict]:
    """Loader targets -> torchvision's: contiguous labels; `source` rides along for the
    pasted-object loss switch."""
    return [{"boxes": t["boxes"], "labels": labels.to_labels(t["labels"]), "masks": t["masks"],
             "source": t["source"]} for t in targets]


def plan_digest(plan) -> str:
    """A short hash of every random choice of a batch (background order and paste plan)."""
    h = hashlib.sha1()
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, np.ndarray):
            h.update(f.name.encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:16]


def make_loader(cfg: TrainConfig, rt: Runtime) -> CopyPasteLoader:
    """The loader for this rank; it refuses shards that match nothing and a bank built for
    other categories, before any model is built."""
    return CopyPasteLoader(cfg.backgrounds, cfg.bank, cfg.paste, categories=cfg.categories,
                           batch_size=cfg.batch_size, device_id=rt.loader_device, rank=rt.rank,
                           world_size=rt.world_size, seed=cfg.seed, num_threads=cfg.loader_threads,
                           workers=cfg.loader_workers)


def check_background_kind(patterns: list[str]) -> None:
    """Instance or image shards given as backgrounds are named as what they are (a wrong-kind
    input, not an old version to re-pack), before the loader reads them."""
    for url in urls.expand(patterns)[:1]:
        if not urls.exists(url):
            return  # the loader names missing shards
        from ..shards import iter_tar

        try:
            sample = next(iter(iter_tar(url, [])), None)
            schema = json.loads(sample["json"]).get("schema") if sample else None
        except (OSError, KeyError, ValueError, UnicodeDecodeError, AttributeError):
            return  # damage is the loader's to report
        kinds = {formats.IMAGE_SCHEMA: "image shards (generate's output)",
                 **dict.fromkeys(formats.INSTANCE_SCHEMAS, "instance shards (extract's output)")}
        if schema in kinds:
            raise TrainError(f"--backgrounds {url}: these are {kinds[schema]}, schema {schema}, not "
                             f"background shards ({formats.BACKGROUND_SCHEMA}, pack-coco's output); "
                             "instances go in a bank (xpaste-stream index) given as --bank")


RUN_FILES = ("log.jsonl",)  # besides checkpoints: what a run writes into its output folder


def used_output(output_dir: str | None) -> list[str]:
    """The files of an earlier run in `output_dir` (checkpoints, latest mark, log.jsonl)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n in RUN_FILES or (n.startswith("checkpoint-") and n.endswith(".pt"))
                  or n == os.path.basename(LATEST))


def check_output(cfg: TrainConfig) -> None:
    """A folder holding an earlier run is refused (its checkpoints and log would mix with this
    run's) unless the run resumes it or asks to start over (`overwrite`: its files removed)."""
    present = used_output(cfg.output_dir)
    if not present or cfg.resume:
        return
    if not cfg.overwrite:
        raise TrainError(f"--output {cfg.output_dir} holds an earlier run ({len(present)} files, e.g. "
                         f"{present[0]}); use --resume auto to continue it, --overwrite to start "
                         "over (removes them), or another --output")
    for name in present:
        os.remove(os.path.join(cfg.output_dir, name))


def check_resume_settings(state: dict, path: str, cfg: TrainConfig) -> None:
    """Settings a mid-epoch resume cannot change, named by their flags."""
    trained = (state.get("config") or {}).get("model", {}).get("image_size")
    if trained is not None and int(trained) != cfg.model.image_size:
        raise TrainError(f"{path}: trained at --size {trained}; this run asks for --size "
                         f"{cfg.model.image_size}. Resume with --size {trained}, or start a new run "
                         f"from its weights (--weights, another --output)")


def resume_state(cfg: TrainConfig, identity: dict) -> tuple[dict | None, str | None]:
    """The checkpoint to continue from (checked to be of this model), or (None, None)."""
    if cfg.resume is None:
        return None, None
    path = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
    if path is None:
        return None, None  # "auto" in a fresh output folder: start from scratch
    state = read_checkpoint(path)
    check_identity(state, path, identity)
    check_resume_settings(state, path, cfg)
    if state.get("loader") is None:
        raise TrainError(f"{path}: checkpoint holds no loader state; it cannot resume training "
                         "(use it as --weights to start a new run from its weights)")
    return state, path


def start_epoch(loader, epoch: int) -> None:
    """Point the loader at `epoch`. Loaders without `set_epoch` advance one epoch per
    iteration by themselves, which gives the same order when a run starts at epoch 0."""
    set_epoch = getattr(loader, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)


class Trainer:
    """The pieces of a run, built and checked before the first step."""

    def __init__(self, cfg: TrainConfig):
        check(cfg, "train")
        self.cfg = cfg
        self.rt = init_runtime(cfg.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        check_background_kind(cfg.backgrounds)
        if self.rt.rank == 0:
            check_output(cfg)
        self.loader = make_loader(cfg, self.rt)
        self.categories = self.loader.categories_doc["categories"]
        self.labels = LabelMap.from_categories(self.loader.categories_doc)
        resumed, self.resumed_from = resume_state(cfg, model_identity(cfg.model, self.labels))
        model = build_model(cfg.model, self.labels.num_classes)
        set_pasted_losses(model, box=cfg.pasted_box_loss, mask=cfg.pasted_mask_loss)
        self.model = model.to(self.rt.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.amp = amp_dtype(cfg.amp, self.rt.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.step, self.epoch = 0, 0
        if resumed is not None:
            self._restore(resumed)
        if self.rt.world_size > 1:
            ids = [self.rt.local_rank] if self.rt.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.last_checkpoint = self.resumed_from

    def _restore(self, state: dict) -> None:
        load_model_state(self.model, state, self.resumed_from)
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        restore_rng(state)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        if self.rt.rank == 0:
            print(f"train: resumed from step {self.step} (epoch {self.epoch}) of {self.resumed_from}",
                  file=sys.stderr, flush=True)

    # -- one step ---------------------------------------------------------------------------

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        images = list(batch.images.float().div_(255))
        targets = model_targets(batch.targets, self.labels)
        autocast = (torch.autocast(self.rt.device.type, dtype=self.amp) if self.amp is not None
                    else contextlib.nullcontext())
        with autocast:
            losses = self.model(images, targets)
        total = sum(losses.values())
        self.scaler.scale(total).backward()
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total.detach(), **{k: v.detach() for k, v in losses.items()}}

    # -- the run ----------------------------------------------------------------------------

    def run(self, on_step: Callable[[StepRecord], None] | None = None) -> TrainResult:
        """Train to the end; Ctrl-C / SIGTERM finish the step under way, save a checkpoint of
        it and then stop (KeyboardInterrupt / errors.Terminated); a second signal stops at once."""
        cfg = self.cfg
        self.model.train()
        log = Logger(cfg, self.rt, resumed_step=self.step if self.resumed_from else None)
        progress = Progress(cfg.progress_every if self.rt.rank == 0 else 0, self.step,
                            self._total_steps())
        waited = stepped = 0.0
        images = 0
        fresh_epoch = self.resumed_from is None  # a resumed epoch continues where it stopped
        timer = _Timed()
        with deferred_signals() as stop, progress:
            while not self._done():
                if fresh_epoch:
                    start_epoch(self.loader, self.epoch)
                fresh_epoch = True
                for batch, wait_s in timer(self.loader, self.rt.device):
                    values = {k: float(v) for k, v in self.train_step(batch).items()}  # syncs
                    step_s = wait_s + timer.since_batch()
                    self.step += 1
                    n = len(batch.targets) * self.rt.world_size
                    waited, stepped, images = waited + wait_s, stepped + step_s, images + n
                    record = StepRecord(self.step, self.epoch, values.pop("loss"), values,
                                        [int(t["image_id"]) for t in batch.targets],
                                        plan_digest(batch.plan), wait_s, step_s, n)
                    log.add(record, lr_at(self.step - 1, cfg))
                    progress.step(record)
                    if on_step is not None:
                        on_step(record)
                    if self.step % cfg.checkpoint_every == 0:
                        self.save()
                    if stop.signum is not None:
                        self._stop(stop.signum, log)
                    if self._done(steps_only=True):
                        break
                else:
                    self.epoch += 1
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(checkpoint_name(self.step)):
            self.save()
        log.close()
        return TrainResult(self.step, self.epoch, self.last_checkpoint,
                           images / stepped if stepped else 0.0, waited / stepped if stepped else 0.0)

    def _stop(self, signum: int, log: Logger) -> None:
        """Save this step (unless just saved), say where, and stop like the signal would."""
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(checkpoint_name(self.step)):
            self.save()
        log.close()
        name = signal.Signals(signum).name
        if self.rt.rank == 0:
            where = (f"checkpoint {self.last_checkpoint} written; rerun with --resume auto to continue"
                     if self.cfg.output_dir else "no --output, so nothing was kept")
            print(f"train: {name} at step {self.step}: {where}", file=sys.stderr, flush=True)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise errors.Terminated(signum)

    def _total_steps(self) -> int | None:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        try:
            return self.cfg.epochs * len(self.loader)
        except TypeError:
            return None

    def _done(self, steps_only: bool = False) -> bool:
        if self.cfg.max_steps:
            return self.step >= self.cfg.max_steps
        return not steps_only and self.epoch >= self.cfg.epochs

    def save(self) -> str | None:
        """A checkpoint of this step (rank 0 writes; the loader state is global)."""
        if not self.cfg.output_dir:
            return None
        loader_state = self.loader.state_dict()
        path = os.path.join(self.cfg.output_dir, checkpoint_name(self.step))
        if self.rt.rank == 0:
            save_checkpoint(path, model=self.model, model_cfg=self.cfg.model, labels=self.labels,
                            categories=self.categories, step=self.step, epoch=self.epoch,
                            optimizer=self.optimizer, scaler=self.scaler, loader_state=loader_state,
                            config=dataclasses.asdict(self.cfg))
            mark_latest(self.cfg.output_dir, path)
        self.last_checkpoint = path
        return path

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()
        if self.rt.owns_process_group:
            dist.destroy_process_group()


def train(cfg: TrainConfig, on_step: Callable[[StepRecord], None] | None = None) -> TrainResult:
    """Build everything (errors before the first step), train, save the last step."""
    trainer = Trainer(cfg)
    try:
        return trainer.run(on_step)
    finally:
        trainer.close()


class _Timed:
    """Iterate a loader, timing the wait for each batch; `since_batch()` is the time since
    the last batch arrived (the model step, once its loss has been read)."""

    def __init__(self):
        self._arrived = 0.0

    def __call__(self, loader, device: torch.device):
        it = iter(loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            _sync(device)
            self._arrived = time.perf_counter()
            yield batch, self._arrived - started

    def since_batch(self) -> float:
        return time.perf_counter() - self._arrived



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Logger:
    """Every `log_every` steps: mean loss terms, lr, images/s and the data-wait fraction of
    the window, printed and appended to OUTPUT/log.jsonl (rank 0; losses averaged over ranks)."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, resumed_step: int | None = None):
        self.cfg, self.rt = cfg, rt
        self.window: list[StepRecord] = []
        self.file = None
        if cfg.output_dir and rt.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            path = os.path.join(cfg.output_dir, "log.jsonl")
            if resumed_step is not None:
                keep_log_until(path, resumed_step)
            self.file = open(path, "a")

    def add(self, record: StepRecord, lr: float) -> None:
        self.window.append(record)
        self.lr = lr
        if record.step % self.cfg.log_every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.window:
            return
        lr = self.lr
        w, self.window = self.window, []
        names = ["loss", *w[-1].losses]
        means = torch.tensor([[r.loss, *(r.losses.get(k, 0.0) for k in names[1:])] for r in w]).mean(0)
        if self.rt.world_size > 1:
            means = means.to(self.rt.device)
            dist.all_reduce(means)
            means = means.cpu() / self.rt.world_size
        seconds = sum(r.step_s for r in w)
        entry = {"step": w[-1].step, "epoch": w[-1].epoch, "lr": lr,
                 **{k: round(float(v), 5) for k, v in zip(names, means, strict=True)},
                 "images_per_s": float(f"{sum(r.images for r in w) / seconds:.3g}"),  # slow: digits kept
                 "data_wait_fraction": round(sum(r.wait_s for r in w) / seconds, 4),
                 "seconds": round(seconds, 3)}
        if self.rt.rank == 0:
            print(json.dumps(entry), flush=True)
            if self.file:
                self.file.write(json.dumps(entry) + "\n")
                self.file.flush()

    def close(self) -> None:
        self.flush()  # the steps since the last full window
        if self.file:
            self.file.close()
            self.file = None


def keep_log_until(path: str, step: int) -> None:
    """Drop the entries of steps after `step` (logged after the checkpoint a run resumes
    from: the resumed run logs them again), so log.jsonl holds each step once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            entry_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
        if entry_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class _StopFlag:
    signum: int | None = None


@contextlib.contextmanager
def deferred_signals():
    """SIGINT / SIGTERM during training set a flag the loop reads after each step (so the
    checkpoint it saves is of a whole step); a second one raises at once."""
    flag = _StopFlag()

    def handler(signum, frame):
        if flag.signum is not None:
            raise KeyboardInterrupt if signum == signal.SIGINT else errors.Terminated(signum)
        flag.signum = signum
        print(f"train: {signal.Signals(signum).name}: stopping after this step (again to stop now)",
              file=sys.stderr, flush=True)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        yield flag
        return
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _rate(value: float) -> str:
    """images/s with 3 significant digits: 0.0412, not 0.0."""
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """A line on stderr every `every` seconds (a thread, so slow steps still show life):
    step, loss, images/s, ETA; and when no step has finished yet, what it waits for."""

    def __init__(self, every: float, start_step: int, total: int | None):
        self.every, self.start_step, self.total = every, start_step, total
        self.last: StepRecord | None = None
        self.steps = self.images = 0
        self.started = time.perf_counter()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.every > 0:
            self._thread = threading.Thread(target=self._loop, name="train-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def step(self, record: StepRecord) -> None:
        self.last, self.steps, self.images = record, self.steps + 1, self.images + record.images

    def _loop(self) -> None:
        while not self._done.wait(self.every):
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        if self.last is None:
            return f"train: step {self.start_step + 1} under way ({_duration(elapsed)}; the first " \
                   "step includes the loader's start-up)"
        step = self.last.step
        of = f"/{self.total}" if self.total else ""
        rate = self.images / elapsed if elapsed else 0.0
        text = f"train: step {step}{of}, loss {self.last.loss:.4f}, {_rate(rate)} images/s"
        if self.total and self.steps:
            text += f", ETA {_duration((self.total - step) * elapsed / self.steps)}"
        return text
