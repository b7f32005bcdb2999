"""End to end on a few generated images: the loss falls, outputs are written, resume is exact, DDP stays in sync."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from detector import shapes
from detector.checkpoint import read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and fast: 64 px images, few proposals, a narrow head, random (not ImageNet) weights.
TINY = ["--scales", "128", "--max-size", "200", "--test-scales", "128", "--test-max-size", "200",
        "--max-proposals", "300", "--fc-dim", "128", "--workers", "1", "--device", "cpu", "--log-every", "5",
        "--warmup-iters", "0", "--lr-steps", "1000"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return shapes.generate(str(tmp_path_factory.mktemp("shapes")), seed=1, n_train=6, n_test=3, size=128)


def train(out, data, *extra, launcher=(sys.executable,)):
    cmd = [*launcher, os.path.join(REPO, "train.py"), "--data", data, "--out", str(out), *TINY, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_loss_falls_and_outputs_are_written(tmp_path, tiny_data):
    out = train(tmp_path, tiny_data, "--iters", "40", "--lr", "0.01")
    with open(tmp_path / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0 and set(metrics["ap"]) == set(shapes.SHAPE_CLASSES)
    assert metrics["seconds_per_image"] > 0
    for name in ("final.pt", "checkpoint.pt", "loss.png", "pr_curves.png", "detections.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert len(os.listdir(tmp_path / "results")) == len(shapes.SHAPE_CLASSES)
    assert "mAP" in out
    # eval.py on the saved model: the same detections give the same mAP; a mismatched architecture is named.
    evaluate = [sys.executable, os.path.join(REPO, "eval.py"), "--checkpoint", str(tmp_path / "final.pt")]
    proc = subprocess.run([*evaluate, "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-9)


def test_resume_continues_exactly(tmp_path, tiny_data):
    common = ("--lr", "0.005", "--evaluate", "false")
    train(tmp_path / "whole", tiny_data, "--iters", "6", *common)
    train(tmp_path / "first", tiny_data, "--iters", "3", *common)
    train(tmp_path / "second", tiny_data, "--iters", "6", "--resume", str(tmp_path / "first" / "checkpoint.pt"), *common)
    whole = read_checkpoint(str(tmp_path / "whole" / "checkpoint.pt"))
    resumed = read_checkpoint(str(tmp_path / "second" / "checkpoint.pt"))
    assert whole["training"]["iter"] == resumed["training"]["iter"] == 6
    for k, v in whole["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=0, msg=k)


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path, tiny_data):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out = train(tmp_path, tiny_data, "--iters", "4", "--evaluate", "false", launcher=launcher)
    assert "weights identical on all 2 ranks" in out
    first, second = read_checkpoint(str(tmp_path / "checkpoint.pt"))["training"]["ranks"]
    assert first["batches"]["order"] != second["batches"]["order"], "each rank samples its own images"
