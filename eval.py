"""Evaluate a trained Fast R-CNN: detections, PASCAL VOC AP / mAP (devkit-exact), comp4 result files, timing, plots.

    python eval.py --checkpoint runs/demo/final.pt
    python eval.py --checkpoint final.pt --data VOCdevkit/VOC2007 --split test --svd --out runs/eval_svd

Without --data the data set the checkpoint was trained on is used. The network (backbone, classes, input
normalisation, head widths) comes from the checkpoint. --svd evaluates the truncated-SVD model (paper §3.1: fc6
rank 1024, fc7 rank 256 unless --svd-fc6/--svd-fc7 say otherwise). Test-time fields can be overridden (e.g.
--test-scales 480,576,688,864,1200 --test-max-size 2000 for multi-scale testing).
"""

import os
import sys

import torch

from detector.checkpoint import model_from_checkpoint, read_checkpoint
from detector.config import build_parser, resolve, resolve_device
from detector.data import load_voc
from detector.errors import InputError
from detector.evaluate import evaluate_split
from detector.proposals import proposals_for_split
from detector.svd import svd_compress


def main() -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a final.pt or checkpoint.pt written by train.py")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the config's test split)")
    parser.add_argument("--svd", action="store_true", help="evaluate the truncated-SVD compressed model")
    args = parser.parse_args()
    ckpt = read_checkpoint(args.checkpoint)
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                        "eval_svd" if args.svd else "eval")
    cfg = resolve(args, base=ckpt["config"])
    split = args.split or cfg.test_split
    root = cfg.data or ckpt["data_root"]
    if not os.path.isdir(root):
        raise InputError(f"data set {root!r} not found; pass --data DIR")
    device = resolve_device(cfg.device)
    model = model_from_checkpoint(ckpt, args.checkpoint)
    if args.svd:
        model = svd_compress(model, cfg.svd_fc6, cfg.svd_fc7)
        print(f"truncated SVD: fc6 rank {cfg.svd_fc6}, fc7 rank {cfg.svd_fc7}")
    model.to(device).eval()
    classes = ckpt["classes"]
    print(f"checkpoint {args.checkpoint}: backbone {model.backbone.name} ({model.backbone.pixel_format} input), "
          f"{len(classes)} classes, {split} of {root}")
    records, _ = load_voc(root, split, classes)
    proposals = proposals_for_split(records, cfg.test_proposals, cfg.max_proposals, cfg.workers, split)
    with torch.no_grad():
        evaluate_split(model, records, proposals, classes, cfg, cfg.out, split)
    print(f"outputs in {cfg.out}/ (metrics.json, results/, pr_curves.png, detections.png)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
