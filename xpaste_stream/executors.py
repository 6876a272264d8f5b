"""Executors: run a stage's work units in this process, in local worker processes, or on Ray.

A stage describes its work as a picklable *job* with two methods:
- `setup()` builds what one worker needs once (models on its device) and returns it;
- `run(context, unit)` does one work unit (writes exactly its own shard) and returns its stats.
Every executor calls the same two methods, so outputs are byte-identical whichever runs them.

- `local`, 1 worker: this process (a prebuilt context may be passed: benchmarks, tests);
- `local`, N workers: N spawned processes, each with its own context;
- `ray`: N Ray actors, each holding its context (one model per GPU actor when the job asks
  for GPUs), pulling units one at a time from this driver.

A unit that raises (or whose worker dies) is retried up to `retries` times; units that still
fail are reported by name once every other unit is done (`UnitsFailed`), so finished work is
kept and a rerun resumes. Progress is counted over all units, wherever they run.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Literal, Protocol

from tqdm import tqdm

from .config import ConfigError

# test hook: "UNIT_KEY@MARKER_FILE" makes that unit raise once (the marker file remembers it)
FAIL_ONCE_ENV = "XPASTE_FAIL_UNIT_ONCE"


@dataclass
class ExecutorConfig:
    executor: Literal["local", "ray"] = "local"
    workers: int = 1                 # processes (local) or actors (ray)
    ray_address: str | None = None   # None: join the running Ray instance or start one here
    retries: int = 2                 # extra attempts of a failed unit before it is reported

    def validate(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.ray_address and self.executor != "ray":
            raise ValueError("ray_address is given but executor is not 'ray'")


class UnitJob(Protocol):
    num_gpus: float

    def setup(self) -> Any: ...

    def run(self, context: Any, unit: Any) -> dict: ...


class UnitsFailed(RuntimeError):
    """Work units that failed on every attempt, by name, with their last error."""

    def __init__(self, stage: str, failed: dict[str, str]):
        self.failed = failed
        lines = "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:10])
        more = f" (and {len(failed) - 10} more)" if len(failed) > 10 else ""
        super().__init__(f"{stage}: {len(failed)} work unit(s) failed after retries: {lines}{more}; "
                         "finished units are kept, rerun to resume")


def unit_key(unit: Any) -> str:
    return getattr(unit, "key", str(unit))


def call_unit(job: UnitJob, context: Any, unit: Any, fail_once: str | None) -> dict:
    """`job.run`, after the test hook that makes one named unit fail once."""
    if fail_once:
        key, _, marker = fail_once.rpartition("@")
        if key == unit_key(unit) and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(key)
            raise RuntimeError(f"injected failure of unit {key} ({FAIL_ONCE_ENV})")
    return job.run(context, unit)


def add_arguments(p) -> None:
    """--executor, --workers, --ray-address, --retries and --overwrite for a unit stage."""
    g = p.add_argument_group("work units (executors.py)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process or --workers spawned processes; ray: Ray actors")
    g.add_argument("--workers", type=int, default=1, help="processes (local) or actors (ray)")
    g.add_argument("--ray-address", help="HOST:PORT or ray://HOST:PORT of a running cluster "
                                         "(default: join the running one or start one here)")
    g.add_argument("--retries", type=int, default=2, help="extra attempts of a failed work unit")
    g.add_argument("--overwrite", action="store_true",
                   help="start over: remove the shards a run with other settings left in the output")


def from_arguments(args) -> ExecutorConfig:
    from .config import from_dict

    return from_dict(ExecutorConfig, {"executor": args.executor, "workers": args.workers,
                                      "ray_address": args.ray_address, "retries": args.retries},
                     "executor")


def wants_gpu(device: str) -> bool:
    """Whether a model stage on `device` needs a GPU per worker (Ray schedules it on one)."""
    if device.startswith("cuda"):
        return True
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def check_ray_address(address: str | None) -> None:
    """An address that names a host:port must answer before any work (ConfigError if not)."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise ConfigError(f"--ray-address {address!r}: no Ray cluster answers there ({e}); start "
                          "one with `ray start --head` or leave --ray-address out") from None


def start_ray(address: str | None):
    """The `ray` module, connected (checked before any work)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor 'ray' needs Ray: pip install 'xpaste-stream[ray]'") from None
    check_ray_address(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--ray-address {address!r}: cannot join Ray ({e})") from None
    return ray


def run_units(job: UnitJob, units: list, cfg: ExecutorConfig, *, stage: str, progress: bool = True,
              context: Any = None, weights: list[int] | None = None) -> list[dict]:
    """Run every unit; return their stats in the order of `units`. `weights` (inputs per unit)
    make the progress bar count inputs rather than units."""
    weights = weights or [1] * len(units)
    fail_once = os.environ.get(FAIL_ONCE_ENV)
    bar = tqdm(total=sum(weights), desc=stage, unit="img", disable=not progress or not units)
    try:
        if not units:
            return []
        if cfg.executor == "ray":
            return _run_ray(job, units, cfg, stage, bar, weights, fail_once)
        if cfg.workers == 1:
            return _run_here(job, units, cfg, stage, bar, weights, fail_once, context)
        return _run_processes(job, units, cfg, stage, bar, weights, fail_once)
    finally:
        bar.close()


def _run_here(job, units, cfg, stage, bar, weights, fail_once, context) -> list[dict]:
    context = job.setup() if context is None else context
    results: list[dict | None] = [None] * len(units)
    failed: dict[str, str] = {}
    for i, unit in enumerate(units):
        for attempt in range(cfg.retries + 1):
            try:
                results[i] = call_unit(job, context, unit, fail_once)
                break
            except (KeyboardInterrupt, ConfigError):
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a unit is retried, then named
                if attempt == cfg.retries:
                    failed[unit_key(unit)] = f"{type(e).__name__}: {e}"
        bar.update(weights[i])
    _raise_failed(stage, failed)
    return results


_WORKER: dict = {}


def _init_worker(job) -> None:
    from . import errors

    errors.quiet_worker()
    _WORKER["job"], _WORKER["context"] = job, job.setup()


def _run_in_worker(unit, fail_once):
    return call_unit(_WORKER["job"], _WORKER["context"], unit, fail_once)


def _run_processes(job, units, cfg, stage, bar, weights, fail_once) -> list[dict]:
    results: list[dict | None] = [None] * len(units)
    attempts = [0] * len(units)
    failed: dict[str, str] = {}
    todo = deque(range(len(units)))
    while todo:
        with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(job,)) as pool:
            running = {}
            broken = False
            while (todo or running) and not broken:
                while todo and len(running) < 2 * cfg.workers:
                    i = todo.popleft()
                    running[pool.submit(_run_in_worker, units[i], fail_once)] = i
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = running.pop(fut)
                    try:
                        results[i] = fut.result()
                        bar.update(weights[i])
                    except BrokenProcessPool as e:  # a worker died: start a new pool
                        broken = True
                        _retry(i, e, attempts, cfg, todo, failed, units, bar, weights)
                    except Exception as e:  # noqa: BLE001
                        _retry(i, e, attempts, cfg, todo, failed, units, bar, weights)
            for i in running.values():  # the pool broke under these: run them again
                if results[i] is None:
                    todo.append(i)
    _raise_failed(stage, failed)
    return results


def _retry(i, error, attempts, cfg, todo, failed, units, bar, weights) -> None:
    attempts[i] += 1
    if attempts[i] > cfg.retries:
        failed[unit_key(units[i])] = f"{type(error).__name__}: {error}"
        bar.update(weights[i])
    else:
        todo.append(i)


def _raise_failed(stage: str, failed: dict[str, str]) -> None:
    if failed:
        raise UnitsFailed(stage, failed)


def _run_ray(job, units, cfg, stage, bar, weights, fail_once) -> list[dict]:
    ray = start_ray(cfg.ray_address)
    actor_class = ray.remote(num_cpus=1, num_gpus=job.num_gpus)(_UnitActor)
    actors = [actor_class.remote(job, fail_once) for _ in range(cfg.workers)]
    spawned = list(actors)
    results: list[dict | None] = [None] * len(units)
    attempts = [0] * len(units)
    failed: dict[str, str] = {}
    todo = deque(range(len(units)))
    idle = deque(actors)
    running: dict = {}
    try:
        while todo or running:
            while todo and idle:
                actor, i = idle.popleft(), todo.popleft()
                running[actor.run.remote(units[i])] = (i, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i, actor = running.pop(ref)
                try:
                    results[i] = ray.get(ref)
                    bar.update(weights[i])
                except ray.exceptions.RayActorError as e:  # the actor died: replace it
                    actor = actor_class.remote(job, fail_once)
                    spawned.append(actor)
                    _retry(i, e, attempts, cfg, todo, failed, units, bar, weights)
                except ray.exceptions.RayTaskError as e:
                    _retry(i, e.cause if e.cause is not None else e, attempts, cfg, todo, failed,
                           units, bar, weights)
                idle.append(actor)
    finally:
        for actor in spawned:
            ray.kill(actor)
    _raise_failed(stage, failed)
    return results


class _UnitActor:
    """A Ray actor holding one worker context (a model on its GPU), running units it is sent."""

    def __init__(self, job, fail_once):
        self.job, self.fail_once, self.context = job, fail_once, job.setup()

    def run(self, unit) -> dict:
        return call_unit(self.job, self.context, unit, self.fail_once)
