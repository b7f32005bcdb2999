"""RoI max pooling at the paper's VGG16 shapes: ours (Triton on CUDA, the vectorised path on CPU), a plain
PyTorch baseline, and torchvision.ops.roi_pool when torchvision is importable (it is not a dependency).

Shapes (paper §2, FR config.py): a 600 x 1000 image gives a 38 x 63 conv5 map at 1/16, C = 512, 7 x 7 bins.
    test   N=1, 38x63, K=2000 proposals, forward only (no gradient: our forward writes no argmax)
    train  N=2, 38x50 (600 x 800 images), K=128 RoIs, forward + backward
Proposals are uniform random boxes inside the map, the same seed for every provider. "same" is the fraction
of outputs equal to ours: 1 for torchvision (same semantics); the baseline's adaptive pool computes its bins
in exact integers, where the reference's fp32 bin math sometimes reaches one cell further (7 * fl(57/7) > 57).
GB/s counts the bytes a provider must move at least: test = input + output; train = input + output + int32
argmax (forward) + output gradient + argmax + input gradient (backward). On CUDA, "x floor" is the time over
those bytes at the measured device copy bandwidth.

    python bench/bench_roi_pool.py              # CPU always (1 thread), CUDA too when present (< 1 min)
    python bench/bench_roi_pool.py --threads=0  # CPU with torch's default thread count
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
    QUANTILES, add_options, pick_devices, print_header, save_results, time_ms,
)
from detector.plots import plt  # noqa: E402
from kernels.roi_pool import roi_pool  # noqa: E402

try:
    import torchvision
except ImportError:  # not a dependency: compared with only where it is installed
    torchvision = None

SHAPES = {  # name: (N, C, H, W, K, image height, image width, with gradient)
    "test": (1, 512, 38, 63, 2000, 600, 1000, False),
    "train": (2, 512, 38, 50, 128, 600, 800, True),
}
TINY_SHAPES = {  # --tiny: the same two cases at a few channels and a 160 x 192 image (10 x 12 map)
    "test": (1, 16, 10, 12, 40, 160, 192, False),
    "train": (2, 16, 10, 12, 16, 160, 192, True),
}
SCALE, POOL = 1 / 16, 7  # VGG16 conv5 stride, pool5 size


def baseline_roi_pool(x, rois, output_size, spatial_scale):
    """The obvious PyTorch version: per RoI, crop the rounded box from the map and adaptive-max-pool it."""
    out = []
    for b, x1, y1, x2, y2 in rois.tolist():
        sw, sh, ew, eh = (int(v * spatial_scale + 0.5) for v in (x1, y1, x2, y2))  # boxes are >= 0 here
        out.append(F.adaptive_max_pool2d(x[int(b), :, sh : eh + 1, sw : ew + 1], output_size))
    return torch.stack(out)


def make_inputs(shape, device):
    n, c, h, w, k, _, _, _ = shape
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
    # torchvision's CPU kernel is a serial loop: one thread compares like with like (and on a busy 2-core
    # machine torch's 2 threads stall each other at every op); --threads=0 keeps torch's default
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    add_options(parser)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter is for tests, not timings")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = pick_devices(args.device, ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    shapes = TINY_SHAPES if args.tiny else SHAPES
    # CPU runs: up to 50 within 3 s (the per-RoI baseline takes seconds a run); --tiny: a handful
    repeats, budget_s = (5, 0.2) if args.tiny else (50, 3.0)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    tv = torchvision.__version__ if torchvision is not None else "not installed"
    title = (f"roi_pool | CPU ({torch.get_num_threads()} thread(s)) | {gpu} | torch {torch.__version__} | "
             f"triton {triton.__version__} | torchvision {tv}")  # fmt: skip
    print(title)
    header = ["shape", "device", "provider", "ms", "20%", "80%", "GB/s", "x floor", "vs ours", "same"]
    widths = [6, 6, 17, 10, 10, 10, 8, 8, 8, 9]
    print_header(header, widths)

    rows = []
    for device in devices:
        bandwidth = copy_bandwidth(device)
        for shape_name, shape in shapes.items():
            n, c, h, w, k, _, _, train = shape
            x, rois = make_inputs(shape, device)
            x.requires_grad_(train)
            grad = torch.randn(k, c, POOL, POOL, device=device)
            elem = x.element_size()
            outputs = k * c * POOL * POOL
            nbytes = (n * c * h * w + outputs) * elem
            if train:  # + argmax written and read, output gradient read, input gradient written
                nbytes += 2 * outputs * 4 + outputs * elem + n * c * h * w * elem
            ours_ms, reference = None, None
            for provider, fn in providers(device).items():

                def step(fn=fn, x=x, rois=rois, grad=grad, train=train):
                    if not train:
                        with torch.no_grad():
                            return fn(x, rois, POOL, SCALE)
                    x.grad = None
                    out = fn(x, rois, POOL, SCALE)
                    out.backward(grad)
                    return out

                if fn is deterministic_roi_pool:
                    step = deterministic(step)
                result = step().detach()
                reference = result if reference is None else reference
                same = (result == reference).double().mean().item()  # fraction of outputs equal to ours
                ms, lo, hi = time_ms(step, device, repeats, budget_s)
                ours_ms = ours_ms or ms
                gbps = nbytes / (ms * 1e-3) / 1e9
                floor = f"{ms * 1e-3 / (nbytes / bandwidth):.2f}" if bandwidth else "n/a"
                row = dict(shape=shape_name, device=device, provider=provider, ms=ms, ms_20=lo, ms_80=hi)
                rows.append(
                    dict(title=title, **row, gbps=gbps, x_floor=floor, vs_ours=ms / ours_ms, same=same)
                )
                print(f"{shape_name:>6} {device:>6} {provider:>17} {ms:10.3f} {lo:10.3f} {hi:10.3f} "
                      f"{gbps:8.2f} {floor:>8} {ms / ours_ms:8.2f} {same:9.6f}")  # fmt: skip

    save_results(rows, "roi_pool", lambda rows: plot(rows, title), args.out)


def plot(rows: list[dict], title: str):
    groups = sorted({(r["shape"], r["device"]) for r in rows}, key=lambda g: (g[1], g[0]))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        for j, group in enumerate(groups):
            sel = [r for r in rows if (r["shape"], r["device"]) == group and r["provider"] == name]
            if sel:
                r = sel[0]  # median bar, 20-80% whiskers
                err = [[r["ms"] - r["ms_20"]], [r["ms_80"] - r["ms"]]]
                ax.bar(j + i * width, r["ms"], width, yerr=err, color=f"C{i}", label=name if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{s}\n{d}" for s, d in groups])
    ax.set(yscale="log", ylabel="ms (median, 20-80%)")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
