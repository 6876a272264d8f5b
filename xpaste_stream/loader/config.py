"""Loader settings. Defaults reproduce the original X-Paste pasting recipe (docs/LOADER.md).

Both dataclasses are filled from TOML through `xpaste_stream.config.from_dict`, so they use
plain types only; `validate()` rejects values that would make a batch meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Fallback per-category size statistics (mean and std of sqrt(box area / image area)) for a
# category that categories.json lists without statistics (no real annotation to measure).
# 0.2 / 0.1 is roughly the LVIS train average; the clip below keeps draws sane either way.
DEFAULT_SCALE_MEAN = 0.2
DEFAULT_SCALE_STD = 0.1


@dataclass
class PasteConfig:
    """How one composited image is made: LSJ of the background, then the pastes."""

    output_size: int = 1024                         # square canvas after LSJ (paper: 1024)
    scale_range: tuple[float, float] = (0.1, 2.0)   # LSJ scale of the output size
    hflip_prob: float = 0.5                         # background flip
    min_pastes: int = 0                             # pastes per image ~ U{min_pastes..max_pastes}
    max_pastes: int = 19                            # also the number of paste slots K in the graph
    category_sampling: Literal["cas", "instance", "repeat_factor"] = "cas"  # bank.make_sampler kind
    default_scale_mean: float = DEFAULT_SCALE_MEAN
    default_scale_std: float = DEFAULT_SCALE_STD
    min_size_px: float = 10.0                       # side ratio clipped to [min_size_px / H, ...
    max_size_ratio: float = 0.5                     # ... max_size_ratio]
    aspect_jitter: tuple[float, float] = (0.8, 1.2)  # instance aspect ratio x U(lo, hi)
    min_side_px: int = 5                            # planned pastes with a smaller side are dropped
    instance_hflip_prob: float = 0.5
    blending: Literal["hard", "alpha", "gaussian"] = "hard"
    gaussian_sigma: float = 2.0                     # edge blur of the paste mask (gaussian only)
    mask_threshold: int = 128                       # alpha >= threshold is the object's mask
    keep_max_box_shift: float = 10.0                # keep an occluded object if its box moved <= this
    keep_min_area: int = 300                        # ... or more than this many mask pixels remain
    drop_crowd: bool = True                         # iscrowd annotations are not training targets

    def validate(self) -> None:
        if not 8 <= self.output_size <= 8192:
            raise ValueError(f"output_size {self.output_size} must be in [8, 8192]")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range {self.scale_range} must satisfy 0 < lo <= hi")
        if not 0 <= self.min_pastes <= self.max_pastes <= 254:
            raise ValueError(f"pastes U{{{self.min_pastes}..{self.max_pastes}}}: need "
                             "0 <= min_pastes <= max_pastes <= 254")
        for name in ("hflip_prob", "instance_hflip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} must be a probability in [0, 1]")
        if self.category_sampling not in ("cas", "instance", "repeat_factor"):
            raise ValueError(f"category_sampling {self.category_sampling!r}: use 'cas', 'instance' "
                             "or 'repeat_factor'")
        if self.default_scale_mean <= 0 or self.default_scale_std < 0:
            raise ValueError("default_scale_mean must be > 0 and default_scale_std >= 0")
        if not 0 < self.min_size_px / self.output_size <= self.max_size_ratio <= 1.0:
            raise ValueError(f"need 0 < min_size_px / output_size <= max_size_ratio <= 1 "
                             f"(got {self.min_size_px} / {self.output_size}, {self.max_size_ratio})")
        a, b = self.aspect_jitter
        if not 0 < a <= b:
            raise ValueError(f"aspect_jitter {self.aspect_jitter} must satisfy 0 < lo <= hi")
        if self.min_side_px < 1:
            raise ValueError(f"min_side_px {self.min_side_px} must be >= 1")
        if self.gaussian_sigma <= 0:
            raise ValueError(f"gaussian_sigma {self.gaussian_sigma} must be > 0")
        if not 1 <= self.mask_threshold <= 255:
            raise ValueError(f"mask_threshold {self.mask_threshold} must be in [1, 255]")
        if self.keep_max_box_shift < 0 or self.keep_min_area < 0:
            raise ValueError("keep_max_box_shift and keep_min_area must be >= 0")

    @property
    def slots(self) -> int:
        """Paste slots K in the DALI graph; unused slots hold a transparent placeholder."""
        return max(1, self.max_pastes)


@dataclass
class LoaderConfig:
    """How batches are produced: sizes, workers, order, debugging. None of these but `seed`,
    `shuffle`, `background_sampling` and `drop_last` changes what a sample holds (order.py)."""

    batch_size: int = 16
    # worker processes running the sample function (DALI parallel external source); 0 runs it
    # in the pipeline's own thread. Measured on 2 cores (bench loader --feed-only): 1 -> 2
    # workers scales the host feed ~1.9x; give a GPU host's spare cores to it.
    workers: int = 2
    worker_start: Literal["auto", "fork", "spawn"] = "auto"  # auto: fork unless CUDA is live
    # batches the workers prepare ahead (the parallel external source's queue). Measured host
    # feed, 2 cores, 2 workers: 897 images/s with 1, 1042 with 4 (workers no longer wait).
    worker_prefetch: int = 4
    num_threads: int = 4                # DALI worker threads per pipeline
    prefetch: int = 2                   # batches prepared ahead of the training step
    shuffle: bool = True                # permute each epoch's order by (seed, epoch)
    # backgrounds per epoch: each once ("uniform"), or floor(r) + Bernoulli(frac r) times with
    # r the LVIS image repeat factor pack-coco stored (the original's RepeatFactorTrainingSampler)
    background_sampling: Literal["uniform", "repeat_factor"] = "repeat_factor"
    drop_last: bool = False             # False: the last global batch wraps to the epoch's start
    seed: int = 0
    debug: bool = False                 # also return the LSJ'd background and resized instances
    instance_retries: int = 4           # redraws for an instance whose bytes are damaged
    # torch threads while the loader builds targets on the CPU (restored after each batch);
    # 0 leaves torch's setting alone. DALI's threads already keep the cores busy; more OpenMP
    # threads competing with them cost more than they gain (2 cores: 36.8 -> 42.7 images/s).
    torch_threads: int = 1
    # a batch not ready within `batch_timeout` s, or a worker process that died, ends the
    # pipeline: its workers are killed and a new pipeline resumes at the same position (the
    # order is a function of the position), at most `worker_restarts` times per loader, then
    # a LoaderError names what failed. The bound covers worker start-up and a remote read's
    # own retries (remote.py: ~150 s at worst).
    batch_timeout: float = 300.0
    worker_restarts: int = 3

    def validate(self) -> None:
        if self.batch_timeout <= 0:
            raise ValueError(f"batch_timeout {self.batch_timeout} must be > 0 seconds")
        if self.worker_restarts < 0:
            raise ValueError(f"worker_restarts {self.worker_restarts} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size} must be >= 1")
        if self.workers < 0:
            raise ValueError(f"workers {self.workers} must be >= 0 (0: no worker processes)")
        if self.worker_prefetch < 1:
            raise ValueError(f"worker_prefetch {self.worker_prefetch} must be >= 1")
        if self.worker_start not in ("auto", "fork", "spawn"):
            raise ValueError(f"worker_start {self.worker_start!r}: use 'auto', 'fork' or 'spawn'")
        if self.num_threads < 1:
            raise ValueError(f"num_threads {self.num_threads} must be >= 1")
        if self.prefetch < 1:
            raise ValueError(f"prefetch {self.prefetch} must be >= 1")
        if self.background_sampling not in ("uniform", "repeat_factor"):
            raise ValueError(f"background_sampling {self.background_sampling!r}: use 'uniform' "
                             "or 'repeat_factor'")
        if self.instance_retries < 0:
            raise ValueError(f"instance_retries {self.instance_retries} must be >= 0")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads {self.torch_threads} must be >= 0 (0: leave as is)")
