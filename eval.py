"""Evaluate a trained Fast R-CNN: detections, PASCAL VOC AP / mAP (devkit-exact), comp4 result files, timing, plots;
or run it on your own images.

    python eval.py --checkpoint runs/demo/final.pt
    python eval.py --checkpoint final.pt --data VOCdevkit/VOC2007 --split test --svd --out runs/eval_svd
    python eval.py --checkpoint runs/demo/final.pt --images photo.jpg more_photos/ --min-score 0.5

--images (files, or folders of .jpg/.jpeg/.png/.bmp/.tif/.tiff; --recursive descends into subfolders) needs no
annotations: it writes OUT/detections.json (per image, in the order given: image, width, height, detections with
label, score and box [x1, y1, x2, y2] in the image's 0-based pixels, by descending score) and OUT/<image stem>.png.

A checkpoint trained with --tile is tested the same way, in both modes: each image is cut into tiles, the
tiles' detections are mapped back and merged by per-class NMS, and boxes are reported (and scored) in the
whole image's pixels. Without --data the data set the checkpoint was trained on is used. The network
(backbone, classes, input normalisation, head widths) comes from the checkpoint. --svd evaluates the truncated-SVD model (paper §3.1: fc6
rank 1024, fc7 rank 256 unless --svd-fc6/--svd-fc7 say otherwise). Test-time fields can be overridden (e.g.
--test-scales 480,576,688,864,1200 --test-max-size 2000 for multi-scale testing).
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import cv2
import numpy as np
import torch
from PIL import Image

from detector.checkpoint import model_from_checkpoint, read_checkpoint
from detector.config import UsageError, build_parser, resolve, resolve_device
from detector.data import ImageRecord, load_voc, read_image
from detector.detect import Detector
from detector.errors import InputError
from detector.evaluate import evaluate_split
from detector.plots import draw_detections
from detector.progress import progress
from detector.proposals import image_proposals
from detector.svd import svd_compress
from detector.tiling import tile_records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header."""
    with Image.open(path) as im:
        return im.size


def collect_images(paths: list[str], recursive: bool) -> list[str]:
    """Image files named on the command line, in the order given; a folder gives its images in sorted order.
    Paths that are neither an image file nor a folder are kept, so that they are reported as missing."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            found.append(path)
            continue
        walk = os.walk(path) if recursive else [(path, [], os.listdir(path))]
        for folder, subfolders, files in walk:
            subfolders.sort()
            found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def detect_images(detector: Detector, paths: list[str], out_dir: str, min_score: float) -> int:
    """--images: detections.json and one picture per image; an unreadable image is named and skipped (exit 1)."""
    os.makedirs(out_dir, exist_ok=True)
    readable, skipped = [], 0
    for path in paths:
        ok = os.path.isfile(path) and cv2.haveImageReader(path)
        if ok and cv2.imread(path, cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None:
            readable.append(path)
        else:
            print(f"error: {path}: {'not found' if not os.path.exists(path) else 'unreadable image'}; skipped",
                  file=sys.stderr)
            skipped += 1
    # Proposals as for the evaluation (selective search in parallel, cached by the image bytes; or dense), at
    # its working scale; with --tile, per tile of each image (the detector's own windows).
    start = time.perf_counter()
    cfg = detector.cfg
    pseudo = [SimpleNamespace(path=p, image_id=os.path.splitext(os.path.basename(p))[0]) for p in readable]
    if cfg.tile:
        pseudo = [ImageRecord(r.image_id, r.path, w, h, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                              np.zeros(0, bool)) for r in pseudo for w, h in [image_size(r.path)]]
        tiles = tile_records(pseudo, cfg.tile, cfg.tile_overlap)
        tile_boxes = image_proposals(tiles, detector.proposal_mode, cfg.max_proposals, cfg.workers,
                                     max(cfg.test_scales), cfg.test_max_size)
        boxes = [[b for t, b in zip(tiles, tile_boxes) if t.source == i] for i in range(len(pseudo))]
    else:
        boxes = image_proposals(pseudo, detector.proposal_mode, cfg.max_proposals, cfg.workers,
                                max(cfg.test_scales), cfg.test_max_size)
    detector.seconds["proposals"] += time.perf_counter() - start
    if readable:  # warm-up: first-call allocations stay out of the per-image times, as in the evaluation
        spent = dict(detector.seconds)
        detector(read_image(readable[0]), boxes[0])
        detector.seconds.update(spent)
    entries, stems = [], set()
    for path, proposals in zip(progress(readable, desc="detect", unit="img"), boxes):
        image = read_image(path)
        found = detector(image, proposals, min_score=min_score)
        entries.append({"image": path, "width": image.shape[1], "height": image.shape[0], "detections": [
            {"label": label, "score": float(score), "box": [float(v) for v in box]}
            for label, score, box in zip(found["labels"], found["scores"], found["boxes"])]})
        stem = os.path.splitext(os.path.basename(path))[0]
        while stem in stems:  # two images of one name in different folders
            stem += "_"
        stems.add(stem)
        draw_detections(image, found["boxes"], found["labels"], found["scores"], os.path.join(out_dir, f"{stem}.png"))
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(entries, f, indent=1)
    n = max(len(readable), 1)
    print(f"{len(readable)} images, {sum(len(e['detections']) for e in entries)} detections with score >= "
          f"{min_score} -> {out_dir}/detections.json and one .png per image")
    print("mean time per image: " + ", ".join(f"{k} {v / n * 1000:.0f} ms" for k, v in detector.seconds.items())
          + f" (total {sum(detector.seconds.values()) / n * 1000:.0f} ms)")
    return 1 if skipped else 0


def main() -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a final.pt or checkpoint.pt written by train.py")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the config's test split)")
    parser.add_argument("--svd", action="store_true", help="evaluate the truncated-SVD compressed model")
    parser.add_argument("--images", nargs="+", metavar="PATH", help="detect in these image files or folders instead")
    parser.add_argument("--recursive", action="store_true", help="--images: also the images in subfolders")
    parser.add_argument("--min-score", type=float, default=0.5,
                        help="--images: leave out detections scoring below this (display only; default 0.5)")
    args = parser.parse_args()
    ckpt = read_checkpoint(args.checkpoint)
    default_out = "detections" if args.images else "eval_svd" if args.svd else "eval"
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), default_out)
    cfg = resolve(args, base=ckpt["config"])
    device = resolve_device(cfg.device)
    model = model_from_checkpoint(ckpt, args.checkpoint)
    if args.svd:
        model = svd_compress(model, cfg.svd_fc6, cfg.svd_fc7)
        print(f"truncated SVD: fc6 rank {cfg.svd_fc6}, fc7 rank {cfg.svd_fc7}")
    model.to(device).eval()
    classes = ckpt["classes"]
    if args.images:
        return detect_images(Detector(model, classes, cfg), collect_images(args.images, args.recursive), cfg.out,
                             args.min_score)
    split = args.split or cfg.test_split
    root = cfg.data or ckpt["data_root"]
    if not os.path.isdir(root):
        raise InputError(f"data set {root!r} not found; pass --data DIR")
    print(f"checkpoint {args.checkpoint}: backbone {model.backbone.name} ({model.backbone.pixel_format} input), "
          f"{len(classes)} classes, {split} of {root}")
    records, _ = load_voc(root, split, classes)
    with torch.no_grad():
        evaluate_split(model, records, classes, cfg, cfg.out, split)
    print(f"outputs in {cfg.out}/ (metrics.json, results/, pr_curves.png, detections.png)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:  # one line, no traceback: 2 for a bad command-line value (UsageError), else 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
