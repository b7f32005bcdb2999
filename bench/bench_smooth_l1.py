"""Fused smooth-L1 (one kernel: loss + gradient) vs the plain-PyTorch Fast R-CNN box loss, fwd and fwd+bwd.

The baseline is Caffe's box loss written in PyTorch (paper §2.3, sum over the 0/1-weighted coordinates / R):
    (w * F.smooth_l1_loss(pred, target, reduction="none", beta=1)).sum() / R
ours:
    smooth_l1_loss(pred, target, beta=1, reduction="sum", weight=w) / R
Sweep: R = 128 RoIs x 84 (= 4 * 21 classes), one Fast R-CNN minibatch, and R = 16384 (a large point).
GB/s counts the bytes the loss must move, the same for both: pred, target and weight read, plus the pred
gradient written for fwd+bwd (the target needs no gradient). On CUDA, "launches" is the number of GPU kernels
one fwd+bwd step runs (torch.profiler); on a CPU our op takes its torch path, not Triton (ATen's elementwise
loss under PyTorch's autograd, kernels/smooth_l1.py). On a CPU the two providers run interleaved, call after
call, so that a shared machine's drift hits both; "x torch" is the median over rounds of (time / torch's time
in the same round); CPU runs use 1 thread, then torch's default thread count.

    python bench/bench_smooth_l1.py                  # CUDA if present, else CPU (< 1 min)
    python bench/bench_smooth_l1.py --device=cpu --threads=1
    python bench/bench_smooth_l1.py --device=cpu --tiny --out=DIR   # R = 8 and 64, a few runs, results in DIR
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `python bench/...` finds bench/, kernels/
from bench.common import (  # noqa: E402
    add_options, cpu_threads, pick_devices, print_header, save_results, time_interleaved,
)
from detector.plots import plt  # noqa: E402
from kernels.smooth_l1 import smooth_l1_loss  # noqa: E402

NUM_CLASSES = 21  # PASCAL VOC 20 + background; 4 box deltas per class
ROIS = [128, 16384]  # paper §2.3: R = 128 per SGD minibatch; then a large point
TINY_ROIS = [8, 64]  # --tiny


def _make_batch(num_rois: int, device: str):
    # Caffe's bbox_loss_weights: 1 on the 4 coordinates of a foreground RoI's class, else 0 (25% foreground)
    labels = torch.randint(1, NUM_CLASSES, (num_rois,), device=device)
    labels[num_rois // 4 :] = 0
    weight = torch.zeros(num_rois, NUM_CLASSES, 4, device=device)
    fg = labels > 0
    weight[fg, labels[fg]] = 1.0
    pred = torch.randn(num_rois, 4 * NUM_CLASSES, device=device, requires_grad=True)
    target = torch.randn(num_rois, 4 * NUM_CLASSES, device=device) * 0.5
    return pred, target, weight.view(num_rois, 4 * NUM_CLASSES)  # (R, 4 * C)


def fused_loss(pred, target, weight):
    return smooth_l1_loss(pred, target, beta=1.0, reduction="sum", weight=weight) / pred.shape[0]


def torch_loss(pred, target, weight):
    return (weight * F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)).sum() / pred.shape[0]


def _count_launches(fn, device: str) -> str:
    if device != "cuda":
        return "n/a"
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return str(len(kernels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser)
    args = parser.parse_args()
    (device,) = pick_devices(args.device, ["cuda" if torch.cuda.is_available() else "cpu"])
    # CPU: rounds of both providers, up to 2000 within 2 s (a step takes 0.02-10 ms); --tiny: a handful
    repeats, budget_s = (5, 0.0) if args.tiny else (2000, 2.0)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU (default threads {torch.get_num_threads()})"
    print(f"device {name} | torch {torch.__version__} | triton {triton.__version__}")
    header = ["threads", "R x 84", "provider", "mode", "ms", "20%", "80%", "x torch", "GB/s", "launches"]
    print_header(header, [7, 12, 8, 8, 9, 9, 9, 8, 8, 8])

    rows = []
    for threads in cpu_threads(args.threads, device):
        for num_rois in TINY_ROIS if args.tiny else ROIS:
            rows += bench_size(device, threads, num_rois, repeats, budget_s, name)
    save_results(rows, "smooth_l1", lambda rows: _plot(rows, name), args.out)


def bench_size(device, threads, num_rois, repeats, budget_s, name) -> list[dict]:
    pred, target, weight = _make_batch(num_rois, device)
    # same loss and gradient before timing anything
    grads = []
    for loss_fn in (fused_loss, torch_loss):
        loss = loss_fn(pred, target, weight)
        grads.append((loss.detach(), torch.autograd.grad(loss, pred)[0]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)

    n, elem = pred.numel(), pred.element_size()
    rows = []
    for mode, nbytes in (("fwd", 3 * n * elem), ("fwd+bwd", 4 * n * elem)):
        steps = {}
        for provider, loss_fn in (("fused", fused_loss), ("torch", torch_loss)):

            def forward(loss_fn=loss_fn):
                with torch.no_grad():
                    return loss_fn(pred, target, weight)

            def full(loss_fn=loss_fn):
                pred.grad = None
                loss_fn(pred, target, weight).backward()

            steps[provider] = forward if mode == "fwd" else full
        timed = time_interleaved(steps, device, "torch", repeats, budget_s)
        for provider, fn in steps.items():
            (ms, lo, hi), ratio = timed[provider]["ms"], timed[provider]["ratio"]
            launches = _count_launches(fn, device)
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(device=name, threads=threads or "", torch=torch.__version__,
                             triton=triton.__version__, rois=num_rois, elements=n, provider=provider, mode=mode,
                             ms=ms, ms_20=lo, ms_80=hi, x_torch=ratio, gbps=gbps, launches=launches))  # fmt: skip
            print(f"{threads or '':>7} {num_rois:>7} x 84 {provider:>8} {mode:>8} {ms:9.4f} {lo:9.4f} {hi:9.4f} "
                  f"{ratio:8.2f} {gbps:8.2f} {launches:>8}")  # fmt: skip
    return rows


def _plot(rows: list[dict], name: str):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for provider, threads in dict.fromkeys((r["provider"], r["threads"]) for r in rows):
            sel = [r for r in rows if r["mode"] == mode and (r["provider"], r["threads"]) == (provider, threads)]
            x = [r["elements"] for r in sel]
            label = f"{provider}, {threads} thread(s)" if threads else provider
            ax.plot(x, [r["ms"] for r in sel], marker="o", label=label)
            ax.fill_between(x, [r["ms_20"] for r in sel], [r["ms_80"] for r in sel], alpha=0.25)
        ax.set(xscale="log", yscale="log", xlabel="elements (R x 84)", title=mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (median, 20-80% band)")
    axes[0].legend()
    fig.suptitle(f"smooth-L1 box loss: {name}, torch {torch.__version__}, triton {triton.__version__}")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
