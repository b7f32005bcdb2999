"""Object proposals: selective search through OpenCV (cached on disk), dense sliding windows (paper §5.5), the
original .mat files, their recall.

Fast R-CNN consumes ~2000 class-agnostic boxes per image (paper §2, "R is typically around 2000"). Boxes are
0-based (x1, y1, x2, y2) float32, x2/y2 inclusive, like the ground truth in detector.data.

Caching (FR's stale data/cache pickles were its most common pitfall): one .npy per image under
<cache_dir>/<data set>/<mode and parameters>/<image id>-<hash of the image bytes>.npy, so editing an image or
changing the mode or a parameter can only miss the cache, never return stale boxes.

Working scale: selective search's cost grows with the pixels it segments, but the network only sees the image
at its training/test scale. Given that scale (shorter side, cap on the longer side, as
detector.data.image_scale), a larger image is shrunk to it before segmentation and the boxes are scaled back,
so the cost follows the network's input size, not the file's. It never enlarges an image (that adds no detail
to segment), and the working size is part of the cache key of exactly the images it shrinks.

Records may be tiles (detector.tiling.TileRecord): selective search then runs on the tile's window of the
image.
"""

import ctypes
import hashlib
import multiprocessing
import os
import sys
import time

import cv2
import numpy as np
import scipy.io
from PIL import Image
from detector.progress import progress as progress_bar

from detector.boxes import box_iou
from detector.data import DatasetError, image_scale

_CACHE_VERSION = 1  # bump when selective_search changes what it returns
# The dense grid (paper §5.5), laid out in the pixels the network sees; see dense_boxes. Its density: 2 sides
# per octave from one feature cell (16 px) up, 3 aspect ratios, windows every half side. At the paper's scale
# (600 x 1000) that is ~53k boxes, the order of the paper's dense set (Fig. 3: "45k dense boxes"); 14k at the
# demo's 320 x 533, 22k on a 512-px tile.
DENSE_MIN_SIZE = 16
DENSE_SCALE_STEP = 2 ** 0.5
DENSE_ASPECT_RATIOS = (0.5, 1.0, 2.0)
DENSE_STRIDE = 0.5


def _seed_opencv_rand() -> None:
    """OpenCV ranks regions with std::rand() (Uijlings' pseudo-random ranking); seed it, so proposals are the
    same whichever process computes them. Where libc cannot be reached, the order just varies."""
    try:
        ctypes.CDLL(None).srand(0)
    except (OSError, AttributeError, TypeError):
        pass


def _segmentation():
    """cv2.ximgproc.segmentation, from the contrib build. Looked up on first use, not at import: a machine with
    plain OpenCV (a GPU box, say) can still read cached and .mat proposals."""
    try:
        return cv2.ximgproc.segmentation
    except AttributeError:
        raise DatasetError(
            "selective search needs OpenCV's contrib build (cv2.ximgproc.segmentation), which this OpenCV "
            f"{cv2.__version__} lacks: pip install opencv-contrib-python-headless, or bring the proposal cache "
            f"({default_cache_dir()}) computed on a machine that has it, or pass a .mat proposal file") from None


def _configure(ss, bgr: np.ndarray, mode: str) -> None:
    if mode == "quality":
        # Uijlings et al.'s quality mode, the setting of the paper's VOC proposals: 5 colour spaces x 5 values
        # of k x 4 similarity strategies (OpenCV's defaults).
        ss.switchToSelectiveSearchQuality()
    elif mode == "fast":
        # Uijlings' fast mode cut to what pays on a CPU: colour spaces HSV and Lab, but ONE graph
        # segmentation (k = 100; segmentation is most of the cost) and no texture similarity (~25% of the
        # rest, no recall gained on the built-in data). There it matches the recall of OpenCV's fast mode
        # (k = 150, 300, 450; texture) in 1/4 of the time. The paper's proposals are "quality".
        ss.clearImages()
        ss.clearGraphSegmentations()
        ss.clearStrategies()
        ss.addImage(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV))
        ss.addImage(cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab))
        seg = _segmentation()
        ss.addGraphSegmentation(seg.createGraphSegmentation(0.8, 100))
        colour = seg.createSelectiveSearchSegmentationStrategyColor()
        fill = seg.createSelectiveSearchSegmentationStrategyFill()
        size = seg.createSelectiveSearchSegmentationStrategySize()
        ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(colour, fill, size))
        ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(fill, size))
    else:
        raise ValueError(f"selective search mode must be 'fast' or 'quality', got {mode!r}")


def _search_bgr(bgr: np.ndarray, mode: str, max_boxes: int, min_size: int) -> np.ndarray:
    ss = _segmentation().createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    _configure(ss, bgr, mode)
    _seed_opencv_rand()
    # (P, 4) x, y, w, h in ascending random * hierarchy level: low regions tend to come first. OpenCV inverts
    # the paper here, and rightly for top-k: on the built-in data its first 50 boxes have 2x the recall.
    rects = ss.process()
    rects = rects[(rects[:, 2] >= min_size) & (rects[:, 3] >= min_size)]
    x, y, w, h = rects.T
    boxes = np.stack([x, y, x + w - 1, y + h - 1], 1)  # inclusive x2, y2
    # Drop duplicates but keep the ranking: np.unique sorts, so reorder by first occurrence.
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    return (boxes[:max_boxes] if max_boxes > 0 else boxes).astype(np.float32)


def _working_factors(height: int, width: int, scale: int, max_size: int) -> tuple[float, float] | None:
    """(fx, fy) that shrink a height x width image to the working scale (image_scale), or None to keep it."""
    if scale <= 0:
        return None
    f = image_scale(height, width, scale, max_size if max_size > 0 else 1 << 30)
    if f >= 1:
        return None  # never enlarged: no detail to gain, only time to lose
    # The factors cv2.resize realises: its output size is rounded, so each axis has its own exact factor.
    out_w, out_h = max(int(round(width * f)), 1), max(int(round(height * f)), 1)
    return out_w / width, out_h / height


def _scale_back(boxes: np.ndarray, fx: float, fy: float, height: int, width: int) -> np.ndarray:
    """Working-scale boxes -> boxes in the full image: the pixels a working pixel stands for, so x1 maps to
    the first full-resolution column of its pixel (floor) and x2 to the last (ceil of its right edge, minus
    1); integral and clipped. For factors below 1 the map is one-to-one, so no duplicates appear."""
    b = boxes.astype(np.float64)
    eps = 1e-6  # x / fx that should be integral can land just below it in floating point
    out = np.stack([np.floor(b[:, 0] / fx + eps), np.floor(b[:, 1] / fy + eps),
                    np.ceil((b[:, 2] + 1) / fx - eps) - 1, np.ceil((b[:, 3] + 1) / fy - eps) - 1], 1)
    out[:, 0::2] = out[:, 0::2].clip(0, width - 1)
    out[:, 1::2] = out[:, 1::2].clip(0, height - 1)
    return out.astype(np.float32)


def _search_working(bgr: np.ndarray, mode: str, max_boxes: int, min_size: int, scale: int, max_size: int
                    ) -> np.ndarray:
    """_search_bgr on the image shrunk to the working scale, boxes scaled back (see the module docstring)."""
    height, width = bgr.shape[:2]
    factors = _working_factors(height, width, scale, max_size)
    if factors is None:
        return _search_bgr(bgr, mode, max_boxes, min_size)
    fx, fy = factors
    small = cv2.resize(bgr, (int(round(width * fx)), int(round(height * fy))), interpolation=cv2.INTER_AREA)
    return _scale_back(_search_bgr(small, mode, max_boxes, min_size), fx, fy, height, width)


def selective_search(
    img: np.ndarray, mode: str = "fast", max_boxes: int = 2000, min_size: int = 10, scale: int = 0,
    max_size: int = 0,
) -> np.ndarray:
    """Selective-search boxes for one image.

    Args:
        img: (H, W, 3) uint8 RGB.
        mode: "fast" or "quality" (the paper's setting, ~10x slower).
        max_boxes: keep the best-ranked this many (<= 0: all).
        min_size: drop boxes narrower or shorter than this many pixels (of the working scale, when shrunk).
        scale, max_size: the working scale (detector.data.image_scale: shorter side to `scale`, longer side at
            most `max_size`, 0 = no cap); a larger image is shrunk to it before the search (area
            interpolation) and the boxes mapped back. scale 0: the image as it is.
    Returns (P, 4) float32 0-based x1, y1, x2, y2 in the pixels of `img`.
    """
    return _search_working(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), mode, max_boxes, min_size, scale, max_size)


def dense_boxes(height: int, width: int, min_size: float = DENSE_MIN_SIZE,
                scale_step: float = DENSE_SCALE_STEP, aspect_ratios=DENSE_ASPECT_RATIOS,
                stride: float = DENSE_STRIDE) -> np.ndarray:
    """Every sliding window of the dense grid over a height x width image (paper §5.5's "dense boxes").

    The density: square sides min_size * scale_step**k up to the shorter image side; for each, boxes of the
    same area with aspect ratios (height / width) `aspect_ratios`; each slid over the image in steps of
    `stride` times its own width (height) horizontally (vertically), the last one flush with the border.
    Order: by side, then aspect ratio, then row, then column. Boxes are integral and inside the image.

    Args:
        height, width: image size in pixels.
        min_size: smallest square side (default 16 px: one cell of the stride-16 feature map).
        scale_step: ratio between consecutive sides (default sqrt(2): two sides per octave).
        aspect_ratios: height / width ratios (default 1/2, 1, 2).
        stride: step between neighbouring windows as a fraction of their side (default 1/2).
    Returns (P, 4) float32.
    """
    out = []
    shorter = min(height, width)
    side = float(min_size)
    while side <= shorter + 1e-6:
        for ratio in aspect_ratios:
            bw = min(int(round(side / np.sqrt(ratio))), width)
            bh = min(int(round(side * np.sqrt(ratio))), height)
            xs = _window_starts(width, bw, max(int(round(stride * bw)), 1))
            ys = _window_starts(height, bh, max(int(round(stride * bh)), 1))
            x1, y1 = np.meshgrid(xs, ys)  # (rows, cols)
            x1, y1 = x1.ravel(), y1.ravel()
            out.append(np.stack([x1, y1, x1 + bw - 1, y1 + bh - 1], 1))
        side *= scale_step
    if not out:  # an image smaller than min_size: the whole image
        return np.array([[0, 0, width - 1, height - 1]], np.float32)
    boxes = np.concatenate(out).astype(np.float32)
    # Clamped windows (an aspect ratio wider than the image) repeat; keep the first of each.
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def _window_starts(length: int, size: int, step: int) -> np.ndarray:
    if length <= size:
        return np.zeros(1, np.int64)
    starts = np.arange(0, length - size, step)
    return np.append(starts, length - size)  # the last window flush with the border


def dense_proposals(height: int, width: int, max_boxes: int = 2000, scale: int = 0, max_size: int = 0
                    ) -> np.ndarray:
    """The dense proposals of one image: dense_boxes at the working scale, mapped back, capped at max_boxes.

    The grid is laid out in the pixels the network sees (scale, max_size as selective_search; 0: the image's
    own), so its smallest boxes are one feature cell whatever the file's resolution. Over max_boxes, a random
    subset is kept, the same for every image of the same size (numpy seed 0), in dense_boxes' order: the
    paper's §5.5 samples its dense boxes at random too (Fig. 3, "SS 2k plus random dense boxes"), and a random
    subset thins every scale evenly, where any order would drop whole scales. max_boxes <= 0 keeps them all.
    """
    factors = _working_factors(height, width, scale, max_size)
    if factors is None:
        boxes = dense_boxes(height, width)
    else:
        fx, fy = factors
        boxes = dense_boxes(int(round(height * fy)), int(round(width * fx)))
        boxes = _scale_back(boxes, fx, fy, height, width)
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]
    if 0 < max_boxes < len(boxes):
        keep = np.sort(np.random.default_rng(0).choice(len(boxes), max_boxes, replace=False))
        boxes = boxes[keep]
    return boxes


def _record_size(rec) -> tuple[int, int]:
    """(height, width) of what a record stands for: its fields, else the image file's header (eval.py --images
    passes records with a path and an id only)."""
    if getattr(rec, "height", None) and getattr(rec, "width", None):
        return int(rec.height), int(rec.width)
    with Image.open(rec.path) as im:
        return im.size[1], im.size[0]


def _worker(job: tuple) -> tuple[int, np.ndarray]:
    index, path, window, mode, max_boxes, min_size, scale, max_size = job
    bgr = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise DatasetError(f"{path}: unreadable or corrupt image")
    if window is not None:  # a tile (detector.tiling.Window: x, y, width, height)
        x, y, w, h = window
        bgr = np.ascontiguousarray(bgr[y:y + h, x:x + w])
    return index, _search_working(bgr, mode, max_boxes, min_size, scale, max_size)


def default_cache_dir() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, "data", "cache", "proposals")


def cache_paths(records, mode: str, max_boxes: int, min_size: int = 10, cache_dir: str | None = None,
                scale: int = 0, max_size: int = 0) -> list[str]:
    """The cache file of each record's proposals: <cache_dir>/<data set folder name>/<parameters>/<image id>-<sha1
    of the image bytes>.npy. The key holds no absolute path, so a cache copied to another machine along with its
    data set (a GPU box without selective search) is found there. The working scale (scale, max_size) joins the
    parameters of the images it shrinks only: the others' boxes are the same as without it. A tile's image id
    names its window (detector.tiling.tile_records)."""
    cache_dir = cache_dir or default_cache_dir()
    params = f"{mode}-max{max_boxes}-min{min_size}-v{_CACHE_VERSION}"
    paths = []
    for rec in records:
        dataset = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(rec.path))))  # above JPEGImages/
        with open(rec.path, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()[:16]
        shrunk = scale > 0 and _working_factors(*_record_size(rec), scale, max_size) is not None
        key = f"{params}-at{scale}-{max_size}" if shrunk else params
        paths.append(os.path.join(cache_dir, dataset, key, f"{rec.image_id}-{digest}.npy"))
    return paths


def _load_cached(path: str) -> np.ndarray | None:
    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError, EOFError):  # missing, or a file cut short by a crash: recompute it
        return None


def _save(path: str, boxes: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, boxes.astype(np.uint16))  # integral pixels; uint16 (as FR's roidb) halves the cache
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def compute_proposals(
    records,
    mode: str = "fast",
    max_boxes: int = 2000,
    cache_dir: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    min_size: int = 10,
    use_cache: bool = True,
    scale: int = 0,
    max_size: int = 0,
    stats: dict | None = None,
) -> list[np.ndarray]:
    """Selective search over a split, in parallel, cached on disk; aligned with records.

    Args:
        records: ImageRecords or TileRecords (path, image_id, and a tile's window are used).
        mode, max_boxes, min_size, scale, max_size: as selective_search; each combination has its own cache.
        cache_dir: cache root (default <repo>/data/cache/proposals); per data set and mode below it.
        workers: processes (default: one per core); 1 runs in this process. Off Linux, processes are spawned:
            call from under `if __name__ == "__main__":`.
        use_cache: False recomputes and writes nothing.
        stats: if given, receives "computed" (images searched, not read from the cache) and "seconds" (the time
            spent searching them, wall clock).
    Returns a list of (P_i, 4) float32 arrays.
    """
    cache = (cache_paths(records, mode, max_boxes, min_size, cache_dir, scale, max_size) if use_cache
             else [None] * len(records))
    out = [_load_cached(p) if p else None for p in cache]
    todo = [(i, r.path, getattr(r, "window", None), mode, max_boxes, min_size, scale, max_size)
            for i, (r, b) in enumerate(zip(records, out)) if b is None]
    if stats is not None:
        stats.update(computed=len(todo), seconds=0.0)
    if not todo:
        return out
    t0 = time.time()
    workers = min(workers or os.cpu_count() or 1, len(todo))
    bar = progress_bar(total=len(todo), desc=f"selective search ({mode})", disable=not progress, unit="img")
    # fork on Linux: workers start at once and share the parent's imports. (Never call cv2.setNumThreads in a
    # forked child: tearing down the parent's OpenCV thread pool hangs it.) Elsewhere the platform default,
    # spawn, which needs the caller's entry point guarded by `if __name__ == "__main__":`, as train.py is.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    pool = context.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_worker, todo) if pool else map(_worker, todo)
        for i, boxes in results:
            out[i] = boxes
            if cache[i]:
                _save(cache[i], boxes)
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if stats is not None:
        stats["seconds"] = time.time() - t0
    return out


def load_mat_proposals(path: str, records) -> list[np.ndarray]:
    """The original Fast R-CNN proposals (selective_search_data/voc_2007_<split>.mat), aligned with records.

    The file holds `boxes`, a cell array with one (P, 4) matrix per image in ImageSets order, [y1 x1 y2 x2]
    1-based; FR pascal_voc.py converts with raw[:, (1, 0, 3, 2)] - 1. Ids are checked if it holds `images`.
    """
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a missing or malformed file
        raise DatasetError(f"{path}: cannot read the proposal file ({e})") from None
    if "boxes" not in mat:
        names = [k for k in mat if not k.startswith("__")]
        raise DatasetError(f"{path}: no 'boxes' variable (found {', '.join(names) or 'none'})")
    raw = mat["boxes"].ravel()
    if len(raw) != len(records):
        raise DatasetError(f"{path}: {len(raw)} proposal matrices for {len(records)} images in the split; "
                           "the file must list one matrix per image, in ImageSets order")
    if "images" in mat:
        ids = [str(np.asarray(x).ravel()[0]).strip() for x in mat["images"].ravel()]
        for k, (a, rec) in enumerate(zip(ids, records)):
            if a != rec.image_id:
                raise DatasetError(f"{path}: entry {k} is image {a!r} but the split lists {rec.image_id!r}")
    out = []
    for k, m in enumerate(raw):
        m = np.asarray(m, dtype=np.float32)
        if m.size == 0:
            m = m.reshape(0, 4)
        if m.ndim != 2 or m.shape[1] != 4:
            raise DatasetError(f"{path}: entry {k} ({records[k].image_id}) has shape {m.shape}, not (P, 4)")
        out.append(m[:, (1, 0, 3, 2)] - 1)
    return out


def image_proposals(records, source: str, max_boxes: int, workers: int = 0, scale: int = 0, max_size: int = 0,
                    cache_dir: str | None = None, progress: bool = True, stats: dict | None = None
                    ) -> list[np.ndarray]:
    """Selective search ("fast" / "quality": compute_proposals, cached) or dense sliding windows ("dense":
    dense_proposals) for records that need no annotations (a path, an image id, a tile's window); aligned
    with records. Arguments as proposals_for_split; stats as compute_proposals (selective search only)."""
    if source in ("fast", "quality"):
        return compute_proposals(records, mode=source, max_boxes=max_boxes, workers=workers or None,
                                 scale=scale, max_size=max_size, stats=stats, cache_dir=cache_dir,
                                 progress=progress)
    if source == "dense":
        return [dense_proposals(*_record_size(r), max_boxes, scale, max_size) for r in records]
    raise DatasetError(f"proposals must be 'fast', 'quality', 'dense' or a .mat file, got {source!r}")


def proposals_for_split(records, source: str, max_boxes: int, workers: int = 0, split: str = "",
                        log=print, scale: int = 0, max_size: int = 0, cache_dir: str | None = None
                        ) -> list[np.ndarray]:
    """The proposals of one split, aligned with records: selective search ("fast" / "quality", cached), dense
    sliding windows ("dense", paper §5.5; cheap, not cached) or the boxes of a .mat file; logs the time per
    image and the recall of the ground truth (proposal_recall).

    Args:
        records: ImageRecords, or TileRecords (detector.tiling) to search each tile.
        source: "fast", "quality", "dense" or a .mat path.
        max_boxes: proposals kept per image (--max-proposals).
        workers: selective-search processes (0: one per core).
        scale, max_size: the working scale for selective search and the dense grid (selective_search); pass
            the largest training (or the test) scale and its max size; 0: the images as they are.
        cache_dir: the selective-search cache root (default <repo>/data/cache/proposals).
    """
    t0 = time.time()
    searched: dict = {}
    if source.endswith(".mat"):
        boxes = load_mat_proposals(source, records)
    else:
        boxes = image_proposals(records, source, max_boxes, workers, scale, max_size, cache_dir, stats=searched)
    seconds = time.time() - t0
    tiled = bool(records) and hasattr(records[0], "window")  # TileRecords: recall of the tiles' objects
    unit = "tile" if tiled else "image"
    # Time per image: of the images searched (with `workers` processes, wall clock), not of cache reads.
    per_image = f"{seconds / max(len(records), 1):.2f} s/{unit}"
    if source in ("fast", "quality"):
        n = searched["computed"]
        per_image = (f"{searched['seconds'] / n:.2f} s/{unit} searched, {len(records) - n} from the cache" if n
                     else "all from the cache")
    if tiled:  # and per whole image, the figure to compare with an untiled run
        per_image += f", {searched.get('seconds', seconds) / len({r.path for r in records}):.2f} s/image"
    recall = proposal_recall(boxes, records)
    at = f" at scale {scale}/{max_size}" if scale > 0 and not source.endswith(".mat") else ""
    log(f"{split}: {len(records)} {unit}s, {sum(len(r.boxes) for r in records)} objects, "
        f"proposals ({source}{at}) {seconds:.1f}s ({per_image}), "
        + ", ".join(f"{k} {v:.3f}" for k, v in recall.items() if isinstance(v, float)))
    return boxes


def proposal_recall(proposals: list[np.ndarray], records, thresholds=(0.5, 0.7)) -> dict:
    """Fraction of non-difficult ground-truth boxes that some proposal covers with IoU >= t (+1 areas).

    Returns {"recall@0.5": float, "recall@0.7": float, ..., "boxes_per_image": float, "num_gt": int}.
    """
    best = []
    for boxes, rec in zip(proposals, records):
        gt = rec.boxes[~rec.difficult].astype(np.float64)
        if len(gt) == 0:
            continue
        best.append(box_iou(gt, boxes.astype(np.float64)).max(1) if len(boxes) else np.zeros(len(gt)))
    best = np.concatenate(best) if best else np.zeros(0)
    stats = {f"recall@{t:g}": float((best >= t).mean()) if len(best) else float("nan") for t in thresholds}
    stats["boxes_per_image"] = float(np.mean([len(p) for p in proposals])) if proposals else 0.0
    stats["num_gt"] = int(len(best))
    return stats
