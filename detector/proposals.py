"""Object proposals: selective search through OpenCV (cached on disk), the original .mat files, their recall.

Fast R-CNN consumes ~2000 class-agnostic boxes per image (paper §2, "R is typically around 2000"). Boxes are
0-based (x1, y1, x2, y2) float32, x2/y2 inclusive, like the ground truth in detector.data.

Caching (FR's stale data/cache pickles were its most common pitfall): one .npy per image under
<cache_dir>/<data set>/<mode and parameters>/<image id>-<hash of the image bytes>.npy, so editing an image or
changing the mode or a parameter can only miss the cache, never return stale boxes.
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
from tqdm import tqdm

from detector.boxes import box_iou
from detector.data import DatasetError

_CACHE_VERSION = 1  # bump when selective_search changes what it returns


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
    return boxes[np.sort(first)][:max_boxes].astype(np.float32)


def selective_search(
    img: np.ndarray, mode: str = "fast", max_boxes: int = 2000, min_size: int = 10
) -> np.ndarray:
    """Selective-search boxes for one image.

    Args:
        img: (H, W, 3) uint8 RGB.
        mode: "fast" or "quality" (the paper's setting, ~10x slower).
        max_boxes: keep the best-ranked this many.
        min_size: drop boxes narrower or shorter than this many pixels.
    Returns (P, 4) float32 0-based x1, y1, x2, y2.
    """
    return _search_bgr(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), mode, max_boxes, min_size)


def _worker(job: tuple) -> tuple[int, np.ndarray]:
    index, path, mode, max_boxes, min_size = job
    bgr = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise DatasetError(f"{path}: unreadable or corrupt image")
    return index, _search_bgr(bgr, mode, max_boxes, min_size)


def default_cache_dir() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo, "data", "cache", "proposals")


def cache_paths(records, mode: str, max_boxes: int, min_size: int = 10, cache_dir: str | None = None) -> list[str]:
    """The cache file of each record's proposals: <cache_dir>/<data set folder name>/<parameters>/<image id>-<sha1
    of the image bytes>.npy. The key holds no absolute path, so a cache copied to another machine along with its
    data set (a GPU box without selective search) is found there."""
    cache_dir = cache_dir or default_cache_dir()
    params = f"{mode}-max{max_boxes}-min{min_size}-v{_CACHE_VERSION}"
    paths = []
    for rec in records:
        dataset = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(rec.path))))  # above JPEGImages/
        with open(rec.path, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()[:16]
        paths.append(os.path.join(cache_dir, dataset, params, f"{rec.image_id}-{digest}.npy"))
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
) -> list[np.ndarray]:
    """Selective search over a split, in parallel, cached on disk; aligned with records.

    Args:
        records: ImageRecords (path and image_id are used).
        mode, max_boxes, min_size: as selective_search; each combination has its own cache.
        cache_dir: cache root (default <repo>/data/cache/proposals); per data set and mode below it.
        workers: processes (default: one per core); 1 runs in this process. Off Linux, processes are spawned:
            call from under `if __name__ == "__main__":`.
        use_cache: False recomputes and writes nothing.
    Returns a list of (P_i, 4) float32 arrays.
    """
    cache = cache_paths(records, mode, max_boxes, min_size, cache_dir) if use_cache else [None] * len(records)
    out = [_load_cached(p) if p else None for p in cache]
    todo = [(i, r.path, mode, max_boxes, min_size) for i, (r, b) in enumerate(zip(records, out)) if b is None]
    if not todo:
        return out
    workers = min(workers or os.cpu_count() or 1, len(todo))
    bar = tqdm(total=len(todo), desc=f"selective search ({mode})", disable=not progress, unit="img")
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


def proposals_for_split(records, source: str, max_boxes: int, workers: int = 0, split: str = "",
                        log=print) -> list[np.ndarray]:
    """The proposals of one split, aligned with records: selective search ("fast" / "quality", cached) or the
    boxes of a .mat file; logs the time and the recall of the ground truth (proposal_recall)."""
    t0 = time.time()
    if source.endswith(".mat"):
        boxes = load_mat_proposals(source, records)
    elif source in ("fast", "quality"):
        boxes = compute_proposals(records, mode=source, max_boxes=max_boxes, workers=workers or None)
    else:
        raise DatasetError(f"proposals must be 'fast', 'quality' or a .mat file, got {source!r}")
    recall = proposal_recall(boxes, records)
    log(f"{split}: {len(records)} images, {sum(len(r.boxes) for r in records)} objects, proposals ({source}) "
        f"{time.time() - t0:.1f}s, " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items() if isinstance(v, float)))
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
