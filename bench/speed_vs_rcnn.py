"""Paper Table 4 re-measured here: train and test time of R-CNN, SPPnet and Fast R-CNN with nets S, M and L.

One synthetic VOC-sized image with random proposals. Fast R-CNN runs its own forward pass (FastRCNN.forward);
R-CNN and SPPnet run the stock ImageNet nets of their papers (rcnn_baselines.stock_backbone: for S, CaffeNet
without Fast R-CNN's conv1/pool padding) with model.BoxHead as fc6/fc7. Every method's test pass is split into
the paper's Fig. 2 stages (conv, roi_pool, fc6, fc7, rest) by detector.timing.StageTimer. The timed runs are
interleaved: round after round, each method runs once, so that the machine's drift hits all of them; a stage
reports the median and spread (min..max) of its runs. R-CNN's per-crop time is measured at several batch sizes
and the fastest is used (x 2000 crops: EXTRAPOLATED, and printed as such). Training is MODELLED: measured unit
times (one SGD step, one image's feature caching) x the papers' counts, each formula printed. The same run
measures this machine's peak (a large sgemm, a large convolution) and reports each stage's achieved GFLOP/s
against it, and the peak memory of each method (resident set size on a CPU, max_memory_allocated on a GPU).

    python bench/speed_vs_rcnn.py                    # CPU: S, M, L with small samples, ~10 min on 2 cores
    python bench/speed_vs_rcnn.py --device cuda      # GPU: more runs, R-CNN batches of 4, 32 and 128 crops
    python bench/speed_vs_rcnn.py --nets S --repeats 5 --budget-s 0   # one net, five runs of every stage
"""

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that `python bench/...` finds detector/
from bench.rcnn_baselines import (  # noqa: E402
    MINIBATCH, RCNN, SPPnet, UnitTimes, disk_speed, stock_backbone, warp_crops, warp_windows,
)
from bench.speed_report import print_report, summarize, write_outputs  # noqa: E402
from detector.backbones import build_backbone  # noqa: E402
from detector.config import option, parse_dataclass  # noqa: E402
from detector.data import image_scale  # noqa: E402
from detector.detect import scale_levels  # noqa: E402
from detector.flops import fc_flops, trunk_flops  # noqa: E402
from detector.model import FastRCNN  # noqa: E402
from detector.svd import svd_compress  # noqa: E402
from detector.timing import StageTimer, summary, sync, time_runs  # noqa: E402
from detector.weights import load_weights  # noqa: E402

BACKBONES = {"S": "caffenet", "M": "vgg_cnn_m_1024", "L": "vgg16"}
# R-CNN warps each proposal to the stock net's input: 227 for CaffeNet, 224 for VGG_CNN_M (Chatfield et al.) and
# VGG16; each gives the 13x13 (S, M) or 14x14 (L) conv5 that the stock pool5 brings to fc6's 6x6 / 7x7.
RCNN_CROP = {"S": 227, "M": 224, "L": 224, "mobilenet_v2": 224}
NUM_CLASSES = 20  # PASCAL VOC
FG_FRACTION = 0.25  # FR config.py: 25% foreground RoIs

Probe = Callable[[], dict[str, float]]  # one run of a method: seconds per stage


@dataclass
class Config:
    nets: tuple = option(("S", "M", "L"), "Table 4's columns: S = CaffeNet, M = VGG_CNN_M_1024, L = VGG16; also "
                       "mobilenet_v2")
    device: str = option("auto", "auto = cuda when available, else cpu")
    weights: str = option("", "optional trained weights, L=vgg16.pth,S=caffenet.pth; timing does not need them")
    proposals: int = option(2000, "paper §3 / R-CNN: ~2000 selective-search boxes per image")
    image_size: str = option("375x500", "H x W of the synthetic image: a typical VOC07 image")
    scale: int = option(600, "FR config.py TEST.SCALES: shorter side for Fast R-CNN and SPPnet 1-scale")
    max_size: int = option(1000, "FR config.py TEST.MAX_SIZE: cap on the longer side")
    spp_scales: tuple = option((480, 576, 688, 864, 1200), "paper §5.2 / SPPnet: the 5-scale pyramid", kind=int)
    spp_max_size: int = option(2000, "paper §5.2: longest side capped at 2000 for 5 scales")
    crop_size: int = option(0, "R-CNN warp size; 0 = the stock net's (227 for S, 224 for M and L)")
    rcnn_batch_sizes: tuple = option((), "R-CNN test crops per forward, each timed, the fastest used; "
                                   "empty = 4,16 on CPU, 4,32,128 on GPU", kind=int)
    train_crops: int = option(0, "R-CNN fine-tuning crops per measured step; 0 = 8 on CPU, 128 (all) on GPU")
    train_images: int = option(2, "Fast R-CNN images per iteration (paper §2.3: N = 2)")
    rois_per_batch: int = option(MINIBATCH, "Fast R-CNN RoIs per iteration, SPPnet windows per step (R = 128)")
    repeats: int = option(0, "timed runs of every stage, interleaved across methods; 0 = 3 on CPU, 5 on GPU")
    warmup: int = option(1, "untimed runs of every method on a small input (64 px, 4 proposals) first")
    budget_s: float = option(20.0, "a method stops repeating once its timed runs add up to this (CPU budget); "
                           "0 = never")
    svd_ranks: tuple = option((1024, 256), "FR compress_net.py: fc6 keeps 1024 singular values, fc7 256", kind=int)
    svd_exact: bool = option(False, "true: svd_compress's real SVD (minutes for L on a CPU); false: its factor "
                           "shapes only (the same arithmetic)")
    io_mb: int = option(64, "size of the disk probe behind the feature-cache estimates")
    out: str = option("bench/out", "JSON, CSV and PNG go here")
    seed: int = option(0, "random seed of the image, the proposals and the labels")


def resolve_config(cfg: Config, device: torch.device) -> Config:
    """Fill the device-dependent defaults (0 / empty): small samples on CPU, more on GPU."""
    gpu = device.type == "cuda"
    if any(b > cfg.proposals for b in cfg.rcnn_batch_sizes):
        raise ValueError(f"rcnn_batch_sizes {cfg.rcnn_batch_sizes}: a batch holds at most {cfg.proposals} crops")
    return replace(cfg, device=str(device),
                   rcnn_batch_sizes=cfg.rcnn_batch_sizes or ((4, 32, 128) if gpu else (4, 16)),
                   train_crops=cfg.train_crops or (MINIBATCH if gpu else 8), repeats=cfg.repeats or (5 if gpu else 3))


@dataclass
class Scene:
    """The synthetic test image, its proposals and the factors that Fast R-CNN and SPPnet resize it by."""

    image: Tensor  # (1, 3, H, W) RGB 0..255
    boxes: Tensor  # (P, 4) proposals (x1, y1, x2, y2) in image pixels
    factor: float  # Fast R-CNN's (and SPPnet 1-scale's) resize factor
    pyramid: list[float]  # SPPnet's factors, one per scale

    @property
    def hw(self) -> tuple[int, int]:
        return self.image.shape[-2], self.image.shape[-1]

    def size(self, f: float) -> tuple[int, int]:
        return round(self.hw[0] * f), round(self.hw[1] * f)

    def resized(self, backbone, f: float) -> Tensor:
        """FR im_detect's input: the image resized by f, then normalised as the backbone's weights expect."""
        return backbone.normalize(F.interpolate(self.image, self.size(f), mode="bilinear", align_corners=False))

    def small(self) -> "Scene":
        """The warm-up's input: a 64 x 64 corner, 4 proposals inside it, no resizing; the same code paths."""
        boxes = self.boxes[:4].clone()
        boxes[:, :2] = boxes[:, :2].clamp(max=40)
        boxes[:, 2:] = torch.maximum(boxes[:, :2] + 15, boxes[:, 2:].clamp(max=63))
        return Scene(self.image[..., :64, :64], boxes, 1.0, [1.0] * len(self.pyramid))


def random_proposals(n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """(n, 4) integer boxes, sides log-uniform from 16 px to the image's (selective search: mostly small)."""
    sides = torch.exp(math.log(16) + torch.rand(n, 2, generator=generator) * torch.tensor(
        [math.log(width / 16), math.log(height / 16)])).floor()  # (n, 2) widths, heights
    corner = (torch.rand(n, 2, generator=generator) * (torch.tensor([width, height]) - sides + 1)).floor()
    return torch.cat([corner, corner + sides - 1], dim=1)


def _staged(model, device: torch.device, forward: Callable[[], object]) -> dict[str, float]:
    """Seconds per stage of one test-time forward (StageTimer's hooks on the model's own modules)."""
    model.eval()
    with torch.no_grad(), StageTimer(model, device) as timer:
        forward()
        timer.tick("rest")  # outputs after fc7 (scores, box deltas, softmax)
    return timer.seconds


# --- One function per method: each returns its probes (name -> one timed run, seconds per stage). ---


def fast_rcnn_probes(models: dict[str, FastRCNN], scene: Scene, device: torch.device) -> dict[str, Probe]:
    """Fast R-CNN at one scale: resize, conv, RoI pooling, fc6, fc7, softmax and box deltas (FastRCNN.forward)."""
    rois = torch.cat([scene.boxes.new_zeros(len(scene.boxes), 1), scene.boxes * scene.factor], dim=1)  # (P, 5)

    def probe(model: FastRCNN) -> Probe:
        return lambda: _staged(model, device, lambda: model(scene.resized(model.backbone, scene.factor), rois))
    return {name: probe(model) for name, model in models.items()}


def spp_rois(scene: Scene, factors: list[float]) -> Tensor:
    """(P, 5) (level, box in that level's pixels): each box at the scale closest to 224^2 (FR _project_im_rois)."""
    levels = torch.from_numpy(scale_levels(scene.boxes.cpu().numpy(), factors)).to(scene.boxes.device)
    scaled = scene.boxes * scene.boxes.new_tensor(factors)[levels][:, None]
    return torch.cat([levels[:, None].to(scaled.dtype), scaled], dim=1)


def sppnet_probes(spp: SPPnet, scene: Scene, device: torch.device) -> dict[str, Probe]:
    """SPPnet at 5 scales and at 1 (Fast R-CNN's): conv pyramid, SPP pooling, fc6, fc7, SVMs and regressors."""

    def probe(factors: list[float]) -> Probe:
        rois = spp_rois(scene, factors)
        return lambda: _staged(spp, device, lambda: spp([scene.resized(spp.backbone, f) for f in factors], rois))
    return {"spp5": probe(scene.pyramid), "spp1": probe([scene.factor])}


def rcnn_probes(rcnn: RCNN, scene: Scene, crop: int, batch_sizes: tuple, device: torch.device) -> dict[str, Probe]:
    """R-CNN on one batch of b crops per run, for each b: warp with context, conv, pool5, fc6, fc7, SVMs."""

    def probe(b: int) -> Probe:
        boxes = scene.boxes[torch.arange(b, device=scene.boxes.device) % len(scene.boxes)]
        boxes = boxes[: len(scene.boxes)]  # the warm-up's small scene: its 4 boxes once

        def forward():
            src, dst = warp_windows(boxes, scene.hw, crop)  # rcnn_im_crop.m: 16 px of context, 'warp' mode
            return rcnn(warp_crops(rcnn.backbone.normalize(scene.image), src, dst, crop))
        return lambda: _staged(rcnn, device, forward)
    return {f"rcnn_b{b}": probe(b) for b in batch_sizes}


def sgd(params) -> torch.optim.Optimizer:
    # FR and R-CNN solvers: base_lr 0.001, momentum 0.9, weight_decay 0.0005
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=1e-3, momentum=0.9, weight_decay=5e-4)


def train_probes(frcn: FastRCNN, rcnn: RCNN, spp: SPPnet, optimizers: dict, scene: Scene, crop: int, cfg: Config,
                 device: torch.device, gen: torch.Generator) -> dict[str, Probe]:
    """One SGD iteration (forward, backward, step) of each method's fine-tuning."""
    n_img, n_roi, n_fg = cfg.train_images, cfg.rois_per_batch, int(FG_FRACTION * cfg.rois_per_batch)
    labels = torch.randint(0, NUM_CLASSES + 1, (max(cfg.train_crops, n_roi),), generator=gen).to(device)
    p = len(scene.boxes)

    def step(module, optimizer, loss_fn) -> Probe:
        def run():
            module.train()  # the backbones keep the paper's frozen layers (conv1 for S/M, conv1_1..conv2_2 for L)
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
        return lambda: {"step": time_runs(run, device, repeats=1, warmup=0)[0]}

    # R-CNN: the crops are warped on the fly (Caffe's window data layer), everything above conv1 trains.
    crops = min(cfg.train_crops, p)
    train_boxes = scene.boxes[:crops]

    def rcnn_loss():
        src, dst = warp_windows(train_boxes, scene.hw, crop)
        batch = warp_crops(rcnn.backbone.normalize(scene.image), src, dst, crop)
        return F.cross_entropy(rcnn.finetune_logits(batch), labels[:crops])

    # SPPnet: fc6 and up on pooled windows read from its conv5 cache.
    pooled = torch.rand(n_roi, spp.spp_dim, generator=gen).to(device)
    spp_loss = lambda: F.cross_entropy(spp.finetune_logits(pooled), labels[:n_roi])  # noqa: E731

    # Fast R-CNN: N images, R RoIs, 25% foreground with regression targets, as FR minibatch.py builds them.
    picked = scene.boxes[torch.randint(0, p, (n_roi,), generator=gen).to(device)] * scene.factor
    rois = torch.cat([(torch.arange(n_roi, device=device) % n_img)[:, None].float(), picked], dim=1)
    roi_labels = torch.zeros(n_roi, dtype=torch.long, device=device)
    roi_labels[:n_fg] = labels[:n_fg].clamp(min=1)  # paper §2.3: 25% foreground, the rest background
    box_weights = torch.zeros(n_roi, 4 * (NUM_CLASSES + 1), device=device)
    fg_columns = 4 * roi_labels[:n_fg, None] + torch.arange(4, device=device)  # the true class's 4 deltas
    box_weights[torch.arange(n_fg, device=device)[:, None], fg_columns] = 1
    targets = {"labels": roi_labels, "bbox_weights": box_weights,
               "bbox_targets": torch.randn(box_weights.shape, generator=gen).to(device) * box_weights}

    def frcn_loss():
        images = scene.resized(frcn.backbone, scene.factor).expand(n_img, -1, -1, -1)
        return sum(frcn(images, rois, targets).values())

    return {"rcnn_train": step(rcnn, optimizers["rcnn"], rcnn_loss),
            "spp_train": step(spp, optimizers["spp"], spp_loss),
            "frcn_train": step(frcn, optimizers["frcn"], frcn_loss)}


# --- Running the probes: interleaved rounds, peak memory, the machine's peak arithmetic rate. ---


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM) to the current one
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _memory_mb(device: torch.device, peak: bool) -> float:
    """Peak (or current) memory in MiB: max_memory_allocated on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**20
    key = "VmHWM:" if peak else "VmRSS:"
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith(key)), float("nan"))


def interleave(probes: dict[str, Probe], warm: dict[str, Probe], cfg: Config, device: torch.device,
               log) -> dict[str, dict]:
    """Warm every method on the small input, then cfg.repeats rounds of one run of each method in turn.

    A method stops repeating once its runs add up to cfg.budget_s (at least one run). Returns per probe: the runs'
    stage seconds, and the peak memory over its runs (MiB, and above what was allocated when it started).
    """
    for _ in range(cfg.warmup):
        for run in warm.values():
            run()
    out = {name: {"runs": [], "peak_mb": 0.0, "added_mb": 0.0} for name in probes}
    for r in range(cfg.repeats):
        for name, run in probes.items():
            rec = out[name]
            if rec["runs"] and cfg.budget_s and sum(sum(s.values()) for s in rec["runs"]) >= cfg.budget_s:
                continue
            sync(device)
            _reset_peak_memory(device)
            before = _memory_mb(device, peak=False)
            rec["runs"].append(run())
            peak = _memory_mb(device, peak=True)
            rec["peak_mb"], rec["added_mb"] = max(rec["peak_mb"], peak), max(rec["added_mb"], peak - before)
            log(f"round {r + 1}/{cfg.repeats} {name:<11} {sum(rec['runs'][-1].values()):9.4f} s")
    return out


def machine_peak(device: torch.device) -> dict:
    """This machine's best GFLOP/s on a large fp32 sgemm and a large 3x3 convolution (channels-last on a CPU)."""
    gpu = device.type == "cuda"
    n = 8192 if gpu else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sgemm = 2 * n**3 / min(time_runs(lambda: a @ b, device, repeats=3, warmup=1))
    batch, c, hw = (32, 256, 56) if gpu else (4, 256, 56)
    x = torch.randn(batch, c, hw, hw, device=device)
    w = torch.randn(c, c, 3, 3, device=device)
    if not gpu:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv = 2 * batch * hw * hw * c * c * 9 / min(time_runs(lambda: F.conv2d(x, w, padding=1), device, 3, 1))
    return {"sgemm_gflop_s": sgemm / 1e9, "sgemm": f"{n}x{n}x{n} fp32",
            "conv_gflop_s": conv / 1e9, "conv": f"3x3 conv {c}->{c} on {batch}x{hw}x{hw} fp32"}


def _head_flops(model, rois: int) -> dict[str, int]:
    """fc6, fc7 and output-layer FLOPs of `rois` RoIs through a model with .head and two output layers."""
    # R-CNN and SPPnet test with SVMs and regressors (their cls_score is the fine-tuning softmax only)
    outputs = [model.svm, model.bbox_reg] if isinstance(model, (RCNN, SPPnet)) else [model.cls_score, model.bbox_pred]
    return {"fc6": rois * fc_flops(model.head.fc6), "fc7": rois * fc_flops(model.head.fc7),
            "rest": rois * sum(fc_flops(m) for m in outputs)}


def measure_net(net: str, cfg: Config, device: torch.device, log) -> dict:
    """Every method on one backbone: per-probe stage times (median, spread), FLOPs, memory; test totals, units."""
    gen = torch.Generator().manual_seed(cfg.seed)
    model = FastRCNN(build_backbone(BACKBONES.get(net, net)), NUM_CLASSES)
    weights = dict(item.split("=", 1) for item in cfg.weights.split(",") if item)
    if net in weights:
        load_weights(model, weights[net])
    model.to(device)
    with torch.no_grad():
        svd_model = svd_compress(model, *cfg.svd_ranks, exact=cfg.svd_exact).to(device)
    stock = stock_backbone(model.backbone)
    rcnn = RCNN(stock, model.head, NUM_CLASSES).to(device)  # fc6/fc7 shared with Fast R-CNN: same shapes and init
    spp = SPPnet(stock, NUM_CLASSES).to(device)
    crop = cfg.crop_size or RCNN_CROP.get(net, 224)

    height, width = (int(v) for v in cfg.image_size.split("x"))
    image = torch.rand(1, 3, height, width, generator=gen).mul(255).to(device)
    boxes = random_proposals(cfg.proposals, height, width, gen).to(device)
    scene = Scene(image, boxes, image_scale(height, width, cfg.scale, cfg.max_size),
                  [image_scale(height, width, s, cfg.spp_max_size) for s in cfg.spp_scales])
    optimizers = {"rcnn": sgd(rcnn.parameters()), "frcn": sgd(model.parameters()),
                  "spp": sgd([*spp.head.parameters(), *spp.cls_score.parameters()])}  # SPPnet §4.1: fc only

    def probes(s: Scene, crops: int) -> dict[str, Probe]:
        return {**fast_rcnn_probes({"frcn": model, "frcn_svd": svd_model}, s, device),
                **sppnet_probes(spp, s, device), **rcnn_probes(rcnn, s, crop, cfg.rcnn_batch_sizes, device),
                **train_probes(model, rcnn, spp, optimizers, s, crop, replace(cfg, train_crops=crops), device, gen)}
    measured = interleave(probes(scene, cfg.train_crops), probes(scene.small(), 2), cfg, device, log)

    # FLOPs per stage of each probe: 2 x multiply-adds of the convolutions and fc layers (detector/flops.py).
    p = cfg.proposals
    flops = {name: {"conv": trunk_flops(m.backbone, *scene.size(scene.factor)), **_head_flops(m, p)}
             for name, m in (("frcn", model), ("frcn_svd", svd_model))}
    flops["spp5"] = {"conv": sum(trunk_flops(stock, *scene.size(f)) for f in scene.pyramid), **_head_flops(spp, p)}
    flops["spp1"] = {"conv": trunk_flops(stock, *scene.size(scene.factor)), **_head_flops(spp, p)}
    for b in cfg.rcnn_batch_sizes:
        flops[f"rcnn_b{b}"] = {"conv": b * trunk_flops(stock, crop, crop), **_head_flops(rcnn, b)}
    stats = {}
    for name, rec in measured.items():
        runs = rec["runs"]
        stages = {k: summary([r[k] for r in runs]) for k in runs[0]}
        stats[name] = {"total": summary([sum(r.values()) for r in runs]), "stages": stages,
                       "flops": flops.get(name, {}), "peak_mb": rec["peak_mb"], "added_mb": rec["added_mb"]}

    # Test totals per image. R-CNN: the fastest batch size's median per crop x P crops.
    def per_crop(name: str) -> float:
        return stats[name]["total"]["median"] / int(name.removeprefix("rcnn_b"))
    rcnn_best = min((f"rcnn_b{b}" for b in cfg.rcnn_batch_sizes), key=per_crop)
    b_best, rcnn_stats = int(rcnn_best.removeprefix("rcnn_b")), stats[rcnn_best]
    test = {k: {"s": stats[k]["total"]["median"], "min": stats[k]["total"]["min"], "max": stats[k]["total"]["max"],
                "runs": stats[k]["total"]["runs"]} for k in ("frcn", "frcn_svd", "spp5", "spp1")}
    total = rcnn_stats["total"]
    test["rcnn"] = {"s": total["median"] * p / b_best, "min": total["min"] * p / b_best,
                    "max": total["max"] * p / b_best, "runs": total["runs"]}
    how = {"frcn": f"conv at {cfg.scale} + RoI pool + fc6 + fc7 + outputs",
           "frcn_svd": f"the same, fc6/fc7 SVD ranks {cfg.svd_ranks}"
                       + ("" if cfg.svd_exact else " (factor shapes; values not computed)"),
           "spp5": f"stock trunk at {len(scene.pyramid)} scales + SPP + fc6 + fc7 + SVMs",
           "spp1": f"stock trunk at {cfg.scale} + SPP + fc6 + fc7 + SVMs",
           "rcnn": f"EXTRAPOLATED: per crop at batch {b_best} (fastest of {list(cfg.rcnn_batch_sizes)}), {crop}px "
                   f"stock net, x {p} crops"}
    method_flops = {k: sum(flops[k].values()) for k in ("frcn", "frcn_svd", "spp5", "spp1")}
    method_flops["rcnn"] = sum(flops[rcnn_best].values()) * p // b_best

    stage = rcnn_stats["stages"]
    # per crop: warp (in "rest", with the SVM outputs), conv and pool5 -> the pool5 cache; fc6, fc7 -> SVM training
    conv_s = sum(stage[k]["median"] for k in ("rest", "conv", "roi_pool") if k in stage)
    fc_s = sum(stage[k]["median"] for k in ("fc6", "fc7") if k in stage)
    spp5 = stats["spp5"]["stages"]
    pyramid_s = spp5["conv"]["median"]
    units = UnitTimes(
        proposals=p, rcnn_step_s=stats["rcnn_train"]["total"]["median"], rcnn_step_crops=min(cfg.train_crops, p),
        rcnn_crop_conv_s=conv_s / b_best, rcnn_crop_fc_s=fc_s / b_best,
        pool5_mb=p * stock.pooled_features * 4 / 1e6, spp_step_s=stats["spp_train"]["total"]["median"],
        spp_step_windows=cfg.rois_per_batch, spp_pyramid_s=pyramid_s,
        conv5_mb=sum(stock.out_channels * math.ceil(h / 16) * math.ceil(w / 16)  # ~H/16 x W/16 maps, fp32
                     for h, w in (scene.size(f) for f in scene.pyramid)) * 4 / 1e6,
        spp_head_s=stats["spp5"]["total"]["median"] - pyramid_s,
        frcn_step_s=stats["frcn_train"]["total"]["median"], frcn_step_images=cfg.train_images,
        frcn_step_rois=cfg.rois_per_batch)
    return {"probes": stats, "test": test, "test_how": how, "flops": method_flops, "units": asdict(units)}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")
    return f"{model}, {torch.get_num_threads()} threads"


def run(config: Config) -> dict:
    """Measure every net of config.nets, print Table 4 and the breakdowns, write JSON/CSV/PNG; the results."""
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = auto if config.device == "auto" else torch.device(config.device)
    cfg = resolve_config(config, device)
    for n in cfg.nets:
        if n not in BACKBONES and n != "mobilenet_v2":
            raise ValueError(f"nets: unknown net {n!r}; use S, M, L or mobilenet_v2")
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    device_name = describe_device(device)
    log(f"device: {device_name}; torch {torch.__version__}; config: {asdict(cfg)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    disk = disk_speed(out, cfg.io_mb)
    log(f"disk: {disk['write_mb_s']:.0f} MB/s write, {disk['read_mb_s']:.0f} MB/s read ({cfg.io_mb} MB)")
    peaks = [machine_peak(device)]
    log(f"peak: {peaks[0]['sgemm_gflop_s']:.0f} GFLOP/s sgemm ({peaks[0]['sgemm']}), "
        f"{peaks[0]['conv_gflop_s']:.0f} GFLOP/s conv ({peaks[0]['conv']})")
    per_net = {}
    for i, net in enumerate(cfg.nets):
        log(f"=== net {net} ({i + 1}/{len(cfg.nets)}) ===")
        per_net[net] = measure_net(net, cfg, device, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # measured again at the end: the best of both, so that a busy moment at the start does not lower the peak
    peaks.append(machine_peak(device))
    peak = {**peaks[0], **{k: max(p[k] for p in peaks) for k in ("sgemm_gflop_s", "conv_gflop_s")}}
    log(f"peak at the end: {peaks[1]['sgemm_gflop_s']:.0f} GFLOP/s sgemm, {peaks[1]['conv_gflop_s']:.0f} conv")
    results = summarize(per_net, disk, peak, asdict(cfg), device_name, time.perf_counter() - start)
    print_report(results)
    write_outputs(results, out)
    log(f"wrote {out}/speed_vs_rcnn.json, .csv and .png; total {time.perf_counter() - start:.0f} s")
    return results


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_dataclass(Config, argv, description=__doc__)


if __name__ == "__main__":
    run(parse_args())
