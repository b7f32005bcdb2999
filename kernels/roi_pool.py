"""RoI max pooling (paper §2.1, eq. 4): Triton forward/backward kernels, custom op, public API.

Semantics are the original Caffe layer's (caffe-fast-rcnn roi_pooling_layer.cu), which torchvision's
roi_pool copies line for line. For RoI (b, x1, y1, x2, y2), scale s and output bin (ph, pw):
    sw, sh, ew, eh = round(x1*s), round(y1*s), round(x2*s), round(y2*s)  # C round(): halves AWAY from 0
    rw, rh = max(ew - sw + 1, 1), max(eh - sh + 1, 1)                    # inclusive pixels; bad box -> 1x1
    hs, he = floor(ph*rh/PH) + sh, ceil((ph+1)*rh/PH) + sh                # clipped to [0, H]; same for w
    out = max x[b, c, hs:he, ws:we];  argmax = h*W + w of its FIRST maximum in row-major order (int32)
An empty bin gives 0 and argmax -1. The box math is fp32 whatever the input dtype (CUDA's T=float). The scan
starts at -FLT_MAX with a strict >, so NaN and values <= -FLT_MAX never win: a non-empty bin holding only
those gives -FLT_MAX and argmax -1, exactly as the reference does.

Backward routes each output gradient to its argmax with an fp32 atomic add, like torchvision's CUDA kernel,
so the summation order (and the last bits of the gradient) can vary from run to run. Under
torch.use_deterministic_algorithms(True) the Triton path instead runs `_roi_pool_bwd_deterministic_kernel`:
one program owns each (image, channel) plane of the gradient and walks that image's RoIs in index order, so
every pixel's sum is taken in the same order on every run, without float atomics. Why this design: the
original Caffe backward (a gather, one thread per input pixel looping over all R RoIs) costs O(R) per pixel,
and a sort by destination followed by a segmented sum costs a sort of all K*C*PH*PW outputs; the plane
owner reads each output gradient once, like the atomic kernel, and its serial part is the image's RoI count
(64 per image in training). The CPU path is deterministic by construction (a serial scatter-add).

Devices: CUDA tensors run the Triton kernels; CPU tensors run kernels/roi_pool_cpu.py (torch ops over all
RoIs at once: a range-max table), or the Triton kernels through the interpreter when
TRITON_INTERPRET=1 is set. Outputs and argmaxes agree exactly (signed zeros included).
"""

import os

import torch
import torch.nn as nn
import triton
import triton.language as tl
from torch import Tensor

from kernels.roi_pool_cpu import FLT_MAX, roi_pool_bwd_cpu, roi_pool_fwd_cpu

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_NEG_FLT_MAX = tl.constexpr(-FLT_MAX)  # the reference's scan start, visible inside @triton.jit
_MAX_COORD = 2.0**24  # |coordinate * scale| beyond this is not an integer-exact fp32 pixel


@triton.jit
def _round_half_away(v):
    # C round(). floor(v + 0.5) would be wrong in fp32: 0.49999997 + 0.5 rounds up to 1.0
    a = tl.abs(v)
    r = tl.floor(a)
    r = tl.where(a - r >= 0.5, r + 1.0, r)
    return tl.where(v < 0, -r, r).to(tl.int32)


@triton.jit
def _roi_pool_fwd_kernel(
    # pointers
    x_ptr,  # (N, C, H, W) feature map, contiguous
    rois_ptr,  # (K, 5) rows of (batch_index, x1, y1, x2, y2), contiguous
    out_ptr,  # (K, C, PH, PW) pooled maxima
    argmax_ptr,  # (K, C, PH, PW) int32 flat h*W+w of each maximum; untouched unless WRITE_ARGMAX
    # sizes
    c,  # channels
    h,  # feature map height
    w,  # feature map width
    blocks_per_roi,  # programs per RoI: cdiv(C*PH*PW, BLOCK)
    spatial_scale,  # image pixels -> feature map cells (1/16 for VGG16 conv5)
    # meta
    PH: tl.constexpr,  # pooled height
    PW: tl.constexpr,  # pooled width
    WRITE_ARGMAX: tl.constexpr,  # False when no gradient is needed: the output is the only traffic
    BLOCK: tl.constexpr,  # outputs per program: a contiguous chunk of one RoI's C*PH*PW outputs
):
    # One program = one RoI x BLOCK consecutive outputs (channel-major, then ph, pw), so the stores are
    # contiguous; each lane scans its own bin like the reference's thread, with a loop bound shared by
    # the program (all lanes see the same box, so bin sizes differ by at most one). RoIs and their chunks
    # share grid axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop at 65535).
    pid = tl.program_id(0).to(tl.int64)  # int64: K*C*PH*PW can pass 2^31
    roi = pid // blocks_per_roi
    # --- the box, rounded the C way, in fp32 ---
    batch = tl.load(rois_ptr + roi * 5).to(tl.int64)  # (int) cast truncates, like the reference
    sw = _round_half_away(tl.load(rois_ptr + roi * 5 + 1).to(tl.float32) * spatial_scale)
    sh = _round_half_away(tl.load(rois_ptr + roi * 5 + 2).to(tl.float32) * spatial_scale)
    ew = _round_half_away(tl.load(rois_ptr + roi * 5 + 3).to(tl.float32) * spatial_scale)
    eh = _round_half_away(tl.load(rois_ptr + roi * 5 + 4).to(tl.float32) * spatial_scale)
    # IEEE division like CUDA's '/': Triton's default fp32 divide is approximate (14/7 could floor to 1)
    bin_w = tl.math.div_rn(tl.maximum(ew - sw + 1, 1).to(tl.float32), PW * 1.0)
    bin_h = tl.math.div_rn(tl.maximum(eh - sh + 1, 1).to(tl.float32), PH * 1.0)
    # --- each lane's bin, offset by the box corner and clipped to the map ---
    offs = (pid % blocks_per_roi).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < c * PH * PW
    ch = offs // (PH * PW)
    ph = (offs // PW) % PH
    pw = offs % PW
    hs = tl.minimum(tl.maximum(tl.floor(ph.to(tl.float32) * bin_h).to(tl.int32) + sh, 0), h)
    he = tl.minimum(tl.maximum(tl.ceil((ph + 1).to(tl.float32) * bin_h).to(tl.int32) + sh, 0), h)
    ws = tl.minimum(tl.maximum(tl.floor(pw.to(tl.float32) * bin_w).to(tl.int32) + sw, 0), w)
    we = tl.minimum(tl.maximum(tl.ceil((pw + 1).to(tl.float32) * bin_w).to(tl.int32) + sw, 0), w)
    bh = tl.where(valid, he - hs, 0)  # <= 0: empty bin
    bw = tl.where(valid, we - ws, 0)
    first = hs * w + ws  # flat index of the bin's top-left pixel (H*W < 2^31: checked in the launcher)
    # int64 plane offsets: N*C*H*W (and one image's C*H*W) can pass 2^31
    lane_ptr = x_ptr + (batch * c + ch) * h * w + first
    # --- row-major scan with strict >, as in the reference: ties keep the first pixel, NaN never wins ---
    acc_ty = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32  # fp16/bf16 compare in fp32
    best = tl.full([BLOCK], _NEG_FLT_MAX, acc_ty)
    best_idx = tl.full([BLOCK], -1, tl.int32)
    # while, not range(): triton 3.6's interpreter cannot take a tensor as a range() bound (it calls int()
    # on a 1-element array, an error under numpy 2.4); the compiled loop is the same scf loop either way
    max_bh, max_bw = tl.max(bh), tl.max(bw)
    dh = 0
    while dh < max_bh:
        dw = 0
        while dw < max_bw:
            inside = (dh < bh) & (dw < bw)
            v = tl.load(lane_ptr + dh * w + dw, mask=inside, other=float("-inf")).to(acc_ty)
            take = v > best
            best = tl.where(take, v, best)
            if WRITE_ARGMAX:
                best_idx = tl.where(take, first + dh * w + dw, best_idx)
            dw += 1
        dh += 1
    best = tl.where((bh <= 0) | (bw <= 0), 0.0, best)
    out_offs = roi * c * PH * PW + offs
    tl.store(out_ptr + out_offs, best.to(out_ptr.dtype.element_ty), mask=valid)
    if WRITE_ARGMAX:
        tl.store(argmax_ptr + out_offs, best_idx, mask=valid)


@triton.jit
def _roi_pool_bwd_kernel(
    # pointers
    grad_ptr,  # (K, C, PH, PW) gradient of the output, contiguous
    argmax_ptr,  # (K, C, PH, PW) int32 from the forward
    rois_ptr,  # (K, 5)
    grad_in_ptr,  # (N, C, H, W) zero-filled fp32 (fp64 for fp64 input) accumulator
    # sizes
    c,  # channels
    h,  # feature map height
    w,  # feature map width
    blocks_per_roi,  # programs per RoI: cdiv(C*PH*PW, BLOCK)
    # meta
    PHPW: tl.constexpr,  # bins per (RoI, channel)
    BLOCK: tl.constexpr,  # outputs per program, same layout as the forward
):
    pid = tl.program_id(0).to(tl.int64)
    roi = pid // blocks_per_roi
    batch = tl.load(rois_ptr + roi * 5).to(tl.int64)
    offs = (pid % blocks_per_roi).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < c * PHPW
    idx = tl.load(argmax_ptr + roi * c * PHPW + offs, mask=valid, other=-1)
    g = tl.load(grad_ptr + roi * c * PHPW + offs, mask=valid, other=0.0)
    dst = grad_in_ptr + (batch * c + offs // PHPW) * h * w + idx
    # argmax -1 (empty bin) routes nothing; overlapping bins and RoIs add into the same pixel
    tl.atomic_add(dst, g.to(grad_in_ptr.dtype.element_ty), mask=idx >= 0, sem="relaxed")


@triton.jit
def _roi_pool_bwd_deterministic_kernel(
    # pointers
    grad_ptr,  # (K, C, PH, PW) gradient of the output, contiguous
    argmax_ptr,  # (K, C, PH, PW) int32 from the forward
    order_ptr,  # (K,) RoI ids sorted by image, stable: each image's RoIs in index order
    bounds_ptr,  # (N + 1,) image n owns order[bounds[n]:bounds[n + 1]]
    grad_in_ptr,  # (N, C, H, W) zero-filled fp32 (fp64 for fp64 input), owned plane by plane
    # sizes
    c,  # channels
    h,  # feature map height
    w,  # feature map width
    # meta
    PHPW: tl.constexpr,  # bins per (RoI, channel)
    BLOCK: tl.constexpr,  # bins per step: a power of two, at most 64 (a BLOCK x BLOCK match table)
):
    # One program owns one (image, channel) plane of grad_in, so no other program writes it and no atomics
    # are needed. It walks the image's RoIs in index order and, per step, up to BLOCK bins of one RoI:
    # bins that share an argmax (overlapping bins, or a box narrower than the grid) are summed in-register
    # by the first of them in a fixed-shape reduction, then each distinct pixel gets one load-add-store.
    # The same steps in the same order on every run: bit-identical gradients.
    plane = tl.program_id(0).to(tl.int64)  # = n * C + channel; int64: N*C*H*W can pass 2^31
    n = plane // c
    ch = plane % c
    plane_ptr = grad_in_ptr + plane * h * w
    lanes = tl.arange(0, BLOCK)
    earlier = lanes[None, :] < lanes[:, None]  # (i, j): bin j comes before bin i in this step
    i = tl.load(bounds_ptr + n)
    end = tl.load(bounds_ptr + n + 1)
    # while, not range(): see _roi_pool_fwd_kernel (triton 3.6's interpreter)
    while i < end:
        roi = tl.load(order_ptr + i).to(tl.int64)
        base = (roi * c + ch) * PHPW
        p0 = 0
        while p0 < PHPW:
            valid = p0 + lanes < PHPW
            idx = tl.load(argmax_ptr + base + p0 + lanes, mask=valid, other=-1)
            g = tl.load(grad_ptr + base + p0 + lanes, mask=valid, other=0.0).to(grad_in_ptr.dtype.element_ty)
            same = (idx[:, None] == idx[None, :]) & (idx[None, :] >= 0)  # (BLOCK, BLOCK) shared argmax
            total = tl.sum(tl.where(same, g[None, :], 0.0), axis=1)  # every bin's pixel total, fixed order
            owner = (idx >= 0) & (tl.sum((same & earlier).to(tl.int32), axis=1) == 0)  # first bin per pixel
            old = tl.load(plane_ptr + idx, mask=owner, other=0.0)
            tl.store(plane_ptr + idx, old + total, mask=owner)
            # the next step may read a pixel another thread of this program just wrote
            tl.debug_barrier()
            p0 += BLOCK
        i += 1


def _settings(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for n = C*PH*PW outputs per RoI: 512-wide chunks, 4 warps (no spills on sm80/90)."""
    return min(512, triton.next_power_of_2(n)), 4


_DETERMINISTIC_BLOCK, _DETERMINISTIC_WARPS = 64, 2  # 7x7 = 49 bins in one step; a 64 x 64 match table


def _grid_1d(k: int, per_roi: int) -> tuple[int]:
    # every program on axis 0, whose limit is 2^31 - 1 (axes 1 and 2 allow only 65535)
    assert k * per_roi < 2**31, f"roi_pool: {k} RoIs x {per_roi} programs each pass CUDA's grid limit"
    return (k * per_roi,)


def _roi_pool_fwd_triton(x: Tensor, rois: Tensor, scale: float, ph: int, pw: int, need_argmax: bool):
    k, (_, c, h, w) = rois.shape[0], x.shape
    assert h * w < 2**31, "roi_pool: the argmax h*W+w is int32, so H*W must be below 2^31"
    x, rois = x.contiguous(), rois.contiguous()
    out = torch.empty((k, c, ph, pw), dtype=x.dtype, device=x.device)
    argmax = torch.empty((k, c, ph, pw) if need_argmax else (0,), dtype=torch.int32, device=x.device)
    if k == 0 or c == 0:
        return out, argmax
    block, warps = _settings(c * ph * pw)
    per_roi = triton.cdiv(c * ph * pw, block)
    _roi_pool_fwd_kernel[_grid_1d(k, per_roi)](
        x, rois, out, argmax, c, h, w, per_roi, scale, PH=ph, PW=pw, WRITE_ARGMAX=need_argmax, BLOCK=block,
        num_warps=warps,
    )  # fmt: skip
    return out, argmax


def _roi_pool_bwd_triton(
    grad: Tensor, rois: Tensor, argmax: Tensor, n: int, c: int, h: int, w: int
) -> Tensor:
    """Input gradient on the Triton path: fp32 atomics (fastest), or, when
    torch.are_deterministic_algorithms_enabled(), the plane-owner kernel (bit-identical run to run)."""
    # fp32 accumulator: fp16/bf16 atomics are slow (and fail under the interpreter); cast at the end
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    grad_in = torch.zeros((n, c, h, w), dtype=acc, device=grad.device)
    k, phpw = argmax.shape[0], argmax.shape[2] * argmax.shape[3] if argmax.dim() == 4 else 0
    if k == 0 or c == 0 or phpw == 0:
        return grad_in.to(grad.dtype)
    grad = grad.contiguous()
    if torch.are_deterministic_algorithms_enabled():
        batch = rois[:, 0].long()  # the forward checked 0 <= batch < N
        order = torch.sort(batch, stable=True).indices  # each image's RoIs, in index order
        bounds = torch.zeros(n + 1, dtype=torch.int64, device=grad.device)
        bounds[1:] = torch.bincount(batch, minlength=n).cumsum(0)  # integer counts: exact on any device
        assert n * c < 2**31, "roi_pool: N*C planes pass CUDA's grid limit"
        block = min(_DETERMINISTIC_BLOCK, triton.next_power_of_2(phpw))
        _roi_pool_bwd_deterministic_kernel[(n * c,)](
            grad, argmax, order, bounds, grad_in, c, h, w, PHPW=phpw, BLOCK=block,
            num_warps=_DETERMINISTIC_WARPS,
        )  # fmt: skip
    else:
        block, warps = _settings(c * phpw)
        per_roi = triton.cdiv(c * phpw, block)
        _roi_pool_bwd_kernel[_grid_1d(k, per_roi)](
            grad, argmax, rois.contiguous(), grad_in, c, h, w, per_roi, PHPW=phpw, BLOCK=block,
            num_warps=warps,
        )  # fmt: skip
    return grad_in.to(grad.dtype)


def _use_triton(x: Tensor) -> bool:
    return x.is_cuda or (_INTERPRET and x.device.type == "cpu")


def _check_roi_values(rois: Tensor, n: int, scale: float) -> None:
    """Batch indices in [0, N) and finite, fp32-exact coordinates; one host sync for all of them."""
    if rois.shape[0] == 0:
        return
    bad_batch = ~((rois[:, 0] >= 0) & (rois[:, 0] < n))  # also catches NaN
    not_finite = ~torch.isfinite(rois[:, 1:]).all(1)
    too_far = ~((rois[:, 1:].double() * scale).abs() < _MAX_COORD).all(1)
    flags = torch.stack([bad_batch.any(), not_finite.any(), too_far.any()]).tolist()  # the one sync
    problems = {
        "batch index": f"outside [0, N) with N={n}",
        "coordinates": "are not finite",
        "box": f"lies beyond {_MAX_COORD:.0f} feature cells (coordinate * spatial_scale)",
    }
    for flag, bad, (what, problem) in zip(flags, (bad_batch, not_finite, too_far), problems.items()):
        if flag:
            row = int(bad.nonzero()[0])  # error path only: a second sync to name the row
            raise ValueError(f"roi_pool: rois[{row}] = {rois[row].tolist()}: {what} {problem}")


@torch.library.custom_op("frcnn::roi_pool_fwd", mutates_args=())
def _roi_pool_fwd_op(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    need_argmax: bool,
) -> tuple[Tensor, Tensor]:
    _check_roi_values(rois, input.shape[0], spatial_scale)
    fwd = _roi_pool_fwd_triton if _use_triton(input) else roi_pool_fwd_cpu
    return fwd(input, rois, spatial_scale, pooled_height, pooled_width, need_argmax)


@_roi_pool_fwd_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, need_argmax):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape if need_argmax else (0,), dtype=torch.int32)


@torch.library.custom_op("frcnn::roi_pool_bwd", mutates_args=())
def _roi_pool_bwd_op(
    grad: Tensor, rois: Tensor, argmax: Tensor, batch_size: int, channels: int, height: int, width: int
) -> Tensor:
    bwd = _roi_pool_bwd_triton if _use_triton(grad) else roi_pool_bwd_cpu
    return bwd(grad, rois, argmax, batch_size, channels, height, width)


@_roi_pool_bwd_op.register_fake
def _(grad, rois, argmax, batch_size, channels, height, width):
    return grad.new_empty((batch_size, channels, height, width))


def _setup_context(ctx, inputs, output):
    input, rois = inputs[0], inputs[1]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(rois, output[1])
    ctx.input_shape = input.shape


def _backward(ctx, grad_out, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    if argmax.numel() != grad_out.numel():
        raise RuntimeError("roi_pool: the forward ran with need_argmax=False, so it cannot backpropagate")
    grad_in = torch.ops.frcnn.roi_pool_bwd(grad_out, rois, argmax, *ctx.input_shape)
    return grad_in, None, None, None, None, None


_roi_pool_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_args(input: Tensor, rois: Tensor, output_size, spatial_scale: float) -> tuple[int, int]:
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(
            f"roi_pool: input must be a 4-D [N, C, H, W] tensor, got {getattr(input, 'shape', input)}"
        )
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"roi_pool: input dtype {input.dtype} is not a float16/bfloat16/float32/float64")
    if input.device.type not in ("cpu", "cuda"):
        raise ValueError(f"roi_pool: input on {input.device}; only cpu and cuda are supported")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"roi_pool: rois must be [K, 5] (batch_index, x1, y1, x2, y2), got {list(rois.shape)}"
        )
    if rois.device != input.device:
        raise ValueError(f"roi_pool: rois on {rois.device} but input on {input.device}")
    if rois.dtype != input.dtype:
        raise ValueError(f"roi_pool: rois dtype {rois.dtype} does not match input dtype {input.dtype}")
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(f"roi_pool: output_size must be an int or (h, w) of ints >= 1, got {output_size}")
    if not spatial_scale > 0 or spatial_scale == float("inf"):
        raise ValueError(f"roi_pool: spatial_scale must be a finite number > 0, got {spatial_scale}")
    return size


def _as_rois(input: Tensor, boxes: Tensor | list[Tensor]) -> Tensor:
    """[K, 5] rois from either [K, 5] or a list of per-image [L, 4] boxes (torchvision's two formats)."""
    if isinstance(boxes, Tensor):
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(
            f"roi_pool: boxes must be a [K, 5] tensor or a list of [L, 4] tensors, got {type(boxes)}"
        )
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"roi_pool: boxes[{i}] must be an [L, 4] tensor, got {getattr(b, 'shape', b)}")
    if not boxes:
        return input.new_zeros((0, 5))
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])


def roi_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoI max pooling, a drop-in for torchvision.ops.roi_pool (same semantics, argmax kept for backward).

    Args:
        input: (N, C, H, W) feature map.
        boxes: (K, 5) rows of (batch_index, x1, y1, x2, y2) in image pixels, or a list of N (L_i, 4) boxes.
        output_size: pooled (h, w), or one int for both.
        spatial_scale: image pixels -> feature cells (1/16 for VGG16 conv5).
    Returns:
        (K, C, h, w) tensor in the input's dtype.
    """
    rois = _as_rois(input, boxes)
    ph, pw = _check_args(input, rois, output_size, spatial_scale)
    need_argmax = torch.is_grad_enabled() and input.requires_grad  # no grad: skip the argmax writes
    out, _ = torch.ops.frcnn.roi_pool_fwd(input, rois, float(spatial_scale), ph, pw, need_argmax)
    return out


class RoIPool(nn.Module):
    """`roi_pool` as a module (torchvision.ops.RoIPool)."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"
        )
