"""Evaluate a detector on an annotated split: proposals (proposals.py), detections (detect.py), VOC AP
(voc_eval.py), and the files a person reads afterwards: metrics.json, comp4 result files, the AP table, PR
curves and a sheet of detections. With --tile the detector runs on tiles (tiling.py) and the evaluation
scores the whole images."""

import json
import os
import time
from dataclasses import replace

import numpy as np

from detector.data import read_image
from detector.detect import cap_per_image, detect_dataset
from detector.plots import draw_boxes_sheet, plot_pr_curves
from detector.progress import peak_memory_mb
from detector.proposals import proposal_recall, proposals_for_split
from detector.tiling import merge_split_detections, pool_boxes, tile_records
from detector.timing import StageTimer
from detector.voc_eval import evaluate, format_ap_table, write_comp4


def evaluate_split(model, records, classes, cfg, out_dir: str, split: str, log=print) -> dict:
    """Propose, detect, score (VOC AP), write comp4 files, metrics.json, the AP table, PR curves and a detection
    sheet.

    Proposals: cfg.test_proposals at the working scale of the largest test scale (proposals_for_split). With
    cfg.tile > 0 every image is cut into tiles (all of them, empty ones too), proposals and detections are
    made per tile, mapped back to the image and merged by per-class NMS (merge_split_detections), and
    cfg.max_per_image applies per whole image.
    Returns the metrics written to out_dir/metrics.json.
    """
    os.makedirs(out_dir, exist_ok=True)
    device = next(model.parameters()).device
    inputs = tile_records(records, cfg.tile, cfg.tile_overlap) if cfg.tile else records
    proposals = proposals_for_split(inputs, cfg.test_proposals, cfg.max_proposals, cfg.workers, split, log,
                                    scale=max(cfg.test_scales), max_size=cfg.test_max_size)
    if cfg.tile:  # the recall to compare with an untiled run: all tiles' proposals, on the whole images
        recall = proposal_recall(pool_boxes(proposals, inputs, len(records)), records)
        log(f"{split}: proposals of all tiles on the {len(records)} whole images: "
            + ", ".join(f"{k} {v:.3f}" for k, v in recall.items() if isinstance(v, float)))
    # Tiles: the cap across classes applies to whole images, after the merge.
    detect_cfg = replace(cfg, max_per_image=0) if cfg.tile else cfg
    if inputs:  # warm-up: first-call allocations and kernel compilation stay out of the timing
        detect_dataset(model, inputs[:1], proposals[:1], detect_cfg, progress=False)
    timer = StageTimer(model, device)
    t0 = time.time()
    with timer:
        all_dets = detect_dataset(model, inputs, proposals, detect_cfg, timer=timer)
        if cfg.tile:
            all_dets = merge_split_detections(all_dets, inputs, len(records), cfg.nms)
            for i in range(len(records)):
                capped = cap_per_image([d[i] for d in all_dets], cfg.max_per_image)
                for j, d in enumerate(capped):
                    all_dets[j][i] = d
            timer.tick("rest")  # the merge: post-processing, as NMS is
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
        "tiles": len(inputs) if cfg.tile else 0,
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
