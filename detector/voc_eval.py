"""PASCAL VOC detection evaluation: per-class AP, mAP, comp4 result files and the AP table.

Matching follows the devkit's VOCevaldet.m as ported to Python by PF lib/datasets/voc_eval.py (reference §7):
detections in descending score order; each takes the gt box of its class with the highest +1-area IoU in its
image; IoU > 0.5 on an unmatched gt is a true positive, on a matched gt a duplicate (false positive), on a
"difficult" gt neither; anything else is a false positive. Recall counts non-difficult gt boxes only.
Two deliberate choices: ties in score keep input order (a stable sort, as MATLAB's sort; PF's np.argsort
quicksort leaves them unspecified), and IoU must be STRICTLY above the threshold as in PF (VOCevaldet.m
uses >=; the two differ only for an IoU of exactly 0.5).
Boxes are 0-based inclusive (detector/boxes.py); comp4 files are 1-based, as the devkit expects.
"""

import math
import os

import numpy as np

from detector.boxes import box_iou

# VOCevaldet.m `for t=0:0.1:1`. MATLAB's colon builds the first half as 0 + k*0.1 and the second half as
# 1 - (10-k)*0.1, giving exactly these doubles; PF's np.arange(0, 1.1, 0.1) has 0.6000000000000001 and
# 0.7000000000000001 instead, so PF rejects a recall of exactly 6/10 or 7/10 that the devkit accepts.
VOC07_RECALL_THRESHOLDS = np.array([k * 0.1 for k in range(6)] + [1.0 - (10 - k) * 0.1 for k in range(6, 11)])


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = True) -> float:
    """Average precision from a recall/precision curve.

    Args:
        rec: [D] cumulative recall, non-decreasing.
        prec: [D] cumulative precision.
        use_07_metric: VOC2007 11-point interpolated AP; else the area under the monotone precision
            envelope (VOC2010+ VOCap.m).
    """
    rec, prec = np.asarray(rec, dtype=np.float64), np.asarray(prec, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALL_THRESHOLDS:
            above = prec[rec >= t]
            ap += (above.max() if above.size else 0.0) / 11  # no point reaches recall t -> 0
        return float(ap)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at any higher recall
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])  # points where recall changes
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _average_precision(
    image_index: np.ndarray,
    scores: np.ndarray,
    boxes: np.ndarray,
    gt_boxes: list,
    gt_difficult: list,
    iou_thresh: float,
    use_07_metric: bool,
) -> tuple[float, np.ndarray, np.ndarray]:
    """eval_class on arrays: detection d is in image i = image_index[d], with gt gt_boxes/gt_difficult[i]."""
    sizes = [len(b) for b in gt_boxes]
    offsets = np.cumsum([0] + sizes)  # gt box j of image i is number offsets[i] + j in the flat list
    # The flat list of difficult flags; a trailing False stands for "no gt" (index -1).
    flat_difficult = np.concatenate(gt_difficult + [np.zeros(1, dtype=bool)])
    npos = int((~flat_difficult[:-1]).sum())

    # Best gt per detection. It does not depend on which gts are already matched, so compute it image by
    # image with one vectorised IoU instead of the devkit's loop over detections.
    best_iou = np.full(len(scores), -np.inf)
    best_gt = np.full(len(scores), -1)
    by_image = np.argsort(image_index, kind="stable")
    images, starts = np.unique(image_index[by_image], return_index=True)
    for i, idx in zip(images, np.split(by_image, starts[1:])):
        if sizes[i]:
            iou = box_iou(boxes[idx], gt_boxes[i])  # (n, G)
            best_iou[idx] = iou.max(axis=1)
            best_gt[idx] = offsets[i] + iou.argmax(axis=1)  # first max on ties, as the devkit

    order = np.argsort(-scores, kind="stable")  # stable: equal scores keep input order
    best_iou, best_gt = best_iou[order], best_gt[order]
    hit = best_iou > iou_thresh
    on_difficult = hit & flat_difficult[best_gt]
    claims = np.flatnonzero(hit & ~on_difficult)  # detections that claim a non-difficult gt, in score order
    # The highest-scored claim on each gt is the true positive; later claims on it are duplicates.
    _, first = np.unique(best_gt[claims], return_index=True)
    tp = np.zeros(len(order))
    tp[claims[first]] = 1
    fp = (~on_difficult).astype(np.float64) - tp  # every detection not on a difficult gt is a tp or an fp

    tp, fp = np.cumsum(tp), np.cumsum(fp)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)  # eps: leading detections on difficult gts
    if npos == 0:
        return math.nan, np.full(len(order), math.nan), prec
    rec = tp / npos
    return voc_ap(rec, prec, use_07_metric), rec, prec


def evaluate(all_dets: list, records: list, classes: list, use_07_metric: bool = True) -> dict:
    """Per-class AP and mAP over a test set.

    Args:
        all_dets: all_dets[c][i] = [n, 5] (x1, y1, x2, y2, score) 0-based detections of class c (1..K) in
            image i (records order); all_dets[0] (background) is ignored.
        records: per image, objects with .image_id, .boxes [G, 4] 0-based, .labels [G] in 1..K and
            .difficult [G].
        classes: the K class names, class c is classes[c - 1].
        use_07_metric: see voc_ap.
    Returns:
        {"mAP": mean AP over the classes with non-difficult gt, "ap": {name: ap}, "pr": {name: (rec, prec)}}.
    """
    if len(all_dets) != len(classes) + 1:
        raise ValueError(f"evaluate: all_dets has {len(all_dets)} entries, expected K+1 = {len(classes) + 1}")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("evaluate: records contain duplicate image_id values")
    for c in range(1, len(classes) + 1):
        if len(all_dets[c]) != len(records):
            raise ValueError(f"evaluate: all_dets[{c}] has {len(all_dets[c])} images, records {len(records)}")
    labels = [np.asarray(r.labels).reshape(-1) for r in records]
    boxes = [np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4) for r in records]
    difficult = [np.asarray(r.difficult, dtype=bool).reshape(-1) for r in records]
    ap, pr = {}, {}
    for c, name in enumerate(classes, start=1):
        dets = [np.asarray(d, dtype=np.float64).reshape(-1, 5) for d in all_dets[c]]  # per image (n, 5)
        image_index = np.repeat(np.arange(len(records)), [len(d) for d in dets])
        stacked = np.concatenate(dets + [np.zeros((0, 5))])  # images in records order, as a comp4 file
        gt_boxes = [b[lab == c] for b, lab in zip(boxes, labels)]
        gt_difficult = [d[lab == c] for d, lab in zip(difficult, labels)]
        ap[name], rec, prec = _average_precision(
            image_index, stacked[:, 4], stacked[:, :4], gt_boxes, gt_difficult, 0.5, use_07_metric
        )  # VOC: IoU > 0.5
        pr[name] = (rec, prec)
    scored = [v for v in ap.values() if not math.isnan(v)]
    return {"mAP": float(np.mean(scored)) if scored else math.nan, "ap": ap, "pr": pr}


def write_comp4(results_dir: str, split: str, classes: list, image_ids: list, all_dets: list) -> list:
    """Write one VOC comp4 file per class, exactly in FR test.py's format; returns the paths.

    Lines are `<image_id> <score:.3f> <x1+1:.1f> <y1+1:.1f> <x2+1:.1f> <y2+1:.1f>` (1-based for the devkit).
    The rounding is FR's: the official numbers were computed from these files, so scores equal to 3 decimals
    tie there (and keep file order), unlike evaluate() on the in-memory detections.

    Args:
        results_dir: output folder (created).
        split: image set name, e.g. "test".
        classes: the K class names.
        image_ids: per image id, aligned with all_dets[c].
        all_dets: as evaluate().
    """
    os.makedirs(results_dir, exist_ok=True)
    paths = []
    for c, name in enumerate(classes, start=1):
        path = os.path.join(results_dir, f"comp4_det_{split}_{name}.txt")
        with open(path, "w") as f:
            for image_id, dets in zip(image_ids, all_dets[c]):
                for x1, y1, x2, y2, score in np.asarray(dets).reshape(-1, 5).tolist():  # floats format faster
                    f.write(f"{image_id} {score:.3f} {x1 + 1:.1f} {y1 + 1:.1f} {x2 + 1:.1f} {y2 + 1:.1f}\n")
        paths.append(path)
    return paths


def format_ap_table(ap: dict, mAP: float) -> str:
    """Fixed-width table of per-class AP and mAP, in percent as the paper's tables (nan: no gt)."""
    width = max([len(name) for name in ap] + [5])
    rule = "-" * (width + 8)
    lines = [f"{'class':<{width}}  {'AP':>6}", rule]
    lines += [f"{name:<{width}}  {100 * value:6.1f}" for name, value in ap.items()]
    lines += [rule, f"{'mAP':<{width}}  {100 * mAP:6.1f}"]
    return "\n".join(lines)
