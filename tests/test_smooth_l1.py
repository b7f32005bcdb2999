"""Fused smooth-L1 vs a float64 loop oracle and F.smooth_l1_loss: values, grads, packaging, cubins."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from kernels.smooth_l1 import (
    _ELEMENTWISE_BLOCK,
    _ELEMENTWISE_WARPS,
    _REDUCE_BLOCK,
    _REDUCE_WARPS,
    _fwd_triton,
    _smooth_l1_bwd_kernel,
    _smooth_l1_fwd_kernel,
    _smooth_l1_torch,
    smooth_l1_loss,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the run of tests/test_interpreter.py
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BETAS = [0.0, 1 / 9, 1.0, 2.5]  # L1, torchvision's box head, the paper / Caffe, a wide quadratic zone
REDUCTIONS = ["none", "mean", "sum"]
SHAPES = [
    (1,),  # a single element
    (7, 13),  # odd sizes: partial blocks
    (128, 84),  # a Fast R-CNN minibatch: R = 128 RoIs x 4 * 21 classes (single-program reduction)
    (20011,),  # prime, > 16384: partial sums + a second stage (reductions only: slow when interpreted)
]
CASES = [
    (shape, beta, reduction, weight, device)
    for shape in SHAPES
    for beta in BETAS
    for reduction in REDUCTIONS
    for weight in [None, "binary", "general"]
    for device in DEVICES
    if not (shape == (20011,) and reduction == "none")
]


def _oracle(x, y, beta, reduction, w=None):
    """Float64 loop over elements: (loss, d loss / d input) written from the formula, not from torch."""
    xs, ys = x.double().flatten().tolist(), y.double().flatten().tolist()
    ws = [1.0] * len(xs) if w is None else w.double().flatten().tolist()
    losses, grads = [], []
    for xi, yi, wi in zip(xs, ys, ws):
        d = xi - yi
        if abs(d) < beta:
            f, g = 0.5 * d * d / beta, d / beta
        else:
            f, g = abs(d) - 0.5 * beta, float((d > 0) - (d < 0))
        losses.append(wi * f)
        grads.append(wi * g)
    grad = torch.tensor(grads, dtype=torch.float64).view(x.shape)
    if reduction == "none":
        return torch.tensor(losses, dtype=torch.float64).view(x.shape), grad
    scale = 1.0 / len(xs) if reduction == "mean" else 1.0
    return torch.tensor(math.fsum(losses) * scale, dtype=torch.float64), grad * scale


def _make_weight(kind, shape, device, dtype=torch.float32):
    if kind is None:
        return None
    if kind == "binary":  # the paper's 0/1 loss weights
        return (torch.rand(shape) < 0.3).to(device=device, dtype=dtype)
    return (torch.rand(shape) * 2).to(device=device, dtype=dtype)  # general weights


def _loss_and_grads(x, y, beta, reduction, w, gout):
    """Our loss and its gradients w.r.t. input and target for an upstream gradient gout."""
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    loss = smooth_l1_loss(x, y, beta=beta, reduction=reduction, weight=w)
    gx, gy = torch.autograd.grad(loss, (x, y), gout)
    return loss.detach(), gx, gy


@pytest.mark.parametrize("shape, beta, reduction, weight, device", CASES)
def test_matches_oracle_and_torch(shape, beta, reduction, weight, device):
    x = (torch.randn(shape) * 2).to(device)  # |d| spans both branches for every beta
    y = torch.randn(shape).to(device)
    w = _make_weight(weight, shape, device)
    gout = torch.randn(shape if reduction == "none" else ()).to(device)  # scaling by a non-1 upstream grad
    loss, gx, gy = _loss_and_grads(x, y, beta, reduction, w, gout)

    want_loss, want_grad = _oracle(x.cpu(), y.cpu(), beta, reduction, None if w is None else w.cpu())
    want_gx = want_grad * gout.cpu().double()
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.cpu().double(), want_gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gy.cpu().double(), -want_gx, rtol=1e-5, atol=1e-7)
    assert loss.dtype == x.dtype and gx.shape == x.shape

    if w is None:  # also PyTorch's own op, values and both gradients
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        ref = F.smooth_l1_loss(xr, yr, reduction=reduction, beta=beta)
        ref_gx, ref_gy = torch.autograd.grad(ref, (xr, yr), gout)
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(gx, ref_gx)
        torch.testing.assert_close(gy, ref_gy)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous(reduction):
    # a transposed input, a strided target and a sliced weight
    x = (torch.randn(13, 9) * 2).t()
    y = torch.randn(9, 26)[:, ::2]
    w = torch.rand(9, 13, 2)[..., 1]
    assert not (x.is_contiguous() or y.is_contiguous() or w.is_contiguous())
    gout = torch.randn(x.shape if reduction == "none" else ())
    loss, gx, gy = _loss_and_grads(x, y, 1 / 9, reduction, w, gout)
    want_loss, want_grad = _oracle(x, y, 1 / 9, reduction, w)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), want_grad * gout.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gy, -gx)


@pytest.mark.parametrize("beta", [1.0, 2.5])  # exactly representable: |d| == beta is hit exactly
def test_values_at_the_switch_point(beta):
    x = torch.tensor([-beta, beta, -0.5 * beta, 0.0, 3 * beta])
    y = torch.zeros(5)
    loss, gx, gy = _loss_and_grads(x, y, beta, "none", None, torch.ones(5))
    # |d| == beta takes the linear branch: |d| - beta/2 = beta/2, slope sign(d); d = 0 has slope 0
    want_loss = torch.tensor([0.5 * beta, 0.5 * beta, 0.125 * beta, 0.0, 2.5 * beta])
    want_gx = torch.tensor([-1.0, 1.0, -0.5, 0.0, 1.0])
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=0)
    torch.testing.assert_close(gy, -want_gx, rtol=0, atol=0)
    xr = x.clone().requires_grad_()
    (ref_gx,) = torch.autograd.grad(F.smooth_l1_loss(xr, y, reduction="sum", beta=beta), xr)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=0)


def test_l1_at_zero_difference():
    # beta = 0 is L1; its subgradient at d = 0 is 0, as in F.l1_loss
    x = torch.tensor([0.0, 1.0, -2.0])
    loss, gx, _ = _loss_and_grads(x, torch.zeros(3), 0.0, "sum", None, torch.tensor(1.0))
    assert loss.item() == 3.0
    torch.testing.assert_close(gx, torch.tensor([0.0, 1.0, -1.0]), rtol=0, atol=0)


def test_fast_rcnn_box_loss():
    # paper §2.3 / Caffe: sum over foreground RoIs' true-class coordinates, divided by R (not by #fg);
    # the independent form is torchvision's fastrcnn_loss: gather those entries, F.smooth_l1_loss "sum", / R
    num_rois, num_classes = 128, 21
    labels = torch.randint(0, num_classes, (num_rois,))
    labels[96:] = 0  # background RoIs
    pred, target = torch.randn(num_rois, 4 * num_classes), torch.randn(num_rois, 4 * num_classes) * 0.3
    weight = torch.zeros(num_rois, num_classes, 4)
    weight[labels > 0, labels[labels > 0]] = 1.0
    weight = weight.view(num_rois, 4 * num_classes)  # (R, 4 * C)

    pred.requires_grad_()
    loss = smooth_l1_loss(pred, target, beta=1.0, reduction="sum", weight=weight) / num_rois
    (grad,) = torch.autograd.grad(loss, pred)

    fg = torch.nonzero(labels > 0).squeeze(1)
    cols = 4 * labels[fg, None] + torch.arange(4)  # (num_fg, 4)
    pred_ref = pred.detach().clone().requires_grad_()
    ref = F.smooth_l1_loss(pred_ref[fg[:, None], cols], target[fg[:, None], cols], beta=1.0, reduction="sum")
    ref = ref / num_rois
    (ref_grad,) = torch.autograd.grad(ref, pred_ref)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


DTYPES = [(torch.float16, 4e-3, 4e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])  # fmt: skip
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision(reduction, dtype, rtol, atol, device):
    # math in fp32, output in the input dtype; the oracle sees the same rounded inputs
    x, y = (torch.randn(37, 84) * 2).to(device, dtype), torch.randn(37, 84).to(device, dtype)
    w = _make_weight("binary", (37, 84), device, dtype)
    gout = torch.rand(x.shape if reduction == "none" else ()).to(device, dtype)
    loss, gx, gy = _loss_and_grads(x, y, 1 / 9, reduction, w, gout)
    want_loss, want_grad = _oracle(x.cpu(), y.cpu(), 1 / 9, reduction, w.cpu())
    assert loss.dtype == dtype and gx.dtype == dtype
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx.cpu().double(), want_grad * gout.cpu().double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(gy, -gx)


TRITON_RUNS = INTERPRET or torch.cuda.is_available()


@pytest.mark.skipif(not TRITON_RUNS, reason="the Triton path needs CUDA or the interpreter")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", [5, 10752, 20011])  # single program with 1 and 3 blocks; partial sums
def test_triton_matches_torch_path(n, reduction):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = torch.randn(n, device=device) * 2, torch.randn(n, device=device)
    w = torch.rand(n, device=device)
    loss, grad = _fwd_triton(x, y, w, 1 / 9, reduction, True)
    want_loss, want_grad = _smooth_l1_torch(x, y, w, 1 / 9, reduction, True)
    torch.testing.assert_close(loss, want_loss, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_deterministic(reduction):
    x, y, w = torch.randn(20011) * 2, torch.randn(20011), torch.rand(20011)
    gout = torch.ones(20011) if reduction == "none" else torch.tensor(1.0)
    first = _loss_and_grads(x, y, 1.0, reduction, w, gout)
    again = _loss_and_grads(x, y, 1.0, reduction, w, gout)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0,), (0, 84)])
def test_empty_input(shape, reduction):
    # follows F.smooth_l1_loss: mean of nothing is nan, sum is 0, "none" is empty
    x, y = torch.randn(shape, requires_grad=True), torch.randn(shape)
    loss = smooth_l1_loss(x, y, reduction=reduction)
    ref = F.smooth_l1_loss(x, y, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    assert gx.shape == x.shape


def test_only_one_side_requires_grad_and_no_grad():
    x, y = torch.randn(7, 13) * 2, torch.randn(7, 13)
    with torch.no_grad():  # inference: the kernel skips the gradient store
        plain = smooth_l1_loss(x, y, beta=1 / 9)
    yr = y.clone().requires_grad_()  # target-only gradient
    loss = smooth_l1_loss(x, yr, beta=1 / 9)
    (gy,) = torch.autograd.grad(loss, yr)
    _, want_grad = _oracle(x, y, 1 / 9, "mean")
    torch.testing.assert_close(plain, loss.detach())
    torch.testing.assert_close(gy.double(), -want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("weight", [None, "general"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck(beta, reduction, weight):
    x = (torch.randn(3, 5, dtype=torch.float64) * 2).requires_grad_()
    y = torch.randn(3, 5, dtype=torch.float64).requires_grad_()
    w = _make_weight(weight, (3, 5), "cpu", torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: smooth_l1_loss(a, b, beta, reduction, w), (x, y))


@pytest.mark.parametrize("weight", [None, "binary"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(reduction, weight):
    x, y = torch.randn(7, 13, requires_grad=True), torch.randn(7, 13, requires_grad=True)
    w = _make_weight(weight, (7, 13), "cpu")
    torch.library.opcheck(torch.ops.frcnn.smooth_l1_fwd.default, (x, y, w, 1 / 9, reduction, True))
    gout = torch.randn(x.shape if reduction == "none" else ())
    bwd_args = (torch.randn(7, 13), gout, True, reduction != "sum")  # also with the target gradient skipped
    torch.library.opcheck(torch.ops.frcnn.smooth_l1_bwd.default, bwd_args)


def test_torch_compile():
    x, y = torch.randn(7, 13, requires_grad=True), torch.randn(7, 13)
    w = _make_weight("binary", (7, 13), "cpu")

    def box_loss(a, b, c):
        return smooth_l1_loss(a, b, beta=1 / 9, reduction="sum", weight=c)

    loss = torch.compile(box_loss, fullgraph=True)(x, y, w)
    (gx,) = torch.autograd.grad(loss, x)
    want_loss, want_grad = _oracle(x, y, 1 / 9, "sum", w)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), want_grad, rtol=1e-5, atol=1e-7)


def _bad_inputs():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    return [
        (dict(input=x, target=torch.randn(4, 3)), "target shape"),
        (dict(input=x, target=y, beta=-0.1), "beta"),
        (dict(input=x, target=y, beta=float("nan")), "beta"),
        (dict(input=x, target=y, reduction="avg"), "reduction"),
        (dict(input=x, target=y, weight=torch.ones(3)), "weight shape"),
        (dict(input=x, target=y.double()), "target dtype"),
        (dict(input=x, target=y, weight=torch.ones(3, 4, dtype=torch.float16)), "weight dtype"),
        (dict(input=x, target=torch.empty(3, 4, device="meta")), "target device"),
        (dict(input=x.long(), target=y.long()), "input dtype"),
        (dict(input=x, target=y, weight=torch.ones(3, 4, requires_grad=True)), "weight gets no gradient"),
    ]


@pytest.mark.parametrize("kwargs, match", _bad_inputs())
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smooth_l1_loss(**kwargs)


# --- the kernels compile for real GPUs (no GPU needed); no register spills
def _signature(kernel, ptr: str) -> dict:
    scalars = {"n": "i32", "num_iters": "i32", "beta": "fp32", "inv_beta": "fp32", "scale": "fp32"}
    names = kernel.arg_names
    return {a: "constexpr" if a.isupper() else ptr if a.endswith("_ptr") else scalars[a] for a in names}


# the launch configurations of kernels/smooth_l1.py, every flag on: (kernel, constexprs, num_warps)
BUILDS = {
    "fwd reduce": (_smooth_l1_fwd_kernel, dict(BLOCK=_REDUCE_BLOCK, REDUCE=True), _REDUCE_WARPS),
    "fwd none": (_smooth_l1_fwd_kernel, dict(BLOCK=_ELEMENTWISE_BLOCK, REDUCE=False), _ELEMENTWISE_WARPS),
    "bwd": (_smooth_l1_bwd_kernel, dict(BLOCK=_ELEMENTWISE_BLOCK, SCALAR_GOUT=False), _ELEMENTWISE_WARPS),
}


@pytest.mark.skipif(INTERPRET, reason="the interpreter run does not compile for a GPU")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_kernels_compile_without_spills(dtype, arch):
    from cubin import compile_for_gpu

    for name, (kernel, constexprs, num_warps) in BUILDS.items():
        flags = {a: True for a in kernel.arg_names if a.isupper() and a not in constexprs}
        usage = compile_for_gpu(kernel, _signature(kernel, f"*{dtype}"), constexprs | flags, arch, num_warps)
        print(f"smooth_l1 {name} sm{arch} {dtype}: {usage['registers']} registers/thread, {num_warps} warps")
        assert usage["local"] == 0, f"{name} spills registers on sm{arch} ({usage})"
