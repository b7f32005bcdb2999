"""Evaluate a detector on an annotated split: detections (detect.py), VOC AP (voc_eval.py), and the files a
person reads afterwards: metrics.json, comp4 result files, the AP table, PR curves and a sheet of detections."""

import json
import os
import time

import numpy as np

from detector.data import read_image
from detector.detect import detect_dataset
from detector.plots import draw_boxes_sheet, plot_pr_curves
from detector.progress import peak_memory_mb
from detector.timing import StageTimer
from detector.voc_eval import evaluate, format_ap_table, write_comp4


def evaluate_split(model, records, proposals, classes, cfg, out_dir: str, split: str, log=print) -> dict:
    """Detect, score (VOC AP), write comp4 files, metrics.json, the AP table, PR curves and a detection sheet.

    Returns the metrics written to out_dir/metrics.json.
    """
    os.makedirs(out_dir, exist_ok=True)
    device = next(model.parameters()).device
    if records:  # warm-up: first-call allocations and kernel compilation stay out of the timing
        detect_dataset(model, records[:1], proposals[:1], cfg, progress=False)
    timer = StageTimer(model, device)
    t0 = time.time()
    with timer:
        all_dets = detect_dataset(model, records, proposals, cfg, timer=timer)
    seconds = (time.time() - t0) / max(len(records), 1)
    result = evaluate(all_dets, records, classes, use_07_metric=cfg.eval_metric == "voc07")
    write_comp4(os.path.join(out_dir, "results"), split, classes, [r.image_id for r in records], all_dets)
    per_image = {k: v / max(len(records), 1) for k, v in timer.seconds.items()}
    metrics = {
        "mAP": result["mAP"],
        "ap": {c: (None if np.isnan(a) else a) for c, a in result["ap"].items()},
        "metric": cfg.eval_metric,
        "split": split,
        "images": len(records),
        "seconds_per_image": seconds,
        "stage_seconds_per_image": per_image,
        "device": str(device),
        "peak_memory_mb": peak_memory_mb(device),  # of the whole process so far (training included, in train.py)
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_pr_curves(result["pr"], os.path.join(out_dir, "pr_curves.png"))
    shown = min(8, len(records))
    _detection_sheet(records[:shown], [[d[i] for d in all_dets] for i in range(shown)], classes,
                     os.path.join(out_dir, "detections.png"))
    log(format_ap_table(result["ap"], result["mAP"]))
    log(f"{seconds:.3f} s/image on {device}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in per_image.items())
        + f"; peak memory {metrics['peak_memory_mb']:.0f} MB")
    return metrics


def _detection_sheet(records, dets_per_image, classes, path: str, min_score: float = 0.5) -> None:
    images, boxes, labels, scores = [], [], [], []
    for rec, dets in zip(records, dets_per_image):
        rows = [(classes[j - 1], d) for j, cls_dets in enumerate(dets) if j > 0 for d in cls_dets if d[4] >= min_score]
        images.append(read_image(rec.path))
        boxes.append(np.array([d[:4] for _, d in rows]).reshape(-1, 4))
        labels.append([name for name, _ in rows])
        scores.append(np.array([d[4] for _, d in rows]))
    draw_boxes_sheet(images, boxes, labels, path, scores=scores)
