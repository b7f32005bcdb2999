"""The two measurements bench/gpu_check.py runs itself: the kernels against their references at fp32 / fp16 /
bf16 with a bytes-moved floor, and Fast R-CNN test time per image split as the paper's Fig. 2.

    python bench/gpu_measure.py kernels --device cuda --out kernels.json
    python bench/gpu_measure.py test_time --device cuda --out test_time.json
    python bench/gpu_measure.py test_time --device cpu --tiny --out t.json   # small sizes, seconds on a CPU

kernels: RoI max pooling, ours vs torchvision.ops.roi_pool (when importable), at the test shape (1 image,
    38x63 conv5 map, 2000 RoIs, forward without gradient) and the training shape (2 images, 38x50, 128 RoIs,
    forward + backward); the fused smooth-L1 vs F.smooth_l1_loss (plain sum, and Fast R-CNN's 0/1-weighted
    sum / R). The floor is the time to move the bytes a kernel must write (its output; for forward + backward
    also the input gradient, and the output gradient read) at the device copy bandwidth measured here.
test_time: nets S, M, L with random weights on a random 600 x 1000 image with 2000 random proposals, each
    stage (conv, roi_pool, fc6, fc7, rest) timed by detector.timing.StageTimer, with and without truncated
    SVD (fc6 rank 1024, fc7 256: the factors' shapes, random values; timing depends on shapes only).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that `python bench/...` finds detector/
from bench.common import time_ms  # noqa: E402
from bench.speed_vs_rcnn import random_proposals  # noqa: E402
from detector.backbones import build_backbone  # noqa: E402
from detector.model import FastRCNN  # noqa: E402
from detector.svd import svd_compress  # noqa: E402
from detector.timing import StageTimer, sync, time_runs  # noqa: E402
from kernels import roi_pool, smooth_l1_loss  # noqa: E402

try:
    import torchvision
except ImportError:  # not a dependency: compared with only where it is installed
    torchvision = None

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# name: (N, C, H, W, K, with gradient); paper §2: a 600 x 1000 image gives a 38 x 63 VGG16 conv5 map at 1/16
ROI_SHAPES = {"test": (1, 512, 38, 63, 2000, False), "train": (2, 512, 38, 50, 128, True)}
ROI_SHAPES_TINY = {"test": (1, 16, 10, 13, 40, False), "train": (2, 16, 10, 12, 16, True)}
SMOOTH_L1_ROIS, SMOOTH_L1_ROIS_TINY = [128, 16384], [128]  # R x 84 (4 deltas x 21 VOC classes)
NETS = {"S": "caffenet", "M": "vgg_cnn_m_1024", "L": "vgg16"}


def copy_bandwidth(device: str, tiny: bool) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write (256 MiB; 8 MiB tiny)."""
    src = torch.empty((2 << 20) if tiny else (64 << 20), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src), device, repeats=2 if tiny else 5)[0] * 1e-3)


def _roi_inputs(shape, dtype, device):
    n, c, h, w, k, _ = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).to(device, dtype)
    # corners up to the last cell's centre (x 16 px), so that round(x / 16) stays inside the map
    corners = torch.rand(k, 2, 2, generator=g) * torch.tensor([(w - 1) * 16.0, (h - 1) * 16.0])
    batch = torch.randint(0, n, (k, 1), generator=g).float()
    rois = torch.cat([batch, corners.min(1).values, corners.max(1).values], 1).to(device, dtype)
    return x, rois


def measure_roi_pool(device: str, tiny: bool, bandwidth: float) -> list[dict]:
    """One row per (shape, dtype, provider): median ms, the floor's ms, and agreement with ours."""
    providers = {"ours": roi_pool}
    if torchvision is not None:
        providers["torchvision"] = torchvision.ops.roi_pool
    rows = []
    for shape_name, shape in (ROI_SHAPES_TINY if tiny else ROI_SHAPES).items():
        n, c, h, w, k, train = shape
        for dtype_name, dtype in DTYPES.items():
            x, rois = _roi_inputs(shape, dtype, device)
            elem = x.element_size()
            out_bytes = k * c * 7 * 7 * elem
            # what must move at least: the output written; for training also the output gradient read and the
            # input gradient written
            floor_bytes = out_bytes + (out_bytes + x.numel() * elem if train else 0)
            grad = torch.randn(k, c, 7, 7, device=device).to(dtype)
            reference = None
            for provider, fn in providers.items():
                row = dict(shape=shape_name, dtype=dtype_name, provider=provider, rois=k, channels=c,
                           mode="fwd+bwd" if train else "fwd", floor_ms=floor_bytes / bandwidth * 1e3)

                def step(fn=fn, x=x, rois=rois, grad=grad, train=train):
                    if not train:
                        with torch.no_grad():
                            return fn(x, rois, 7, 1 / 16), None
                    xg = x.detach().requires_grad_(True)
                    out = fn(xg, rois, 7, 1 / 16)
                    out.backward(grad)
                    return out, xg.grad

                try:
                    out, gx = step()
                    if reference is None:
                        reference = (out.detach(), gx)
                    row["max_diff_vs_ours"] = float((out.detach().float() - reference[0].float()).abs().max())
                    if gx is not None:
                        row["grad_max_diff_vs_ours"] = float((gx.float() - reference[1].float()).abs().max())
                    row["ms"] = time_ms(step, device, repeats=2 if tiny else 5)[0]
                    row["x_floor"] = row["ms"] / row["floor_ms"]
                except Exception as e:  # e.g. a provider without bf16 on this device: recorded, not fatal
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
    return rows


def measure_smooth_l1(device: str, tiny: bool) -> list[dict]:
    """Fused smooth-L1 vs F.smooth_l1_loss, beta 1: the plain sum, and Fast R-CNN's weighted sum / R."""
    forms = {
        "sum": (lambda p, t, w: smooth_l1_loss(p, t, beta=1.0, reduction="sum"),
                lambda p, t, w: F.smooth_l1_loss(p, t, beta=1.0, reduction="sum")),
        "weighted": (lambda p, t, w: smooth_l1_loss(p, t, beta=1.0, reduction="sum", weight=w) / p.shape[0],
                     lambda p, t, w: (w * F.smooth_l1_loss(p, t, beta=1.0, reduction="none")).sum()
                     / p.shape[0]),
    }
    rows = []
    for num_rois in SMOOTH_L1_ROIS_TINY if tiny else SMOOTH_L1_ROIS:
        g = torch.Generator().manual_seed(0)
        for dtype_name, dtype in DTYPES.items():
            pred = torch.randn(num_rois, 84, generator=g).to(device, dtype)
            target = (torch.randn(num_rois, 84, generator=g) * 0.5).to(device, dtype)
            weight = (torch.rand(num_rois, 84, generator=g) < 0.05).to(device, dtype)  # ~1 fg class of 21
            for form, (ours, theirs) in forms.items():
                values = {}
                for provider, fn in (("ours", ours), ("torch", theirs)):
                    for mode in ("fwd", "fwd+bwd"):
                        row = dict(rois=num_rois, dtype=dtype_name, form=form, provider=provider, mode=mode)

                        def step(fn=fn, mode=mode):
                            if mode == "fwd":
                                with torch.no_grad():
                                    return fn(pred, target, weight)
                            p = pred.detach().requires_grad_(True)
                            fn(p, target, weight).backward()
                            return p.grad

                        try:
                            values[(provider, mode)] = step().float()
                            row["ms"] = time_ms(step, device, repeats=2 if tiny else 5)[0]
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {e}"[:200]
                        rows.append(row)
                for mode in ("fwd", "fwd+bwd"):  # agreement, written on the "ours" rows
                    if ("ours", mode) in values and ("torch", mode) in values:
                        diff = (values[("ours", mode)] - values[("torch", mode)]).abs().max()
                        scale = values[("torch", mode)].abs().max().clamp(min=1e-12)
                        for row in rows[-4:]:
                            if row["provider"] == "ours" and row["mode"] == mode:
                                row["rel_diff_vs_torch"] = float(diff / scale)
    return rows


def measure_kernels(device: str, tiny: bool) -> dict:
    bandwidth = copy_bandwidth(device, tiny)
    return {"copy_GBps": bandwidth / 1e9, "torchvision": torchvision.__version__ if torchvision else None,
            "roi_pool": measure_roi_pool(device, tiny, bandwidth),
            "smooth_l1": measure_smooth_l1(device, tiny)}


def measure_test_time(device: str, tiny: bool) -> dict:
    """Per net, with and without SVD: median ms per image of each stage (hooked runs) and of the pass."""
    height, width, num_rois = (96, 128, 20) if tiny else (600, 1000, 2000)
    nets = {"S": NETS["S"]} if tiny else NETS  # tiny: the smallest of the paper's nets, one timed run
    warmup, repeats = (1, 1) if tiny else (2, 5)
    gen = torch.Generator().manual_seed(0)
    boxes = random_proposals(num_rois, height, width, gen)
    rois = torch.cat([boxes.new_zeros(num_rois, 1), boxes], 1).to(device)  # (R, 5), batch index 0
    result = {"image": f"{height}x{width}", "rois": num_rois, "svd_ranks": (1024, 256), "repeats": repeats,
              "nets": {}}
    for net, name in nets.items():
        t0 = time.perf_counter()
        model = FastRCNN(build_backbone(name), num_classes=20).to(device).eval()
        image = model.backbone.normalize(torch.rand(1, 3, height, width, generator=gen).mul(255).to(device))
        svd_model = svd_compress(model, 1024, 256, exact=False)  # factor shapes, values unset: fill them
        with torch.no_grad():
            for p in svd_model.head.parameters():
                p.normal_(std=0.01)
        per_net = {}
        for variant, m in (("full", model), ("svd", svd_model)):
            with torch.inference_mode():
                runs = []
                for i in range(warmup + repeats):
                    timer = StageTimer(m, device)
                    with timer:
                        m.predict(m.features(image), rois)
                        timer.tick("rest")
                    if i >= warmup:
                        runs.append(timer.seconds)
                # the whole pass without the timer's synchronising hooks
                total = time_runs(lambda m=m: m.predict(m.features(image), rois), device, repeats, warmup)
            stages = {s: statistics.median(r.get(s, 0.0) for r in runs) * 1e3 for s in runs[0]}
            per_net[variant] = {"stages_ms": stages, "total_ms": statistics.median(total) * 1e3,
                                "hooked_total_ms": sum(stages.values())}
        per_net["build_s"] = time.perf_counter() - t0
        result["nets"][net] = dict(backbone=name, **per_net)
        for variant in ("full", "svd"):
            stages = " ".join(f"{k} {v:.2f}" for k, v in per_net[variant]["stages_ms"].items())
            total = per_net[variant]["total_ms"]
            print(f"{net} {name} {variant}: {total:.2f} ms/image | {stages} ms", flush=True)
        del model, svd_model
        if device == "cuda":
            sync(device)
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["kernels", "test_time"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small sizes (seconds on a CPU)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    measure = measure_kernels if args.what == "kernels" else measure_test_time
    result = dict(device=args.device, tiny=args.tiny, **measure(args.device, args.tiny))
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(result, indent=1))
    for row in result.get("roi_pool", []) + result.get("smooth_l1", []):  # the JSON holds every figure
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"wrote {args.out} in {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
