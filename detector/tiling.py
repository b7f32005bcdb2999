"""Tiling large images: the tile grid, ground truth cut to a tile, tile detections mapped back and merged; and
the warning that the chosen scales make the training objects too small for the network.

Why: Fast R-CNN rescales every image so its shorter side is `scale` (paper §2.3, FR blob.py). An aerial image
of 2300 px at the demo's scale 320 shrinks 7x, and 15-60 px objects become 2-8 px, below the stride-16 cells
of the conv5 map the RoIs are pooled from. Cutting the image into SIZE x SIZE tiles at native resolution (as
DeepForest and SAHI do) lets the network see the objects at their own size; the detections of all tiles are
mapped back to the image and merged with per-class NMS, so the evaluation still scores whole images.

Conventions: boxes as in detector/boxes.py (0-based x1, y1, x2, y2, inclusive, +1 areas). A tile window is
(x, y, width, height) in image pixels: the tile covers columns x .. x + width - 1 and rows y .. y + height -
1, and a box in tile coordinates plus (x, y, x, y) is the box in image coordinates.
"""

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from detector.boxes import nms
from detector.data import ImageRecord, image_scale, read_image

# The tile overlap, as a fraction of the tile side: SAHI's default overlap ratio (0.2). With 512-px tiles that
# is 102 px, more than the largest object we aim at (~60 px), so every such object lies whole inside some
# tile. (DeepForest's default, 0.05 of 400 px = 20 px, is tuned for tree crowns of about that size.)
DEFAULT_OVERLAP = 0.2
# An object cut by a tile border is kept, clipped to the tile, when at least this fraction of its area (+1
# pixels) lies inside; otherwise it is dropped from that tile. DeepForest keeps clipped boxes above 50% of
# their area (preprocess.select_annotations); SAHI keeps them above 10% (slice_coco min_area_ratio). We take
# 0.5 for a reason specific to the VOC criterion: the clipped box of an object with visible fraction v lies
# inside the full box, so IoU(clipped, full) = v. Keeping v >= 0.5 trains exactly the fragments whose box
# would still count as a correct detection of the whole object (IoU >= 0.5), and no smaller fragment. A
# dropped fragment is whole in a neighbouring tile whenever the object is smaller than the overlap.
DEFAULT_MIN_VISIBLE = 0.5
# The warning fires when the median object side, after scaling, is below this many feature strides: below one
# stride an object falls inside about one cell of the stride-16 conv5 map once RoI pooling rounds its box to
# cells (round(x / 16), torchvision semantics), so all 7x7 bins of its RoI read the same feature vector and
# the classifier sees a blob without a shape (the issue: "2-8 pixels, below the feature stride of 16").
# Between one and two strides detection works, but poorly; the suggested fix aims at two strides when native
# resolution is not enough. The paper's own setting is far from both: VOC objects are ~100-300 px at scale
# 600, and multi-scale testing upsamples ~1.6x to an effective stride of ~10 px (§5.2).
SMALL_OBJECT_STRIDES = 1.0
# The tile side the warning suggests: SAHI's default slice (512 x 512), a size every backbone here handles at
# native resolution on a CPU.
SUGGESTED_TILE = 512


class Window(NamedTuple):
    """A tile's place in its image: columns x .. x + width - 1, rows y .. y + height - 1."""

    x: int
    y: int
    width: int
    height: int


@dataclass
class TileRecord(ImageRecord):
    """An ImageRecord for one tile: width, height and boxes are the tile's (boxes in tile coordinates), `path`
    is the whole image's file; read_tile crops the window out of it. `source` indexes the image's record in
    the list given to tile_records, so detections can be merged per image (merge_split_detections)."""

    window: Window = Window(0, 0, 0, 0)
    source: int = 0


def _starts(length: int, size: int, step: int) -> list[int]:
    """Tile starts along one axis: the fewest tiles `step` apart or closer that reach the far border, spread
    evenly, so the first is flush with one border, the last with the other, and all overlaps are about
    equal."""
    if length <= size:
        return [0]
    n = -(-(length - size) // step) + 1  # ceil: the fewest tiles with steps <= step
    return [int(round(k * (length - size) / (n - 1))) for k in range(n)]


def tile_grid(height: int, width: int, size: int, overlap: float = DEFAULT_OVERLAP) -> list[Window]:
    """The tiles of a height x width image, row by row.

    Neighbouring tiles share at least round(overlap * size) pixels: along each axis, the fewest tiles whose
    step is at most size - round(overlap * size), spread evenly from one border to the other (the last tile
    ends flush with the image's border; SAHI and DeepForest instead step evenly and move only the last tile
    back, which can leave two nearly identical tiles). An image no larger than `size` along an axis gets one
    tile spanning it along that axis (so an image smaller than a tile is one tile: the whole image).

    Args:
        height, width: image size in pixels.
        size: tile side in pixels (> 0).
        overlap: fraction of `size` shared by neighbouring tiles, in [0, 1).
    Returns a list of Window(x, y, width, height).
    """
    if size <= 0:
        raise ValueError(f"tile size must be positive, got {size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"tile overlap must be a fraction in [0, 1), got {overlap}")
    step = max(size - int(round(overlap * size)), 1)
    tw, th = min(size, width), min(size, height)
    return [Window(x, y, tw, th) for y in _starts(height, size, step) for x in _starts(width, size, step)]


def cut_boxes(boxes: np.ndarray, window: Window, min_visible: float = DEFAULT_MIN_VISIBLE
              ) -> tuple[np.ndarray, np.ndarray]:
    """The boxes seen through a tile: clipped to it, kept if at least `min_visible` of their area is inside.

    Args:
        boxes: (G, 4) boxes in image coordinates.
        window: the tile.
        min_visible: fraction of a box's (+1) area that must lie inside the tile (DEFAULT_MIN_VISIBLE explains
            0.5).
    Returns (kept boxes (K, 4) float32 in tile coordinates, their indices (K,) into `boxes`).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x2, y2 = window.x + window.width - 1, window.y + window.height - 1
    clipped = np.stack([np.maximum(boxes[:, 0], window.x), np.maximum(boxes[:, 1], window.y),
                        np.minimum(boxes[:, 2], x2), np.minimum(boxes[:, 3], y2)], 1)
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    inside = (clipped[:, 2] - clipped[:, 0] + 1).clip(min=0) * (clipped[:, 3] - clipped[:, 1] + 1).clip(min=0)
    # A clipped box must keep a positive extent (zero width breaks box encoding; data.py drops those too).
    keep = np.flatnonzero((inside >= min_visible * area) & (clipped[:, 2] > clipped[:, 0])
                          & (clipped[:, 3] > clipped[:, 1]))
    offset = np.array([window.x, window.y, window.x, window.y], np.float64)
    return (clipped[keep] - offset).astype(np.float32), keep


def tile_records(records, size: int, overlap: float = DEFAULT_OVERLAP,
                 min_visible: float = DEFAULT_MIN_VISIBLE, keep_empty: bool = True) -> list[TileRecord]:
    """One TileRecord per tile of every image, with the image's ground truth cut to the tile (cut_boxes).

    Args:
        records: ImageRecords (detector.data.load_voc).
        size, overlap: as tile_grid.
        min_visible: as cut_boxes.
        keep_empty: also return tiles without objects. Test splits need every tile; for training they are
            background-only images (roi_sampling samples all their proposals as background), which can
            outnumber the tiles with objects on sparse data.
    Returns the tile records, image by image, row by row; image_id is "<id>@<x>_<y>".
    """
    out = []
    for index, rec in enumerate(records):
        for win in tile_grid(rec.height, rec.width, size, overlap):
            boxes, kept = cut_boxes(rec.boxes, win, min_visible)
            if len(kept) == 0 and not keep_empty:
                continue
            out.append(TileRecord(f"{rec.image_id}@{win.x}_{win.y}", rec.path, win.width, win.height, boxes,
                                  rec.labels[kept], rec.difficult[kept], window=win, source=index))
    return out


def crop(img: np.ndarray, window: Window) -> np.ndarray:
    """The tile's pixels: (height, width, 3), a copy (never a view of img)."""
    return img[window.y:window.y + window.height, window.x:window.x + window.width].copy()


@functools.lru_cache(maxsize=1)
def _decoded(path: str, mtime_ns: int) -> np.ndarray:
    # One image: the tiles of an image come one after another at test time, and decoding a 2000-px JPEG costs
    # ~70 ms on a 2-core CPU. Keyed by mtime too: an edited file is read again.
    return read_image(path)


def read_tile(rec: ImageRecord) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of a record: the tile of a TileRecord (a copy), the whole image of a plain
    ImageRecord (detector.data.read_image)."""
    window = getattr(rec, "window", None)
    if window is None:
        return read_image(rec.path)
    return crop(_decoded(rec.path, os.stat(rec.path).st_mtime_ns), window)


def to_image_coords(boxes: np.ndarray, window: Window) -> np.ndarray:
    """Tile-coordinate boxes -> image coordinates: (N, 4k) boxes, or (N, 4k + 1) detections whose last column
    (the score) is left as is."""
    boxes = np.array(boxes, copy=True)
    cols = boxes.shape[1] - boxes.shape[1] % 4  # the box columns; a trailing score column is not shifted
    boxes[:, 0:cols:2] += window.x
    boxes[:, 1:cols:2] += window.y
    return boxes


def pool_boxes(boxes: list[np.ndarray], tiles: list[TileRecord], num_images: int) -> list[np.ndarray]:
    """Per-tile boxes (P, 4) in tile coordinates -> per-image boxes in image coordinates, all tiles' pooled (no
    NMS): e.g. the tiles' proposals, to measure their recall on the whole images (proposal_recall)."""
    pooled: list[list[np.ndarray]] = [[np.zeros((0, 4), np.float32)] for _ in range(num_images)]
    for t, b in zip(tiles, boxes):
        pooled[t.source].append(to_image_coords(np.asarray(b, np.float32).reshape(-1, 4), t.window))
    return [np.concatenate(p) for p in pooled]


def merge_detections(tile_dets: list[list[np.ndarray]], windows: list[Window], nms_thresh: float = 0.3
                     ) -> list[np.ndarray]:
    """The detections of one image from those of its tiles: mapped back to the image, then per-class NMS.

    An object inside the overlap of two tiles is found in both; NMS (the test-time threshold, paper 0.3) keeps
    the higher-scoring box. A fragment box from a tile that cuts the object overlaps the whole object's box by
    its visible fraction, so at the usual thresholds NMS removes it too when it scores lower.

    Args:
        tile_dets: per tile, a list over classes (index 0 background, empty) of (n, 5) x1, y1, x2, y2, score
            in tile coordinates (detector.detect.postprocess's output).
        windows: the tiles' windows, aligned with tile_dets.
        nms_thresh: IoU threshold of detector.boxes.nms.
    Returns a list over classes of (n, 5) float32 arrays in image coordinates, by descending score.
    """
    if len(tile_dets) != len(windows):
        raise ValueError(f"{len(tile_dets)} tiles of detections for {len(windows)} windows")
    num_outputs = len(tile_dets[0]) if tile_dets else 1
    merged = [np.zeros((0, 5), np.float32)]
    for j in range(1, num_outputs):
        d = np.concatenate([np.zeros((0, 5), np.float32)] +
                           [to_image_coords(np.asarray(t[j], np.float32).reshape(-1, 5), w)
                            for t, w in zip(tile_dets, windows)])
        if len(d):
            d = d[nms(torch.from_numpy(d[:, :4]), torch.from_numpy(d[:, 4]), nms_thresh).numpy()]
        merged.append(d.astype(np.float32))
    return merged


def merge_split_detections(all_dets: list[list[np.ndarray]], tiles: list[TileRecord], num_images: int,
                           nms_thresh: float = 0.3) -> list[list[np.ndarray]]:
    """detect_dataset's all_dets[class][tile] over tile records -> all_dets[class][image] over the images.

    Args:
        all_dets: all_dets[class][tile], (n, 5) arrays in tile coordinates.
        tiles: the tile records the detections were made on (tile_records(records, ...)).
        num_images: len(records); an image without tiles (impossible from tile_records) gets no detections.
        nms_thresh: as merge_detections.
    """
    num_outputs = len(all_dets)
    by_image: list[list[int]] = [[] for _ in range(num_images)]
    for t, tile in enumerate(tiles):
        by_image[tile.source].append(t)
    out = [[None] * num_images for _ in range(num_outputs)]
    for i, members in enumerate(by_image):
        merged = merge_detections([[all_dets[j][t] for j in range(num_outputs)] for t in members],
                                  [tiles[t].window for t in members], nms_thresh)
        for j in range(num_outputs):
            out[j][i] = merged[j] if members else np.zeros((0, 5), np.float32)
    return out


def small_object_warning(records, scales, max_size: int, stride: int = 16, tile: int = 0) -> str | None:
    """A warning when the network would see the training objects smaller than SMALL_OBJECT_STRIDES strides.

    The size of an object is the square root of its (+1) box area; the network sees it multiplied by the image
    scale of detector.data.image_scale (shorter side to each training scale, longer side capped at max_size),
    of the whole image or, with tile > 0, of its tiles. The median is taken over all objects and training
    scales.

    Args:
        records: training ImageRecords.
        scales: the training scales (shorter side in pixels), --scales.
        max_size: the cap on the longer side, --max-size.
        stride: the feature stride of the backbone's conv5 map (16 for every backbone here).
        tile: --tile (0: whole images).
    Returns the message (one paragraph naming the flags that fix it), or None when the objects are large
    enough or there are none.
    """
    native, scaled, factors = [], [], []
    for rec in records:
        if len(rec.boxes) == 0:
            continue
        b = np.asarray(rec.boxes, np.float64)
        side = np.sqrt((b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1))
        # The network's input: the image, or one of its tiles, all min(tile, image side) px (tile_grid).
        h, w = (min(tile, rec.height), min(tile, rec.width)) if tile > 0 else (rec.height, rec.width)
        for s in scales:
            f = image_scale(h, w, s, max_size)
            native.append(side)
            scaled.append(side * f)
            factors.append(f)
    if not scaled:
        return None
    median_native = float(np.median(np.concatenate(native)))
    median_scaled = float(np.median(np.concatenate(scaled)))
    limit = SMALL_OBJECT_STRIDES * stride
    if median_scaled >= limit:
        return None
    f = float(np.median(factors))
    scaling = (f"shrunk {1 / f:.1f}x" if f < 1 else f"enlarged {f:.1f}x") if abs(f - 1) > 0.01 else "unscaled"
    inputs = f"{tile}-px tiles" if tile > 0 else "images"
    # The fix: native resolution if that puts the median object above the limit, else the enlargement that
    # makes it two strides. Whole images whose longer side then stays within 2 * SUGGESTED_TILE can simply be
    # scaled; anything larger is cut into tiles.
    need = 1.0 if median_native >= limit else 2 * stride / median_native
    # Tiles keep the network's input at SUGGESTED_TILE (or the user's --tile) px: smaller tiles when enlarged.
    side = tile if tile > 0 else SUGGESTED_TILE
    cut = int(side // need)
    how = f"{cut}-px tiles enlarged {side / cut:.1f}x" if cut < side else "tiles at native resolution"
    fix = f"--tile {cut} --scales {side} --max-size {side} ({how})"
    heights = np.array([r.height for r in records])
    widths = np.array([r.width for r in records])
    short = float(np.median(np.minimum(heights, widths)))
    long_ = float(np.median(np.maximum(heights, widths)))
    if tile <= 0 and long_ * need <= 2 * SUGGESTED_TILE:
        fix = f"--scales {int(np.ceil(short * need))} --max-size {int(np.ceil(long_ * need))}, or " + fix
    return (f"the training objects are small for the network: their median side is {median_native:.0f} px in "
            f"the images and {median_scaled:.1f} px as the network sees them ({inputs} {scaling} by --scales "
            f"{','.join(str(s) for s in scales)} --max-size {max_size}), below the "
            f"feature stride of {stride} px: most objects fall inside one cell of the feature map, where the "
            f"detector cannot tell their shape. Fix: {fix}; give --test-scales and --test-max-size the same "
            "values as --scales and --max-size.")
