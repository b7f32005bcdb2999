"""Issue 15 measured: train.py on generated large images with many small objects, with and without --tile,
with selective-search ("fast") and dense (paper §5.5) proposals. Prints recall@0.5 of the test proposals on
the whole test images, the test mAP and the proposal time per image of each run.

    .venv/bin/python bench/large_images.py --out /tmp/large_bench

The set: detector/shapes.py's generate_large, 3 images of 1500-2500 px (~300-700 objects of 15-60 px each);
the first two train, the third tests. Every run: the demo preset (MobileNetV2, packaged ImageNet weights) with
--iters (300, as in the issue); the untiled runs at the demo's scales (320 / 533, what a new user gets), the
tiled ones at native resolution (--tile T --scales T --max-size T and the same at test time).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detector.proposals import default_cache_dir  # noqa: E402
from detector.shapes import generate_large  # noqa: E402


def _line(log: str, split: str) -> str:
    """The proposals line of a split (tiles or images) in a train.py log."""
    return re.search(rf"^{split}: \d+ (?:images|tiles), .*$", log, re.M).group(0)


def _seconds_per_image(line: str) -> float:
    return float(re.findall(r"([\d.]+) s/image", line)[-1])  # tiled runs: the last figure is per whole image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the data set and the runs")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    data = os.path.join(args.out, "large15")
    if not os.path.isdir(data):
        generate_large(data, n_images=3, seed=0, sizes=(1500, 2500))
        split_dir = os.path.join(data, "ImageSets", "Main")
        with open(os.path.join(split_dir, "trainval.txt"), "w") as f:
            f.write("000001\n000002\n")
        with open(os.path.join(split_dir, "test.txt"), "w") as f:
            f.write("000003\n")
    # Selective search times are measured, not read from a cache of an earlier run of this script.
    shutil.rmtree(os.path.join(default_cache_dir(), "large15"), ignore_errors=True)
    t = str(args.tile)
    runs = [("fast", "whole image 320/533", []), ("fast", f"{t}-px tiles, native", ["--tile", t]),
            ("dense", "whole image 320/533", []), ("dense", f"{t}-px tiles, native", ["--tile", t])]
    rows = []
    for source, label, extra in runs:
        if extra:
            extra += ["--scales", t, "--max-size", t, "--test-scales", t, "--test-max-size", t]
        out = os.path.join(args.out, f"{source}_{'tiled' if extra else 'whole'}")
        cmd = [sys.executable, os.path.join(REPO, "train.py"), "--data", data, "--out", out, "--iters",
               str(args.iters), "--train-proposals", source, "--test-proposals", source, "--workers",
               str(args.workers), "--device", "cpu", *extra]
        print("$ " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        log = proc.stdout
        for line in log.splitlines():
            if line.startswith(("warning:", "tiling:", "trainval:", "test:", "mAP ")):
                print("  " + line)
        pooled = re.search(r"test: proposals of all tiles on the \d+ whole images: recall@0.5 ([\d.]+)", log)
        recall = float(pooled.group(1)) if pooled else float(re.search(r"recall@0.5 ([\d.]+)",
                                                                        _line(log, "test")).group(1))
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        rows.append((source, label, recall, metrics["mAP"], _seconds_per_image(_line(log, "trainval")),
                     _seconds_per_image(_line(log, "test")), time.time() - t0))
    print(f"\n{'proposals':<10}{'input':<24}{'recall@0.5':>11}{'mAP':>8}{'prop s/img train':>17}"
          f"{'test':>7}{'run s':>7}")
    for source, label, recall, ap, s_train, s_test, wall in rows:
        print(f"{source:<10}{label:<24}{recall:>11.3f}{ap:>8.4f}{s_train:>17.2f}{s_test:>7.2f}{wall:>7.0f}")


if __name__ == "__main__":
    main()
