"""What every benchmark's `--quick` does alike (imported as `quickmode`: the scripts' folder is
first on sys.path when they run)."""

from __future__ import annotations

import os
import sys


def one_thread() -> None:
    """One compute thread in this process and the processes it starts (torch, OpenMP, MKL).

    Quick runs do tiny work, where more threads buy nothing; and threads that spin while they
    wait for each other lose many times over when other jobs share the cores (bench_generate
    --quick on 2 cores beside one busy process: 48 s with 2 threads, 15 s with 1)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
