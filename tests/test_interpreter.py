"""Run the kernel tests again with TRITON_INTERPRET=1, so CPU tensors go through the Triton kernels.

The GPU code is then checked on a machine without a GPU: the same oracles, the same cases. Those files skip
their GPU compile tests, torch.compile and the slow CPU-only checks in that run (they read the variable too).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = [p for p in ("tests/test_roi_pool.py", "tests/test_smooth_l1.py") if (ROOT / p).exists()]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already inside the interpreter run")
def test_kernel_tests_pass_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNEL_TESTS]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"interpreter run failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert " passed" in summary and "failed" not in summary, summary
    print(f"\ninterpreter run of {' '.join(KERNEL_TESTS)}: {summary}")
