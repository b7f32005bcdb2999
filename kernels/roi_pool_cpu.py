"""RoI max pooling on CPU tensors (the semantics of kernels/roi_pool.py): torch ops over all RoIs at once.

Forward: a range-max (sparse) table. Level (i, j) holds, at every pixel, the maximum of the 2^i x 2^j window
whose top-left corner it is; any bin is then the maximum of the four power-of-two windows at its corners
(they overlap, which a maximum does not mind). Cost ~ map size x levels + 4 rows per bin, whatever the bin
size, where torchvision's CPU loop pays the bin's area for every output.

Argmax: the reference keeps the FIRST maximum in row-major order, which is the maximum with the smallest
flat index h*W+w. So each pixel gets one int64 key, (order code of its value) << 32 | (2^31 - 2 - h*W - w):
a larger key means a larger value, or an equal value further up-left, and the table's maxima of keys carry
exact argmaxes through any overlap. Without a gradient the table holds the values themselves (half the
bytes). Channels are last, so every gathered row is a pixel's C-vector; tables are built per channel block
and bins are gathered in steps sized to stay in cache (fresh large tensors on a CPU cost page faults). Each
step's keys are decoded into two small reused buffers and written out as batches of small transposes.

Backward: one scatter-add of every output gradient at its argmax into a flat gradient buffer, RoI chunks
at a time; serial, so deterministic by construction.
"""

import torch
from torch import Tensor

FLT_MAX = 3.4028234663852886e38  # the reference's scan starts at -FLT_MAX, for every dtype
_TABLE_BUDGET = 1 << 19  # elements of the range-max table (4 MiB of int64 keys): more -> channel blocks
_STEP_BUDGET = 1 << 16  # elements gathered per step (512 KiB of keys): the temporaries stay in cache
# key low word = _LOW - h*W - w; _LOW + 1 (argmax -1) marks values <= -FLT_MAX and empty bins. All of them fit a
# non-negative int32, so argmax = _LOW - low word is int32 arithmetic without overflow.
_LOW = 2**31 - 2
_LOW_INT32 = torch.tensor(_LOW, dtype=torch.int32)


def round_half_away(x: Tensor) -> Tensor:
    """C round(): halves away from zero (torch.round and Python round() send halves to even).

    Computed as floor(|x|) + (frac >= 0.5) with the sign put back; floor(x + 0.5) would be wrong in fp32,
    where 0.49999997 + 0.5 rounds up to 1.0.

    Args:
        x: floating tensor of any shape.
    Returns:
        x rounded to integral values, same shape and dtype.
    """
    a = x.abs()
    r = a.floor()
    r = torch.where(a - r >= 0.5, r + 1, r)
    return torch.where(x < 0, -r, r)


def _bin_bounds(rois: Tensor, scale: float, ph: int, pw: int, h: int, w: int):
    """Clipped bin edges, the kernel's fp32 math in torch: hs, he (K, PH) and ws, we (K, PW), int64."""
    v = rois[:, 1:].float() * torch.tensor(scale, dtype=torch.float32)  # (K, 4) x1, y1, x2, y2 scaled
    sw, sh, ew, eh = round_half_away(v).long().unbind(1)
    bin_w = (ew - sw + 1).clamp(min=1).float() / pw
    bin_h = (eh - sh + 1).clamp(min=1).float() / ph

    def edges(bin_size, start, p, size):
        i = torch.arange(p, dtype=torch.float32)
        lo = (i * bin_size[:, None]).floor().long() + start[:, None]
        hi = ((i + 1) * bin_size[:, None]).ceil().long() + start[:, None]
        return lo.clamp(0, size), hi.clamp(0, size)

    return (*edges(bin_h, sh, ph, h), *edges(bin_w, sw, pw, w))


def _codes(xs: Tensor, merge_neg_zero: bool) -> tuple[Tensor, Tensor | None, int]:
    """Order codes of a map block (monotone in the value), the value of each code, and the code of 0.0.

    fp32: the bits made monotone as signed int32 (fp16/bf16 arrive widened to fp32, exactly); merge_neg_zero
    adds 0.0 first, which turns -0.0 into 0.0 (the reference's '>' ties them; only needed when the map has a
    -0.0). float64 values are ranked instead (torch.unique, which ties -0.0 with 0.0), and values holds the
    distinct values indexed by code plus a trailing 0.0.
    """
    if xs.dtype == torch.float64:
        values, code = torch.unique(xs, sorted=True, return_inverse=True)
        return code, torch.cat([values, values.new_zeros(1)]), values.numel()
    bits = (xs + 0.0 if merge_neg_zero else xs).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF), None, 0  # flip the magnitude bits of negatives


def _decode(key: Tensor, values: Tensor | None, out: Tensor, argmax: Tensor) -> None:
    """Write the maxima and argmaxes that table keys (int64) hold into out (fp32/fp64) and argmax (int32),
    contiguous buffers of the keys' shape.

    The low word is read in place as the int32 half of each key (little-endian: it comes first), so that the
    argmax is one int32 subtraction.
    """
    torch.sub(_LOW_INT32, key.view(torch.int32).view(*key.shape, 2)[..., 0], out=argmax)
    code = (key >> 32).to(torch.int32)
    if values is not None:
        torch.index_select(values, 0, code.view(-1), out=out.view(-1))
    else:
        torch.bitwise_xor(code, (code >> 31) & 0x7FFFFFFF, out=out.view(torch.int32))


def _build_table(rows: Tensor, levels_h: int, levels_w: int, shape) -> None:
    """Fill levels (i, j) != (0, 0) of rows, (levels_h*levels_w*N*H*W + 1, C): row (i, j, n, h, w) becomes
    the max over the 2^i x 2^j window at (h, w) of image n (level (0, 0), the map, is already there)."""
    n, h, w, c = shape
    tab = rows[:-1].view(levels_h, levels_w, n, h, w, c)
    for i in range(levels_h):
        for j in range(levels_w):
            if i == j == 0:
                continue
            # double the windows of the level above (downwards) or of the level to the left (rightwards);
            # windows that would pass the map's end are left unwritten: no bin reads them
            src, dim, s = ((i - 1, 0), 1, 2 ** (i - 1)) if j == 0 else ((i, j - 1), 2, 2 ** (j - 1))
            m = (h, w)[dim - 1] - s
            torch.maximum(
                tab[src].narrow(dim, 0, m), tab[src].narrow(dim, s, m), out=tab[i, j].narrow(dim, 0, m)
            )


def roi_pool_fwd_cpu(x: Tensor, rois: Tensor, scale: float, ph: int, pw: int, need_argmax: bool):
    """Pooled maxima and argmaxes, as the Triton forward returns them (checked arguments, CPU tensors).

    Args:
        x: (N, C, H, W) feature map; rois: (K, 5) rows of (batch_index, x1, y1, x2, y2).
        scale: image pixels -> feature cells; ph, pw: pooled size; need_argmax: False skips the argmax.
    Returns:
        (K, C, ph, pw) maxima in x's dtype, and (K, C, ph, pw) int32 argmaxes (or an empty (0,) tensor).
    """
    (n, c, h, w), k = x.shape, rois.shape[0]
    argmax_shape = (k, c, ph, pw) if need_argmax else (0,)
    if k == 0 or c * h * w == 0:  # no RoI, or every bin empty
        return x.new_zeros((k, c, ph, pw)), torch.full(argmax_shape, -1, dtype=torch.int32)
    hs, he, ws, we = _bin_bounds(rois, scale, ph, pw, h, w)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32

    # --- each bin: its four corner windows (rows of the table), at level (floor log2 height, ... width)
    bh, bw = (he - hs)[:, :, None], (we - ws)[:, None, :]  # (K, PH, 1), (K, 1, PW)
    levels_h, levels_w = max(int(bh.max()).bit_length(), 1), max(int(bw.max()).bit_length(), 1)
    kh = sum(((bh >= 2**i).long() for i in range(1, levels_h)), torch.zeros_like(bh))  # floor(log2 height)
    kw = sum(((bw >= 2**i).long() for i in range(1, levels_w)), torch.zeros_like(bw))
    top, bottom = hs[:, :, None], (he[:, :, None] - 2**kh).clamp(min=0)
    left, right = ws[:, None, :], (we[:, None, :] - 2**kw).clamp(min=0)
    batch = rois[:, 0].long()
    base = ((kh * levels_w + kw) * n + batch[:, None, None]) * (h * w)  # (K, PH, PW)
    empty_row = levels_h * levels_w * n * h * w
    corners = torch.stack([base + row * w + col for row in (top, bottom) for col in (left, right)])
    corners = torch.where((bh <= 0) | (bw <= 0), empty_row, corners).view(4, -1)  # (4, K*PH*PW) table rows
    # the low word of a key: _LOW - h*W - w, so that the first pixel of equal values has the larger key
    low = (_LOW - torch.arange(h * w, dtype=torch.int64)).view(1, h, w, 1)

    # --- channel blocks: one table buffer, reused (fresh large tensors cost page faults on a CPU)
    c_step = max(1, min(c, _TABLE_BUDGET // (empty_row + 1)))
    table = torch.empty((empty_row + 1) * c_step, dtype=torch.int64 if need_argmax else acc)
    r_step = max(1, _STEP_BUDGET // (ph * pw * c_step)) * ph * pw  # bins per step: whole RoIs
    # one step's decoded results, in the gathered (bin, channel) order; reused by every step (they stay in cache)
    step_out = torch.empty(r_step * c_step, dtype=acc)
    step_arg = torch.empty(r_step * c_step if need_argmax else 0, dtype=torch.int32)
    out = torch.empty((k, c, ph, pw), dtype=x.dtype)
    argmax = torch.empty((k, c, ph, pw) if need_argmax else (0,), dtype=torch.int32)
    xf = x.to(acc)
    # Whole-map checks, once: NaN and values <= -FLT_MAX never win (the reference's scan starts at -FLT_MAX),
    # and a -0.0 ties with 0.0; both are rare, so the blocks below do the extra work only when they occur.
    never_wins = not bool((xf > -FLT_MAX).all())
    neg_zero = need_argmax and bool(((xf == 0) & xf.signbit()).any())
    for c0 in range(0, c, c_step):
        cb = min(c_step, c - c0)
        rows = table[: (empty_row + 1) * cb].view(empty_row + 1, cb)
        level0 = rows[:-1].view(-1, n, h, w, cb)[0]  # (N, H, W, cb): the map's pixels
        xs = xf[:, c0 : c0 + cb].permute(0, 2, 3, 1)  # channels last (a view)
        if never_wins:
            xs = torch.where(xs > -FLT_MAX, xs, -FLT_MAX)
        if need_argmax:
            code, values, zero_code = _codes(xs, neg_zero)
            torch.bitwise_or(code.long() << 32, low, out=level0)
            if never_wins:  # one code for all of them, and the low word of argmax -1
                level0.masked_fill_(xs <= -FLT_MAX, (int(code.min()) << 32) | (_LOW + 1))
            rows[-1] = (zero_code << 32) | (_LOW + 1)  # an empty bin: 0.0 and argmax -1, as the reference
        else:
            level0.copy_(xs)
            rows[-1] = 0
        _build_table(rows, levels_h, levels_w, (n, h, w, cb))
        for r0 in range(0, k * ph * pw, r_step):
            sel = corners[:, r0 : r0 + r_step]
            best = rows.index_select(0, sel[0])
            for i in range(1, 4):
                torch.maximum(best, rows.index_select(0, sel[i]), out=best)
            k0, kc = r0 // (ph * pw), sel.shape[1] // (ph * pw)
            # (kc * PH * PW, cb) gathered rows -> out[k0 : k0 + kc, c0 : c0 + cb]: a contiguous cb x PH*PW
            # chunk per RoI, written as a batch of small transposes
            dst = (slice(k0, k0 + kc), slice(c0, c0 + cb))
            if not need_argmax:
                out.view(k, c, ph * pw)[dst].copy_(best.view(kc, ph * pw, cb).transpose(1, 2))
                continue
            val, arg = step_out[: best.numel()].view_as(best), step_arg[: best.numel()].view_as(best)
            _decode(best, values, val, arg)
            if neg_zero:  # rare: refetch zero maxima from the map, to get the sign of the first one
                zero = (val == 0) & (arg >= 0)
                image = batch[k0 : k0 + kc].repeat_interleave(ph * pw)[:, None]
                pixel = image * (h * w) + arg.clamp(min=0).long()
                val[zero] = xs.reshape(-1, cb).gather(0, pixel)[zero]
            out.view(k, c, ph * pw)[dst].copy_(val.view(kc, ph * pw, cb).transpose(1, 2))
            argmax.view(k, c, ph * pw)[dst].copy_(arg.view(kc, ph * pw, cb).transpose(1, 2))
    return out, argmax


def roi_pool_bwd_cpu(grad: Tensor, rois: Tensor, argmax: Tensor, n: int, c: int, h: int, w: int) -> Tensor:
    """Input gradient: each output gradient added at its argmax (argmax -1 routes nothing).

    Args:
        grad: (K, C, PH, PW); rois: (K, 5); argmax: (K, C, PH, PW) int32 from the forward;
        n, c, h, w: the input's shape.
    Returns:
        (N, C, H, W) gradient in grad's dtype.
    """
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    grad_in = torch.zeros((n, c, h, w), dtype=acc)
    k = argmax.shape[0]
    if k > 0 and c > 0:
        p = argmax.shape[2] * argmax.shape[3]
        flat = grad_in.view(-1)
        # int32 plane offsets where the whole input fits: int32 + int32 then one widening is ~6x faster than
        # ATen's mixed int32 + int64 add
        index_dtype = torch.int32 if n * c * h * w < 2**31 else torch.int64
        base = ((rois[:, 0].long()[:, None] * c + torch.arange(c)) * (h * w)).to(index_dtype)[:, :, None]
        arg, g = argmax.view(k, c, p), grad.reshape(k, c, p)
        any_empty = bool((argmax < 0).any())  # empty bins (argmax -1) are rare: mask only when present
        k_step = max(1, 4 * _STEP_BUDGET // (c * p))  # RoIs per step: index and values stay in cache
        for k0 in range(0, k, k_step):
            a, src = arg[k0 : k0 + k_step], g[k0 : k0 + k_step].to(acc)
            if any_empty:  # argmax -1 routes nothing
                a, src = a.clamp(min=0), src.masked_fill(a < 0, 0)
            idx = (a + base[k0 : k0 + k_step]).long()  # flat pixels, (kc, C, PH*PW)
            flat.scatter_add_(0, idx.view(-1), src.reshape(-1))
    return grad_in.to(grad.dtype)
