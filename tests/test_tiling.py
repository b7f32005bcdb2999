"""Tiling arithmetic against hand-made cases: the grid, boxes cut at tile borders, tile records, mapping back,
the per-class merge; and the small-object warning."""

import os

import numpy as np
import pytest

from detector import tiling
from detector.data import ImageRecord, load_voc
from detector.shapes import generate
from detector.tiling import Window


def _record(boxes, width=1000, height=800, image_id="a", labels=None) -> ImageRecord:
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    labels = np.arange(1, len(boxes) + 1) if labels is None else np.array(labels)
    return ImageRecord(image_id, "unused.jpg", width, height, boxes, labels.astype(np.int64),
                       np.zeros(len(boxes), bool))


# (height, width, size, overlap, expected x starts, expected y starts)
GRID_CASES = [
    # 1000 wide, 400-px tiles, overlap 0.25 (100 px): steps of at most 300 over 600 px -> 3 tiles, 0, 300,
    # 600. 800 high: 400 px to cover in steps <= 300 -> 3 tiles spread evenly: 0, 200, 400 (overlap 200).
    (800, 1000, 400, 0.25, [0, 300, 600], [0, 200, 400]),
    # The last step lands exactly on the border: no extra tile.
    (700, 700, 400, 0.25, [0, 300], [0, 300]),
    # No overlap: 1000 = 512 + 488: two tiles, the second flush (overlapping the first by 24 px).
    (512, 1000, 512, 0.0, [0, 488], [0]),
    # Overlap 0.2 of 512 = 102 px (rounded): step <= 410 over 988 px -> 4 tiles at 988/3 = 329.3 apart.
    (1500, 1500, 512, 0.2, [0, 329, 659, 988], [0, 329, 659, 988]),
    # 900 px, overlap 0.25 (128 px): 388 px in steps <= 384 -> 3 tiles: 0, 194, 388 (a start-stepping grid
    # would give 0, 384, 388: two near-duplicates).
    (512, 900, 512, 0.25, [0, 194, 388], [0]),
]


@pytest.mark.parametrize("height, width, size, overlap, xs, ys", GRID_CASES)
def test_tile_grid_hand_cases(height, width, size, overlap, xs, ys):
    grid = tiling.tile_grid(height, width, size, overlap)
    assert [w.x for w in grid[:len(xs)]] == xs  # first row
    assert [w.y for w in grid[::len(xs)]] == ys  # first column
    assert len(grid) == len(xs) * len(ys)
    assert all(w.width == min(size, width) and w.height == min(size, height) for w in grid)
    # Every pixel is covered, the last tiles end flush with the borders.
    cover = np.zeros((height, width), bool)
    for w in grid:
        cover[w.y:w.y + w.height, w.x:w.x + w.width] = True
    assert cover.all()
    assert max(w.x + w.width for w in grid) == width and max(w.y + w.height for w in grid) == height


def test_small_images_are_one_tile():
    # Smaller than a tile in both axes: the whole image. In one axis only: one tile along it.
    assert tiling.tile_grid(300, 200, 512) == [Window(0, 0, 200, 300)]
    assert tiling.tile_grid(512, 512, 512) == [Window(0, 0, 512, 512)]
    assert [tuple(w) for w in tiling.tile_grid(300, 900, 512, 0.1)] == [(0, 0, 512, 300), (388, 0, 512, 300)]
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_grid(100, 100, 50, 1.0)
    with pytest.raises(ValueError, match="size"):
        tiling.tile_grid(100, 100, 0)


def test_cut_boxes_visibility_rule():
    win = Window(100, 50, 200, 100)  # columns 100..299, rows 50..149
    boxes = [
        [120, 60, 139, 79],  # inside: kept unchanged, shifted by (100, 50)
        [90, 60, 109, 79],  # 20 px wide, 10 columns (100..109) inside: exactly half -> kept, clipped
        [91, 60, 110, 79],  # 20 wide, 11 columns inside: kept
        [88, 60, 107, 79],  # 8 of 20 columns inside (40%): dropped
        [290, 140, 309, 159],  # a corner: 10 x 10 of 20 x 20 inside (25%): dropped
        [400, 400, 420, 420],  # outside
        [100, 149, 120, 149],  # one row tall, inside: zero height once clipped? no, y1 == y2 -> dropped
    ]
    out, kept = tiling.cut_boxes(np.array(boxes, np.float32), win)
    np.testing.assert_array_equal(kept, [0, 1, 2])
    np.testing.assert_array_equal(out, [[20, 10, 39, 29], [0, 10, 9, 29], [0, 10, 10, 29]])
    assert out.dtype == np.float32
    # A lower threshold (SAHI's 0.1) also keeps the 40% and 25% fragments.
    _, kept = tiling.cut_boxes(np.array(boxes, np.float32), win, min_visible=0.1)
    np.testing.assert_array_equal(kept, [0, 1, 2, 3, 4])
    # No boxes.
    out, kept = tiling.cut_boxes(np.zeros((0, 4), np.float32), win)
    assert out.shape == (0, 4) and kept.shape == (0,)


def test_clipped_box_iou_with_whole_box_is_its_visible_fraction():
    # Why 0.5: a kept fragment is itself a correct detection of the whole object (IoU >= 0.5, +1 areas).
    from detector.boxes import box_iou

    box = np.array([[90, 60, 109, 79]], np.float64)
    out, _ = tiling.cut_boxes(box, Window(100, 0, 100, 100))
    clipped = out.astype(np.float64) + [100, 0, 100, 0]
    assert box_iou(clipped, box)[0, 0] == pytest.approx(0.5)


def test_tile_records_cut_the_ground_truth():
    # 1000 x 800 image, 400-px tiles, overlap 0.25: tiles start at x 0, 300, 600 and y 0, 200, 400.
    rec = _record([[10, 10, 29, 29],  # tile (0, 0) only
                   [310, 10, 329, 29],  # whole in tiles x=0 and x=300, row y=0
                   [590, 320, 609, 339]],  # whole in x=300; x=600 cuts it at column 600 (half visible): kept
                  labels=[1, 2, 3])
    tiles = tiling.tile_records([rec], 400, 0.25)
    assert len(tiles) == 9 and all(t.source == 0 and t.path == rec.path for t in tiles)
    by_id = {t.image_id: t for t in tiles}
    first = by_id["a@0_0"]
    assert (first.width, first.height, first.window) == (400, 400, Window(0, 0, 400, 400))
    np.testing.assert_array_equal(first.labels, [1, 2])
    np.testing.assert_array_equal(first.boxes, [[10, 10, 29, 29], [310, 10, 329, 29]])
    np.testing.assert_array_equal(by_id["a@300_0"].boxes, [[10, 10, 29, 29], [290, 320, 309, 339]])
    np.testing.assert_array_equal(by_id["a@300_200"].boxes, [[290, 120, 309, 139]])
    np.testing.assert_array_equal(by_id["a@600_200"].boxes, [[0, 120, 9, 139]])  # half visible: clipped
    np.testing.assert_array_equal(by_id["a@600_200"].labels, [3])
    assert by_id["a@0_400"].boxes.shape == (0, 4) and by_id["a@0_400"].labels.shape == (0,)
    # Without the empty tiles (training).
    kept = tiling.tile_records([rec], 400, 0.25, keep_empty=False)
    assert [t.image_id for t in kept] == ["a@0_0", "a@300_0", "a@600_0", "a@300_200", "a@600_200"]


def test_crop_and_read_tile(tmp_path):
    import cv2

    img = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    rec = _record([], width=80, height=60)
    rec.path = path
    tile = tiling.tile_records([rec], 50, 0.0)[1]  # x 30..79, y 0..49
    np.testing.assert_array_equal(tiling.read_tile(tile), img[0:50, 30:80])
    np.testing.assert_array_equal(tiling.read_tile(rec), img)  # a plain record: the whole image
    # The decoded image is reused for the next tile, but a rewritten file is read again.
    tiling.read_tile(tile)[:] = 0  # a copy: the cached image is untouched
    np.testing.assert_array_equal(tiling.read_tile(tile), img[0:50, 30:80])
    cv2.imwrite(path, cv2.cvtColor(255 - img, cv2.COLOR_RGB2BGR))
    os.utime(path, ns=(1, 1))
    np.testing.assert_array_equal(tiling.read_tile(tile), 255 - img[0:50, 30:80])


def test_to_image_coords_boxes_detections_and_class_columns():
    win = Window(100, 50, 200, 100)
    dets = np.array([[0, 0, 9, 9, 0.7]], np.float32)
    np.testing.assert_allclose(tiling.to_image_coords(dets, win), [[100, 50, 109, 59, 0.7]])
    boxes = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.float32)  # two classes' boxes
    np.testing.assert_array_equal(tiling.to_image_coords(boxes, win), [[101, 52, 103, 54, 105, 56, 107, 58]])
    assert dets[0, 0] == 0  # not modified in place


def test_merge_detections_maps_back_and_suppresses_per_class():
    windows = [Window(0, 0, 400, 400), Window(300, 0, 400, 400)]
    empty = np.zeros((0, 5), np.float32)
    tile_dets = [
        # tile 1: class 1 object at image x 320..339 (whole), and class 2 at the same place
        [empty, np.array([[320, 10, 339, 29, 0.9]], np.float32),
         np.array([[320, 10, 339, 29, 0.8]], np.float32)],
        # tile 2: the same class-1 object seen again (tile x 20 = image 320), lower score; another far away
        [empty, np.array([[20, 10, 39, 29, 0.6], [200, 200, 219, 219, 0.5]], np.float32), empty],
    ]
    merged = tiling.merge_detections(tile_dets, windows, nms_thresh=0.3)
    assert len(merged) == 3 and merged[0].shape == (0, 5)
    # Class 1: the duplicate is suppressed; the far box maps to x 500.
    np.testing.assert_allclose(merged[1], [[320, 10, 339, 29, 0.9], [500, 200, 519, 219, 0.5]])
    # Class 2 is not suppressed by class 1 (per-class NMS).
    np.testing.assert_allclose(merged[2], [[320, 10, 339, 29, 0.8]])
    assert all(m.dtype == np.float32 for m in merged)


def test_merge_split_detections_groups_tiles_by_image():
    recs = [_record([], width=700, height=400, image_id="a"),
            _record([], width=300, height=300, image_id="b")]
    tiles = tiling.tile_records(recs, 400, 0.25)  # a: 2 tiles (x 0, 300); b: 1 tile
    assert [t.source for t in tiles] == [0, 0, 1]
    det = lambda *rows: np.array(rows, np.float32).reshape(-1, 5)
    all_dets = [[det(), det(), det()],
                [det([0, 0, 9, 9, 0.5]), det([0, 0, 9, 9, 0.4]), det([5, 5, 14, 14, 0.3])]]
    out = tiling.merge_split_detections(all_dets, tiles, len(recs))
    assert len(out) == 2 and len(out[1]) == 2
    np.testing.assert_allclose(out[1][0], [[0, 0, 9, 9, 0.5], [300, 0, 309, 9, 0.4]])
    np.testing.assert_allclose(out[1][1], [[5, 5, 14, 14, 0.3]])
    assert out[0][0].shape == (0, 5)


def _synthetic_large(n=3, seed=0) -> list[ImageRecord]:
    """Records only (no pixels): 1500-2500 px images holding ~300 objects of 15-60 px (the issue's aerial
    set)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(1500, 2501, 2))
        side = np.exp(rng.uniform(np.log(15), np.log(60), (300, 2)))
        xy = rng.uniform(0, [w - 61, h - 61], (300, 2))
        out.append(_record(np.concatenate([xy, xy + side - 1], 1), width=w, height=h, image_id=str(i),
                           labels=np.ones(300)))
    return out


def test_small_object_warning_fires_on_large_images_with_small_objects():
    records = _synthetic_large()
    msg = tiling.small_object_warning(records, (320,), 533)
    assert msg is not None
    # It states the median size after scaling and the stride, and names the flags that fix it.
    assert "px as the network sees them" in msg and "stride of 16 px" in msg
    assert "--tile 512 --scales 512 --max-size 512" in msg and "--scales 320 --max-size 533" in msg
    # The paper's scale shrinks them less but still below a stride.
    assert tiling.small_object_warning(records, (600,), 1000) is not None
    # The fix it names silences it.
    assert tiling.small_object_warning(records, (512,), 512, tile=512) is None
    # Objects too small even at native resolution (8 px): smaller tiles, enlarged 4x to the same input size.
    tiny = [_record(np.tile(r.boxes[:, :2], 2) + [0, 0, 7, 7], r.width, r.height) for r in records]
    msg = tiling.small_object_warning(tiny, (512,), 512, tile=512)
    assert "median side is 8 px" in msg
    assert "--tile 128 --scales 512 --max-size 512 (128-px tiles enlarged 4.0x)" in msg
    # No objects: nothing to say.
    assert tiling.small_object_warning([_record([])], (320,), 533) is None


def test_small_object_warning_suggests_scales_for_moderate_images():
    # 800 x 600 images with 24-px objects at scale 300 (12 px as seen): at native resolution the whole image
    # fits (800 <= 2 * 512), so --scales is suggested before tiles.
    recs = [_record([[10, 10, 33, 33]] * 5, width=800, height=600)]
    msg = tiling.small_object_warning(recs, (300,), 400)
    assert msg is not None and "--scales 600 --max-size 800, or --tile 512" in msg
    assert tiling.small_object_warning(recs, (600,), 1000) is None


def test_small_object_warning_is_silent_on_the_builtin_set(tmp_path):
    root = generate(str(tmp_path / "shapes"), n_train=30, n_test=0)
    records, _ = load_voc(root, "trainval", log=lambda *_: None)
    assert tiling.small_object_warning(records, (320,), 533) is None  # the demo preset
    assert tiling.small_object_warning(records, (600,), 1000) is None  # the paper's
