"""RoI max pooling vs a float64 loop oracle of the Caffe layer: values, argmax, gradients, packaging, kernels.

Under TRITON_INTERPRET=1 (tests/test_interpreter.py) the same tests run the Triton kernels on CPU tensors.
"""

import importlib
import math
import os
import time

import numpy as np
import pytest
import torch

from kernels import roi_pool_cpu
from kernels.roi_pool import (
    RoIPool,
    _roi_pool_bwd_deterministic_kernel,
    _roi_pool_bwd_kernel,
    _roi_pool_fwd_kernel,
    _settings,
    roi_pool,
)

R = importlib.import_module("kernels.roi_pool")  # the module: kernels/__init__ re-exports the function's name
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the run of tests/test_interpreter.py
F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
fwd_op, bwd_op = torch.ops.frcnn.roi_pool_fwd, torch.ops.frcnn.roi_pool_bwd


def c_round(v: float) -> int:
    """C round(): halves away from zero (|v| + 0.5 is exact in float64 for a float32 v)."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def oracle(x, rois, scale, ph_n, pw_n):
    """Caffe ROIPoolForward (fast_rcnn.md §1) one output at a time: fp32 box math, float64 values."""
    xs, (_, c, h, w) = x.double().tolist(), x.shape
    out = torch.zeros(len(rois), c, ph_n, pw_n, dtype=torch.float64)
    arg = torch.full((len(rois), c, ph_n, pw_n), -1, dtype=torch.int32)
    for r, roi in enumerate(rois.double().tolist()):
        b = int(roi[0])
        sw, sh, ew, eh = (c_round(float(F32(v) * F32(scale))) for v in roi[1:])
        bin_h, bin_w = F32(max(eh - sh + 1, 1)) / F32(ph_n), F32(max(ew - sw + 1, 1)) / F32(pw_n)
        for ch in range(c):
            for ph in range(ph_n):
                hs = min(max(math.floor(F32(ph) * bin_h) + sh, 0), h)
                he = min(max(math.ceil(F32(ph + 1) * bin_h) + sh, 0), h)
                for pw in range(pw_n):
                    ws = min(max(math.floor(F32(pw) * bin_w) + sw, 0), w)
                    we = min(max(math.ceil(F32(pw + 1) * bin_w) + sw, 0), w)
                    if he <= hs or we <= ws:
                        continue  # empty bin: 0, argmax -1
                    best, best_i = -FLT_MAX, -1
                    for hh in range(hs, he):
                        for ww in range(ws, we):
                            if xs[b][ch][hh][ww] > best:
                                best, best_i = xs[b][ch][hh][ww], hh * w + ww
                    out[r, ch, ph, pw], arg[r, ch, ph, pw] = best, best_i
    return out, arg


def oracle_backward(grad, rois, arg, shape):
    """Paper eq. 4: each output gradient goes to its argmax pixel; -1 routes nothing."""
    n, c, h, w = shape
    gin = [[[0.0] * (h * w) for _ in range(c)] for _ in range(n)]
    for r, g_r in enumerate(grad.double().tolist()):
        b = int(rois[r, 0])
        for ch in range(c):
            for g, i in zip(np.ravel(g_r[ch]), arg[r, ch].flatten().tolist(), strict=True):
                if i >= 0:
                    gin[b][ch][i] += g
    return torch.tensor(gin, dtype=torch.float64).view(shape)


def random_rois(n_img, k, img_h, img_w, seed):
    """k boxes (batch, x1, y1, x2, y2) reaching 20% past every border of an img_h x img_w image."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.tensor([-0.2 * img_w, -0.2 * img_h]), torch.tensor([1.2 * img_w, 1.2 * img_h])
    p = lo + (hi - lo) * torch.rand(k, 2, 2, generator=g)  # two corners per box
    b = torch.randint(0, n_img, (k, 1), generator=g).double()
    return torch.cat([b, p.min(1).values, p.max(1).values], 1).tolist()


# (N, C, H, W, rois, output_size, spatial_scale), one comment per case
CASES = {
    # 1/16 lands exactly on .5: x = 8, 24, 40 -> 0.5, 1.5, 2.5 -> C round 1, 2, 3 (torch.round: 0, 2, 2)
    "half_points": (1, 3, 5, 6, [[0, 8, 8, 40, 40], [0, 24, 8, 40, 24], [0, 0, 24, 8, 40]], 2, 1 / 16),
    # partly outside the map: bins clipped at all four borders, some of them emptied
    "partly_outside": (1, 2, 5, 6, [[0, -3, -2, 3, 2], [0, 3, 2, 9, 8], [0, -10, -10, 20, 20]], 3, 1.0),
    # fully outside: every bin empty -> 0 and argmax -1
    "fully_outside": (1, 2, 4, 4, [[0, 10, 10, 14, 14], [0, -9, -9, -5, -5], [0, 0, 6, 3, 9]], 2, 1.0),
    # degenerate boxes (x2 < x1, y2 < y1, a point): forced to 1 x 1 at (round(y1), round(x1))
    "degenerate": (1, 2, 5, 5, [[0, 3, 3, 1, 1], [0, 4, 1, 0, 4], [0, 2, 2, 2, 2]], 2, 1.0),
    # a 1 x 1 feature map
    "map_1x1": (1, 3, 1, 1, [[0, 0, 0, 0, 0], [0, -5, -5, 5, 5], [0, 1, 1, 2, 2]], 2, 1.0),
    # two images, odd C, VGG16's 7 x 7 at 1/16 (bins smaller than a cell overlap their neighbours)
    "two_images_7x7": (2, 5, 6, 8, random_rois(2, 6, 96, 128, seed=1), 7, 1 / 16),
    # CaffeNet / VGG_CNN_M_1024's 6 x 6
    "caffenet_6x6": (1, 3, 9, 7, random_rois(1, 5, 144, 112, seed=2), 6, 1 / 16),
    # non-square outputs, bins of different heights and widths
    "non_square_2x5": (2, 3, 7, 9, random_rois(2, 5, 7, 9, seed=3), (2, 5), 1.0),
    "non_square_5x2": (1, 2, 8, 4, random_rois(1, 4, 8, 4, seed=4), (5, 2), 1.0),
    # big boxes on a small map: wide bins, the largest windows
    "large_bins": (1, 2, 12, 15, random_rois(1, 4, 12, 15, seed=5), 2, 1.0),
}


def make_input(n, c, h, w, dtype, kind="randn", seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # three values only: many equal maxima inside one bin
        return torch.randint(0, 3, (n, c, h, w), generator=g).to(dtype)
    return torch.randn(n, c, h, w, generator=g).to(dtype)


def run_case(name, dtype, kind="randn"):
    n, c, h, w, rois, size, scale = CASES[name]
    ph, pw = (size, size) if isinstance(size, int) else size
    return make_input(n, c, h, w, dtype, kind), torch.tensor(rois, dtype=dtype), scale, ph, pw


# (dtype, input values): every dtype once, the tie-heavy maps where ties survive the rounding of the input
DTYPE_KINDS = [
    (torch.float32, "randn"),
    (torch.float32, "ties"),
    (torch.float64, "randn"),
    (torch.float16, "ties"),
    (torch.bfloat16, "randn"),  # 8 mantissa bits: near-ties galore
]


@pytest.mark.parametrize("dtype, kind", DTYPE_KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_oracle(name, dtype, kind):
    x, rois, scale, ph, pw = run_case(name, dtype, kind)
    out, arg = fwd_op(x, rois, scale, ph, pw, True)
    want, want_arg = oracle(x, rois, scale, ph, pw)
    assert out.dtype == dtype and arg.dtype == torch.int32
    torch.testing.assert_close(out.double(), want, rtol=0, atol=0)  # a max picks an element: exact
    torch.testing.assert_close(arg, want_arg, rtol=0, atol=0)
    out_no_arg, no_arg = fwd_op(x, rois, scale, ph, pw, False)  # the test-time variant writes no argmax
    assert torch.equal(out_no_arg, out) and no_arg.numel() == 0


@pytest.mark.parametrize("name", ["two_images_7x7", "partly_outside", "half_points"])
def test_noncontiguous_input(name):
    x, rois, scale, ph, pw = run_case(name, torch.float32)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, W-major strides
    assert not x_t.is_contiguous()
    out, arg = fwd_op(x_t, rois, scale, ph, pw, True)
    want, want_arg = oracle(x, rois, scale, ph, pw)
    assert torch.equal(out.double(), want) and torch.equal(arg, want_arg)


def test_nan_and_neg_inf_never_win():
    # the scan starts at -FLT_MAX with a strict >: NaN and -inf are skipped; an all -inf bin: -FLT_MAX, -1
    x = torch.tensor(
        [[[[float("nan"), 1.0, float("-inf"), float("-inf")], [2.0, float("nan"), float("-inf"), -5.0]]]]
    )
    rois = torch.tensor([[0, 0, 0, 3, 1]], dtype=torch.float32)
    out, arg = fwd_op(x, rois, 1.0, 1, 4, True)  # four 2 x 1 columns
    assert out.flatten().tolist() == [2.0, 1.0, -FLT_MAX, -5.0]
    assert arg.flatten().tolist() == [4, 1, -1, 7]


def test_half_points_round_away_from_zero_by_hand():
    x = torch.arange(36.0).view(1, 1, 6, 6)  # increasing: the max of a window is its bottom-right pixel
    rois = torch.tensor([[0, 8, 8, 40, 40], [0, 24, 24, 24, 24], [0, 0, 0, 8, 8]])
    out, arg = fwd_op(x, rois, 1 / 16, 1, 1, True)
    # 40/16 = 2.5 -> 3: window rows/cols 1..3 -> pixel (3, 3); 24/16 = 1.5 -> 2; 8/16 = 0.5 -> 1
    assert arg.flatten().tolist() == [3 * 6 + 3, 2 * 6 + 2, 1 * 6 + 1]
    assert out.flatten().tolist() == [21.0, 14.0, 7.0]


def test_ties_take_the_first_pixel_by_hand():
    x = torch.ones(1, 1, 4, 4)
    out, arg = fwd_op(x, torch.tensor([[0.0, 0, 0, 3, 3]]), 1.0, 2, 2, True)
    assert arg.flatten().tolist() == [0, 2, 8, 10]  # each 2 x 2 bin's top-left pixel
    assert out.flatten().tolist() == [1.0] * 4


def test_empty_bins_by_hand():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    rois = torch.tensor(
        [[0.0, 0, 0, 7, 7]]
    )  # an 8 x 8 box in 2 x 2 bins: bins 2 and 3 of each axis are off the map
    out, arg = fwd_op(x, rois, 1.0, 4, 4, True)
    assert (out[0, :, 2:, :] == 0).all() and (out[0, :, :, 2:] == 0).all()
    assert (arg[0, :, 2:, :] == -1).all() and (arg[0, :, :, 2:] == -1).all()
    assert (arg[0, :, :2, :2] >= 0).all()
    out.sum().backward()
    assert x.grad.sum() == 2 * 4  # 4 non-empty bins per channel route 1 each


@pytest.mark.parametrize("name", ["two_images_7x7", "partly_outside", "large_bins", "fully_outside"])
def test_backward_matches_oracle_scatter(name):
    x, rois, scale, ph, pw = run_case(name, torch.float64)
    x.requires_grad_(True)
    out = roi_pool(x, rois, (ph, pw), scale)
    grad = torch.randn(out.shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(out, x, grad)
    _, arg = oracle(x.detach(), rois, scale, ph, pw)
    torch.testing.assert_close(gx, oracle_backward(grad, rois, arg, x.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_low_precision_dtypes(dtype):
    x, rois, scale, ph, pw = run_case("two_images_7x7", dtype)
    x.requires_grad_(True)
    out = roi_pool(x, rois, (ph, pw), scale)
    grad = torch.randn(out.shape).to(dtype)
    (gx,) = torch.autograd.grad(out, x, grad)
    _, arg = oracle(x.detach(), rois, scale, ph, pw)
    want = oracle_backward(grad, rois, arg, x.shape)  # fp32 accumulation, one rounding at the end
    assert gx.dtype == dtype
    torch.testing.assert_close(gx, want.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("contiguous", [True, False])
def test_gradcheck(seed, contiguous):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randperm(2 * 2 * 5 * 6, generator=g).double() / 100).view(2, 2, 6, 5)  # tie-free: gaps >> eps
    x = x.transpose(2, 3) if not contiguous else x.contiguous().view(2, 2, 5, 6)
    rois = torch.tensor(random_rois(2, 4, 5, 6, seed), dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (3, 2), 1.0), (x,), fast_mode=INTERPRET)


def test_k0_empty_output_and_zero_gradient():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = roi_pool(x, torch.zeros(0, 5), 7, 1 / 16)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape and (x.grad == 0).all()
    assert roi_pool(x, [torch.zeros(0, 4), torch.zeros(0, 4)], 2).shape == (0, 3, 2, 2)


def test_boxes_list_and_module_match_tensor_format():
    x, rois, scale, ph, pw = run_case("two_images_7x7", torch.float32)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    rois_sorted = torch.cat([rois[rois[:, 0] == i] for i in range(2)])
    want = roi_pool(x, rois_sorted, ph, scale)
    assert torch.equal(roi_pool(x, boxes, ph, scale), want)
    pool = RoIPool(output_size=7, spatial_scale=1 / 16)
    assert torch.equal(pool(x, rois_sorted), want)
    assert repr(pool) == "RoIPool(output_size=7, spatial_scale=0.0625)"


def test_argmax_only_written_when_a_gradient_is_needed(monkeypatch):
    seen = []
    fwd = R._roi_pool_fwd_triton if INTERPRET else R.roi_pool_fwd_cpu
    monkeypatch.setattr(R, fwd.__name__, lambda *a: seen.append(a[-1]) or fwd(*a))
    x, rois, scale, ph, pw = run_case("half_points", torch.float32)
    roi_pool(x, rois, ph, scale)  # no requires_grad
    with torch.no_grad():
        roi_pool(x.requires_grad_(True), rois, ph, scale)
    roi_pool(x, rois, ph, scale)
    assert seen == [False, False, True]


def test_the_expected_backend_ran(monkeypatch):
    # under the interpreter the Triton kernels must really run, not the CPU path: count the launchers' calls
    calls = []
    for name in ("_roi_pool_fwd_triton", "_roi_pool_bwd_triton", "roi_pool_fwd_cpu", "roi_pool_bwd_cpu"):
        fn = getattr(R, name)
        monkeypatch.setattr(R, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    x, rois, scale, ph, pw = run_case("two_images_7x7", torch.float32)
    roi_pool(x.requires_grad_(True), rois, ph, scale).sum().backward()
    want = ["_roi_pool_fwd_triton", "_roi_pool_bwd_triton"] if INTERPRET else ["roi_pool_fwd_cpu", "roi_pool_bwd_cpu"]
    assert calls == want


@pytest.mark.parametrize("name", ["two_images_7x7", "degenerate", "partly_outside"])
def test_deterministic_backward(name):
    # torch.use_deterministic_algorithms(True): the Triton path (interpreter run) switches to the plane-owner
    # kernel, the CPU path is deterministic anyway; both equal the oracle and repeat bit for bit
    x, rois, scale, ph, pw = run_case(name, torch.float32, "ties")
    rois = torch.cat([rois, rois.flip(0)])  # RoIs that repeat: many gradients land on the same pixels
    out, arg = fwd_op(x, rois, scale, ph, pw, True)
    grad = torch.randn(out.shape)
    want = oracle_backward(grad, rois, oracle(x, rois, scale, ph, pw)[1], x.shape)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [bwd_op(grad, rois, arg, *x.shape) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(runs[0].double(), want, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(r, runs[0]) for r in runs[1:])


@pytest.mark.skipif(
    not INTERPRET, reason="compares the Triton kernels with the CPU path: interpreter run only"
)
def test_triton_matches_cpu_path():
    x, rois, scale, ph, pw = run_case("two_images_7x7", torch.float32, "ties")
    for need_argmax in (True, False):
        got = R._roi_pool_fwd_triton(x, rois, scale, ph, pw, need_argmax)
        want = roi_pool_cpu.roi_pool_fwd_cpu(x, rois, scale, ph, pw, need_argmax)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(INTERPRET, reason="CPU path only")
def test_cpu_path_in_small_blocks(monkeypatch):
    # tables per channel block and bins gathered in many steps give the same exact results
    monkeypatch.setattr(roi_pool_cpu, "_TABLE_BUDGET", 200)
    monkeypatch.setattr(roi_pool_cpu, "_STEP_BUDGET", 1)
    for name in CASES:
        for dtype, kind in [(torch.float32, "ties"), (torch.float64, "randn")]:
            x, rois, scale, ph, pw = run_case(name, dtype, kind)
            want, want_arg = oracle(x, rois, scale, ph, pw)
            for need_argmax in (True, False):
                out, arg = roi_pool_cpu.roi_pool_fwd_cpu(x, rois, scale, ph, pw, need_argmax)
                assert torch.equal(out.double(), want), (name, dtype)
                assert torch.equal(arg, want_arg if need_argmax else arg.new_empty(0)), (name, dtype)
            grad = torch.randn(want.shape, dtype=dtype)
            got = roi_pool_cpu.roi_pool_bwd_cpu(grad, rois, want_arg, *x.shape)
            torch.testing.assert_close(got, oracle_backward(grad, rois, want_arg, x.shape).to(dtype))


def test_signed_zeros_keep_the_first_ones_sign():
    # -0.0 == 0.0 for the reference's '>': the first zero in row-major order wins, with its sign
    x = torch.tensor([[[[-0.0, 0.0, -3.0], [0.0, -0.0, -1.0], [float("nan"), float("-inf"), -0.0]]]])
    for size in (1, 2, 3):
        out, arg = fwd_op(x, torch.tensor([[0.0, 0, 0, 2, 2]]), 1.0, size, size, True)
        want, want_arg = oracle(x, torch.tensor([[0.0, 0, 0, 2, 2]]), 1.0, size, size)
        assert torch.equal(arg, want_arg)
        assert torch.equal(out.double(), want) and torch.equal(out.signbit(), want.signbit())


def test_round_half_away():
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 3.0, -3.7])
    want = torch.tensor([c_round(float(t)) for t in v], dtype=torch.float32)
    assert torch.equal(roi_pool_cpu.round_half_away(v), want)
    assert roi_pool_cpu.round_half_away(torch.tensor([2.5], dtype=torch.float64)).dtype == torch.float64


@pytest.mark.skipif(INTERPRET, reason="slow CPU-only check at the paper's test-time shape")
def test_cpu_path_at_test_time_shape():
    # VGG16 at test time: 38 x 63 conv5 map of a 600 x 1000 image, 2000 proposals, 7 x 7, no gradient
    x = torch.randn(1, 512, 38, 63)
    rois = torch.tensor(random_rois(1, 2000, 600, 1000, seed=0))
    t = time.perf_counter()
    out = roi_pool(x, rois, 7, 1 / 16)
    print(f"\nroi_pool CPU path, 2000 RoIs x 512 ch, 7x7: {1e3 * (time.perf_counter() - t):.0f} ms")
    pick = torch.randint(0, 2000, (6,))
    want, _ = oracle(x[:, :4], rois[pick], 1 / 16, 7, 7)  # spot-check 6 RoIs x 4 channels
    assert torch.equal(out[pick, :4].double(), want)


# --- bad input: ValueError naming the problem ---
BAD = {
    "input must be a 4-D": lambda x, r: roi_pool(x[0], r, 2),
    r"rois must be \[K, 5\]": lambda x, r: roi_pool(x, r[:, 1:], 2),
    r"boxes\[1\] must be an \[L, 4\]": lambda x, r: roi_pool(x, [r[:, 1:], r], 2),
    r"batch index outside \[0, N\) with N=2": lambda x, r: roi_pool(
        x, r + torch.tensor([2.0, 0, 0, 0, 0]), 2
    ),
    "negative batch": lambda x, r: roi_pool(x, r - torch.tensor([1.0, 0, 0, 0, 0]), 2),
    "coordinates are not finite": lambda x, r: roi_pool(x, r + torch.tensor([0, 0, float("inf"), 0, 0]), 2),
    "NaN coordinates": lambda x, r: roi_pool(x, r + torch.tensor([0, float("nan"), 0, 0, 0]), 2),
    "beyond 16777216 feature cells": lambda x, r: roi_pool(x, r + torch.tensor([0, 0, 0, 1e9, 0]), 2),
    "spatial_scale must be a finite number > 0": lambda x, r: roi_pool(x, r, 2, 0.0),
    "output_size must be an int or": lambda x, r: roi_pool(x, r, (0, 2)),
    r"rois dtype torch.float64 does not match": lambda x, r: roi_pool(x, r.double(), 2),
    r"input dtype torch.int64 is not a": lambda x, r: roi_pool(x.long(), r.long(), 2),
    "rois on meta but input on cpu": lambda x, r: roi_pool(x, r.to("meta"), 2),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input_raises_value_error(what):
    x, rois = torch.randn(2, 3, 4, 4), torch.tensor([[0, 0, 0, 3, 3], [1, 1, 1, 2, 2.0]])
    match = {"negative batch": "batch index outside", "NaN coordinates": "coordinates are not finite"}.get(
        what, what
    )
    with pytest.raises(ValueError, match=match):
        BAD[what](x, rois)


# --- packaging: torch.library checks and torch.compile, on CPU ---
@pytest.mark.parametrize("need_argmax", [True, False])
def test_opcheck(need_argmax):
    x, rois, scale, ph, pw = run_case("half_points", torch.float64)
    x.requires_grad_(need_argmax)
    torch.library.opcheck(fwd_op, (x, rois, scale, ph, pw, need_argmax))
    _, arg = fwd_op(x.detach(), rois, scale, ph, pw, True)
    torch.library.opcheck(bwd_op, (torch.randn(arg.shape, dtype=torch.float64), rois, arg, *x.shape))


@pytest.mark.skipif(INTERPRET, reason="torch.compile is tested in the plain CPU run")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend):
    x, rois, scale, ph, pw = run_case("two_images_7x7", torch.float32)
    x.requires_grad_(True)
    compiled = torch.compile(
        lambda t, r: roi_pool(t, r, (ph, pw), scale).square().sum(), backend=backend, fullgraph=True
    )
    (g_compiled,) = torch.autograd.grad(compiled(x, rois), x)
    (g_eager,) = torch.autograd.grad(roi_pool(x, rois, (ph, pw), scale).square().sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)


# --- the kernels compile for real GPUs without spilling ---
@pytest.mark.skipif(INTERPRET, reason="the interpreter run does not compile for a GPU")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch):
    from cubin import compile_for_gpu

    block, warps = _settings(512 * 7 * 7)  # the launch of the paper's shapes: C = 512, 7 x 7
    builds = {}
    for dtype, write_argmax in [("fp32", True), ("fp32", False), ("fp16", True), ("bf16", False)]:
        sig = dict(x_ptr=f"*{dtype}", rois_ptr=f"*{dtype}", out_ptr=f"*{dtype}", argmax_ptr="*i32", c="i32",
                   h="i32", w="i32", blocks_per_roi="i32", spatial_scale="fp32", PH="constexpr", PW="constexpr",
                   WRITE_ARGMAX="constexpr", BLOCK="constexpr")  # fmt: skip
        meta = dict(PH=7, PW=7, WRITE_ARGMAX=write_argmax, BLOCK=block)
        builds[f"fwd {dtype} argmax={write_argmax}"] = (_roi_pool_fwd_kernel, sig, meta)
    for dtype in ["fp32", "bf16"]:
        sig = dict(grad_ptr=f"*{dtype}", argmax_ptr="*i32", rois_ptr=f"*{dtype}", grad_in_ptr="*fp32",
                   c="i32", h="i32", w="i32", blocks_per_roi="i32", PHPW="constexpr", BLOCK="constexpr")  # fmt: skip
        builds[f"bwd {dtype}"] = (_roi_pool_bwd_kernel, sig, dict(PHPW=49, BLOCK=block))
        sig = dict(grad_ptr=f"*{dtype}", argmax_ptr="*i32", order_ptr="*i64", bounds_ptr="*i64",
                   grad_in_ptr="*fp32", c="i32", h="i32", w="i32", PHPW="constexpr", BLOCK="constexpr")  # fmt: skip
        builds[f"bwd deterministic {dtype}"] = (
            _roi_pool_bwd_deterministic_kernel, sig, dict(PHPW=49, BLOCK=R._DETERMINISTIC_BLOCK),
            R._DETERMINISTIC_WARPS,
        )
    for name, (kernel, sig, meta, *num_warps) in builds.items():
        usage = compile_for_gpu(kernel, sig, meta, arch, num_warps[0] if num_warps else warps)
        print(f"\nroi_pool {name} sm{arch}: {usage['registers']} registers/thread, {usage['num_warps']} warps, "
              f"local {usage['local']} B")  # fmt: skip
        assert usage["local"] == 0, f"{name} spills registers on sm{arch} ({usage})"
