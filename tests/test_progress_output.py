"""What `train` and `evaluate` show a user while they work (issue 17): `evaluate` has a progress
bar and prints one stated scale (the table in %, results.json in fractions) with none of the
evaluators' own prints, log lines or numpy warnings; a slow training rate is printed with its
digits, not as "0.0 images/s"."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from test_evaluate import categories_of, tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_shows_progress_one_scale_and_no_third_party_output(lvis_dataset, tmp_path):
    annotations, images = lvis_dataset
    ckpt = tiny_checkpoint(str(tmp_path / "tiny.pt"), categories_of(annotations))
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "xpaste_stream.cli", "evaluate", ckpt,
                           "--annotations", annotations, "--images", images, "--output", str(out),
                           "--device", "cpu", "--score-thresh", "0"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    # progress while predicting: a bar on stderr that reaches all 12 images
    bar = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert bar and all(line.startswith("evaluate: ") for line in bar), proc.stderr  # nothing else
    assert "12/12" in bar[-1]
    # one scale: the table says it is in %, and its AP is results.json's fraction x 100
    with open(out / "results.json") as f:
        metrics = json.load(f)["metrics"]
    assert "AP in %" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("bbox"))
    assert float(row.split()[1]) == pytest.approx(100 * metrics["bbox"]["AP"], abs=0.006)
    assert 0 <= metrics["bbox"]["AP"] <= 1
    # stdout: the heading, the table, its scale note, where the results are; no evaluator prints
    assert not re.search(r"Loading|index created|DONE|Accumulating|Evaluate annotation", proc.stdout)


def test_a_slow_training_rate_keeps_its_digits(monkeypatch):
    """R50 at 1024 on a CPU: 2 images in ~50 s; the line must not round that to 0.0 images/s."""
    from xpaste_stream.train import loop

    clock = [1000.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    progress = loop.Progress(every=0.0, start_step=0, total=20)
    clock[0] += 48.5
    progress.step(loop.StepRecord(step=1, epoch=0, loss=3.25, losses={}, image_ids=[1, 2],
                                  plan_digest="", wait_s=0.5, step_s=48.5, images=2))
    line = progress.line()
    assert "train: step 1/20, loss 3.2500" in line and "0.0412 images/s" in line, line
    assert "ETA 15m" in line, line  # 19 steps x 48.5 s


def test_a_slow_training_rate_keeps_its_digits_in_the_log(tmp_path, capsys):
    """The JSON log line of the same slow window: 0.0412 images/s, not 0.04 (or 0.0)."""
    import torch

    from xpaste_stream.train import loop

    cfg = loop.TrainConfig(backgrounds=[], bank="", output_dir=str(tmp_path), log_every=1)
    logger = loop.Logger(cfg, loop.Runtime(0, 1, 0, torch.device("cpu")))
    logger.add(loop.StepRecord(step=1, epoch=0, loss=3.25, losses={}, image_ids=[1, 2],
                               plan_digest="", wait_s=0.5, step_s=48.5, images=2), lr=0.01)
    logger.file.close()
    entry = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert entry["images_per_s"] == 0.0412 and entry["step"] == 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == entry
