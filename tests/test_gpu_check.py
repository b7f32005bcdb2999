"""Tests for bench/gpu_check.py: the tiny CPU run of the whole check; its data and proposal-cache check."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.gpu_check import CLASSES, SECTIONS, check_inputs
from detector import shapes
from detector.data import load_voc
from detector.proposals import cache_paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    # The command the issue names, on tiny sizes: every section runs its real code path (~70 s, 2 busy cores).
    out = tmp_path_factory.mktemp("gpu_check")
    argv = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, json.loads((out / "gpu_check.json").read_text())


def test_tiny_run_reports_every_section(tiny_report):
    out, proc, report = tiny_report
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == list(SECTIONS)
    env = report["environment"]
    assert env["torch"] and env["triton"] and env["device"] and env["commit"]
    for name, s in sections.items():
        # a section fails here when the script it calls is broken: its output tail says why
        assert s["status"] in ("pass", "skip"), f"{name}: {s['status']} {s['notes']}\n{s.get('tail', '')}"
        assert (out / s["log"]).is_file()
        assert "--help" not in s["command"]  # every script really runs, on its small sizes
    assert proc.returncode == 0
    md = (out / "gpu_check.md").read_text()
    assert all(f"## {name}:" in md for name in SECTIONS)
    # the tiny data set's proposal cache (data/cache/proposals/<its folder name>/) is removed after the run
    assert not list((REPO / "data" / "cache" / "proposals").glob("gpu-check-tiny-*"))


def test_tiny_run_gives_real_numbers(tiny_report):
    out, _, report = tiny_report
    sections = {s["name"]: s for s in report["sections"]}
    # no GPU here: the CUDA tests are selected and skip cleanly; skips are not counted as passes
    cuda = sections["cuda_tests"]
    assert cuda["status"] == "skip" and cuda["figures"].get("skipped", 0) > 0
    assert not cuda["figures"].get("failed")
    for name, stem in (("bench_roi_pool", "roi_pool"), ("bench_smooth_l1", "smooth_l1")):
        # written to the report folder, not bench/out/
        assert sections[name]["figures"]["files"] == [f"{stem}.csv", f"{stem}.png"]
        rows = sections[name]["figures"]["rows"]
        assert rows and all(float(r["ms"]) > 0 for r in rows)
    kernels = sections["kernels"]["figures"]
    assert kernels["copy_GBps"] > 0
    roi = [r for r in kernels["roi_pool"] if r["provider"] == "ours"]
    dtypes = ("fp32", "fp16", "bf16")
    assert {(r["shape"], r["dtype"]) for r in roi} == {(s, d) for s in ("test", "train") for d in dtypes}
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["max_diff_vs_ours"] == 0 for r in roi)
    assert all(r["ms"] > 0 for r in kernels["smooth_l1"])
    assert all(r["rel_diff_vs_torch"] < 1e-2 for r in kernels["smooth_l1"] if r["provider"] == "ours")
    for net in sections["test_time"]["figures"]["nets"].values():
        for variant in ("full", "svd"):
            stages = net[variant]["stages_ms"]
            assert set(stages) >= {"conv", "roi_pool", "fc6", "fc7"} and all(v > 0 for v in stages.values())
            assert net[variant]["total_ms"] > 0
    train = sections["train"]["figures"]
    assert train["iters"] == 4 and train["ms_per_iter"] > 0 and train["loss_first"] > 0
    speed = sections["speed_vs_rcnn"]["figures"]
    assert speed["test_speedup"]["mobilenet_v2"] > 0 and speed["train_speedup"]["mobilenet_v2"] > 0


def test_check_inputs_says_how_to_prepare(tmp_path):
    # No data set, then a data set whose proposals were never computed: both name the CPU-side command.
    problems = check_inputs(tmp_path / "shapes-v1", 2000)
    assert problems and "--prepare" in problems[0]
    root = tmp_path / "tiny"
    shapes.generate(str(root), seed=0, n_train=2, n_test=1, size=96)
    problems = check_inputs(root, 300, cache_dir=str(tmp_path / "cache"))
    assert problems and "2 of 2 trainval images" in problems[0] and "--prepare" in problems[0]
    assert not (tmp_path / "cache").exists()  # checking creates nothing


def test_carried_cache_is_found_at_another_path(tmp_path):
    # Prepared on a CPU machine, carried to the GPU machine's checkout at another absolute path: the cache key
    # (data set folder name + image bytes) finds the carried files there.
    prepared = tmp_path / "cpu_machine" / "shapes-v1"
    shapes.generate(str(prepared), seed=0, n_train=2, n_test=1, size=96)
    records, _ = load_voc(str(prepared), "trainval", CLASSES.split(","), log=lambda *_: None)
    cache = str(tmp_path / "cache")
    for path in cache_paths(records, "fast", 300, cache_dir=cache):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.zeros((1, 4), np.uint16))
    carried = tmp_path / "gpu_machine" / "shapes-v1"
    shutil.copytree(prepared, carried)
    assert check_inputs(prepared, 300, cache_dir=cache) == []
    assert check_inputs(carried, 300, cache_dir=cache) == []
    assert check_inputs(carried, 2000, cache_dir=cache)  # another max_boxes is another cache
