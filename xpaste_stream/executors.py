"""Executors: run a stage's work units in this process, in local worker processes, or on Ray.

A stage describes its work as a picklable *job* with two methods:
- `setup()` builds what one worker needs once (models on its device) and returns it;
- `run(context, unit)` does one work unit (writes exactly its own shard, or reads one input
  shard: index) and returns its result (stats, a scan).
Every executor calls the same two methods, so outputs are byte-identical whichever runs them.
Every stage that writes shards or a bank (pack-coco, generate, extract, index) runs here.

- `local`, 1 worker (or one unit to run): this process (a prebuilt context may be passed:
  benchmarks, tests);
- `local`, N workers: up to N spawned processes (no more than units), each with its own context;
- `ray`: up to N Ray actors, each holding its context (one model per GPU actor when the job asks
  for GPUs), pulling units one at a time from this driver; an actor lost (with its node) is
  replaced when the cluster has room, its unit retried on the others meanwhile.

Which errors are retried is decided here, once, for every executor (`refused`): a refusal
(`REFUSALS`: bad settings, inputs of the wrong format, a model that is not here) cannot be cured
by running the unit again, so the first one stops the run and is raised as it is (the command
exits 2, as when it is found before work), whichever executor and worker count ran it. Any other
error of a unit (or a worker that dies) is taken as transient: the unit is retried up to
`retries` times; units that still fail are reported by name once every other unit is done
(`UnitsFailed`: exit 1), so finished work is kept and a rerun resumes. A worker builds its
context (`setup`) on its first unit, so an error there follows the same rule. Progress is counted
over all units, wherever they run.
"""

from __future__ import annotations

import dataclasses
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
from .errors import ModelLoadError
from .formats import FormatError

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


# errors that mean "refused": never retried, raised as they are on every executor (exit 2)
REFUSALS: tuple[type[BaseException], ...] = (ConfigError, FormatError, ModelLoadError)


def refused(error: BaseException) -> bool:
    """Whether a unit's error is a refusal (raised at once) rather than transient (retried)."""
    return isinstance(error, REFUSALS)


class UnitJob(Protocol):
    num_gpus: float

    def setup(self) -> Any: ...

    def run(self, context: Any, unit: Any) -> dict: ...


class PlainJob:
    """Base of a job whose workers build nothing (`setup` gives None) and need no GPU: CPU-only
    stages (pack-coco, index)."""

    num_gpus = 0.0

    def setup(self) -> None:
        return None


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


def add_arguments(p, workers: int = 1, overwrite: bool = True) -> None:
    """--executor, --workers, --ray-address, --retries (and --overwrite, for a stage with a run
    manifest) for a unit stage; `workers`: the stage's default worker count."""
    g = p.add_argument_group("work units (executors.py)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process or --workers spawned processes; ray: Ray actors")
    g.add_argument("--workers", type=int, default=workers, help="processes (local) or actors (ray)")
    g.add_argument("--ray-address", help="HOST:PORT or ray://HOST:PORT of a running cluster "
                                         "(default: join the running one or start one here)")
    g.add_argument("--retries", type=int, default=2, help="extra attempts of a failed work unit")
    if overwrite:
        g.add_argument("--overwrite", action="store_true",
                       help="start over: remove the shards a run with other settings left in the output")


def from_arguments(args) -> ExecutorConfig:
    from .config import from_dict

    return from_dict(ExecutorConfig, {"executor": args.executor, "workers": args.workers,
                                      "ray_address": args.ray_address, "retries": args.retries},
                     "executor")


def for_stage(executor: ExecutorConfig | None, workers: int | None) -> ExecutorConfig:
    """The executor of one stage: `executor` (default: local, 1 worker) with the stage's own
    worker count, when its settings give one (`workers` of a pipeline file's stage table)."""
    executor = executor or ExecutorConfig()
    return executor if workers is None else dataclasses.replace(executor, workers=workers)


def unit_summary(units: list, todo: list, cfg: ExecutorConfig) -> dict:
    """What a stage's summary says of its units and how they ran."""
    return {"units": len(units), "units_run": len(todo), "executor": cfg.executor,
            "workers": cfg.workers}


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
              context: Any = None, weights: list[int] | None = None, desc: str | None = None,
              unit_name: str = "img") -> list:
    """Run every unit; return their results in the order of `units`. `weights` (inputs per unit)
    make the progress bar (`desc`, default the stage; counting `unit_name`) count inputs rather
    than units. Local with one unit to run works in this process, whatever `workers` says."""
    weights = weights or [1] * len(units)
    fail_once = os.environ.get(FAIL_ONCE_ENV)
    bar = tqdm(total=sum(weights), desc=desc or stage, unit=unit_name,
               disable=not progress or not units)
    run = _Run(job, units, cfg, stage, bar, weights, fail_once)
    try:
        if not units:
            return []
        if cfg.executor == "ray":
            return _run_ray(run)
        if cfg.workers == 1 or len(units) == 1:
            return _run_here(run, context)
        return _run_processes(run)
    finally:
        bar.close()


@dataclass
class _Run:
    """One `run_units` call: its units, their results and attempts, the rule for errors."""

    job: Any
    units: list
    cfg: ExecutorConfig
    stage: str
    bar: Any
    weights: list[int]
    fail_once: str | None
    results: list = dataclasses.field(default_factory=list)
    attempts: list[int] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    todo: deque = dataclasses.field(default_factory=deque)

    def __post_init__(self):
        self.results = [None] * len(self.units)
        self.attempts = [0] * len(self.units)
        self.todo = deque(range(len(self.units)))

    def done(self, i: int, result: Any) -> None:
        self.results[i] = result
        self.bar.update(self.weights[i])

    def error(self, i: int, error: BaseException) -> None:
        """A refusal is raised at once; a transient error puts the unit back in the queue, or,
        past its retries, among the failed."""
        if refused(error):
            raise error
        self.attempts[i] += 1
        if self.attempts[i] > self.cfg.retries:
            self.failed[unit_key(self.units[i])] = f"{type(error).__name__}: {error}"
            self.bar.update(self.weights[i])
        else:
            self.todo.append(i)

    def finish(self) -> list:
        if self.failed:
            raise UnitsFailed(self.stage, self.failed)
        return self.results


def _run_here(run: _Run, context) -> list:
    while run.todo:
        i = run.todo.popleft()
        try:
            if context is None:
                context = run.job.setup()
            run.done(i, call_unit(run.job, context, run.units[i], run.fail_once))
        except Exception as e:  # noqa: BLE001 - the rule in `_Run.error` decides
            run.error(i, e)
    return run.finish()


_WORKER: dict = {}


def _init_worker(job) -> None:
    from . import errors

    errors.quiet_worker()
    _WORKER.clear()
    _WORKER["job"] = job


def _run_in_worker(unit, fail_once):
    """One unit in a worker process; its context is built on the first (again after a failure)."""
    if "context" not in _WORKER:
        _WORKER["context"] = _WORKER["job"].setup()
    return call_unit(_WORKER["job"], _WORKER["context"], unit, fail_once)


def _run_processes(run: _Run) -> list:
    workers = min(run.cfg.workers, len(run.units))
    while run.todo:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(run.job,)) as pool:
            running: dict = {}
            broken = False
            try:
                while (run.todo or running) and not broken:
                    while run.todo and len(running) < 2 * workers:
                        i = run.todo.popleft()
                        running[pool.submit(_run_in_worker, run.units[i], run.fail_once)] = i
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        i = running.pop(fut)
                        try:
                            run.done(i, fut.result())
                        except BrokenProcessPool as e:  # a worker died: start a new pool
                            broken = True
                            run.error(i, e)
                        except Exception as e:  # noqa: BLE001 - the rule in `_Run.error` decides
                            run.error(i, e)
            except KeyboardInterrupt:  # Ctrl-C / SIGTERM: stop now (a rerun redoes those units)
                _stop_workers(pool)
                raise
            except BaseException:  # a refusal: units running finish, the others never start
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            for i in running.values():  # the pool broke under these: run them again
                if run.results[i] is None:
                    run.todo.append(i)
    return run.finish()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM every worker of `pool` (they ignore SIGINT: quiet_worker), then let it go."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


ACTOR_START_S = 300.0  # the longest wait for a Ray actor to start when no unit is running


def _run_ray(run: _Run) -> list:
    """Units are sent only to actors that answered `ready`: an actor replacing one lost with its
    node may wait for room on the cluster while the others carry on; with nothing running and no
    actor started for ACTOR_START_S seconds, the units left are named as failed."""
    ray = start_ray(run.cfg.ray_address)
    actor_class = ray.remote(num_cpus=1, num_gpus=run.job.num_gpus)(_UnitActor)
    spawned: list = []
    starting: dict = {}  # ready() ref -> actor not yet answering
    most = run.cfg.workers + len(run.units) * (run.cfg.retries + 1)  # actors ever started

    def spawn() -> None:
        if len(spawned) < most:
            actor = actor_class.remote(run.job, run.fail_once)
            spawned.append(actor)
            starting[actor.ready.remote()] = actor

    for _ in range(min(run.cfg.workers, len(run.units))):
        spawn()
    idle: deque = deque()
    running: dict = {}
    try:
        while run.todo or running:
            while run.todo and idle:
                actor, i = idle.popleft(), run.todo.popleft()
                running[actor.run.remote(run.units[i])] = (i, actor)
            waiting = [*running, *starting]
            ready = ray.wait(waiting, num_returns=1, timeout=ACTOR_START_S)[0] if waiting else []
            if not ready and not running:  # no actor to run the units left, nor one coming
                why = (f"no Ray actor started in {ACTOR_START_S:.0f} s" if waiting else
                       f"every Ray actor was lost ({len(spawned)} started)")
                for i in run.todo:
                    run.failed[unit_key(run.units[i])] = \
                        f"{why} (cluster resources free: {ray.available_resources()})"
                break
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                    except ray.exceptions.RayActorError:  # lost before it started: another
                        spawn()
                    continue
                i, actor = running.pop(ref)
                try:
                    run.done(i, ray.get(ref))
                    idle.append(actor)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                    # the actor, or its node (and the result kept there), is gone: another
                    ray.kill(actor)
                    spawn()
                    run.error(i, e)
                except ray.exceptions.RayTaskError as e:
                    idle.append(actor)
                    run.error(i, e.cause if e.cause is not None else e)
    finally:
        for actor in spawned:
            ray.kill(actor)
    return run.finish()


class _UnitActor:
    """A Ray actor holding one worker context (a model on its GPU), running units it is sent;
    the context is built on its first unit (again after a failure), like a local worker's."""

    def __init__(self, job, fail_once):
        self.job, self.fail_once, self.context = job, fail_once, None

    def ready(self) -> bool:
        return True

    def run(self, unit):
        if self.context is None:
            self.context = self.job.setup()
        return call_unit(self.job, self.context, unit, self.fail_once)
