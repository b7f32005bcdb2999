"""Test-time detection: per-class postprocessing, duplicate RoIs, images without proposals, eval.py's errors."""

import os
import subprocess
import sys

import numpy as np
import torch

from detector.backbones import build_backbone
from detector.detect import im_detect, postprocess
from detector.model import FastRCNN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def iou(a, b):  # inclusive-pixel (+1) IoU, written out independently of detector.boxes
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter)


def brute_force(scores, boxes, j, thresh, top, nms):
    order = [i for i in sorted(range(len(scores)), key=lambda i: -scores[i, j]) if scores[i, j] > thresh][:top]
    kept = []
    for i in order:  # greedy: drop a box whose IoU with a kept one is >= the NMS threshold (FR nms.pyx)
        if all(iou(boxes[i, 4 * j:4 * j + 4], boxes[k, 4 * j:4 * j + 4]) < nms for k in kept):
            kept.append(i)
    return kept


def test_postprocess_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n, k = 60, 3
        xy = rng.uniform(0, 80, (n, 2 * (k + 1)))
        wh = rng.uniform(5, 40, (n, 2 * (k + 1)))
        boxes = np.stack([xy[:, 0::2], xy[:, 1::2], xy[:, 0::2] + wh[:, 0::2], xy[:, 1::2] + wh[:, 1::2]], 2)
        boxes = boxes.reshape(n, 4 * (k + 1)).astype(np.float32)
        scores = rng.dirichlet(np.ones(k + 1), n).astype(np.float32)
        dets = postprocess(scores, boxes, k, score_thresh=0.05, max_per_class=40, nms_thresh=0.3)
        assert len(dets) == k + 1 and len(dets[0]) == 0
        for j in range(1, k + 1):
            kept = brute_force(scores, boxes, j, 0.05, 40, 0.3)
            np.testing.assert_allclose(dets[j][:, 4], scores[kept, j])
            np.testing.assert_allclose(dets[j][:, :4], boxes[kept, 4 * j:4 * j + 4])


def test_max_per_image_keeps_the_best_scores():
    scores = np.array([[0.1, 0.9, 0.0], [0.2, 0.0, 0.8], [0.3, 0.7, 0.0]], np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], np.float32), (1, 3))
    dets = postprocess(scores, boxes, 2, max_per_image=2)
    assert sorted(np.concatenate([d[:, 4] for d in dets]).tolist()) == [np.float32(0.8), np.float32(0.9)]


def model():
    torch.manual_seed(0)
    return FastRCNN(build_backbone("mobilenet_v2", fc_dim=32), 2).eval()


def test_duplicate_rois_get_identical_outputs_and_empty_proposals_work():
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 40, 40], [10, 12, 60, 50], [5, 5, 40, 40], [6, 5, 41, 40]], np.float32)
    scores, pred = im_detect(model(), img, boxes, scales=(70,), max_size=200)
    assert scores.shape == (4, 3) and pred.shape == (4, 12)
    np.testing.assert_array_equal(scores[0], scores[2])  # the same box twice is computed once
    np.testing.assert_array_equal(scores[0], scores[3])  # 1 px apart: the same cells of the stride-16 map
    np.testing.assert_allclose(scores.sum(1), 1, rtol=1e-5)
    assert (pred[:, 0::2] >= 0).all() and (pred[:, 0::2] <= 89).all() and (pred[:, 1::2] <= 69).all()
    scores, pred = im_detect(model(), img, np.zeros((0, 4), np.float32), scales=(70,), max_size=200)
    assert scores.shape == (0, 3) and pred.shape == (0, 12)


def run_eval(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_eval_names_a_bad_checkpoint(tmp_path):
    proc = run_eval("--checkpoint", str(tmp_path / "missing.pt"))
    assert proc.returncode == 1 and "missing.pt not found" in proc.stderr and "Traceback" not in proc.stderr
    truncated = tmp_path / "truncated.pt"
    torch.save({"config": {}, "classes": ["a"], "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    proc = run_eval("--checkpoint", str(truncated))
    assert proc.returncode != 0 and "cannot be read" in proc.stderr and "Traceback" not in proc.stderr
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    proc = run_eval("--checkpoint", str(foreign))
    assert proc.returncode != 0 and "not a Fast R-CNN checkpoint" in proc.stderr
