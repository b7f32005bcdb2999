"""End to end on a few generated images: the loss falls, outputs are written, eval.py agrees, --images mode.

Resume, signals and data-parallel runs: tests/test_reliability.py."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from detector import shapes

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """One tiny training run that the tests below read: its outputs, and its final.pt for eval.py."""
    out = tmp_path_factory.mktemp("run")
    return out, train(out, tiny_data, "--iters", "40", "--lr", "0.01")


def run_eval(*args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    return proc


def test_loss_falls_and_outputs_are_written(trained):
    tmp_path, out = trained
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
    # eval.py on the saved model: the same detections give the same mAP.
    proc = run_eval("--checkpoint", str(tmp_path / "final.pt"), "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["mAP"] == pytest.approx(metrics["mAP"], abs=1e-9)


def comp4_rows(results: str, image_id: str) -> set:
    """(label, score, box) rows of one image in train.py's comp4 files, as the devkit reads them (1-based)."""
    rows = set()
    for name in os.listdir(results):
        label = name[len("comp4_det_test_"):-len(".txt")]
        for line in open(os.path.join(results, name)):
            fields = line.split()
            if fields[0] == image_id:
                rows.add((label, fields[1], *fields[2:]))
    return rows


def test_images_mode_equals_the_evaluation(trained, tiny_data, tmp_path):
    run, _ = trained
    test_ids = open(os.path.join(tiny_data, "ImageSets", "Main", "test.txt")).read().split()
    images = [os.path.join(tiny_data, "JPEGImages", f"{i}.jpg") for i in test_ids]
    proc = run_eval("--checkpoint", str(run / "final.pt"), "--images", *images, "--out", str(tmp_path),
                    "--min-score", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.loads((tmp_path / "detections.json").read_text())
    assert [e["image"] for e in entries] == images  # the order given, paths as given
    total = 0
    for image_id, entry in zip(test_ids, entries):
        assert set(entry) == {"image", "width", "height", "detections"}
        assert (entry["width"], entry["height"]) == Image.open(entry["image"]).size
        scores = [d["score"] for d in entry["detections"]]
        assert scores == sorted(scores, reverse=True)
        # the evaluation's comp4 lines for this image, in their format: score .3f, 1-based boxes .1f
        ours = {(d["label"], f"{d['score']:.3f}", *(f"{v + 1:.1f}" for v in d["box"])) for d in entry["detections"]}
        assert ours == comp4_rows(str(run / "results"), image_id)
        total += len(ours)
        assert (tmp_path / f"{image_id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert total > 0
    # a display threshold leaves out the low scores and nothing else
    proc = run_eval("--checkpoint", str(run / "final.pt"), "--images", images[0], "--out", str(tmp_path / "high"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    high = json.loads((tmp_path / "high" / "detections.json").read_text())[0]["detections"]
    assert high == [d for d in entries[0]["detections"] if d["score"] >= 0.5]
    assert "mean time per image: proposals" in proc.stdout


def test_images_mode_folders_bad_files_and_svd(trained, tiny_data, tmp_path):
    run, _ = trained
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    source = os.path.join(tiny_data, "JPEGImages")
    first, second = sorted(os.listdir(source))[:2]
    shutil.copy(os.path.join(source, first), folder / "b.jpg")
    shutil.copy(os.path.join(source, second), folder / "sub" / "a.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    proc = run_eval("--checkpoint", str(run / "final.pt"), "--images", str(folder), str(tmp_path / "missing.jpg"),
                    "--out", str(out), "--svd", "--svd-fc6", "32", "--svd-fc7", "16")
    assert proc.returncode == 1  # two images skipped, the others still processed
    assert "broken.jpg: unreadable image; skipped" in proc.stderr and "missing.jpg: not found; skipped" in proc.stderr
    assert "Traceback" not in proc.stderr and "truncated SVD: fc6 rank 32" in proc.stdout
    entries = json.loads((out / "detections.json").read_text())
    assert [os.path.basename(e["image"]) for e in entries] == ["b.jpg"]  # not recursive: sub/ left out
    proc = run_eval("--checkpoint", str(run / "final.pt"), "--images", str(folder), "--recursive", "--out", str(out))
    assert [os.path.relpath(e["image"], folder) for e in json.loads((out / "detections.json").read_text())] == \
        ["b.jpg", os.path.join("sub", "a.png")]
