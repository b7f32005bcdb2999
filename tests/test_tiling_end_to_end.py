"""Tiling end to end (issue 15): train.py and its evaluation on one generated large image with many small
objects, with and without --tile at otherwise equal settings; eval.py --images on the tiled checkpoint.

Small on purpose (~30 s on 2 CPU cores): one 1200-1400 px image (~170 objects of 15-60 px) is both the
training and the test image, dense proposals (no selective-search time), 30 iterations. The full measurement
(selective search vs dense, AP with a test image of its own, proposal time per image) is bench/large_images.py.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from detector.shapes import generate_large

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Equal settings for both runs: the demo preset (MobileNetV2), dense proposals, one image per step.
COMMON = ["--iters", "30", "--train-proposals", "dense", "--test-proposals", "dense", "--max-proposals", "2000",
          "--fc-dim", "256", "--ims-per-batch", "1", "--rois-per-batch", "64", "--log-every", "10",
          "--warmup-iters", "0", "--lr-steps", "1000", "--workers", "1", "--device", "cpu"]
# Tiles at native resolution: the network sees the 15-60 px objects at their own size.
TILED = ["--tile", "400", "--scales", "400", "--max-size", "400", "--test-scales", "400", "--test-max-size", "400"]


def _train(data: str, out, *extra) -> tuple[str, dict]:
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--data", data, "--out", str(out), *COMMON, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "metrics.json").read_text())


def _whole_image_recall(log: str) -> float:
    """recall@0.5 of the test proposals on the whole image: the tiled run's pooled line, or the untiled one's."""
    pooled = re.search(r"test: proposals of all tiles on the \d+ whole images: recall@0.5 ([\d.]+)", log)
    plain = re.search(r"test: \d+ images, .* recall@0.5 ([\d.]+)", log)
    return float((pooled or plain).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = generate_large(str(tmp_path_factory.mktemp("large")), n_images=1, sizes=(1200, 1400))
    out = tmp_path_factory.mktemp("runs")
    return data, _train(data, out / "whole"), _train(data, out / "tiled", *TILED), out / "tiled"


def test_tiling_raises_recall_and_ap(runs):
    _, (whole_log, whole), (tiled_log, tiled), _ = runs
    # The untiled run is warned, and told the flags; the tiled one at native resolution is not.
    assert "warning: the training objects are small" in whole_log and "--tile 512" in whole_log
    assert "warning: the training objects are small" not in tiled_log
    assert "tiling: 1 images -> " in tiled_log and tiled["tiles"] > 1
    whole_recall, tiled_recall = _whole_image_recall(whole_log), _whole_image_recall(tiled_log)
    print(f"recall@0.5 {whole_recall:.3f} -> {tiled_recall:.3f}, mAP {whole['mAP']:.4f} -> {tiled['mAP']:.4f}")
    assert tiled_recall > whole_recall + 0.2
    # Whole images shrunk 4x leave the objects at ~7 px, below the stride: the detector finds next to nothing.
    assert tiled["mAP"] > whole["mAP"] + 0.02


def test_images_mode_tiles_as_the_evaluation(runs, tmp_path):
    data, _, _, tiled_dir = runs
    image = os.path.join(data, "JPEGImages", "000001.jpg")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--checkpoint",
                           str(tiled_dir / "final.pt"), "--images", image, "--out", str(tmp_path), "--min-score",
                           "0.3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((tmp_path / "detections.json").read_text())[0]
    # The comp4 rows of the evaluation (1-based boxes, score .3f) for the same image: the same detections.
    ours = {(d["label"], f"{d['score']:.3f}", *(f"{v + 1:.1f}" for v in d["box"])) for d in entry["detections"]}
    theirs = set()
    for name in os.listdir(tiled_dir / "results"):
        label = name[len("comp4_det_test_"):-len(".txt")]
        for line in open(tiled_dir / "results" / name):
            fields = line.split()
            theirs.add((label, fields[1], *fields[2:]))
    # (A display threshold of 0.3 keeps the picture quick to draw; scores within rounding of it may differ.)
    assert len(ours) > 0 and ours <= theirs
    assert {t for t in theirs if float(t[1]) > 0.3005} <= ours
    # Boxes in whole-image pixels, beyond a single tile.
    assert max(d["box"][2] for d in entry["detections"]) > 400
