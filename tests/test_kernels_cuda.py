"""The compiled Triton kernels on a real GPU: the CPU tests' cases against the float64 oracle and the CPU path,
gradcheck, opcheck, torch.compile, launch counts, int64 offsets and grid limits. Skipped without CUDA.

Run only these (e.g. from bench/gpu_check.py):  python -m pytest -q tests/test_kernels_cuda.py
"""

import pytest
import torch
import torch.nn.functional as F
from test_roi_pool import CASES, oracle, oracle_backward, random_rois, run_case

from kernels import roi_pool_cpu
from kernels.roi_pool import roi_pool
from kernels.smooth_l1 import smooth_l1_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
fwd_op, bwd_op = torch.ops.frcnn.roi_pool_fwd, torch.ops.frcnn.roi_pool_bwd


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


@pytest.mark.parametrize("dtype, kind", [(torch.float32, "ties"), (torch.float32, "randn"), (torch.float64, "randn")])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_oracle_and_cpu_path(name, dtype, kind):
    x, rois, scale, ph, pw = run_case(name, dtype, kind)
    out, arg = fwd_op(x.cuda(), rois.cuda(), scale, ph, pw, True)
    want, want_arg = oracle(x, rois, scale, ph, pw)
    assert torch.equal(out.cpu().double(), want) and torch.equal(arg.cpu(), want_arg)  # a max is exact
    cpu_out, cpu_arg = roi_pool_cpu.roi_pool_fwd_cpu(x, rois, scale, ph, pw, True)
    assert torch.equal(out.cpu(), cpu_out) and torch.equal(arg.cpu(), cpu_arg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_low_precision_forward(name, dtype):
    # the oracle sees the same rounded inputs: the maxima are exact in the input dtype
    x, rois, scale, ph, pw = run_case(name, dtype, "ties" if dtype == torch.float16 else "randn")
    out, arg = fwd_op(x.cuda(), rois.cuda(), scale, ph, pw, True)
    want, want_arg = oracle(x, rois, scale, ph, pw)
    assert out.dtype == dtype and torch.equal(out.cpu().double(), want) and torch.equal(arg.cpu(), want_arg)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", ["two_images_7x7", "partly_outside", "degenerate", "large_bins"])
def test_backward_matches_oracle(name, deterministic):
    x, rois, scale, ph, pw = run_case(name, torch.float32, "ties")
    rois = torch.cat([rois, rois.flip(0)])  # repeated RoIs: many gradients land on one pixel
    out, arg = fwd_op(x.cuda(), rois.cuda(), scale, ph, pw, True)
    grad = torch.randn(out.shape)
    want = oracle_backward(grad, rois, arg.cpu(), x.shape)
    torch.use_deterministic_algorithms(deterministic)
    try:
        runs = [bwd_op(grad.cuda(), rois.cuda(), arg, *x.shape).cpu() for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(runs[0].double(), want, rtol=1e-5, atol=1e-6)
    if deterministic:
        assert all(torch.equal(r, runs[0]) for r in runs[1:])


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = (torch.randperm(2 * 2 * 5 * 6, generator=g).double() / 100).view(2, 2, 5, 6).cuda().requires_grad_()
    rois = torch.tensor(random_rois(2, 4, 5, 6, 0), dtype=torch.float64).cuda()
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (3, 2), 1.0), (x,))


def test_opcheck():
    x, rois, scale, ph, pw = run_case("half_points", torch.float32)
    x, rois = x.cuda().requires_grad_(), rois.cuda()
    torch.library.opcheck(fwd_op, (x, rois, scale, ph, pw, True))
    _, arg = fwd_op(x.detach(), rois, scale, ph, pw, True)
    torch.library.opcheck(bwd_op, (torch.randn(arg.shape, device="cuda"), rois, arg, *x.shape))


def test_torch_compile_inductor():
    x, rois, scale, ph, pw = run_case("two_images_7x7", torch.float32)
    x, rois = x.cuda().requires_grad_(), rois.cuda()
    fn = torch.compile(lambda t, r: roi_pool(t, r, (ph, pw), scale).square().sum(), fullgraph=True)
    (g_compiled,) = torch.autograd.grad(fn(x, rois), x)
    (g_eager,) = torch.autograd.grad(roi_pool(x, rois, (ph, pw), scale).square().sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)


def test_more_rois_than_grid_axis_1_allows():
    # 70000 RoIs > 65535: every program sits on grid axis 0
    x = torch.randn(2, 3, 10, 12)
    rois = torch.tensor(random_rois(2, 70_000, 10, 12, seed=7))
    out, arg = fwd_op(x.cuda(), rois.cuda(), 1.0, 2, 2, True)
    cpu_out, cpu_arg = roi_pool_cpu.roi_pool_fwd_cpu(x, rois, 1.0, 2, 2, True)
    assert torch.equal(out.cpu(), cpu_out) and torch.equal(arg.cpu(), cpu_arg)


def test_past_int32_offsets():
    # N*C*H*W = 3 * 2^30 > 2^31 elements (fp16, 6 GiB + a 12 GiB fp32 gradient): RoIs in the last image
    n, c, h, w = 3, 8, 16384, 8192
    if _free_bytes() < n * c * h * w * (2 + 4 + 2) + (2 << 30):
        pytest.skip("needs ~26 GiB of free GPU memory")
    x = torch.zeros((n, c, h, w), dtype=torch.float16, device="cuda")
    crop = torch.randn(1, c, 16, 16).half()
    x[2, :, h - 16 :, w - 16 :] = crop.cuda()
    local = torch.tensor([[0, 0, 0, 15, 15], [0, 3, 2, 12, 9]], dtype=torch.float16)  # in crop coordinates
    rois = local + torch.tensor([2, w - 16, h - 16, w - 16, h - 16], dtype=torch.float16)
    x.requires_grad_()
    out, arg = fwd_op(x, rois.cuda(), 1.0, 3, 3, True)
    want, want_arg = oracle(crop, local, 1.0, 3, 3)
    assert torch.equal(out.cpu().double(), want)
    to_map = (want_arg // 16 + h - 16) * w + want_arg % 16 + w - 16  # crop argmax -> flat h*W+w of the map
    assert torch.equal(arg.cpu(), to_map.int())
    grad = torch.randn(out.shape).half()
    gin = bwd_op(grad.cuda(), rois.cuda(), arg, n, c, h, w)
    want_grad = oracle_backward(grad, local, want_arg, crop.shape)
    torch.testing.assert_close(gin[2:, :, h - 16 :, w - 16 :].cpu().double(), want_grad, rtol=2e-3, atol=2e-3)
    assert gin.float().abs().sum().item() == pytest.approx(gin[2:, :, h - 16 :, w - 16 :].float().abs().sum().item())


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_smooth_l1_matches_torch(reduction):
    x, y, w = torch.randn(128, 84, device="cuda") * 2, torch.randn(128, 84, device="cuda"), torch.rand(128, 84, device="cuda")
    xr = x.clone().requires_grad_()
    loss = smooth_l1_loss(xr, y, beta=1 / 9, reduction=reduction, weight=w)
    gout = torch.randn(loss.shape, device="cuda")
    (gx,) = torch.autograd.grad(loss, xr, gout)
    x2 = x.clone().requires_grad_()
    ref_el = F.smooth_l1_loss(x2, y, reduction="none", beta=1 / 9) * w
    ref = {"none": ref_el, "mean": ref_el.mean(), "sum": ref_el.sum()}[reduction]
    (ref_gx,) = torch.autograd.grad(ref, x2, gout)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)


def _cuda_kernels(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_smooth_l1_one_launch_each_way():
    x = torch.randn(128, 84, device="cuda", requires_grad=True)
    y, w, gout = torch.randn(128, 84, device="cuda"), torch.rand(128, 84, device="cuda"), torch.ones((), device="cuda")
    smooth_l1_loss(x, y, beta=1.0, reduction="sum", weight=w).backward()  # compile the kernels first
    box = {}
    fwd = _cuda_kernels(lambda: box.setdefault("loss", smooth_l1_loss(x, y, beta=1.0, reduction="sum", weight=w)))
    bwd = _cuda_kernels(lambda: torch.autograd.grad(box["loss"], x, gout))
    assert len(fwd) == 1 and len(bwd) == 1, (fwd, bwd)
