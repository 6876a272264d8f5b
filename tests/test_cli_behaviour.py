"""The command line as a new user meets it: one input however it is spelled, a moved project
folder that resumes, invalid values refused before work, one --device grammar, --quiet and
defaults everywhere, subcommand usage on errors, quiet broken pipes, and messages that name
what is actually wrong (issue 17)."""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import make_dataset as make_scene_dataset
from PIL import Image

from xpaste_stream import cli, formats
from xpaste_stream.shards import ShardWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(out: str, *extra: str) -> None:
    assert cli.main(["generate", "-o", f"{out}/gen-{{shard:04d}}.tar", "--num-categories", "3",
                     "--images-per-category", "3", "--image-size", "96", "--maxcount", "4",
                     *extra]) == 0


def instances(folder: str) -> int:
    """Instances the shard set in `folder` holds, from its shards' stats."""
    total = 0
    for path in glob.glob(os.path.join(folder, "inst-*.stats.json")):
        with open(path) as f:
            total += json.load(f)["count"]
    return total


def extract(inputs: str, out: str, capsys) -> dict:
    assert cli.main(["extract", inputs, "-o", f"{out}/inst-{{shard:04d}}.tar"]) == 0
    return json.loads(capsys.readouterr().out)


# -- one identity per input -------------------------------------------------------------------


def test_one_input_spelled_three_ways_is_extracted_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    generate("x")
    capsys.readouterr()
    first = extract("./x/*.tar", "inst", capsys)
    n = instances("inst")
    assert first["units_run"] == 3 and n > 0
    os.symlink("x", "link")
    for spelling in (f"{tmp_path}/x/*.tar", "x/*.tar", "link/*.tar", "./x/../x/*.tar"):
        again = extract(spelling, "inst", capsys)
        assert again["units_run"] == 0 and again["units"] == 3, spelling
    assert instances("inst") == n and len(glob.glob("inst/inst-*.tar")) == 3


def test_a_moved_project_folder_resumes_every_stage(tmp_path, capsys):
    """generate -> extract and pack-coco in one project folder; the folder is moved; the same
    commands with the new paths resume (nothing redone, nothing refused)."""
    old, new = tmp_path / "project", tmp_path / "moved"
    scenes = make_scene_dataset(str(old / "scenes"), lvis=True, num_images=4, num_categories=3)
    pack = lambda root, ann: ["pack-coco", ann, f"{root}/scenes/images",  # noqa: E731
                              "-o", f"{root}/bg/bg-{{shard:04d}}.tar", "--workers", "1"]
    assert cli.main(pack(old, scenes)) == 0
    generate(f"{old}/img")
    capsys.readouterr()
    extract(f"{old}/img/gen-*.tar", f"{old}/inst", capsys)
    n = instances(f"{old}/inst")
    shutil.move(str(old), str(new))
    assert cli.main(pack(new, scenes.replace(str(old), str(new)))) == 0
    assert "written with other settings" not in capsys.readouterr().err
    assert extract(f"{new}/img/gen-*.tar", f"{new}/inst", capsys)["units_run"] == 0
    assert instances(f"{new}/inst") == n


def test_the_demo_data_and_the_demo_pipeline_file_are_one_data_set(tmp_path, monkeypatch, capsys):
    """`./runs/demo` (the demo's workdir) and `runs/demo` (pipelines/demo.toml) are one folder:
    running both builds the bank once (small sizes: the same code path as the shipped file)."""
    from xpaste_stream.pipeline import demo_pipeline, run_pipeline

    monkeypatch.chdir(tmp_path)
    kw = dict(num_categories=3, instances_per_category=3, num_backgrounds=4, image_size=96)
    run_pipeline(demo_pipeline("./runs/demo", **kw), progress=False)
    bank = json.load(open("runs/demo/bank/manifest.json"))["num_indexed"]
    results = run_pipeline(demo_pipeline(f"{tmp_path}/runs/demo", **kw), progress=False)
    assert results["extract"]["units_run"] == 0
    assert json.load(open("runs/demo/bank/manifest.json"))["num_indexed"] == bank
    assert len(glob.glob("runs/demo/instances/inst-*.tar")) == 1


# -- invalid values: refused before any work --------------------------------------------------


def test_invalid_values_are_refused_before_work_with_one_line(tmp_path, capsys):
    scenes = make_scene_dataset(str(tmp_path / "scenes"), lvis=False, num_images=2, num_categories=2)
    generate(str(tmp_path / "img"))
    capsys.readouterr()
    runs = {
        "pack-coco": ["pack-coco", scenes, str(tmp_path / "scenes" / "images"),
                      "-o", str(tmp_path / "bg" / "bg-{shard:04d}.tar"), "--maxcount", "0"],
        "generate": ["generate", "-o", str(tmp_path / "g" / "gen-{shard:04d}.tar"), "--maxcount", "0"],
        "extract": ["extract", str(tmp_path / "img" / "gen-*.tar"),
                    "-o", str(tmp_path / "i" / "inst-{shard:04d}.tar"), "--maxcount", "0"],
    }
    for name, argv in runs.items():
        assert cli.main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "maxcount 0" in err and "internal error" not in err, err
    for folder in ("bg", "g", "i"):
        assert not (tmp_path / folder).exists()  # nothing written
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--workdir", str(tmp_path / "demo"), "--batches", "0"])
    assert stop.value.code == 2 and not (tmp_path / "demo").exists()
    assert "--batches: 0 must be >= 1" in capsys.readouterr().err


def test_run_check_catches_a_maxcount_a_stage_would_refuse(tmp_path, capsys):
    toml = tmp_path / "p.toml"
    toml.write_text(textwrap.dedent(f"""
        [pipeline]
        stages = ["generate", "extract"]
        [generate]
        output = "{tmp_path}/img/gen-{{shard:04d}}.tar"
        num_categories = 2
        images_per_category = 2
        image_size = 96
        [extract]
        inputs = ["{tmp_path}/img/gen-*.tar"]
        output = "{tmp_path}/inst/inst-{{shard:04d}}.tar"
        maxcount = -16
    """))
    assert cli.main(["run", str(toml), "--check"]) == 2
    assert "maxcount -16" in capsys.readouterr().err
    assert cli.main(["run", str(toml)]) == 2
    assert not (tmp_path / "img").exists()  # refused before the first stage


def test_the_folder_generator_names_its_flag(tmp_path, capsys):
    assert cli.main(["generate", "--generator", "folder", "-o", str(tmp_path / "g-{shard:04d}.tar")]) == 2
    err = capsys.readouterr().err
    assert "--folder ROOT" in err and "none given" in err


# -- one grammar for every command --------------------------------------------------------------


def leaf_parsers(parser: argparse.ArgumentParser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from leaf_parsers(child, (*path, name))


DEVICE_COMMANDS = {  # the arguments each command needs besides --device
    ("demo",): [], ("bench", "loader"): [], ("train",): [], ("evaluate",): ["ckpt.pt"],
    ("generate",): ["-o", "g-{shard:04d}.tar"], ("extract",): ["x.tar", "-o", "i-{shard:04d}.tar"],
}


@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_every_command_takes_one_device_grammar(command, capsys):
    parser = cli.build_parser()
    argv = [*command, *DEVICE_COMMANDS[command]]
    for given, meant in (("cpu", "cpu"), ("auto", "auto"), ("cuda", "cuda"), ("cuda:1", "cuda:1"),
                         ("1", "cuda:1"), ("CUDA:0", "cuda:0")):
        assert parser.parse_args([*argv, "--device", given]).device == meant, (command, given)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([*argv, "--device", "gpu7"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: xpaste-stream {' '.join(command)}" in err and "cuda:N" in err


def test_every_command_has_quiet_and_shows_its_defaults():
    for path, parser in leaf_parsers(cli.build_parser()):
        assert "quiet" in {a.dest for a in parser._actions}, path
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, [], ()) \
                    and action.help is not argparse.SUPPRESS and action.dest != "help":
                assert "default" in (action.help or ""), (path, action.dest)
    text = cli.build_parser()._subparsers._group_actions[0].choices["pack-coco"].format_help()
    assert "(default: 2)" in text and "(default: 1000)" in text  # --workers, --maxcount


def test_an_unknown_flag_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["extract", "x.tar", "-o", "i-{shard:04d}.tar", "--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "usage: xpaste-stream extract" in err and "--bogus" in err
    with pytest.raises(SystemExit):
        cli.main(["bench", "loader", "--bogus"])
    assert "usage: xpaste-stream bench loader" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`xpaste-stream inspect ... | head -1`: the reader leaves before the report is written."""
    cats = {"schema": formats.CATEGORIES_SCHEMA, "dataset": "coco", "num_images": 1, "categories": [
        {"id": i, "name": f"c{i}", "image_count": 1, "instance_count": 0, "scale_mean": None,
         "scale_std": None, "repeat_factor": 1.0} for i in range(1, 3000)]}
    (tmp_path / "categories.json").write_text(json.dumps(cats))
    read, write = os.pipe()
    os.close(read)  # nobody will read: every write fails with EPIPE
    proc = subprocess.run([sys.executable, "-m", "xpaste_stream.cli", "inspect", "--json",
                           str(tmp_path / "categories.json")], stdout=write, stderr=subprocess.PIPE,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=120, text=True)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


# -- report, inspect ----------------------------------------------------------------------------


def test_report_refuses_image_shards(tmp_path, capsys):
    generate(str(tmp_path / "img"))
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "img" / "gen-*.tar"), "-o", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "holds image samples, report reads instance shards" in err
    assert not (tmp_path / "rep").exists()


def small_bank(tmp_path) -> tuple[str, list[str]]:
    from xpaste_stream.bank import build_index

    writer = ShardWriter(str(tmp_path / "inst" / "inst-{shard:02d}.tar"), maxcount=4)
    writer.resume()
    rng = np.random.default_rng(0)
    for i in range(6):
        writer.add(i, formats.instance_sample(
            f"k{i}", rng.integers(0, 255, (6, 5, 3), np.uint8), rng.integers(0, 255, (6, 5), np.uint8),
            category_id=1 + i % 2, category="c", clip_score=None, source_key=f"g{i}", generator="t",
            segmenter="t", source_box=[0, 0, 5, 6]))
    writer.close()
    shards = sorted(glob.glob(str(tmp_path / "inst" / "inst-*.tar")))
    build_index(shards, str(tmp_path / "bank"), workers=1, progress=False)
    return str(tmp_path / "bank"), shards


def test_inspect_plot_writes_beside_the_bank_and_the_size_counts_the_index(tmp_path, capsys):
    from xpaste_stream.bank.layout import bank_bytes

    bank, _ = small_bank(tmp_path)
    before = sorted(os.listdir(bank))
    size = bank_bytes(bank)
    assert cli.main(["inspect", bank, "--plot"]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(bank)) == before  # nothing written into the bank
    png = f"{bank}-instances_per_category.png"
    assert os.path.getsize(png) > 1000 and f"histogram written to {png}" in out
    Image.new("RGB", (300, 300)).save(os.path.join(bank, "notes.png"))  # a user's file in the folder
    assert bank_bytes(bank) == size


def test_inspect_reports_a_source_sample_held_twice(tmp_path, capsys):
    bank, shards = small_bank(tmp_path)
    copy = shards[0].replace("inst-00", "inst-07")
    shutil.copy(shards[0], copy)  # one input extracted twice
    assert cli.main(["inspect", "--json", *shards, copy]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [d["reason"] for d in report["same_source"]] == ["same_source_sample"] * 4
    assert {d["shard"] for d in report["same_source"]} == {copy}
    assert cli.main(["inspect", "--json", bank]) == 0  # the bank indexed each sample once
    capsys.readouterr()


def test_inspect_names_the_input_shard_of_an_extract_reject(tmp_path, capsys):
    writer = ShardWriter(str(tmp_path / "img" / "gen-{shard:04d}.tar"))
    writer.resume()
    meta = {"schema": formats.IMAGE_SCHEMA, "category_id": 1, "category": "a", "prompt": "p",
            "seed": 0, "generator": "t", "width": 8, "height": 8}
    image = Image.new("RGB", (96, 96), "white")
    image.paste((200, 30, 30), (30, 30, 70, 70))
    jpg = io.BytesIO()
    image.save(jpg, "JPEG")
    good = {**meta, "width": 96, "height": 96}
    writer.add(0, {"__key__": "good", "jpg": jpg.getvalue(), "json": json.dumps(good).encode()})
    writer.add(1, {"__key__": "bad", "jpg": b"not a jpeg", "json": json.dumps(meta).encode()})
    writer.close()
    source = str(tmp_path / "img" / "gen-0000.tar")
    assert cli.main(["extract", source, "-o", str(tmp_path / "inst" / "inst-{shard:04d}.tar")]) == 0
    capsys.readouterr()
    inst = str(tmp_path / "inst" / "inst-0000.tar")
    cli.main(["inspect", "--json", inst])
    failed = json.loads(capsys.readouterr().out)["recorded_failed"]
    assert [(f["shard"], f["key"], f["recorded_in"]) for f in failed] == [(source, "bad", inst)]


def test_index_with_worker_processes_prints_no_worker_tracebacks(tmp_path):
    """The pool's workers used to be SIGTERMed on the way out and print `Terminated` tracebacks
    (the parent's SIGTERM handler, inherited by fork) on successful runs: about one run in two
    on 94e2bdc, so eight runs (~1.5 s each) show it with odds of 255 in 256."""
    _, shards = small_bank(tmp_path)
    for run in range(8):
        proc = subprocess.run([sys.executable, "-m", "xpaste_stream.cli", "index", *shards, "-o",
                               str(tmp_path / f"bank{run}"), "--workers", "2"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "SIGTERM" not in proc.stderr
