"""RoI max pooling at the paper's VGG16 shapes: ours (Triton on CUDA, the vectorised path on CPU), a plain
PyTorch baseline, and torchvision.ops.roi_pool when torchvision is importable (it is not a dependency).

Cases (paper §2, FR config.py): a 600 x 1000 image gives a 38 x 63 conv5 map at 1/16, C = 512, 7 x 7 bins.
    test  fwd      N=1, 38x63, K=2000 proposals, no gradient (our forward then writes no argmax)
    test  fwd+bwd  the same shape with a gradient (what a CPU training run on full-size images pays)
    train fwd+bwd  N=2, 38x50 (600 x 800 images), K=128 RoIs
Providers: ours (Triton on CUDA, the range-max path on CPU), ours under torch.use_deterministic_algorithms(True)
("-determ": the plane-owner backward on CUDA; the CPU path is deterministic anyway), a plain PyTorch baseline,
and torchvision.ops.roi_pool when torchvision is importable (it is not a dependency). On a CPU the providers of
a case run interleaved, round after round, so that the drift of a shared machine's speed hits all of them;
"x ours" is the median over rounds of (provider time / ours in the same round), and the CPU cases run with 1
thread and with torch's default thread count.
Proposals are uniform random boxes inside the map, the same seed for every provider. "same" is the fraction
of outputs equal to ours: 1 for torchvision (same semantics); the baseline's adaptive pool computes its bins
in exact integers, where the reference's fp32 bin math sometimes reaches one cell further (7 * fl(57/7) > 57).
GB/s counts the bytes a provider must move at least: fwd = input + output; fwd+bwd adds the int32 argmax
(written and read), the output gradient (read) and the input gradient (written). On CUDA, "x floor" is the time
over those bytes at the measured device copy bandwidth.

    python bench/bench_roi_pool.py              # CPU (1 thread, then default threads), CUDA too when present (~3 min)
    python bench/bench_roi_pool.py --threads=1  # CPU with 1 thread only
    python bench/bench_roi_pool.py --device=cuda --out=DIR   # CUDA only, results in DIR (bench/gpu_check.py)
    python bench/bench_roi_pool.py --device=cpu --tiny       # tiny shapes, a few seconds: a smoke run
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `python bench/...` finds bench/, kernels/
from bench.common import (  # noqa: E402
    QUANTILES, add_options, cpu_threads, pick_devices, print_header, save_results, time_interleaved,
)
from detector.plots import plt  # noqa: E402
from kernels.roi_pool import roi_pool  # noqa: E402

try:
    import torchvision
except ImportError:  # not a dependency: compared with only where it is installed
    torchvision = None

SHAPES = {  # name: (N, C, H, W, K, image height, image width)
    "test": (1, 512, 38, 63, 2000, 600, 1000),
    "train": (2, 512, 38, 50, 128, 600, 800),
}
TINY_SHAPES = {  # --tiny: the same cases at a few channels and a 160 x 192 image (10 x 12 map)
    "test": (1, 16, 10, 12, 40, 160, 192),
    "train": (2, 16, 10, 12, 16, 160, 192),
}
CASES = [("test", False), ("test", True), ("train", True)]  # (shape, with gradient)
SCALE, POOL = 1 / 16, 7  # VGG16 conv5 stride, pool5 size


def baseline_roi_pool(x, rois, output_size, spatial_scale):
    """The obvious PyTorch version: per RoI, crop the rounded box from the map and adaptive-max-pool it."""
    out = []
    for b, x1, y1, x2, y2 in rois.tolist():
        sw, sh, ew, eh = (int(v * spatial_scale + 0.5) for v in (x1, y1, x2, y2))  # boxes are >= 0 here
        out.append(F.adaptive_max_pool2d(x[int(b), :, sh : eh + 1, sw : ew + 1], output_size))
    return torch.stack(out)


def make_inputs(shape, device):
    n, c, h, w, k, _, _ = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    # corners up to the last map cell's centre, so that round(x / 16) stays inside the map (see the docstring)
    corners = torch.rand(k, 2, 2, generator=g) * torch.tensor([(w - 1) / SCALE, (h - 1) / SCALE])
    b = torch.randint(0, n, (k, 1), generator=g).float()
    rois = torch.cat([b, corners.min(1).values, corners.max(1).values], 1)
    return x.to(device), rois.to(device)


def copy_bandwidth(device):
    """Device copy bandwidth in bytes/s (read + write of a 256 MiB buffer); None on CPU."""
    if device != "cuda":
        return None
    src = torch.empty(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=QUANTILES)[0]
    return 2 * src.numel() * 4 / (ms * 1e-3)


def deterministic_roi_pool(x, rois, output_size, spatial_scale):
    """Ours under torch.use_deterministic_algorithms(True): the plane-owner backward on CUDA (the CPU path is
    deterministic anyway). The flag is read when the backward runs: the step sets it around fwd + bwd."""
    return roi_pool(x, rois, output_size, spatial_scale)


def deterministic(step):
    def run():
        torch.use_deterministic_algorithms(True)
        try:
            return step()
        finally:
            torch.use_deterministic_algorithms(False)

    return run


def providers(device):
    ours = "triton" if device == "cuda" else "ours-cpu"
    found = {ours: roi_pool, f"{ours}-determ": deterministic_roi_pool, "torch-baseline": baseline_roi_pool}
    if torchvision is not None:
        found["torchvision"] = torchvision.ops.roi_pool
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter is for tests, not timings")
    devices = pick_devices(args.device, ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    shapes = TINY_SHAPES if args.tiny else SHAPES
    # CPU: rounds of every provider until 15 rounds or 20 s (at least 3: the baseline takes seconds a call)
    repeats, budget_s = (3, 0.0) if args.tiny else (15, 20.0)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    tv = torchvision.__version__ if torchvision is not None else "not installed"
    title = (f"roi_pool | {gpu} | torch {torch.__version__} | triton {triton.__version__} | torchvision {tv} | "
             f"CPU default threads {torch.get_num_threads()}")  # fmt: skip
    print(title)
    rows = []
    for device in devices:
        bandwidth = copy_bandwidth(device)
        for threads in cpu_threads(args.threads, device):
            for shape_name, train in CASES:
                rows += bench_case(device, threads, shape_name, shapes[shape_name], train, bandwidth, repeats,
                                   budget_s, title)
    save_results(rows, "roi_pool", lambda rows: plot(rows, title), args.out)


def bench_case(device, threads, shape_name, shape, train, bandwidth, repeats, budget_s, title) -> list[dict]:
    """One table: every provider on one shape, forward or forward + backward, timed interleaved."""
    n, c, h, w, k, _, _ = shape
    mode = "fwd+bwd" if train else "fwd"
    where = f"{device}, {threads} thread(s)" if threads else device
    print(f"\n{shape_name} {mode}: N={n} C={c} {h}x{w} K={k} {POOL}x{POOL} | {where}")
    header = ["provider", "ms", "20%", "80%", "x ours", "GB/s", "x floor", "same"]
    widths = [17, 10, 10, 10, 8, 8, 8, 9]
    print_header(header, widths)
    x, rois = make_inputs(shape, device)
    x.requires_grad_(train)
    grad = torch.randn(k, c, POOL, POOL, device=device)
    elem = x.element_size()
    outputs = k * c * POOL * POOL
    nbytes = (n * c * h * w + outputs) * elem
    if train:  # + argmax written and read, output gradient read, input gradient written
        nbytes += 2 * outputs * 4 + outputs * elem + n * c * h * w * elem
    steps, same, reference = {}, {}, None
    for provider, fn in providers(device).items():

        def step(fn=fn):
            if not train:
                with torch.no_grad():
                    return fn(x, rois, POOL, SCALE)
            x.grad = None
            out = fn(x, rois, POOL, SCALE)
            out.backward(grad)
            return out

        steps[provider] = deterministic(step) if fn is deterministic_roi_pool else step
        result = steps[provider]().detach()
        reference = result if reference is None else reference
        same[provider] = (result == reference).double().mean().item()  # fraction of outputs equal to ours
    ours = next(iter(steps))
    timed = time_interleaved(steps, device, ours, repeats, budget_s)
    rows = []
    for provider, t in timed.items():
        ms, lo, hi = t["ms"]
        gbps = nbytes / (ms * 1e-3) / 1e9
        floor = f"{ms * 1e-3 / (nbytes / bandwidth):.2f}" if bandwidth else "n/a"
        rows.append(dict(title=title, shape=shape_name, mode=mode, device=device, threads=threads or "",
                         provider=provider, ms=ms, ms_20=lo, ms_80=hi, x_ours=t["ratio"], runs=t["runs"],
                         gbps=gbps, x_floor=floor, same=same[provider]))  # fmt: skip
        print(f"{provider:>17} {ms:10.3f} {lo:10.3f} {hi:10.3f} {t['ratio']:8.2f} {gbps:8.2f} {floor:>8} "
              f"{same[provider]:9.6f}")  # fmt: skip
    return rows


def plot(rows: list[dict], title: str):
    def group(r):
        return (r["shape"], r["mode"], r["device"], str(r["threads"]))

    groups = list(dict.fromkeys(group(r) for r in rows))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(9, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        for j, g in enumerate(groups):
            sel = [r for r in rows if group(r) == g and r["provider"] == name]
            if sel:
                r = sel[0]  # median bar, 20-80% whiskers
                err = [[r["ms"] - r["ms_20"]], [r["ms_80"] - r["ms"]]]
                ax.bar(j + i * width, r["ms"], width, yerr=err, color=f"C{i}", label=name if j == 0 else None)
    labels = [f"{s} {m}\n{d}" + (f" {t} thr" if t else "") for s, m, d, t in groups]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], labels, fontsize=8)
    ax.set(yscale="log", ylabel="ms (median, 20-80%)")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
