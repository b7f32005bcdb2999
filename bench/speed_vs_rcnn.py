"""Paper Table 4 re-measured here: train and test time of R-CNN, SPPnet and Fast R-CNN with nets S, M and L.

All three methods run the same backbone (detector/backbones.py) on a synthetic VOC-sized image with random
proposals; a stage's time is the median of repeated runs after a warm-up. Whatever is not run in full is
extrapolated from a measured unit time, and the printout says so with the unit and the count (R-CNN test on
CPU: seconds per crop batch x 2000 / batch size; every training time: seconds per iteration or per image x the
papers' iteration counts or the 5011 VOC07 trainval images). FLOPs per image separate the arithmetic a method
saves from what its implementation makes of it.

    python bench/speed_vs_rcnn.py                    # CPU: S, M, L with small samples, < 10 min on 2 cores
    python bench/speed_vs_rcnn.py --device=cuda      # GPU: full counts (all 2000 crops, 128-crop iterations)
    python bench/speed_vs_rcnn.py --nets=L --batches=8 --repeats=5 --long-stage-s=0   # wider CPU samples
"""

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that `python bench/...` finds detector/
from bench.rcnn_baselines import (  # noqa: E402
    MINIBATCH, RCNN, SPPnet, assign_scale_levels, disk_speed, warp_crops, warp_windows,
)
from bench.speed_report import print_report, summarize, write_outputs  # noqa: E402
from detector.backbones import build_backbone  # noqa: E402
from detector.flops import fc_flops, trunk_flops  # noqa: E402
from detector.model import FastRCNN  # noqa: E402
from detector.svd import svd_compress  # noqa: E402
from detector.weights import load_weights  # noqa: E402

BACKBONES = {"S": "caffenet", "M": "vgg_cnn_m_1024", "L": "vgg16"}
RCNN_CROP = {"S": 227, "M": 227, "L": 224}  # R-CNN warps each proposal to the net's input size
NUM_CLASSES = 20  # PASCAL VOC
FG_FRACTION = 0.25  # FR config.py: 25% foreground RoIs
ETA_WEIGHT = {"S": 1.0, "M": 1.5, "L": 3.5}  # relative run times of the nets (default CPU run), for the ETA


@dataclass
class Config:
    nets: str = "S,M,L"  # Table 4's columns: S = CaffeNet, M = VGG_CNN_M_1024, L = VGG16; also mobilenet_v2
    device: str = "auto"  # auto = cuda when available, else cpu
    weights: str = ""  # optional trained weights, "L=vgg16.pth,S=caffenet.pth"; timing does not need them
    proposals: int = 2000  # paper §3 / R-CNN: ~2000 selective-search boxes per image
    image_size: str = "375x500"  # H x W of the synthetic image: a typical VOC07 image
    scale: int = 600  # FR config.py TEST.SCALES: shorter side for Fast R-CNN and SPPnet 1-scale
    max_size: int = 1000  # FR config.py TEST.MAX_SIZE: cap on the longer side
    spp_scales: str = "480,576,688,864,1200"  # paper §5.2 / SPPnet: the 5-scale pyramid
    spp_max_size: int = 2000  # paper §5.2: longest side capped at 2000 for 5 scales
    crop_size: int = 0  # R-CNN warp size; 0 = the net's (227 for S/M, 224 for L)
    crops_per_batch: int = 0  # R-CNN test crops per forward; 0 = 4 on CPU, 256 on GPU (rcnn_batch_256)
    batches: int = 0  # R-CNN test batches run; 0 = 2 on CPU, all of them on GPU (nothing extrapolated)
    train_crops: int = 0  # R-CNN fine-tuning crops per measured step; 0 = 8 on CPU, 128 (all) on GPU
    train_images: int = 2  # Fast R-CNN images per iteration (paper §2.3: N = 2)
    rois_per_batch: int = MINIBATCH  # Fast R-CNN RoIs per iteration, SPPnet windows per step (R = 128)
    repeats: int = 0  # timed runs per stage (median); 0 = 2 on CPU, 5 on GPU
    warmup: int = 1  # untimed runs before the timed ones
    long_stage_s: float = 3.0  # a run this long ends its stage (CPU budget); 0 = never
    svd_ranks: str = "1024,256"  # FR compress_net.py: fc6 keeps 1024 singular values, fc7 256
    svd_exact: str = "auto"  # yes: svd_compress's real SVD; no: its factor shapes only; auto: yes on GPU
    io_mb: int = 64  # size of the disk probe behind the feature-cache estimates
    out: str = "bench/out"  # JSON, CSV and PNG go here
    seed: int = 0


def resolve_config(cfg: Config, device: torch.device) -> Config:
    """Fill the device-dependent defaults (0 / "auto"): small samples on CPU, full counts on GPU."""
    if cfg.svd_exact not in ("auto", "yes", "no"):
        raise ValueError(f"svd_exact must be auto, yes or no, got {cfg.svd_exact!r}")
    gpu = device.type == "cuda"
    r = Config(**asdict(cfg))
    r.device = str(device)
    r.crops_per_batch = cfg.crops_per_batch or (256 if gpu else 4)
    r.batches = cfg.batches or (math.ceil(cfg.proposals / r.crops_per_batch) if gpu else 2)
    r.train_crops = cfg.train_crops or (MINIBATCH if gpu else 8)
    r.repeats = cfg.repeats or (5 if gpu else 2)
    r.svd_exact = ("yes" if gpu else "no") if cfg.svd_exact == "auto" else cfg.svd_exact
    return r


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stage(fn, warm, device: torch.device, cfg: Config) -> tuple[float, int, object]:
    """Median seconds of up to cfg.repeats runs of fn() after cfg.warmup runs of warm(); runs; last output.

    warm() is fn itself or the same code on a small input: that pays the one-off costs (thread pool,
    allocator, kernel compilation, momentum buffers) without doubling a long stage. A run longer than
    cfg.long_stage_s ends the stage (the CPU budget); its noise is small next to its length.
    """
    for _ in range(cfg.warmup):
        warm()
    times = []
    for _ in range(max(cfg.repeats, 1)):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if cfg.long_stage_s and times[-1] >= cfg.long_stage_s:
            break
    return statistics.median(times), len(times), out


def image_scale(height: int, width: int, target: int, max_size: int) -> float:
    """FR prep_im_for_blob: the shorter side to `target`, unless the longer side would pass `max_size`."""
    scale = target / min(height, width)
    return max_size / max(height, width) if round(scale * max(height, width)) > max_size else scale


def random_proposals(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) integer boxes, sides log-uniform from 16 px to the image's (selective search: mostly small)."""
    sides = torch.exp(math.log(16) + torch.rand(n, 2, generator=generator) * torch.tensor(
        [math.log(width / 16), math.log(height / 16)])).floor()  # (n, 2) widths, heights
    corner = (torch.rand(n, 2, generator=generator) * (torch.tensor([width, height]) - sides + 1)).floor()
    return torch.cat([corner, corner + sides - 1], dim=1)


def _svd_by_shape(backbone, fc6_rank: int, fc7_rank: int) -> FastRCNN:
    """A FastRCNN sharing `backbone` whose fc6/fc7 have svd_compress's factor shapes, values not computed.

    Timing depends on the shapes only, and a float64 SVD of VGG16's 4096 x 25088 fc6 takes minutes on 2 cores.
    """
    model = FastRCNN(backbone, NUM_CLASSES)
    for name, rank in (("fc6", fc6_rank), ("fc7", fc7_rank)):
        layer = getattr(model, name)
        if rank < min(layer.in_features, layer.out_features):  # svd_compress leaves such a layer whole too
            factors = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features)
            setattr(model, name, nn.Sequential(*factors))
    return model


def measure_net(net: str, cfg: Config, device: torch.device, log) -> dict:
    """Every stage of the three methods on one backbone: seconds, FLOPs and how each total was formed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    backbone = build_backbone(BACKBONES.get(net, net))
    weights = dict(item.split("=", 1) for item in cfg.weights.split(",") if item)
    if net in weights:
        load_weights(backbone, weights[net])
    backbone.to(device).eval()
    height, width = (int(v) for v in cfg.image_size.split("x"))
    image = backbone.normalize(torch.rand(1, 3, height, width, generator=gen).mul(255).to(device))
    boxes = random_proposals(cfg.proposals, height, width, gen).to(device)
    p, stages, few = cfg.proposals, {}, 16  # `few`: RoIs, crops or rows of a cheap warm-up
    factors = [image_scale(height, width, int(s), cfg.spp_max_size) for s in cfg.spp_scales.split(",")]

    def stage(name: str, fn, grad: bool = False, small_warmup: bool = True) -> tuple[float, object]:
        """Times fn(None), the whole stage, and returns its output. The warm-up is fn(few), a small run, on
        CPU, except for RoI pooling, whose CPU path is much slower on its first call at full size."""
        warm_n = few if device.type == "cpu" and small_warmup else None
        with torch.enable_grad() if grad else torch.no_grad():
            seconds, runs, out = time_stage(lambda: fn(None), lambda: fn(warm_n), device, cfg)
        stages[name] = {"s": seconds, "runs": runs}
        log(f"{net} {len(stages):>2}/{12 + len(factors)} {name:<28} {seconds:9.4f} s  (median of {runs})")
        return seconds, out

    def conv_at(f: float):  # FR im_detect: resize the mean-subtracted image, then the conv trunk
        size = (round(height * f), round(width * f))

        def run(n=None):  # n set (the warm-up): a 64 x 64 corner through the same layers
            x = F.interpolate(image, size, mode="bilinear", align_corners=False)
            return backbone.trunk(x[..., :64, :64] if n else x)
        return run

    # --- Fast R-CNN: one conv pass at scale 600, RoI pooling (our kernel), fc6, fc7, softmax and box deltas.
    # Each stage is timed on its own (as the paper's Fig. 2 splits the forward pass) and the totals add them.
    f600 = image_scale(height, width, cfg.scale, cfg.max_size)
    size600 = (round(height * f600), round(width * f600))
    t_conv600, feats600 = stage(f"conv at {cfg.scale}", conv_at(f600))
    rois600 = torch.cat([boxes.new_zeros(p, 1), boxes * f600], dim=1)  # (P, 5), batch index 0
    model = FastRCNN(backbone, NUM_CLASSES).to(device).eval()
    r6, r7 = (int(r) for r in cfg.svd_ranks.split(","))
    with torch.no_grad():
        svd_model = svd_compress(model, r6, r7) if cfg.svd_exact == "yes" else _svd_by_shape(backbone, r6, r7)
    svd_model.to(device).eval()

    def frcn_fc(m, n):  # FastRCNN.head after its RoI pooling, then im_detect's softmax
        x = F.relu(m.fc7(F.relu(m.fc6(pooled600[:n]))))
        return torch.softmax(m.cls_score(x), dim=1), m.bbox_pred(x)

    t_roi_pool, pooled600 = stage("roi pool", lambda n: model.roi_pool(feats600, rois600), small_warmup=False)
    pooled600 = pooled600.flatten(1)  # (P, C*7*7) or (P, C*6*6)
    t_frcn_fc, _ = stage("frcn fc+outputs", lambda n: frcn_fc(model, n))
    t_svd_fc, _ = stage("frcn svd fc+outputs", lambda n: frcn_fc(svd_model, n))

    # --- SPPnet: conv at 1 scale (the pass above) or 5, SPP pooling, fc6 (C*50 inputs), fc7, SVMs.
    spp = SPPnet(backbone).to(device).eval()
    zeros = torch.zeros(p, dtype=torch.long, device=device)
    t_spp_pool1, _ = stage("spp pool (1 scale)", lambda n: spp.pool([feats600], rois600, zeros),
                           small_warmup=False)
    pyramid = [stage(f"conv at {round(min(height, width) * f)} (pyramid)", conv_at(f)) for f in factors]
    t_pyramid, maps = sum(t for t, _ in pyramid), [m for _, m in pyramid]
    levels = assign_scale_levels(boxes, factors)
    rois5 = torch.cat([zeros[:, None].float(), boxes * boxes.new_tensor(factors)[levels][:, None]], dim=1)
    t_spp_pool5, spp_pooled = stage("spp pool (5 scales)", lambda n: spp.pool(maps, rois5, levels),
                                    small_warmup=False)
    t_spp_fc, _ = stage("spp fc+svm", lambda n: spp.score(spp_pooled[:n]))  # the same for 1 or 5 scales
    conv5_mb = sum(m.numel() for m in maps) * 4 / 1e6  # SPPnet caches the conv5 pyramid (fp32)
    del maps, pyramid

    # --- R-CNN: each proposal warped with 16 px of context, the whole net on crop batches, SVMs, regressors.
    rcnn = RCNN(backbone).to(device).eval()
    crop, batch = cfg.crop_size or RCNN_CROP.get(net, 224), cfg.crops_per_batch
    full = cfg.batches * batch >= p  # enough batches for every proposal: nothing to extrapolate
    index = torch.arange(p if full else cfg.batches * batch, device=device) % p
    crop_batches = [boxes[chunk] for chunk in index.split(batch)]

    def warp(bxs):
        src, dst = warp_windows(bxs, (height, width), crop)
        return warp_crops(image, src, dst, crop)

    # `n and 1`: the warm-up (n set) runs one batch
    t_conv, pool5 = stage("rcnn warp+conv (all batches)",
                          lambda n: [rcnn.pool5_features(warp(b)) for b in crop_batches[: n and 1]])
    t_fc, _ = stage("rcnn fc+svm (all batches)", lambda n: [rcnn.score_pool5(x) for x in pool5[: n and 1]])
    per_crop_conv, per_crop_fc = t_conv / len(index), t_fc / len(index)
    pool5_mb = p * pool5[0].shape[1] * 4 / 1e6  # R-CNN caches pool5 of every proposal (fp32)
    del pool5

    # --- Training: one SGD iteration (forward, backward, step) of each method's fine-tuning; the warm-up runs
    # a small iteration, which also allocates the momentum buffers.
    labels = torch.randint(0, NUM_CLASSES + 1, (max(cfg.train_crops, cfg.rois_per_batch),), generator=gen)
    labels = labels.to(device)

    def sgd_step(params, loss_fn):
        # FR and R-CNN solvers: base_lr 0.001, momentum 0.9, weight_decay 0.0005
        trained = [q for q in params if q.requires_grad]
        opt = torch.optim.SGD(trained, lr=1e-3, momentum=0.9, weight_decay=5e-4)

        def step(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(n).backward()
            opt.step()
        return step

    rcnn.train()  # the backbone keeps the paper's frozen layers (conv1 for S/M, conv1_1..conv2_2 for L)
    train_boxes = boxes[torch.arange(cfg.train_crops, device=device) % p]

    def rcnn_loss(n):  # n set (the warm-up): 2 crops
        crops = warp(train_boxes[: 2 if n else None]).detach()
        return F.cross_entropy(rcnn.finetune_logits(crops), labels[: len(crops)])

    t_rcnn_step, _ = stage(f"rcnn train ({cfg.train_crops} crops)", sgd_step(rcnn.parameters(), rcnn_loss),
                           True)
    spp.train()
    pooled = torch.rand(cfg.rois_per_batch, spp.spp_dim, generator=gen).to(device)  # cached pooled windows
    spp_loss = lambda n: F.cross_entropy(  # noqa: E731
        spp.finetune_logits(pooled[:n]), labels[: cfg.rois_per_batch][:n])
    fc_params = [*spp.fc6.parameters(), *spp.fc7.parameters(), *spp.cls_score.parameters()]
    t_spp_step, _ = stage("spp train (fc only)", sgd_step(fc_params, spp_loss), True)

    model.train()
    n_img, n_roi, n_fg = cfg.train_images, cfg.rois_per_batch, int(FG_FRACTION * cfg.rois_per_batch)
    images = F.interpolate(image, size600, mode="bilinear", align_corners=False).repeat(n_img, 1, 1, 1)
    picked = rois600[torch.randint(0, p, (n_roi,), generator=gen).to(device), 1:]
    rois = torch.cat([(torch.arange(n_roi, device=device) % n_img)[:, None].float(), picked], dim=1)
    roi_labels = torch.zeros(n_roi, dtype=torch.long, device=device)
    roi_labels[:n_fg] = labels[:n_fg].clamp(min=1)  # paper §2.3: 25% foreground, the rest background
    box_weights = torch.zeros(n_roi, 4 * (NUM_CLASSES + 1), device=device)
    fg_columns = 4 * roi_labels[:n_fg, None] + torch.arange(4, device=device)  # the true class's 4 deltas
    box_weights[torch.arange(n_fg, device=device)[:, None], fg_columns] = 1
    targets = {"labels": roi_labels, "bbox_weights": box_weights,  # as FR minibatch.py builds them
               "bbox_targets": torch.randn(box_weights.shape, generator=gen).to(device) * box_weights}
    warm_rois = torch.cat([rois.new_zeros(n_roi, 1), rois[:, 1:]], dim=1)  # all on the warm-up's one image

    def frcn_loss(n):  # n set (the warm-up): a 64 x 64 corner of one image; the pooling clips the RoIs to it
        losses = model(images[:1, :, :64, :64], warm_rois, targets) if n else model(images, rois, targets)
        return sum(losses.values())

    t_frcn_step, _ = stage(f"frcn train ({n_img} im, {n_roi} RoIs)", sgd_step(model.parameters(), frcn_loss),
                        True)

    # --- FLOPs per test image: 2 x multiply-adds of the conv and fc layers, as flops.trunk_flops counts.
    svms = 2 * backbone.fc_dim * NUM_CLASSES
    rcnn_regressors = 2 * rcnn.bbox_reg.in_features * rcnn.bbox_reg.out_features  # on pool5
    spp_window = fc_flops(spp) + svms + 2 * spp.spp_dim * spp.bbox_reg.out_features  # regressors on SPP
    frcn_outputs = 2 * backbone.fc_dim * (NUM_CLASSES + 1) * 5  # cls_score (21) + bbox_pred (84)
    conv600 = trunk_flops(backbone, *size600)
    pyramid = sum(trunk_flops(backbone, round(height * f), round(width * f)) for f in factors)
    flops = {"rcnn": p * (trunk_flops(backbone, crop, crop) + fc_flops(backbone) + svms + rcnn_regressors),
             "spp5": pyramid + p * spp_window, "spp1": conv600 + p * spp_window,
             "frcn": conv600 + p * (fc_flops(model) + frcn_outputs),
             "frcn_svd": conv600 + p * (fc_flops(svd_model) + frcn_outputs)}

    per_batch = (t_conv + t_fc) / len(crop_batches)
    rcnn_how = (f"measured: all {len(crop_batches)} batches of <= {batch} crops" if full else
                f"EXTRAPOLATED: {per_batch:.4f} s per batch of {batch} crops ({len(crop_batches)} batches"
                f" run) x {p}/{batch} batches")
    svd_how = "" if cfg.svd_exact == "yes" else " (factor shapes; values not computed)"
    test = {"rcnn": ((per_crop_conv + per_crop_fc) * p, rcnn_how),
            "spp5": (t_pyramid + t_spp_pool5 + t_spp_fc, f"conv at {len(factors)} scales + SPP + fc + SVMs"),
            "spp1": (t_conv600 + t_spp_pool1 + t_spp_fc, f"conv at {cfg.scale} + SPP + fc + SVMs"),
            "frcn": (t_conv600 + t_roi_pool + t_frcn_fc, f"conv at {cfg.scale} + RoI pool + fc"),
            "frcn_svd": (t_conv600 + t_roi_pool + t_svd_fc,
                         f"conv at {cfg.scale} + RoI pool + SVD fc" + svd_how)}
    units = {  # the unit times that rcnn_baselines.train_estimates multiplies by counts
        "rcnn_step_s": t_rcnn_step, "rcnn_step_crops": cfg.train_crops, "rcnn_crop_conv_s": per_crop_conv,
        "rcnn_crop_fc_s": per_crop_fc, "pool5_mb": pool5_mb, "spp_step_s": t_spp_step,
        "spp_step_windows": cfg.rois_per_batch, "spp_pyramid_s": t_pyramid, "conv5_mb": conv5_mb,
        "spp5_head_s": t_spp_pool5 + t_spp_fc, "frcn_step_s": t_frcn_step}
    return {"stages": stages, "test": test, "flops": flops, "units": units}


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
    nets = [n.strip() for n in cfg.nets.split(",") if n.strip()]
    for n in nets:
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
    per_net = {}
    for i, net in enumerate(nets):
        log(f"=== net {net} ({i + 1}/{len(nets)}) ===")
        per_net[net] = measure_net(net, cfg, device, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        done, left = (sum(ETA_WEIGHT.get(n, 1.0) for n in part) for part in (nets[: i + 1], nets[i + 1:]))
        if left:
            log(f"ETA for {','.join(nets[i + 1:])}: ~{(time.perf_counter() - start) * left / done:.0f} s")
    results = summarize(per_net, disk, cfg, device_name, time.perf_counter() - start)
    print_report(results)
    write_outputs(results, out)
    log(f"wrote {out}/speed_vs_rcnn.json, .csv and .png; total {time.perf_counter() - start:.0f} s")
    return results


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Config):  # --field=value or --field value for every Config field, typed by its default
        flag = f"--{f.name.replace('_', '-')}"
        parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default)
    return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    run(parse_args())
