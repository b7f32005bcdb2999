"""Selective search on built-in images, the proposal cache, the original .mat loader and proposal recall."""

import os

import cv2
import numpy as np
import pytest
import scipy.io

from detector import proposals
from detector.data import DatasetError, ImageRecord, load_voc, read_image
from detector.shapes import generate
from oracles import iou_loop  # tests/oracles.py


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
    # stats: how many were searched rather than read.
    stats = {}
    run(stats=stats)
    assert stats["computed"] == 0 and stats["seconds"] == 0.0
    run(use_cache=False, stats=stats)
    assert stats["computed"] == 3 and stats["seconds"] >= 0.0


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
    best = [max(iou_loop(g, p) for p in ps) for r, ps in zip(records, props) for g in r.boxes]
    stats = proposals.proposal_recall(props, records, thresholds=(0.3, 0.5, 0.7))
    for t in (0.3, 0.5, 0.7):
        assert stats[f"recall@{t:g}"] == pytest.approx(np.mean(np.array(best) >= t))


# --- selective search at the working scale ---


def test_working_scale_shrinks_before_the_search_and_maps_boxes_back(monkeypatch):
    seen = []

    def fake_search(bgr, mode, max_boxes, min_size):  # boxes in the pixels it is given
        seen.append(bgr.shape[:2])
        h, w = bgr.shape[:2]
        return np.array([[0, 0, w - 1, h - 1], [10, 10, 19, 19], [3, 5, 3, 5]], np.float32)

    monkeypatch.setattr(proposals, "_search_bgr", fake_search)
    img = np.zeros((600, 1000, 3), np.uint8)
    # image_scale(600, 1000, 300, 500) = 0.5: the search sees 500 x 300; working pixel k stands for 2k and
    # 2k + 1.
    boxes = proposals.selective_search(img, scale=300, max_size=500)
    assert seen == [(300, 500)]
    np.testing.assert_array_equal(boxes, [[0, 0, 999, 599], [20, 20, 39, 39], [6, 10, 7, 11]])
    # Never enlarged: an image already at or below the working scale is searched as it is.
    proposals.selective_search(img, scale=600, max_size=1000)
    proposals.selective_search(img)
    assert seen[1:] == [(600, 1000), (600, 1000)]


@pytest.mark.parametrize("height, width, scale, max_size", [(1037, 2311, 320, 533), (999, 777, 200, 0)])
def test_scale_back_is_integral_inside_and_covers_the_working_pixels(height, width, scale, max_size):
    fx, fy = proposals._working_factors(height, width, scale, max_size)
    wh, ww = int(round(height * fy)), int(round(width * fx))
    rng = np.random.default_rng(0)
    xy = rng.integers(0, [ww - 5, wh - 5], (200, 2))
    small = np.concatenate([xy, np.minimum(xy + rng.integers(0, 40, (200, 2)), [ww - 1, wh - 1])], 1)
    big = proposals._scale_back(small.astype(np.float32), fx, fy, height, width)
    assert (big == np.round(big)).all() and (big[:, :2] >= 0).all()
    assert (big[:, 2] <= width - 1).all() and (big[:, 3] <= height - 1).all()
    # The box spans the full-resolution pixels of its working pixels: X1 = floor(x1 / fx),
    # Y2 + 1 = ceil((y2 + 1) / fy) (clipped).
    np.testing.assert_array_equal(big[:, 0], np.floor(small[:, 0] / fx + 1e-6))
    y2 = np.minimum(np.ceil((small[:, 3] + 1) / fy - 1e-6) - 1, height - 1)
    np.testing.assert_array_equal(big[:, 3], y2)
    assert len(np.unique(big, axis=0)) == len(np.unique(small, axis=0))  # one-to-one


def test_working_scale_keeps_recall_on_an_enlarged_builtin_image(builtin):
    rec = builtin[2]
    img = cv2.resize(read_image(rec.path), None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
    gt = _record("big", rec.boxes * 3 + [0, 0, 2, 2])
    boxes = proposals.selective_search(img, scale=min(rec.height, rec.width), max_size=2000)
    assert (boxes[:, 2] < img.shape[1]).all() and (boxes[:, 3] < img.shape[0]).all()
    assert proposals.proposal_recall([boxes], [gt])["recall@0.5"] == 1.0


def test_cache_key_holds_the_working_scale_of_shrunk_images_only(builtin, tmp_path):
    # Built-in images are 217-320 px: a working scale of 200 shrinks most, 400 / 1000 none.
    native = proposals.cache_paths(builtin, "fast", 2000, cache_dir=str(tmp_path))
    same = proposals.cache_paths(builtin, "fast", 2000, cache_dir=str(tmp_path), scale=400, max_size=1000)
    assert same == native
    shrunk = proposals.cache_paths(builtin, "fast", 2000, cache_dir=str(tmp_path), scale=200, max_size=333)
    for rec, a, b in zip(builtin, native, shrunk):
        assert (a == b) == (min(rec.height, rec.width) <= 200 and max(rec.height, rec.width) <= 333)
        assert a == b or "-at200-333" in b


def test_tile_records_are_searched_in_their_window(builtin, tmp_path, monkeypatch):
    from detector import tiling

    seen = []

    def fake_search(bgr, mode, max_boxes, min_size):
        seen.append(bgr.copy())
        return np.array([[0, 0, 9, 9]], np.float32)

    monkeypatch.setattr(proposals, "_search_bgr", fake_search)
    rec = builtin[0]
    tiles = tiling.tile_records([rec], 128, 0.0)
    out = proposals.compute_proposals(tiles, cache_dir=str(tmp_path), workers=1, progress=False)
    assert len(out) == len(tiles) == len(seen)
    bgr = cv2.imread(rec.path)
    for t, s in zip(tiles, seen):
        np.testing.assert_array_equal(s, bgr[t.window.y:t.window.y + t.window.height,
                                             t.window.x:t.window.x + t.window.width])
    # Each tile has its own cache entry.
    paths = proposals.cache_paths(tiles, "fast", 2000, cache_dir=str(tmp_path))
    assert len({os.path.basename(p) for p in paths}) == len(tiles)


# --- dense proposals (paper §5.5) ---


def test_dense_boxes_hand_count():
    # 64 x 64, squares only, sides 16, 32, 64 (step 2), windows every half side:
    # 16 px: starts 0, 8, ..., 48 -> 7 x 7; 32 px: 0, 16, 32 -> 3 x 3; 64 px: 1.
    boxes = proposals.dense_boxes(64, 64, min_size=16, scale_step=2, aspect_ratios=(1.0,), stride=0.5)
    assert len(boxes) == 49 + 9 + 1
    np.testing.assert_array_equal(boxes[:2], [[0, 0, 15, 15], [8, 0, 23, 15]])  # by side, row, column
    np.testing.assert_array_equal(boxes[-1], [0, 0, 63, 63])
    # 70 px wide: 16-px windows at 0, 8, ..., 48 and the last flush at 54.
    xs = np.unique(proposals.dense_boxes(16, 70, min_size=16, aspect_ratios=(1.0,))[:, 0])
    np.testing.assert_array_equal(xs, [0, 8, 16, 24, 32, 40, 48, 54])


def test_dense_boxes_are_valid_unique_and_deterministic():
    boxes = proposals.dense_boxes(375, 500)
    assert boxes.dtype == np.float32 and (boxes == np.round(boxes)).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 499).all() and (boxes[:, 3] <= 374).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    # Documented density: at the paper's scale (600 x 1000) the order of its 45k dense boxes.
    assert 40_000 < len(proposals.dense_boxes(600, 1000)) < 60_000
    # An image smaller than the smallest window: one box, the whole image.
    np.testing.assert_array_equal(proposals.dense_boxes(10, 12), [[0, 0, 11, 9]])


@pytest.mark.parametrize("seed", range(3))
def test_dense_boxes_cover_boxes_of_every_size_and_shape(seed):
    # Random boxes with sides 16-300 px and aspect ratios 1/2..2: all covered at IoU 0.5 by the uncapped grid.
    rng = np.random.default_rng(seed)
    side = np.exp(rng.uniform(np.log(16), np.log(300), 300))
    ratio = np.exp(rng.uniform(np.log(0.5), np.log(2), 300))
    w, h = np.minimum(side / np.sqrt(ratio), 500), np.minimum(side * np.sqrt(ratio), 375)
    x, y = rng.uniform(0, 500 - w), rng.uniform(0, 375 - h)
    gt = _record("r", np.stack([x, y, x + w - 1, y + h - 1], 1))
    stats = proposals.proposal_recall([proposals.dense_boxes(375, 500)], [gt], thresholds=(0.5,))
    assert stats["recall@0.5"] >= 0.97


def test_dense_proposals_cap_and_working_scale():
    full = proposals.dense_boxes(375, 500)
    capped = proposals.dense_proposals(375, 500, max_boxes=2000)
    assert len(capped) == 2000
    # A subset of the grid, in its order, the same on every call.
    index = {tuple(b): i for i, b in enumerate(full)}
    order = [index[tuple(b)] for b in capped]
    assert order == sorted(order)
    np.testing.assert_array_equal(proposals.dense_proposals(375, 500, max_boxes=2000), capped)
    # The random subset thins every size evenly: each side keeps about 2000 / len(full) of its windows.
    sides = lambda b: np.round(np.sqrt((b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)))
    for s in (16, 64, 256):
        share = (sides(capped) == s).sum() / max((sides(full) == s).sum(), 1)
        assert 0.5 * 2000 / len(full) < share < 2 * 2000 / len(full) or (sides(full) == s).sum() < 50
    np.testing.assert_array_equal(proposals.dense_proposals(375, 500, max_boxes=0), full)
    # At a working scale of half the size, the grid is laid out in the shrunk image: its smallest boxes are
    # 16 working pixels = 32 image pixels, and all boxes stay inside the full image.
    big = proposals.dense_proposals(1000, 2000, max_boxes=0, scale=500, max_size=1000)
    assert big[:, 2:].max(0).tolist() == [1999, 999]
    assert (big[:, 2] - big[:, 0] + 1).min() >= 22 and len(big) == len(proposals.dense_boxes(500, 1000))


def test_proposals_for_split_dense_logs_time_per_image(builtin, tmp_path):
    lines = []
    boxes = proposals.proposals_for_split(builtin, "dense", 500, split="trainval", log=lines.append)
    assert len(boxes) == len(builtin) and all(len(b) == 500 for b in boxes)
    assert "proposals (dense)" in lines[0] and "s/image" in lines[0] and "recall@0.5" in lines[0]
    # Selective search says how many images it searched and how long each took.
    kw = dict(split="x", log=lines.append, workers=1, cache_dir=str(tmp_path))
    cached = proposals.proposals_for_split(builtin[:2], "fast", 500, **kw)
    proposals.proposals_for_split(builtin[:2], "fast", 500, **kw)
    assert "s/image searched, 0 from the cache" in lines[1] and "(all from the cache)" in lines[2]
    assert len(cached) == 2
    with pytest.raises(DatasetError, match="'dense'"):
        proposals.proposals_for_split(builtin, "sparse", 500)
