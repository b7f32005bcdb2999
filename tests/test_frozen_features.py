"""The frozen-layer cache (detector/frozen_features.py): which layers it keeps, that a kept map is the map a
recomputation gives, and that training with the cache full or empty ends in bit-identical weights."""

import os
import re
import subprocess
import sys

import torch

from detector import shapes
from detector.backbones import build_backbone
from detector.data import pad_batch
from detector.frozen_features import FrozenFeatures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_frozen_prefix_counts_leading_fixed_layers():
    vgg = build_backbone("vgg16")  # the paper freezes conv1_1..conv2_2: layers 0-9 run through pool2
    assert vgg.frozen_prefix() == 10 and any(p.requires_grad for p in vgg.trunk[10].parameters())
    net = build_backbone("mobilenet_v2")  # its stem, blocks 0-1
    assert net.frozen_prefix() == 2
    net.freeze(tuple(str(i) for i in range(7)))
    assert net.frozen_prefix() == 7
    net.freeze(("0", "2"))  # a trainable layer between frozen ones ends the prefix
    assert net.frozen_prefix() == 1


def test_kept_maps_are_what_the_layers_give():
    torch.manual_seed(0)
    net = build_backbone("mobilenet_v2")
    net.freeze(tuple(str(i) for i in range(4)))
    images = [torch.randn(3, 64, 80), torch.randn(3, 72, 56)]
    keys = [(0, 64, False), (1, 72, True)]
    cache = FrozenFeatures(net, budget_mb=100)
    first = cache(images, keys, torch.device("cpu"))
    again = cache(images, keys, torch.device("cpu"))
    with torch.no_grad():
        alone = [net(im[None], 0, 4)[0] for im in images]
    want = pad_batch(alone)
    assert torch.equal(first, want) and torch.equal(again, want)
    assert (cache.hits, cache.misses, len(cache.maps)) == (2, 2, 2)
    # the rest of the trunk on a kept map = the whole trunk on the image alone
    h, w = alone[0].shape[1:]
    with torch.no_grad():
        assert torch.equal(net(again[:1, :, :h, :w], 4), net(images[0][None]))
    tight = FrozenFeatures(net, budget_mb=1e-6)  # nothing fits: every call recomputes
    assert torch.equal(tight(images, keys, torch.device("cpu")), want) and not tight.maps


def test_bad_budget_is_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--frozen-cache-mb", "-1",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "frozen_cache_mb" in proc.stderr.replace("-", "_")
    assert not (tmp_path / "run").exists()


def test_training_with_and_without_kept_maps_is_bit_identical(tmp_path):
    data = shapes.generate(str(tmp_path / "shapes"), seed=2, n_train=4, n_test=2, size=96)
    common = ["--data", data, "--backbone", "mobilenet_v2", "--freeze", "0,1,2,3", "--fc-dim", "64",
              "--scales", "96,112", "--max-size", "160", "--test-scales", "96", "--test-max-size", "160",
              "--max-proposals", "200", "--workers", "1", "--device", "cpu", "--iters", "8", "--log-every", "4",
              "--lr", "0.01", "--lr-steps", "100", "--evaluate", "false"]
    runs = {}
    for name, budget in (("kept", "1000"), ("recomputed", "1e-6")):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *common, "--frozen-cache-mb",
                               budget, "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        reused = re.search(r"frozen layers 0-3 kept for (\d+) .*: (\d+) of 16 images reused", proc.stdout)
        assert reused, proc.stdout[-2000:]
        runs[name] = (out, int(reused.group(1)), int(reused.group(2)))
    (kept_out, kept_maps, kept_hits), (recomputed_out, none_kept, no_hits) = runs["kept"], runs["recomputed"]
    # 16 draws of 4 images at 2 scales x 2 flips: some come back; with no room nothing is kept or reused
    assert kept_hits > 0 and kept_maps + kept_hits == 16 and none_kept == no_hits == 0
    a = torch.load(kept_out / "final.pt", weights_only=True)["model"]
    b = torch.load(recomputed_out / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the logged losses too: every column but the timing
    logged = [[row.rsplit(",", 1)[0] for row in (out / "metrics.csv").read_text().splitlines()]
              for out in (kept_out, recomputed_out)]
    assert logged[0] == logged[1] and len(logged[0]) == 3
