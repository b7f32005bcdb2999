"""RoI max pooling on CPU tensors (the semantics of kernels/roi_pool.py): torch ops over all RoIs at once.

Two exact forward methods, picked by a rough count of rows touched: grouped bin windows (few RoIs, training;
the only one that finds argmaxes) and a range-max table (many RoIs, test time). The backward scatters each
output gradient to its argmax with one index_add_. Outputs equal the Triton kernels' exactly, except that
where a bin's maximum is a zero and the window holds both -0.0 and +0.0 this path may return the other sign.
"""

import torch
from torch import Tensor

FLT_MAX = 3.4028234663852886e38  # the reference's scan starts at -FLT_MAX, for every dtype
_TABLE_BUDGET = 1 << 25  # elements of one range-max table (128 MiB fp32); more: channel blocks
_CPU_METHOD = None  # without argmax: None picks "table" or "windows" by cost; tests force each
_GATHER_BUDGET = 1 << 22  # elements gathered per step (16 MiB fp32): few, large ops


def _bin_bounds(rois: Tensor, scale: float, ph: int, pw: int, h: int, w: int):
    """Clipped bin edges, the kernel's fp32 math in torch: hs, he (K, PH) and ws, we (K, PW), int64."""
    v = rois[:, 1:].float() * torch.tensor(scale, dtype=torch.float32)  # (K, 4) x1, y1, x2, y2 scaled
    a = v.abs()
    r = torch.where(a - a.floor() >= 0.5, a.floor() + 1, a.floor())  # C round(): _round_half_away
    sw, sh, ew, eh = torch.where(v < 0, -r, r).long().unbind(1)
    bin_w = (ew - sw + 1).clamp(min=1).float() / pw
    bin_h = (eh - sh + 1).clamp(min=1).float() / ph

    def edges(bin_size, start, p, size):
        i = torch.arange(p, dtype=torch.float32)
        lo = (i * bin_size[:, None]).floor().long() + start[:, None]
        hi = ((i + 1) * bin_size[:, None]).ceil().long() + start[:, None]
        return lo.clamp(0, size), hi.clamp(0, size)

    return (*edges(bin_h, sh, ph, h), *edges(bin_w, sw, pw, w))


def _range_max_table(t: Tensor, levels_h: int, levels_w: int) -> Tensor:
    """(levels_h*levels_w*N*H*W + 1, C) rows: row (i, j, n, h, w) is the max of t over the 2^i x 2^j window
    at (h, w) of image n; the last row holds 0, what an empty bin reads."""
    n, h, w, c = t.shape
    rows = t.new_empty((levels_h * levels_w * n * h * w + 1, c))
    tab = rows[:-1].view(levels_h, levels_w, n, h, w, c)
    tab[0, 0], rows[-1] = t, 0  # 1 x 1 windows: the map itself
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
    return rows


def _pool_table(t: Tensor, batch: Tensor, hs, he, ws, we, emit) -> None:
    # Range-max (sparse) table: any bin is the max of the four power-of-two windows at its corners, which
    # overlap (harmless for a max). Cost ~ map size x levels + 4 rows per bin. Values only, no argmax.
    n, h, w, c = t.shape
    k, ph, pw = hs.shape[0], hs.shape[1], ws.shape[1]
    bh, bw = (he - hs)[:, :, None], (we - ws)[:, None, :]  # (K, PH, 1), (K, 1, PW)
    levels_h, levels_w = max(int(bh.max()).bit_length(), 1), max(int(bw.max()).bit_length(), 1)
    kh = sum(((bh >= 2**i).long() for i in range(1, levels_h)), torch.zeros_like(bh))  # floor(log2 height)
    kw = sum(((bw >= 2**i).long() for i in range(1, levels_w)), torch.zeros_like(bw))
    top, bottom = hs[:, :, None], (he[:, :, None] - 2**kh).clamp(min=0)
    left, right = ws[:, None, :], (we[:, None, :] - 2**kw).clamp(min=0)
    base = ((kh * levels_w + kw) * n + batch[:, None, None]) * (h * w)  # (K, PH, PW)
    empty_row = levels_h * levels_w * n * h * w
    corners = torch.stack([base + row * w + col for row in (top, bottom) for col in (left, right)])
    corners = torch.where((bh <= 0) | (bw <= 0), empty_row, corners).view(4, -1)  # (4, K*PH*PW) table rows
    c_step = max(1, _TABLE_BUDGET // empty_row)  # channel blocks bound the table memory
    r_step = max(1, _GATHER_BUDGET // (4 * ph * pw * min(c, c_step))) * ph * pw  # whole RoIs per step
    for c0 in range(0, c, c_step):
        rows = _range_max_table(t[..., c0 : c0 + c_step], levels_h, levels_w)
        for r0 in range(0, k * ph * pw, r_step):
            sel = corners[:, r0 : r0 + r_step]
            emit(r0 // (ph * pw), c0, rows.index_select(0, sel.reshape(-1)).view(4, sel.shape[1], -1).amax(0))


def _pool_windows(t: Tensor, batch: Tensor, hs, he, ws, we, emit, need_argmax: bool) -> None:
    # Gather every bin's window, bins grouped by window shape (one gather + one amax per group and chunk).
    # Cost ~ the summed bin areas, no padding. The argmax is the first window position equal to the max.
    n, h, w, c = t.shape
    k, ph, pw = hs.shape[0], hs.shape[1], ws.shape[1]
    bh = (he - hs)[:, :, None].expand(k, ph, pw).reshape(-1)  # (K*PH*PW,)
    bw = (we - ws)[:, None, :].expand(k, ph, pw).reshape(-1)
    first = (hs[:, :, None] * w + ws[:, None, :]).reshape(-1)  # flat index of each bin's top-left pixel
    top_left = batch.repeat_interleave(ph * pw) * (h * w) + first  # its row in t
    rows = t.reshape(n * h * w, c)
    best = t.new_zeros((k * ph * pw, c))  # empty bins keep (0, -1)
    best_i = torch.full((k * ph * pw, c), -1, dtype=torch.int32) if need_argmax else None
    shapes = (bh * (w + 1) + bw)[(bh > 0) & (bw > 0)].unique().tolist()  # window shapes, one int each
    for sh, sw in (divmod(shape, w + 1) for shape in shapes):
        offs = (torch.arange(sh)[:, None] * w + torch.arange(sw)).reshape(-1)  # the window, row-major
        # area..1: the largest weight on a match is the first one (small ints: a cheap amax)
        weight = torch.arange(sh * sw, 0, -1, dtype=torch.uint8 if sh * sw < 256 else torch.int32)[:, None]
        group = ((bh == sh) & (bw == sw)).nonzero().squeeze(1)
        for part in group.split(max(1, _GATHER_BUDGET // (sh * sw * c))):
            window = (top_left[part][:, None] + offs).reshape(-1)  # (bins * sh * sw,) rows of t
            v = rows.index_select(0, window).view(len(part), sh * sw, c)
            best[part] = v.amax(1)
            if need_argmax:
                pos = sh * sw - ((v == best[part][:, None]) * weight).amax(1).long()  # first max, row-major
                best_i[part] = (first[part][:, None] + offs[pos]).int()
    emit(0, 0, best, best_i)


def roi_pool_fwd_cpu(x: Tensor, rois: Tensor, scale: float, ph: int, pw: int, need_argmax: bool):
    """Pooled maxima and argmaxes, as the Triton forward returns them (checked arguments, CPU tensors).

    Args:
        x: (N, C, H, W) feature map; rois: (K, 5) rows of (batch_index, x1, y1, x2, y2).
        scale: image pixels -> feature cells; ph, pw: pooled size; need_argmax: False skips the argmax.
    Returns:
        (K, C, ph, pw) maxima in x's dtype, and (K, C, ph, pw) int32 argmaxes (or an empty (0,) tensor).
    """
    # Channels last, so that each gathered row is a pixel's C-vector. Two exact methods, the cheaper by a
    # rough count of rows touched: bin windows for few RoIs (training; the only one that finds argmaxes)
    # and the range-max table for many (test time: 2000 proposals).
    (n, c, h, w), k = x.shape, rois.shape[0]
    argmax_shape = (k, c, ph, pw) if need_argmax else (0,)
    if k == 0 or c * h * w == 0:  # no RoI, or every bin empty
        return x.new_zeros((k, c, ph, pw)), torch.full(argmax_shape, -1, dtype=torch.int32)
    hs, he, ws, we = _bin_bounds(rois, scale, ph, pw, h, w)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(acc).permute(0, 2, 3, 1)  # (N, H, W, C)
    xs = torch.where(xs > -FLT_MAX, xs, -FLT_MAX)  # NaN and <= -FLT_MAX never win: the reference's -FLT_MAX
    out = torch.empty((k, c, ph, pw), dtype=x.dtype)
    argmax = torch.empty(argmax_shape, dtype=torch.int32)

    def emit(k0, c0, best, best_i=None):  # (kc*PH*PW, cb) results for RoIs k0.. and channels c0..
        kc, cb = best.shape[0] // (ph * pw), best.shape[1]
        out[k0 : k0 + kc, c0 : c0 + cb] = best.view(kc, ph, pw, cb).permute(0, 3, 1, 2)
        if need_argmax:  # nothing beat -FLT_MAX: argmax -1
            best_i = torch.where(best > -FLT_MAX, best_i, -1)
            argmax[k0 : k0 + kc, c0 : c0 + cb] = best_i.view(kc, ph, pw, cb).permute(0, 3, 1, 2)

    bh, bw = (he - hs).clamp(min=0), (we - ws).clamp(min=0)
    window_cost = int((bh[:, :, None] * bw[:, None, :]).sum())
    table_cost = max(int(bh.max()).bit_length(), 1) * max(int(bw.max()).bit_length(), 1) * n * h * w
    table_cost += 4 * k * ph * pw
    # (the windows' per-shape overhead only pays off on real work: small calls keep the table)
    cheaper = "windows" if window_cost < table_cost and window_cost * c > 1 << 20 else "table"
    xs, batch = xs.contiguous(), rois[:, 0].long()
    if need_argmax or (_CPU_METHOD or cheaper) == "windows":
        _pool_windows(xs, batch, hs, he, ws, we, emit, need_argmax)
    else:
        _pool_table(xs, batch, hs, he, ws, we, emit)
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
    grad_in = torch.zeros(n * c * h * w + 1, dtype=acc)  # + a bin for argmax -1 (empty bins), dropped below
    k = argmax.shape[0]
    if k > 0 and c > 0:
        plane = (rois[:, 0].long()[:, None] * c + torch.arange(c)) * (h * w)  # (K, C) start of each plane
        arg = argmax.view(k, c, -1).long()  # (K, C, PH*PW)
        idx = torch.where(arg >= 0, plane[:, :, None] + arg, n * c * h * w)
        grad_in.index_add_(0, idx.view(-1), grad.reshape(-1).to(acc))
    return grad_in[:-1].view(n, c, h, w).to(grad.dtype)
