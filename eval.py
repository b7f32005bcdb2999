"""Evaluate a trained Fast R-CNN: detections, PASCAL VOC AP / mAP (devkit-exact), comp4 result files, timing, plots.

    python eval.py --checkpoint runs/demo/final.pt
    python eval.py --checkpoint final.pt --data VOCdevkit/VOC2007 --split test --svd --out runs/eval_svd

Without --data the data set the checkpoint was trained on is used. --svd evaluates the truncated-SVD model (paper
§3.1: fc6 rank 1024, fc7 rank 256 unless --svd-fc6/--svd-fc7 say otherwise). Any training/test configuration field
can be overridden (e.g. --test-scales 480,576,688,864,1200 --test-max-size 2000 for multi-scale testing).
"""

import os
import sys

import torch

from detector.config import build_parser, resolve
from detector.data import DatasetError
from detector.pipeline import load_checkpoint, load_split, model_from_checkpoint, resolve_device, run_evaluation
from detector.svd import svd_compress


def main() -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a final.pt or checkpoint.pt written by train.py")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the config's test split)")
    parser.add_argument("--svd", action="store_true", help="evaluate the truncated-SVD compressed model")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                        "eval_svd" if args.svd else "eval")
    cfg = resolve(args, base=ckpt["config"])
    split = args.split or cfg.test_split
    root = cfg.data or ckpt.get("data_root", "")
    if not root or not os.path.isdir(root):
        print(f"error: data set {root!r} not found; pass --data DIR", file=sys.stderr)
        return 1
    device = resolve_device(cfg.device)
    model = model_from_checkpoint(ckpt, cfg, args.checkpoint)
    if args.svd:
        model = svd_compress(model, cfg.svd_fc6, cfg.svd_fc7)
        print(f"truncated SVD: fc6 rank {cfg.svd_fc6}, fc7 rank {cfg.svd_fc7}")
    model.to(device).eval()
    print(f"checkpoint {args.checkpoint}: backbone {cfg.backbone}, {len(ckpt['classes'])} classes, {split} of {root}")
    try:
        records, proposals = load_split(cfg, root, split, ckpt["classes"], cfg.test_proposals)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with torch.no_grad():
        run_evaluation(model, records, proposals, ckpt["classes"], cfg, cfg.out, split)
    print(f"outputs in {cfg.out}/ (metrics.json, results/, pr_curves.png, detections.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
