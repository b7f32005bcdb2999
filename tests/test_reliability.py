"""Reliability: bad inputs named before any work starts, exact resume after SIGKILL / SIGTERM / Ctrl-C, a crash
mid-write that loses nothing, data-parallel processes that stop together, empty minibatches, devkit ground truth."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from detector import shapes
from detector.backbones import build_backbone
from detector.batches import BatchLoader
from detector.checkpoint import read_checkpoint
from detector.config import Config
from detector.data import load_voc
from detector.model import FastRCNN
from detector.torchfile import write_torch_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--scales", "128", "--max-size", "200", "--test-scales", "128", "--test-max-size", "200",
        "--max-proposals", "300", "--fc-dim", "128", "--workers", "1", "--device", "cpu", "--log-every", "1",
        "--warmup-iters", "0", "--lr-steps", "1000", "--lr", "0.005", "--evaluate", "false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes.generate(str(tmp_path_factory.mktemp("shapes")), seed=1, n_train=6, n_test=2, size=128)


# --- every bad input named, before any long phase, no output written ---


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    try:
        code = train.cli()
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("args, status, message", [
    (["--data", "/nonexistent/voc"], 1, "--data /nonexistent/voc: no such directory"),
    (["--train-split", "nope"], 1, "nope.txt not found (splits there: test, trainval)"),
    (["--test-split", "val", "--evaluate", "true"], 1, "val.txt not found"),
    (["--weights", "/nonexistent/w.pth"], 1, "--weights /nonexistent/w.pth: no such file"),
    (["--resume", "/nonexistent/checkpoint.pt"], 1, "checkpoint /nonexistent/checkpoint.pt not found"),
    (["--train-proposals", "/nonexistent/p.mat"], 1, "--train-proposals /nonexistent/p.mat: no such file"),
    (["--classes", "circle,,star"], 1, "names must be unique and non-empty"),
    (["--classes", "circle"], 1, "which is not in the class list (circle)"),
    (["--device", "cuda"], 1, "--device cuda: CUDA is not available"),
    (["--device", "tpu"], 2, "--device 'tpu': must be auto, cpu, cuda or cuda:N"),
    (["--lr", "fast"], 2, "--lr 'fast': could not convert"),
    (["--iters", "0"], 2, "--iters 0: must be at least 1"),
    (["--rois-per-batch", "1"], 2, "--rois-per-batch 1 is less than one RoI per image"),
    (["--bogus", "1"], 2, "unrecognized arguments: --bogus"),
])  # fmt: skip
def test_bad_input_is_named_and_nothing_is_written(monkeypatch, capsys, tmp_path, data, args, status, message):
    if not torch.cuda.is_available() or args != ["--device", "cuda"]:
        out = tmp_path / "out"
        argv = ["--data", data, "--out", str(out), *TINY, "--iters", "2"]  # 2: should a case not fail
        # the bad value goes last, so that it wins over TINY's
        code, text = run_cli(monkeypatch, capsys, *argv, *args)
        assert code == status, text
        assert message in text, text
        assert "Traceback" not in text and "selective search" not in text and "iter " not in text
        assert not out.exists()  # no half-written output folder


# --- exact resume after any stop ---


def start(out, data, *extra):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--data", data, "--out", str(out), *TINY,
           "--iters", "24", "--checkpoint-every", "4", "--scales", "192", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished_weights(out) -> dict:
    ckpt = read_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["training"]["iter"] == 24
    return ckpt["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("whole")
    proc = start(out, data)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    return finished_weights(out)


@pytest.mark.parametrize("sig, status", [(signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_resume_after_a_stop_is_exact(tmp_path, data, uninterrupted, sig, status):
    proc = start(tmp_path, data)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # wait for the first checkpoint (iteration 4), then stop the run mid-way
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stdout[-2000:] + stderr[-2000:]
    stopped_at = read_checkpoint(str(tmp_path / "checkpoint.pt"))["training"]["iter"]
    assert 4 <= stopped_at < 24
    if sig != signal.SIGKILL:  # a handled stop saves at the boundary where it stopped
        assert f"saved {tmp_path}/checkpoint.pt at iteration {stopped_at}" in stdout
    resumed = start(tmp_path, data, "--resume", str(tmp_path / "checkpoint.pt"))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert f"resumed from {tmp_path}/checkpoint.pt at iteration {stopped_at}" in stdout
    for key, value in finished_weights(tmp_path).items():
        torch.testing.assert_close(value, uninterrupted[key], rtol=0, atol=0, msg=key)


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    write_torch_file({"iter": torch.tensor(4)}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        write_torch_file({"iter": torch.tensor(8)}, path)
    monkeypatch.undo()
    assert int(torch.load(path, weights_only=True)["iter"]) == 4  # intact and loadable
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


# --- data-parallel processes stop together ---


def torchrun(out, data, *extra, fault: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), "--data", data, "--out", str(out), *TINY, "--ddp-timeout", "2", *extra]
    env = {**os.environ, "FASTRCNN_TEST_FAULT": fault}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)


def test_ddp_shares_are_disjoint_and_replicas_agree(tmp_path, data):
    proc = torchrun(tmp_path, data, "--iters", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "weights identical on all 2 processes" in proc.stdout
    first, second = (r["batches"] for r in read_checkpoint(str(tmp_path / "checkpoint.pt"))["training"]["ranks"])
    assert first["order"] and not set(first["order"]) & set(second["order"])  # one epoch: no image on both


@pytest.mark.parametrize("fault, message", [
    ("1:data", "process 1 of 2: injected data failure"),
    ("1:nonfinite@3", "non-finite loss at iteration 3 on process(es) [1]"),
])
def test_a_failure_on_one_process_stops_both(tmp_path, data, fault, message):
    started = time.time()
    proc = torchrun(tmp_path, data, "--iters", "6", fault=fault)
    assert time.time() - started < 60
    assert proc.returncode != 0
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]  # both processes say why, and both stop


# --- minibatches without RoIs; the devkit's ground truth for evaluation ---


def test_a_minibatch_without_rois_trains_on(data):
    records, _ = load_voc(data, "trainval", list(shapes.SHAPE_CLASSES), log=lambda *_: None)
    for r in records:  # images without objects, and no proposals: nothing to sample
        r.boxes, r.labels, r.difficult = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
    cfg = Config(scales=(96,), max_size=160, ims_per_batch=2, rois_per_batch=16)
    model = FastRCNN(build_backbone("mobilenet_v2", fc_dim=32), 6)
    loader = BatchLoader(records, [np.zeros((0, 4), np.float32)] * len(records), cfg, 6, np.zeros((7, 4)),
                         np.ones((7, 4)), model.backbone.normalize, seed=0)
    batch = loader.next()
    assert batch.rois.shape == (0, 5)
    losses = model(batch.images, batch.rois, batch.targets("cpu"))
    loss = losses["loss_cls"] + losses["loss_box"]
    assert loss.item() == 0.0
    loss.backward()  # reaches the parameters (zero gradients): a step on every process, nothing stops
    assert model.cls_score.weight.grad is not None and not model.cls_score.weight.grad.any()


def test_evaluation_reads_the_annotations_as_written(tmp_path):
    root = tmp_path / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    import cv2

    cv2.imwrite(str(root / "JPEGImages" / "a.jpg"), np.zeros((30, 40, 3), np.uint8))
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><size><width>40</width><height>30</height></size>"
        "<object><name>cat</name><bndbox><xmin>30</xmin><ymin>5</ymin><xmax>55</xmax><ymax>20</ymax></bndbox>"
        "</object><object><name>cat</name><bndbox><xmin>10</xmin><ymin>5</ymin><xmax>10</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>")
    cleaned, _ = load_voc(str(root), "test", ["cat"], log=lambda *_: None)
    as_written, _ = load_voc(str(root), "test", ["cat"], log=lambda *_: None, clean=False)
    np.testing.assert_array_equal(cleaned[0].boxes, [[29, 4, 39, 19]])  # clipped; the 1-pixel box dropped
    np.testing.assert_array_equal(as_written[0].boxes, [[29, 4, 54, 19], [9, 4, 9, 4]])  # the devkit's truth
