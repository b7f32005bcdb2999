"""bench/profile_train.py on a tiny generated set: every stage is reported and the stages add up to the total."""

import os
import re
import subprocess
import sys

import pytest

from detector import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data", "frozen", "conv", "roi_pool", "fc6", "fc7", "rest", "backward", "step")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return shapes.generate(str(tmp_path_factory.mktemp("shapes")), seed=2, n_train=4, n_test=2, size=96)


@pytest.mark.parametrize("cache_mb", ["0", "100"])
def test_stages_add_up(tiny_data, cache_mb):
    cmd = [sys.executable, os.path.join(REPO, "bench", "profile_train.py"), "--iters", "3", "--skip", "1",
           "--data", tiny_data, "--backbone", "mobilenet_v2", "--freeze", "0,1,2,3", "--fc-dim", "64",
           "--scales", "96", "--max-size", "160", "--max-proposals", "200", "--workers", "1", "--device", "cpu",
           "--frozen-cache-mb", cache_mb]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = dict(re.findall(r"^\s*(\w+)\s+([\d.]+)\s+[\d.]+%$", proc.stdout, flags=re.M))
    assert set(rows) == set(STAGES), proc.stdout[-2000:]
    total = float(re.search(r"^\s*total\s+([\d.]+)$", proc.stdout, flags=re.M).group(1))
    assert abs(sum(float(v) for v in rows.values()) - total) < 0.5  # rounded to 0.1 ms per stage
    # the frozen layers run apart only with the cache on; the trunk always runs
    assert (float(rows["frozen"]) > 0) == (cache_mb != "0") and float(rows["conv"]) > 0
    if cache_mb != "0":
        assert "frozen layers 0-3 kept for" in proc.stdout
