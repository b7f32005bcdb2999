"""Checkpoints: every backbone and weight source survives save -> reload with the same detections; files that
would run code are refused by train.py and eval.py; each tensor is stored once; foreign and old files are named."""

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from detector import shapes
from detector.batches import BatchLoader
from detector.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint, save_checkpoint
from detector.backbones import build_backbone
from detector.config import Config
from detector.data import load_voc
from detector.detect import detect_dataset
from detector.model import FastRCNN, build_model, param_groups
from detector.roi_sampling import regression_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = list(shapes.SHAPE_CLASSES)
# Small images and batches: the paper's nets keep their full fc6/fc7 (VGG16's fc6 alone is 400 MB).
CFG = replace(Config(), scales=(96,), max_size=160, test_scales=(96,), test_max_size=160, ims_per_batch=2,
              rois_per_batch=16, bg_thresh_lo=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = shapes.generate(str(tmp_path_factory.mktemp("shapes")), seed=2, n_train=4, n_test=2, size=96)
    quiet = lambda *a, **k: None  # noqa: E731
    train, _ = load_voc(root, "trainval", CLASSES, log=quiet)
    test, _ = load_voc(root, "test", CLASSES, log=quiet)
    return root, train, [proposals(r, 1) for r in train], test, [proposals(r, 2) for r in test]


def proposals(record, seed: int) -> np.ndarray:
    """Jittered copies of the objects and random boxes: enough foreground and background for sampling."""
    rng = np.random.default_rng(seed)
    jitter = np.repeat(record.boxes, 4, axis=0) + rng.integers(-6, 7, (4 * len(record.boxes), 4))
    x1, y1 = rng.integers(0, record.width - 20, 30), rng.integers(0, record.height - 20, 30)
    rand = np.stack([x1, y1, x1 + rng.integers(8, 40, 30), y1 + rng.integers(8, 40, 30)], axis=1)
    boxes = np.concatenate([jitter, rand]).astype(np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, record.width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, record.height - 1)
    return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]


def weight_file(backbone: str, source: str, folder) -> str:
    """A small random ImageNet-weights file in the given format ('' for none): the real key layout."""
    if source == "none":
        return ""
    donor = FastRCNN(build_backbone(backbone), 1)
    state = {f"trunk.{k}": v for k, v in donor.backbone.trunk.state_dict().items()}
    state.update({f"{fc}.{k}": v for fc in ("fc6", "fc7") for k, v in getattr(donor.head, fc).state_dict().items()})
    path = os.path.join(folder, f"{backbone}-{source}.pth")
    if source == "torchvision":  # features.N.* and classifier.0/3.* as torchvision's files name them
        state = {k.replace("trunk.", "features.", 1).replace("fc6.", "classifier.0.").replace("fc7.", "classifier.3."): v
                 for k, v in state.items()}
        if backbone == "mobilenet_v2":  # its file has no fc6/fc7: they are new layers
            state = {k: v for k, v in state.items() if k.startswith("features.")}
        torch.save(state, path)
    else:  # ours, with the Caffe input normalisation the file declares
        # Caffe pixels are 0..255, not unit-scale: shrink the first conv so random logits do not saturate
        first_conv = next(k for k, v in state.items() if k.startswith("trunk.") and v.dim() == 4)
        state[first_conv] = state[first_conv] / 64
        torch.save({"model": state, "pixel_format": "caffe"}, path)
    return path


# Every backbone and every weight source; the paper's nets once each (their fc6 is 38M-103M numbers), VGG16
# with torchvision's file, the case where an evaluation once used the wrong input normalisation.
CASES = [("caffenet", "ours"), ("vgg_cnn_m_1024", "none"), ("vgg16", "torchvision"),
         ("mobilenet_v2", "torchvision"), ("mobilenet_v2", "ours"), ("mobilenet_v2", "none")]


@pytest.mark.parametrize("backbone, source", CASES)
def test_round_trip_gives_the_same_detections(tmp_path, tiny, backbone, source):
    root, train, train_props, test, test_props = tiny
    torch.manual_seed(0)
    model = build_model(backbone, len(CLASSES), weight_file(backbone, source, tmp_path), log=lambda *_: None)
    expected_format = {"torchvision": "torchvision", "ours": "caffe"}.get(source, build_backbone(backbone).pixel_format)
    assert model.backbone.pixel_format == expected_format
    # two SGD iterations, as train.py runs them, with non-trivial target statistics to fold
    means, stds = regression_stats([r.boxes for r in train], [r.labels for r in train], train_props,
                                   len(CLASSES), 0.5, include_flipped=True, widths=[r.width for r in train])
    model.set_target_stats(means, stds)
    loader = BatchLoader(train, train_props, CFG, len(CLASSES), means, stds, model.backbone.normalize, seed=0)
    optimizer = torch.optim.SGD(param_groups(model, 5e-4, 2.0), lr=1e-3, momentum=0.9)
    model.train()
    for _ in range(2):
        b = loader.next()
        losses = model(b.images, b.rois, b.targets("cpu"))
        optimizer.zero_grad()
        (losses["loss_cls"] + losses["loss_box"]).backward()
        optimizer.step()
    path = str(tmp_path / "final.pt")
    save_checkpoint(path, model, CLASSES, vars(CFG), root, folded=True)
    del optimizer, loader
    # the path eval.py takes: read, rebuild from the description alone, load
    reloaded = model_from_checkpoint(read_checkpoint(path), path)
    assert reloaded.backbone.pixel_format == expected_format
    ours, theirs = (detect_dataset(m.eval(), test, test_props, CFG, progress=False) for m in (model, reloaded))
    found = 0
    for per_class_a, per_class_b in zip(ours, theirs):
        for a, b in zip(per_class_a, per_class_b):
            assert a.shape == b.shape
            np.testing.assert_allclose(b[:, 4], a[:, 4], rtol=0, atol=1e-5)
            np.testing.assert_allclose(b[:, :4], a[:, :4], rtol=0, atol=1e-3)
            found += len(a)
    assert found > 0


def test_final_model_stores_each_tensor_once(tmp_path):
    model = FastRCNN(build_backbone("mobilenet_v2", fc_dim=32), 2)
    path = str(tmp_path / "final.pt")
    save_checkpoint(path, model, ["a", "b"], {}, "", folded=True)
    state = read_checkpoint(path)["model"]
    assert not [k for k in state if ".fc6." in k or ".fc7." in k if not k.startswith("head.")]
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == len(state)  # no aliases
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in model.state_dict().values())


def test_compressed_model_round_trips(tmp_path):
    from detector.svd import svd_compress

    torch.manual_seed(0)
    model = svd_compress(FastRCNN(build_backbone("mobilenet_v2", fc_dim=48), 2), 16, 8).eval()
    path = str(tmp_path / "svd.pt")
    save_checkpoint(path, model, ["a", "b"], {}, "", folded=True)
    reloaded = model_from_checkpoint(read_checkpoint(path), path).eval()
    images, rois = torch.randn(1, 3, 64, 64), torch.tensor([[0, 2.0, 3, 40, 50], [0, 10, 10, 60, 30]])
    for a, b in zip(model(images, rois), reloaded(images, rois)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_foreign_and_old_checkpoints_are_named(tmp_path):
    old = tmp_path / "old.pt"  # the format before format_version: no record of the input normalisation
    torch.save({"config": {}, "classes": ["a"], "model": {}, "folded": True}, old)
    with pytest.raises(CheckpointError, match="old.pt was written by an earlier version"):
        read_checkpoint(str(old))
    foreign = tmp_path / "foreign.pt"
    torch.save([1, 2, 3], foreign)
    with pytest.raises(CheckpointError, match="foreign.pt is not a Fast R-CNN checkpoint"):
        read_checkpoint(str(foreign))


class Payload:
    """Unpickling this calls os.mkdir(marker): the side effect shows whether anything in a file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_payload_would_run_when_unpickled_unsafely(tmp_path):
    """The payload is real: torch.load(weights_only=False), what the previous version did, runs it."""
    marker = tmp_path / "ran"
    torch.save({"config": Payload(str(marker))}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize("flag", ["eval --checkpoint", "train --resume", "train --weights"])
def test_pickled_payload_is_refused_and_never_runs(tmp_path, tiny, flag):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 2, "config": Payload(str(marker)), "classes": ["a"], "model": {},
                "model_description": {}, "data_root": "", "training": None}, evil)
    script, option = flag.split()
    cmd = [sys.executable, os.path.join(REPO, f"{script}.py"), option, str(evil)]
    if script == "train":
        cmd += ["--data", tiny[0], "--out", str(tmp_path / "out"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "evil.pt refused" in proc.stderr and "Nothing in it was run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
