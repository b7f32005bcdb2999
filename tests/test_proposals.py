"""Selective search on built-in images, the proposal cache, the original .mat loader and proposal recall."""

import os

import cv2
import numpy as np
import pytest
import scipy.io

from detector import proposals
from detector.data import DatasetError, ImageRecord, load_voc, read_image
from detector.shapes import generate


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """The first 6 images of the built-in data set (image i depends only on the seed and i)."""
    root = generate(str(tmp_path_factory.mktemp("shapes")), n_train=6, n_test=0)
    records, _ = load_voc(root, "trainval", log=lambda *_: None)
    return records


def _record(image_id: str, boxes=(), difficult=None, path: str = "") -> ImageRecord:
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.array(difficult)
    return ImageRecord(image_id, path, 100, 100, boxes, np.ones(len(boxes), np.int64), difficult)


def test_selective_search_boxes_are_valid_ranked_and_reproducible(builtin):
    rec = builtin[0]
    img = read_image(rec.path)
    boxes = proposals.selective_search(img, "fast", min_size=10)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 50
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] < rec.width).all() and (boxes[:, 3] < rec.height).all()
    assert ((boxes[:, 2:] - boxes[:, :2] + 1) >= 10).all()  # no tiny boxes
    assert len(np.unique(boxes, axis=0)) == len(boxes)  # no duplicates
    np.testing.assert_array_equal(proposals.selective_search(img, "fast"), boxes)  # OpenCV's rand() is seeded
    # max_boxes keeps the best-ranked ones, in order.
    np.testing.assert_array_equal(proposals.selective_search(img, "fast", max_boxes=20), boxes[:20])


def test_quality_mode_runs_and_finds_more_boxes(builtin):
    img = cv2.resize(read_image(builtin[1].path), None, fx=0.5, fy=0.5)  # small: quality mode is ~10x slower
    fast, quality = proposals.selective_search(img, "fast"), proposals.selective_search(img, "quality")
    assert len(quality) > len(fast) > 0
    with pytest.raises(ValueError, match="mode"):
        proposals.selective_search(img, "medium")


def test_proposals_cover_the_builtin_objects(builtin, tmp_path):
    # In parallel (2 processes) through compute_proposals, as train.py runs it.
    boxes = proposals.compute_proposals(builtin, workers=2, progress=False, cache_dir=str(tmp_path))
    stats = proposals.proposal_recall(boxes, builtin)
    assert stats["num_gt"] >= 10
    assert stats["recall@0.5"] > 0.9
    assert stats["boxes_per_image"] == np.mean([len(b) for b in boxes])


def test_cache_is_reused_and_invalidated(builtin, tmp_path, monkeypatch):
    records = builtin[:3]
    calls = []

    def fake_search(bgr, mode, max_boxes, min_size):  # a cheap stand-in whose box tells the calls apart
        calls.append(mode)
        return np.array([[len(calls), 0, 20, 20]], np.float32)

    def run(mode="fast", **kw):
        return proposals.compute_proposals(records, mode, cache_dir=str(tmp_path), workers=1, progress=False,
                                           **kw)

    monkeypatch.setattr(proposals, "_search_bgr", fake_search)
    first = run()
    assert len(calls) == 3
    second = run()
    assert len(calls) == 3  # all three from disk
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # Another mode, or another max_boxes: a different key, so computed afresh.
    run("quality")
    assert calls[3:] == ["quality"] * 3
    run(max_boxes=100)
    assert len(calls) == 9
    # Changing an image's bytes invalidates exactly that image.
    img = cv2.imread(records[1].path)
    img[:8, :8] = 0
    cv2.imwrite(records[1].path, img)
    third = run()
    assert len(calls) == 10
    assert third[1][0, 0] == 10 and third[0][0, 0] == first[0][0, 0] and third[2][0, 0] == first[2][0, 0]
    # A cache file cut short by a crash is recomputed, not trusted.
    first_id = records[0].image_id
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith(first_id)]
    assert len(files) == 3  # fast, quality, max_boxes=100
    for path in files:
        open(path, "wb").write(b"\x93NUMPY")
    run()
    assert len(calls) == 11
    run(use_cache=False)
    assert len(calls) == 14


def test_load_mat_proposals_swaps_and_shifts(tmp_path):
    records = [_record("000005"), _record("000007"), _record("000009")]
    # The original layout: one matrix per image, [y1 x1 y2 x2], 1-based, in ImageSets order.
    raw = [np.array([[1, 2, 10, 20], [5, 6, 7, 8]], np.uint16), np.zeros((0, 4), np.uint16),
           np.array([[3, 1, 4, 100]], np.uint16)]
    cells = np.empty(3, dtype=object)
    cells[:] = raw
    ids = np.array(["000005", "000007", "000009"], dtype=object)
    path = str(tmp_path / "voc_2007_trainval.mat")
    scipy.io.savemat(path, {"boxes": cells, "images": ids})
    out = proposals.load_mat_proposals(path, records)
    np.testing.assert_array_equal(out[0], [[1, 0, 19, 9], [5, 4, 7, 6]])
    assert out[1].shape == (0, 4)
    np.testing.assert_array_equal(out[2], [[0, 2, 99, 3]])
    assert all(o.dtype == np.float32 for o in out)
    with pytest.raises(DatasetError, match="3 proposal matrices for 2 images"):
        proposals.load_mat_proposals(path, records[:2])
    with pytest.raises(DatasetError, match="entry 1 is image '000007' but the split lists '000008'"):
        proposals.load_mat_proposals(path, [records[0], _record("000008"), records[2]])
    with pytest.raises(DatasetError, match="cannot read"):
        proposals.load_mat_proposals(str(tmp_path / "missing.mat"), records)


def _iou_loop(a, b) -> float:
    """Scalar oracle: inclusive pixels, area = (x2 - x1 + 1) * (y2 - y1 + 1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0) * max(ih, 0)
    area = lambda x: (x[2] - x[0] + 1) * (x[3] - x[1] + 1)
    return inter / (area(a) + area(b) - inter)


def test_recall_hand_case():
    # GT 10x10 px. Proposal 10x5 px inside it: IoU 50/100 = 0.5; 10x8: 0.8. The difficult GT is ignored.
    records = [
        _record("a", [[0, 0, 9, 9], [50, 50, 60, 60]], difficult=[False, True]),
        _record("b", [[20, 20, 29, 29]]),
    ]
    props = [np.array([[0, 0, 9, 4]], np.float32), np.array([[20, 20, 29, 27], [0, 0, 1, 1]], np.float32)]
    stats = proposals.proposal_recall(props, records)
    assert stats == {"recall@0.5": 1.0, "recall@0.7": 0.5, "boxes_per_image": 1.5, "num_gt": 2}


@pytest.mark.parametrize("seed", range(3))
def test_recall_matches_loop_oracle(seed):
    rng = np.random.default_rng(seed)

    def random_boxes(n):
        xy = rng.integers(0, 60, (n, 2))
        return np.concatenate([xy, xy + rng.integers(0, 40, (n, 2))], 1).astype(np.float32)

    records = [_record(str(i), random_boxes(4)) for i in range(5)]
    props = [random_boxes(30) for _ in range(5)]
    best = [max(_iou_loop(g, p) for p in ps) for r, ps in zip(records, props) for g in r.boxes]
    stats = proposals.proposal_recall(props, records, thresholds=(0.3, 0.5, 0.7))
    for t in (0.3, 0.5, 0.7):
        assert stats[f"recall@{t:g}"] == pytest.approx(np.mean(np.array(best) >= t))
