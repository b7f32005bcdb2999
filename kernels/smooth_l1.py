"""Fused smooth-L1 loss: the loss and its gradient in one pass of one Triton kernel (paper §2.3, Eq. 3).

Math (PyTorch's form; beta = 1/sigma^2 of py-faster-rcnn, 1 in the paper and Caffe, 1/9 in torchvision):
    d     = input - target
    f(d)  = 0.5 d^2 / beta  if |d| < beta  else  |d| - 0.5 beta        (beta = 0 is plain L1)
    f'(d) = d / beta        if |d| < beta  else  sign(d)
    loss  = reduce(weight * f(d)),   d loss / d input = weight * f'(d) * scale,   d loss / d target = -that
with scale = 1/n for "mean" and 1 otherwise. `weight` holds the paper's 0/1 loss weights (background RoIs and
the other classes' coordinates switched off). Caffe computes f(w * d) and leaves w out of the backward; for
0/1 weights that is the same thing (f(0) = f'(0) = 0).

Design (the op is launch-bound at Fast R-CNN sizes: 128 RoIs x 84 = 10752 elements, 43 KB per array):
- forward, ONE launch: `_smooth_l1_fwd_kernel` reads input, target (and weight) once and writes the gradient
  the backward needs next to the loss (the "gradient in forward" pattern of Liger-Kernel).
  * "mean"/"sum", n <= 16384: a single program walks the blocks in order and reduces with tl.sum, so the
    scalar comes out of the same launch; a second launch would cost more than walking 3-4 blocks in
    sequence (an estimate: the threshold is not tuned on a GPU yet).
  * "mean"/"sum", larger n: one program per block writes a partial sum and torch.sum over the partials is
    the second stage (bandwidth-bound there, so the extra launch does not matter).
  * "none": one program per block stores the elementwise loss.
  Reduction orders are fixed and there are no float atomics, so the loss is bitwise reproducible.
- backward, one launch: `_smooth_l1_bwd_kernel` multiplies the saved gradient by grad_output, which it loads
  from device memory itself (no host sync, no .item()), and writes the input and target gradients.
- devices: CUDA tensors run the Triton kernels. CPU tensors take the torch path: eager calls are ATen's
  elementwise loss under PyTorch's autograd (`_smooth_l1_autograd`: on a CPU, fusing buys nothing and Python-side
  autograd costs more than the loss), calls through the ops (torch.compile) `_smooth_l1_torch`, the same kernels
  returning loss and gradient together. With TRITON_INTERPRET=1, fp32 CPU tensors run the
  Triton kernels in the interpreter; other dtypes keep the torch path there (the interpreter has no bf16, and
  fp64, used by gradcheck, must not be squeezed through the kernel's fp32 math). fp64 on CUDA takes the torch
  path for the same reason. Math is fp32 internally (fp64 for fp64); outputs have the input dtype.
- packaging: torch.library.custom_op ops `frcnn::smooth_l1_fwd` and `frcnn::smooth_l1_bwd` with register_fake
  and register_autograd, so torch.compile and torch.library.opcheck work, on a CPU too (triton_op needs a GPU
  driver there).
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# Decided once: triton.jit reads the same variable when it wraps the kernels at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_REDUCTIONS = ("none", "mean", "sum")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Untuned (no GPU here): 4096 fp32 = 16 per thread with 8 warps; up to 4 such blocks in one program.
_REDUCE_BLOCK, _REDUCE_WARPS, _SINGLE_PROGRAM_MAX = 4096, 8, 4 * 4096
_ELEMENTWISE_BLOCK, _ELEMENTWISE_WARPS = 1024, 4
_ATEN_SMOOTH_L1, _ATEN_L1 = torch.ops.aten.smooth_l1_loss.default, torch.ops.aten.l1_loss.default


@triton.jit
def _smooth_l1_fwd_kernel(
    # pointers
    x_ptr,  # input, n contiguous elements
    y_ptr,  # target, n elements
    w_ptr,  # weight, n elements (read only if HAS_WEIGHT)
    loss_ptr,  # REDUCE: one (partial) sum per program; else the n elementwise losses
    grad_ptr,  # d loss / d input, n elements (written only if WRITE_GRAD)
    # sizes
    n,  # number of elements
    num_iters,  # consecutive blocks each program walks through
    # scalars
    beta,  # where the quadratic part ends
    inv_beta,  # 1/beta, or 0 for beta = 0 (then the quadratic branch is never taken)
    scale,  # 1/n for "mean", else 1
    # meta
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    REDUCE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * num_iters * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # while, not range(num_iters): triton 3.6's interpreter cannot take a runtime value as a range() bound
    # (it calls int() on a 1-element array, an error under numpy 2.4); the compiled loop is the same
    i = 0
    while i < num_iters:
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # --- loss and gradient; masked lanes have d = 0, so both are 0 there for every beta >= 0
        d = x - y
        ad = tl.abs(d)
        quad = ad < beta  # never true for beta = 0: L1
        loss = tl.where(quad, 0.5 * d * d * inv_beta, ad - 0.5 * beta)
        # sign(d) that is 0 at d = 0 (the L1 subgradient torch uses) and keeps a NaN
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d))
        grad = tl.where(quad, d * inv_beta, sign)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            loss = loss * w
            grad = grad * w
        if WRITE_GRAD:
            tl.store(grad_ptr + offs, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)
        # --- reduce in registers (fixed order) or store the elementwise loss
        if REDUCE:
            acc += loss
        else:
            tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
        i += 1
    if REDUCE:
        tl.store(loss_ptr + pid, (tl.sum(acc, axis=0) * scale).to(loss_ptr.dtype.element_ty))


@triton.jit
def _smooth_l1_bwd_kernel(
    # pointers
    grad_ptr,  # saved d loss / d input, n elements
    gout_ptr,  # incoming gradient: one scalar (reduced loss) or n elements ("none")
    gx_ptr,  # out: gradient w.r.t. input, n elements
    gy_ptr,  # out: gradient w.r.t. target, n elements
    # sizes
    n,  # number of elements
    # meta
    BLOCK: tl.constexpr,
    SCALAR_GOUT: tl.constexpr,
    WRITE_X: tl.constexpr,
    WRITE_Y: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALAR_GOUT:
        gout = tl.load(gout_ptr).to(tl.float32)  # read on device: no host sync
    else:
        gout = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gx = g * gout
    if WRITE_X:
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if WRITE_Y:
        tl.store(gy_ptr + offs, (-gx).to(gy_ptr.dtype.element_ty), mask=mask)


def _settings(n: int, reduction: str) -> tuple[int, int, int, int]:
    """(BLOCK, num_warps, num_iters, num_programs) of the forward launch."""
    if reduction == "none":
        return _ELEMENTWISE_BLOCK, _ELEMENTWISE_WARPS, 1, triton.cdiv(n, _ELEMENTWISE_BLOCK)
    num_blocks = triton.cdiv(n, _REDUCE_BLOCK)
    if n <= _SINGLE_PROGRAM_MAX:
        return _REDUCE_BLOCK, _REDUCE_WARPS, num_blocks, 1
    return _REDUCE_BLOCK, _REDUCE_WARPS, 1, num_blocks


def _inv(beta: float) -> float:
    return 1.0 / beta if beta > 0 else 0.0  # no division by zero in the unused branch


def _uses_triton(x: Tensor) -> bool:
    if x.is_cuda:
        return x.dtype != torch.float64
    return _INTERPRET and x.device.type == "cpu" and x.dtype == torch.float32


def _fwd_triton(x: Tensor, y: Tensor, w: Optional[Tensor], beta: float, reduction: str, need_grad: bool):
    n = x.numel()
    block, num_warps, num_iters, num_programs = _settings(n, reduction)
    reduce = reduction != "none"
    if not reduce:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif num_programs == 1:
        out = torch.empty((), dtype=x.dtype, device=x.device)  # the final scalar
    else:
        out = torch.empty(num_programs, dtype=torch.float32, device=x.device)  # partial sums
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_grad else x.new_empty(0)
    scale = 1.0 / n if reduction == "mean" else 1.0
    _smooth_l1_fwd_kernel[(num_programs,)](
        x, y, x if w is None else w, out, grad if need_grad else x,  # unused pointers: never touched
        n, num_iters, beta, _inv(beta), scale,
        BLOCK=block, HAS_WEIGHT=w is not None, REDUCE=reduce, WRITE_GRAD=need_grad, num_warps=num_warps,
    )  # fmt: skip
    if reduce and num_programs > 1:
        out = out.sum().to(x.dtype)  # second stage: a fixed-order sum of the partials
    return out, grad


def _smooth_l1_torch(x: Tensor, y: Tensor, w: Optional[Tensor], beta: float, reduction: str, need_grad: bool):
    """The ops' torch path (torch.compile and torch.ops calls on CPU tensors, fp64 on CUDA): loss and gradient
    together from PyTorch's fused elementwise kernels.

    F.smooth_l1_loss(reduction="none") gives f(d) in one pass; aten.smooth_l1_loss_backward with the weights
    (times the mean's 1/n) as its upstream gradient gives weight * f'(d) * scale in one more; the weighted sum
    is an in-place multiply and ATen's sum. (Not torch.dot: BLAS's multi-threaded dot measured 8 ms for 128 x 84
    on 2 busy cores, its thread pool's wake-up, against microseconds for ATen's reduction.) beta = 0 (L1) keeps
    the subgradient sign(0) = 0 of F.l1_loss, which aten's backward (slope +1 at d = 0 there) does not.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype
    x, y = x.to(compute), y.to(compute)
    w = None if w is None else w.to(compute)
    scale = 1.0 / x.numel() if reduction == "mean" else 1.0  # the gradient's; the loss's is _reduce's mean
    if beta > 0:
        loss = F.smooth_l1_loss(x, y, reduction="none", beta=beta)
        grad = x.new_empty(0)
        if need_grad:
            upstream = x.new_tensor(scale).expand_as(x) if w is None else (w if scale == 1.0 else w * scale)
            grad = torch.ops.aten.smooth_l1_loss_backward(upstream, x, y, 0, beta)  # 0: reduction "none"
    else:  # L1
        d = x - y
        grad = d.sign() if need_grad else x.new_empty(0)
        if need_grad and w is not None:
            grad.mul_(w)
        if need_grad and scale != 1.0:
            grad.mul_(scale)
        loss = d.abs_()
    loss = _reduce(loss if w is None else loss.mul_(w), reduction)
    return loss.to(out_dtype), grad.to(out_dtype) if need_grad else grad


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """The reduction both torch-side paths apply to the weighted elementwise loss (ATen's sum and mean)."""
    return loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss


def _smooth_l1_autograd(x: Tensor, y: Tensor, w: Optional[Tensor], beta: float, reduction: str) -> Tensor:
    """Eager calls on the torch path (CPU tensors; fp64 on CUDA), outside torch.compile: ATen's elementwise
    loss, the weight and the reduction, differentiated by PyTorch's own autograd.

    The fused form (gradient computed in the forward) buys nothing here: on a CPU each ATen call reads and writes
    memory anyway, and at Fast R-CNN's 128 x 84 the loss is dispatch-bound, where a Python autograd.Function or
    torch.library's dispatch adds 6-100 us to a loss that costs ~40 us in C++ autograd (measured on the 2-core
    CPU, bench/RESULTS.md). Values and gradients are those of the op path (_smooth_l1_torch), the same kernels.
    """
    if x.dtype in (torch.float16, torch.bfloat16):  # fp32 math, as the kernels (a cast each: skipped otherwise)
        return _smooth_l1_autograd(x.float(), y.float(), None if w is None else w.float(), beta, reduction).to(x.dtype)
    # the ATen op itself: F.smooth_l1_loss's Python wrapper costs ~4 us a call, 10% of the whole loss here
    # (beta = 0: l1_loss, whose subgradient at 0 is 0 as F.l1_loss's; ATen's smooth-L1 backward gives 1 there)
    loss = _ATEN_SMOOTH_L1(x, y, 0, beta) if beta > 0 else _ATEN_L1(x, y, 0)  # 0: reduction "none"
    return _reduce(loss if w is None else loss * w, reduction)


@torch.library.custom_op("frcnn::smooth_l1_fwd", mutates_args=())
def _smooth_l1_fwd(
    input: Tensor, target: Tensor, weight: Optional[Tensor], beta: float, reduction: str, need_grad: bool
) -> tuple[Tensor, Tensor]:
    x, y = input.contiguous(), target.contiguous()
    w = None if weight is None else weight.contiguous()
    if x.numel() == 0:  # F.smooth_l1_loss: the mean of nothing is nan, the sum 0
        fill = {"none": None, "mean": float("nan"), "sum": 0.0}[reduction]
        loss = x.new_empty(x.shape) if fill is None else x.new_full((), fill)
        return loss, x.new_empty(x.shape if need_grad else (0,))
    if _uses_triton(x):
        return _fwd_triton(x, y, w, beta, reduction, need_grad)
    return _smooth_l1_torch(x, y, w, beta, reduction, need_grad)


@_smooth_l1_fwd.register_fake
def _(input, target, weight, beta, reduction, need_grad):
    loss = input.new_empty(input.shape if reduction == "none" else ())
    return loss, input.new_empty(input.shape if need_grad else (0,))


@torch.library.custom_op("frcnn::smooth_l1_bwd", mutates_args=())
def _smooth_l1_bwd(
    grad: Tensor, grad_output: Tensor, need_input: bool, need_target: bool
) -> tuple[Tensor, Tensor]:
    # grad_output is a 0-d tensor for "mean"/"sum" and has the input's shape for "none" (maybe expanded)
    gout = grad_output.contiguous()
    empty = grad.new_empty(0)
    gx = torch.empty_like(grad) if need_input else empty
    gy = torch.empty_like(grad) if need_target else empty
    n = grad.numel()
    if n == 0 or not (need_input or need_target):
        return gx, gy
    if _uses_triton(grad):
        _smooth_l1_bwd_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
            grad, gout, gx if need_input else grad, gy if need_target else grad, n,
            BLOCK=_ELEMENTWISE_BLOCK, SCALAR_GOUT=gout.numel() == 1,
            WRITE_X=need_input, WRITE_Y=need_target, num_warps=_ELEMENTWISE_WARPS,
        )  # fmt: skip
        return gx, gy
    scaled = grad * gout  # broadcasts a 0-d grad_output on device: no sync
    return (scaled if need_input else empty), (-scaled if need_target else empty)


@_smooth_l1_bwd.register_fake
def _(grad, grad_output, need_input, need_target):
    return tuple(grad.new_empty(grad.shape if need else (0,)) for need in (need_input, need_target))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.had_grad = inputs[5]  # need_grad
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not ctx.had_grad:
        raise RuntimeError("frcnn::smooth_l1_fwd ran with need_grad=False; call smooth_l1_loss() instead")
    gx, gy = torch.ops.frcnn.smooth_l1_bwd(grad, grad_loss, need_input, need_target)
    return (gx if need_input else None), (gy if need_target else None), None, None, None, None


_smooth_l1_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(input: Tensor, target: Tensor, beta: float, reduction: str, weight: Optional[Tensor]) -> None:
    """Raise ValueError naming the first bad argument. Every call pays this at the Fast R-CNN size, where the
    whole loss costs ~40 us on a CPU: the common case is decided by a few comparisons."""
    where = "smooth_l1_loss"
    for name, t in (("input", input), ("target", target), ("weight", weight)):
        if not isinstance(t, Tensor) and not (name == "weight" and t is None):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
    if not beta >= 0:  # also rejects nan
        raise ValueError(f"{where}: beta must be >= 0, got {beta}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    dtype, shape, device = input.dtype, input.shape, input.device
    if dtype not in _DTYPES:
        raise ValueError(f"{where}: input dtype {dtype} is not one of the supported {_DTYPES}")
    for name, t in (("target", target), ("weight", weight)):
        if t is None or (t.shape == shape and t.dtype == dtype and t.device == device):
            continue
        if t.shape != shape:
            raise ValueError(f"{where}: {name} shape {tuple(t.shape)} != input shape {tuple(shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{where}: {name} dtype {t.dtype} != input dtype {dtype}")
        raise ValueError(f"{where}: {name} device {t.device} != input device {device}")
    if weight is not None and weight.requires_grad:
        raise ValueError(f"{where}: weight gets no gradient (constant loss weights); pass weight.detach()")


def smooth_l1_loss(
    input: Tensor, target: Tensor, beta: float = 1.0, reduction: str = "mean", weight: Optional[Tensor] = None
) -> Tensor:
    """Smooth-L1 loss, fused with its gradient; equals F.smooth_l1_loss when weight is None.

    Fast R-CNN (Caffe) divides the summed box loss by the number of RoIs R, not by the element count: call
    with reduction="sum" (an exact, unnormalised sum) and divide by R yourself. Deterministic; the weight
    gets no gradient. Differentiable w.r.t. input and target (target's gradient is the negation).

    Args:
        input: (*) predicted values, fp32/fp16/bf16 (CUDA) or fp32/fp64/fp16/bf16 (CPU).
        target: (*) regression targets, same shape, dtype and device as input.
        beta: >= 0, the quadratic-to-linear switch point (paper 1, torchvision's box head 1/9; 0 is L1).
        reduction: "none" -> (*) elementwise loss, "mean" or "sum" -> a 0-d tensor.
        weight: (*) or None; multiplies the elementwise loss (and so its gradient), e.g. 0/1 loss weights.
    """
    _check(input, target, beta, reduction, weight)
    if input.numel() > 0 and not _uses_triton(input) and not torch.compiler.is_compiling():
        return _smooth_l1_autograd(input, target, weight, float(beta), reduction)
    need_grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    loss, _ = torch.ops.frcnn.smooth_l1_fwd(input, target, weight, float(beta), reduction, need_grad)
    return loss
