"""Stages that scale out: run manifests, work units with identity, executors (local and Ray)."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
from helpers import ext_config, gen_config, snapshot

from xpaste_stream import formats, shards
from xpaste_stream.cli import main
from xpaste_stream.config import ConfigError
from xpaste_stream.executors import FAIL_ONCE_ENV, ExecutorConfig, UnitsFailed
from xpaste_stream.extract import run_extract
from xpaste_stream.generate import run_generate
from xpaste_stream.generate.text2image import DiffusersConfig
from xpaste_stream.inspect import inspect_shards
from xpaste_stream.manifest import manifest_path


def keys_of(folder, prefix: str) -> list[str]:
    return [s["__key__"] for p in sorted(glob.glob(str(folder / f"{prefix}-*.tar")))
            for s in shards.iter_tar(p)]


def shard_bytes(folder, prefix: str) -> dict[str, bytes]:
    """Every shard, index and rejects tar of a set, by name: what must be byte-identical."""
    found = {}
    for pattern in (f"{prefix}-*.tar", f"{prefix}-*.idx", f"rejects/{prefix}-*.tar"):
        for path in sorted(glob.glob(str(folder / pattern))):
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def test_rerun_with_other_settings_is_refused_naming_them(tmp_path):
    run_generate(gen_config(tmp_path), progress=False)
    before = shard_bytes(tmp_path, "gen")
    with pytest.raises(ConfigError) as e:
        run_generate(gen_config(tmp_path, images_per_category=8, seed=5), progress=False)
    assert "images_per_category: 4 -> 8" in str(e.value) and "seed: 0 -> 5" in str(e.value)
    assert "--overwrite" in str(e.value)
    assert shard_bytes(tmp_path, "gen") == before  # refused before any work
    # a setting that does not shape the shards (device, batch size) is no reason to refuse
    run_generate(gen_config(tmp_path, diffusers=DiffusersConfig(device="cpu", batch_size=2)),
                 progress=False)
    # the same through the CLI: exit status 2, message on stderr
    code = main(["generate", "-o", str(tmp_path / "gen-{shard:04d}.tar"), "--num-categories", "3",
                 "--images-per-category", "8", "--image-size", "64", "--maxcount", "4"])
    assert code == 2
    # --overwrite starts over: only the new run's shards remain, nothing mixed
    summary = run_generate(gen_config(tmp_path, images_per_category=8, seed=5), progress=False,
                           overwrite=True)
    assert summary["samples"] == 24 and summary["shards"] == 6
    metas = [json.loads(s["json"]) for p in sorted(glob.glob(str(tmp_path / "gen-*.tar")))
             for s in shards.iter_tar(p)]
    assert {m["seed"] for m in metas} == {5} and len({formats.image_key(m["category_id"], 0)
                                                     for m in metas}) == 3
    report = inspect_shards(sorted(glob.glob(str(tmp_path / "gen-*.tar"))), decode=False)
    assert not report.has_problems and not report.duplicates and not report.mixed_runs


def test_inspect_reports_shard_sets_mixed_by_hand(tmp_path):
    run_generate(gen_config(tmp_path / "a"), progress=False)
    run_generate(gen_config(tmp_path / "b", seed=5), progress=False)
    shutil.copy(tmp_path / "b" / "gen-0002.tar", tmp_path / "a" / "gen-0003.tar")
    shutil.copy(tmp_path / "b" / "gen-0002.stats.json", tmp_path / "a" / "gen-0003.stats.json")
    report = inspect_shards(sorted(glob.glob(str(tmp_path / "a" / "gen-*.tar"))), decode=False)
    assert report.has_problems and report.duplicates
    by_run = {m["run"]: m for m in report.mixed_runs}
    assert len(by_run) == 2
    assert sorted(m["shards"] for m in by_run.values()) == [1, 3]
    assert sorted(str(m["manifest"]) for m in by_run.values()) == \
        sorted([manifest_path(str(tmp_path / "a" / "gen-{shard:04d}.tar")), "None"])


def test_generate_resume_redoes_only_unfinished_units(tmp_path):
    run_generate(gen_config(tmp_path), progress=False)
    reference = shard_bytes(tmp_path, "gen")
    first = tmp_path / "gen-0000.tar"
    before = os.stat(first).st_mtime_ns
    os.remove(shards.stats_path(str(tmp_path / "gen-0001.tar")))  # killed while finishing unit 1
    summary = run_generate(gen_config(tmp_path), progress=False)
    assert summary["units_run"] == 1 and summary["samples"] == 12
    assert os.stat(first).st_mtime_ns == before and shard_bytes(tmp_path, "gen") == reference


def test_extract_input_missing_then_returned_gives_no_duplicate_and_no_gap(tmp_path):
    run_generate(gen_config(tmp_path / "img"), progress=False)
    away = tmp_path / "away"
    away.mkdir()
    for suffix in (".tar", ".idx", ".stats.json"):  # shard 1 is briefly missing
        shutil.move(tmp_path / "img" / f"gen-0001{suffix}", away / f"gen-0001{suffix}")
    cfg = ext_config(str(tmp_path / "img" / "gen-*.tar"), tmp_path / "inst")
    first = run_extract(cfg, progress=False)
    assert first["samples"] + first["failed"] == 8
    for suffix in (".tar", ".idx", ".stats.json"):
        shutil.move(away / f"gen-0001{suffix}", tmp_path / "img" / f"gen-0001{suffix}")
    second = run_extract(cfg, progress=False)
    assert second["units_run"] == 1 and second["samples"] + second["failed"] == 12
    got = keys_of(tmp_path / "inst", "inst")
    failed = [r["key"] for p in glob.glob(str(tmp_path / "inst" / "inst-*.stats.json"))
              for r in json.load(open(p))["failed_samples"]]
    assert len(got) == len(set(got))  # no duplicate
    assert sorted(got + failed) == sorted(keys_of(tmp_path / "img", "gen"))  # no gap
    # a run with one input gone lists it, keeps its instances, and writes nothing twice
    os.remove(tmp_path / "img" / "gen-0002.tar")
    third = run_extract(cfg, progress=False)
    assert third["absent_inputs"] == [str(tmp_path / "img" / "gen-0002.tar")]
    assert third["units_run"] == 0 and keys_of(tmp_path / "inst", "inst") == got
    # an input that changed since it was extracted is refused before work
    run_generate(gen_config(tmp_path / "img", image_size=96), progress=False, overwrite=True)
    with pytest.raises(ConfigError, match="input shards changed since they were extracted"):
        run_extract(cfg, progress=False)


def test_a_failing_unit_is_retried_then_named(tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_ONCE_ENV, f"positions-000000004-000000008@{tmp_path / 'failed-once'}")
    summary = run_generate(gen_config(tmp_path / "a"), progress=False)
    assert (tmp_path / "failed-once").exists() and summary["samples"] == 12
    # with no retries left the unit is reported by name and the others are kept
    monkeypatch.setenv(FAIL_ONCE_ENV, f"positions-000000004-000000008@{tmp_path / 'failed-twice'}")
    with pytest.raises(UnitsFailed, match="positions-000000004-000000008: RuntimeError"):
        run_generate(gen_config(tmp_path / "b"), progress=False, executor=ExecutorConfig(retries=0))
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "b" / "*.stats.json"))) == \
        ["gen-0000.stats.json", "gen-0002.stats.json"]
    monkeypatch.delenv(FAIL_ONCE_ENV)
    assert run_generate(gen_config(tmp_path / "b"), progress=False)["units_run"] == 1
    assert shard_bytes(tmp_path / "b", "gen") == shard_bytes(tmp_path / "a", "gen")


def test_unreachable_ray_address_is_refused_before_work(tmp_path):
    pytest.importorskip("ray")
    cfg = gen_config(tmp_path)
    with pytest.raises(ConfigError, match="no Ray cluster answers there"):
        run_generate(cfg, progress=False,
                     executor=ExecutorConfig(executor="ray", ray_address="127.0.0.1:9"))
    assert not glob.glob(str(tmp_path / "*"))
    code = main(["extract", str(tmp_path / "x.tar"), "-o", str(tmp_path / "i-{shard:02d}.tar"),
                 "--executor", "ray", "--ray-address", "ray://127.0.0.1:9"])
    assert code == 2


TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def ray_local():
    """One Ray instance for the module; its workers import this tree and the tests' plug-ins."""
    ray = pytest.importorskip("ray")
    path = os.pathsep.join(p for p in (TESTS, REPO, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def test_ray_executor_writes_the_same_bytes_as_local(tmp_path, ray_local, monkeypatch):
    ray_exec = ExecutorConfig(executor="ray", workers=2)
    run_generate(gen_config(tmp_path / "local"), progress=False)
    # unit 1 fails once on its actor and is retried there
    monkeypatch.setenv(FAIL_ONCE_ENV, f"positions-000000004-000000008@{tmp_path / 'failed-once'}")
    summary = run_generate(gen_config(tmp_path / "ray"), progress=False, executor=ray_exec)
    assert (tmp_path / "failed-once").exists() and summary["samples"] == 12
    monkeypatch.delenv(FAIL_ONCE_ENV)
    assert shard_bytes(tmp_path / "ray", "gen") == shard_bytes(tmp_path / "local", "gen")

    inputs = str(tmp_path / "local" / "gen-*.tar")
    run_extract(ext_config(inputs, tmp_path / "inst-local"), progress=False)
    summary = run_extract(ext_config(inputs, tmp_path / "inst-ray"), progress=False, executor=ray_exec)
    assert summary["units"] == 3 and summary["executor"] == "ray"
    local, remote = shard_bytes(tmp_path / "inst-local", "inst"), shard_bytes(tmp_path / "inst-ray", "inst")
    assert len(local) >= 6 and remote == local


# -- every stage, every executor: the same shard set ----------------------------------------------

EXECUTORS = {"local-1": ExecutorConfig(), "local-2": ExecutorConfig(workers=2),
             "ray-2": ExecutorConfig(executor="ray", workers=2)}
def on_every_executor(out, run) -> dict:
    """`run(executor)` writes into `out` once per executor; what it left, by executor (the
    same folder each time, so paths recorded in stats and manifests are the same too)."""
    results = {}
    for name, executor in EXECUTORS.items():
        shutil.rmtree(out, ignore_errors=True)
        run(executor)
        results[name] = snapshot(out)
    return results


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """Inputs of every stage, made once: a COCO-format scene dataset with a missing image,
    image shards and instance shards (3 work units each)."""
    from xpaste_stream.generate.procedural import SceneSpec, category_names, write_scene_dataset

    root = tmp_path_factory.mktemp("inputs")
    annotations = write_scene_dataset(str(root / "scenes"), category_names(4),
                                      SceneSpec(num_images=11, image_size=(64, 80), max_objects=3,
                                                seed=3))
    images = str(root / "scenes" / "images")
    os.remove(os.path.join(images, sorted(os.listdir(images))[2]))  # a reject to list
    run_generate(gen_config(root / "img"), progress=False)
    run_extract(ext_config(str(root / "img" / "gen-*.tar"), root / "inst"), progress=False)
    return {"annotations": annotations, "images": images, "root": root}


def run_stage(stage: str, inputs: dict, out, executor: ExecutorConfig) -> dict:
    from xpaste_stream.bank import build_index
    from xpaste_stream.pack import PackCocoConfig, run_pack_coco

    if stage == "pack-coco":
        return run_pack_coco(PackCocoConfig(inputs["annotations"], inputs["images"],
                                            output=str(out / "bg-{shard:04d}.tar"), maxcount=4),
                             progress=False, executor=executor)
    if stage == "generate":
        return run_generate(gen_config(out), progress=False, executor=executor)
    if stage == "extract":
        return run_extract(ext_config(str(inputs["root"] / "img" / "gen-*.tar"), out), progress=False,
                           executor=executor)
    return build_index(sorted(glob.glob(str(inputs["root"] / "inst" / "inst-*.tar"))), str(out),
                       dedup=True, progress=False, executor=executor)


@pytest.mark.parametrize("stage", ["pack-coco", "generate", "extract", "index"])
def test_every_stage_writes_the_same_files_on_every_executor(stage, stage_inputs, tmp_path, ray_local):
    """local with 1 and 2 processes and Ray (2 actors): shards, .idx, stats, run manifest,
    rejects list and tars (pack-coco, generate, extract); every file of the bank (index)."""
    got = on_every_executor(tmp_path / "out", lambda ex: run_stage(stage, stage_inputs,
                                                                   tmp_path / "out", ex))
    reference = got["local-1"]
    kinds = {os.path.splitext(name)[1] for name in reference}
    if stage == "index":
        assert {"manifest.json", "stats.json", "rejects.jsonl"} - set(reference) == {"rejects.jsonl"}
        assert len([n for n in reference if n.endswith(".npy")]) >= 8
    else:
        assert {".tar", ".idx", ".json"} <= kinds and sum(n.endswith("stats.json") for n in reference) == 3
        assert any(n.endswith("-manifest.json") for n in reference)
    if stage == "pack-coco":
        assert "bg-rejects.jsonl" in reference and "categories.json" in reference
    if stage == "extract":
        assert any(n.startswith("rejects/") for n in reference) or "inst-rejects.jsonl" not in reference
    for name in ("local-2", "ray-2"):
        assert sorted(got[name]) == sorted(reference), name
        for f in reference:
            assert got[name][f] == reference[f], (name, f)


# -- one rule for errors, every executor: refusals exit 2 at once, other errors retried, exit 1 ---


@pytest.mark.parametrize("error, at, code", [("ConfigError", "segment", 2), ("ConfigError", "setup", 2),
                                             ("RuntimeError", "segment", 1)])
@pytest.mark.parametrize("executor", ["local-1", "local-2", "ray-2"])
def test_a_unit_error_gives_the_same_exit_status_on_every_executor(error, at, code, executor,
                                                                   stage_inputs, tmp_path, capsys,
                                                                   request):
    if executor.startswith("ray"):
        request.getfixturevalue("ray_local")
    log = tmp_path / "calls.log"
    ex = EXECUTORS[executor]
    argv = ["extract", str(stage_inputs["root"] / "img" / "gen-*.tar"), "-o",
            str(tmp_path / "inst" / "inst-{shard:04d}.tar"), "--maxcount", "4", "--quiet",
            "--segmenters", "raising_segmenter:Raising", "--device", "cpu",
            "--option", f"raising_segmenter:Raising.error={error}",
            "--option", f"raising_segmenter:Raising.log={log}",
            "--option", f"raising_segmenter:Raising.at={at}",
            "--executor", ex.executor, "--workers", str(ex.workers), "--retries", "1"]
    assert main(argv) == code
    err = capsys.readouterr().err
    calls = log.read_text().split() if log.exists() else []
    if code == 2:  # refused: named as it is, no unit run twice
        assert "raising segmenter" in err and "work unit(s) failed" not in err
        assert len(calls) == len(set(calls)) <= 3
        assert at == "segment" or not calls
    else:  # transient: every unit tried 1 + --retries times, then named
        assert "3 work unit(s) failed after retries" in err
        assert sorted(calls) == sorted(2 * sorted(set(calls))) and len(set(calls)) == 3


def test_pack_coco_and_index_refuse_an_unreachable_ray_address_before_work(stage_inputs, tmp_path):
    pytest.importorskip("ray")
    ray = ["--executor", "ray", "--ray-address", "127.0.0.1:9", "--quiet"]
    assert main(["pack-coco", stage_inputs["annotations"], stage_inputs["images"], "-o",
                 str(tmp_path / "bg" / "bg-{shard:04d}.tar"), *ray]) == 2
    inst = sorted(glob.glob(str(stage_inputs["root"] / "inst" / "inst-*.tar")))
    assert main(["index", *inst, "-o", str(tmp_path / "bank"), *ray]) == 2
    assert not glob.glob(str(tmp_path / "*" / "*"))


def test_pipeline_executor_table_runs_pack_coco_and_a_stage_table_overrides_its_workers(tmp_path):
    from xpaste_stream.pipeline import load_pipeline, run_pipeline

    def pipeline(name: str, stage_workers: str) -> dict:
        path = tmp_path / f"{name}.toml"
        path.write_text(f"""
[pipeline]
stages = ["scenes", "pack_coco"]
[scenes]
output = "{tmp_path / 'scenes'}"
num_categories = 3
num_images = 9
height = 48
width = 64
[pack_coco]
output = "{tmp_path / name / 'bg-{shard:04d}.tar'}"
maxcount = 3
{stage_workers}
[executor]
workers = 2
""")
        return run_pipeline(load_pipeline(str(path)), progress=False)["pack_coco"]

    assert pipeline("table", "")["workers"] == 2
    assert pipeline("stage", "workers = 1")["workers"] == 1
    table, stage = shard_bytes(tmp_path / "table", "bg"), shard_bytes(tmp_path / "stage", "bg")
    assert len(table) == 6 and table == stage


def test_pack_coco_resume_redoes_only_unfinished_units(stage_inputs, tmp_path):
    from xpaste_stream.pack import PackCocoConfig, run_pack_coco

    cfg = PackCocoConfig(stage_inputs["annotations"], stage_inputs["images"],
                         output=str(tmp_path / "bg-{shard:04d}.tar"), maxcount=4)
    run_pack_coco(cfg, progress=False)
    reference = snapshot(tmp_path)
    before = os.stat(tmp_path / "bg-0000.tar").st_mtime_ns
    os.remove(shards.stats_path(str(tmp_path / "bg-0001.tar")))  # killed while finishing unit 1
    summary = run_pack_coco(cfg, progress=False, executor=ExecutorConfig(workers=2))
    assert summary["units"] == 3 and summary["units_run"] == 1
    assert os.stat(tmp_path / "bg-0000.tar").st_mtime_ns == before and snapshot(tmp_path) == reference
    # stats written by a unit of another shape (an older pack-coco) are refused before work
    stats = json.loads((tmp_path / "bg-0002.stats.json").read_text())
    (tmp_path / "bg-0002.stats.json").write_text(json.dumps({**stats, "unit": None}))
    with pytest.raises(ConfigError, match="the output mixes runs"):
        run_pack_coco(cfg, progress=False)
