"""The training/test configuration: one dataclass, the paper's defaults, named presets and the command line.

Every field has a default from the original code (FR = rbgirshick/fast-rcnn `lib/fast_rcnn/config.py` and the
`models/*/solver.prototxt` files) or the paper, and a help text. A preset is a named set of overrides; anything can
then be overridden again on the command line (`--lr 0.002`, `--scales 480,600`).
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields

from detector.errors import InputError


class UsageError(InputError):
    """A command-line value that is malformed or out of range: the entry points exit with status 2 for it."""


def option(default, help: str, **kw):
    """A dataclass field with its help text (and, for tuples, the element type as kind=...): what
    parse_dataclass and build_parser turn into a command-line option."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- run ---
    preset: str = option("demo", "named configuration to start from (see PRESETS)")
    out: str = option("", "output directory (default runs/<preset>)")
    device: str = option("auto", "cuda, cpu or auto (CUDA when available: the Triton kernels; else the CPU paths)")
    seed: int = option(3, "random seed; FR config.py RNG_SEED = 3")
    resume: str = option("", "checkpoint to continue from exactly (model, optimizer, schedule, sampler RNG)")
    evaluate: bool = option(True, "evaluate the test split after training")
    ddp_timeout: float = option(240.0, "minutes a data-parallel process waits for the others in one step; covers "
                                "the others waiting while process 0 computes the proposals")
    # --- data ---
    data: str = option("", "VOC-format root (Annotations/, JPEGImages/, ImageSets/Main/); empty: the built-in data set")
    classes: str = option("", "comma-separated class names; empty: VOC's 20 for VOC data, else inferred from training")
    train_split: str = option("trainval", "ImageSets/Main/<split>.txt used for training")
    test_split: str = option("test", "ImageSets/Main/<split>.txt evaluated at the end")
    train_proposals: str = option("fast", "fast | quality (selective search), dense (paper §5.5 sliding windows) "
                                  "or a .mat proposal file")
    test_proposals: str = option("fast", "fast | quality (selective search), dense (paper §5.5 sliding windows) "
                                 "or a .mat proposal file")
    max_proposals: int = option(2000, "proposals kept per image (or tile), selective search or dense; paper §2: R "
                                "is typically around 2000")
    tile: int = option(0, "cut images into TILE x TILE tiles at native resolution for training and testing "
                       "(detector/tiling.py); 0 = off. Pair it with --scales/--test-scales TILE --max-size/"
                       "--test-max-size TILE so the network sees the tiles unscaled")
    tile_overlap: float = option(0.2, "fraction of a tile shared with each neighbour (SAHI's 0.2): objects "
                                 "smaller than the overlap lie whole inside some tile")
    workers: int = option(0, "processes for selective search (0: one per core)")
    # --- model ---
    backbone: str = option("vgg16", "caffenet (S), vgg_cnn_m_1024 (M), vgg16 (L) or mobilenet_v2")
    weights: str = option("", "ImageNet weights file (torchvision-format state dict); empty: none (or the packaged "
                          "MobileNetV2 weights for mobilenet_v2)")
    fc_dim: int = option(0, "fc6/fc7 width for mobilenet_v2 (0: the backbone's default)")
    freeze: str = option("", "comma-separated trunk layers kept fixed, replacing the paper's choice (empty: the paper's)")
    frozen_cache_mb: float = option(0.0, "memory (MiB) for the leading frozen trunk layers' outputs, computed once per "
                                    "(image, scale, flip) and reused (detector/frozen_features.py; exact); 0 = off: "
                                    "the whole trunk runs on each padded minibatch, as FR")
    # --- training (FR config.py __C.TRAIN, paper §2.3) ---
    scales: tuple = option((600,), "training scales, shorter side in pixels; one is picked per image (FR SCALES)", kind=int)
    max_size: int = option(1000, "cap on the longer side (FR MAX_SIZE)")
    ims_per_batch: int = option(2, "images per SGD minibatch, N (paper §2.3)")
    rois_per_batch: int = option(128, "RoIs per minibatch, R = 64 per image (paper §2.3)")
    fg_fraction: float = option(0.25, "fraction of foreground RoIs (paper §2.3)")
    fg_thresh: float = option(0.5, "foreground if IoU >= this (paper §2.3)")
    bg_thresh_hi: float = option(0.5, "background if IoU in [lo, hi) (paper §2.3)")
    bg_thresh_lo: float = option(0.1, "lower background bound, a heuristic for hard example mining (paper §2.3)")
    use_flipped: bool = option(True, "horizontal flip with probability 0.5 (paper §2.3)")
    bbox_thresh: float = option(0.5, "RoIs with IoU >= this get regression targets (FR BBOX_THRESH)")
    loss_box_weight: float = option(1.0, "lambda in paper Eq. 1")
    # --- solver (models/*/solver.prototxt) ---
    iters: int = option(40000, "SGD iterations (FR tools/train_net.py --iters 40000)")
    lr: float = option(0.001, "base learning rate (solver.prototxt base_lr)")
    lr_steps: tuple = option((30000,), "iterations where lr is multiplied by gamma (stepsize 30000)", kind=int)
    gamma: float = option(0.1, "learning-rate decay factor")
    warmup_iters: int = option(0, "linear warm-up iterations (not in the paper; 0 = off)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(0.0005, "on weights only: the prototxts set decay_mult 0 for biases")
    bias_lr_mult: float = option(2.0, "biases learn at 2x lr (lr_mult 2 in every prototxt)")
    log_every: int = option(20, "iterations per progress line")
    checkpoint_every: int = option(10000, "iterations per checkpoint (FR SNAPSHOT_ITERS)")
    # --- test (FR __C.TEST, test.py) ---
    test_scales: tuple = option((600,), "test scales; several give the paper's multi-scale testing", kind=int)
    test_max_size: int = option(1000, "cap on the longer side at test time")
    nms: float = option(0.3, "per-class NMS IoU threshold (FR TEST.NMS)")
    score_thresh: float = option(0.0, "drop detections scoring below this")
    max_per_class: int = option(100, "top detections kept per class per image before NMS (FR test_net max_per_image)")
    max_per_image: int = option(0, "cap on detections per image across classes after NMS (0: no cap)")
    eval_metric: str = option("voc07", "voc07 (11-point AP, VOC2007 devkit) or area (VOC2010+)")
    svd_fc6: int = option(1024, "truncated-SVD rank of fc6 (paper §3.1, FR compress_net.py)")
    svd_fc7: int = option(256, "truncated-SVD rank of fc7")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


PRESETS: dict[str, dict] = {
    # The paper's VGG16 run on VOC 2007 trainval (Table 1, 66.9 mAP): every value is already the default above.
    "voc07_vgg16": dict(backbone="vgg16", train_proposals="quality", test_proposals="quality"),
    # Model M (VGG_CNN_M_1024) and model S (CaffeNet): same solver and data, other trunks (Table 4, 59.2 / 57.1 mAP).
    "voc07_vgg_cnn_m": dict(backbone="vgg_cnn_m_1024", train_proposals="quality", test_proposals="quality"),
    "voc07_caffenet": dict(backbone="caffenet", train_proposals="quality", test_proposals="quality"),
    # The default run: the built-in shapes data set, MobileNetV2 with the packaged ImageNet weights, and a schedule
    # scaled to a 2-core CPU (a few minutes). Values that differ from the paper are tuned for that budget.
    "demo": dict(
        backbone="mobilenet_v2",
        # Fine-tune the last three blocks (11-13, the 96-channel stride-16 stage) and the head: the profile of an
        # iteration (bench/profile_train.py) put 40% of its time in the backward, which stops at the first trained
        # block; training blocks 7-13 took 200 ms/iteration for mAP 0.887, 11-13 with a 512-wide head 141 ms for
        # 0.891 (bench/RESULTS.md, "The default run").
        freeze="0,1,2,3,4,5,6,7,8,9,10",
        fc_dim=512,
        # The frozen blocks' outputs are kept per (image, scale, flip) and reused: exact (frozen_features.py); over
        # 7.5 epochs at 4 scales x 2 flips a third of the images come back (train.py logs it), ~260 MiB.
        frozen_cache_mb=1024,
        # The images are 217-320 px: scaled to a shorter side of 288-384 (one picked per image, the paper's
        # multi-scale training, §5.2), small objects cover several stride-16 cells; tested at 352 (RESULTS.md).
        scales=(288, 320, 352, 384),
        max_size=533,
        test_scales=(352,),
        test_max_size=533,
        # The paper's background band [0.1, 0.5) never samples RoIs far from every object (§2.3: a heuristic for
        # hard example mining). Here the unlabelled distractors (letters, scratches) lie far from objects, so with
        # 0.1 they are never seen as background and come back as false positives (bench/RESULTS.md).
        bg_thresh_lo=0.0,
        iters=1500,  # 7.5 epochs of the 400 training images, sized to a 2-core CPU's 5-minute budget
        lr=0.01,  # a short schedule on a small data set needs a larger step than 0.001 (RESULTS.md: 0.02 is worse)
        lr_steps=(1125,),
        warmup_iters=50,
        log_every=50,
        checkpoint_every=500,
        # The paper's ranks (1024, 256) are for 4096-wide layers; this head is 512 wide (RESULTS.md: the ranks
        # measured on the default run).
        svd_fc6=256,
        svd_fc7=128,
    ),
}


def parse_value(spec: dataclasses.Field, text: str):
    """A command-line string as the type of a dataclass field: bool (true/false, 1/0, yes/no, on/off), a tuple
    ("480,600", element type from the field's metadata "kind", default str), int, float or str."""
    if spec.type is tuple:
        return tuple(spec.metadata.get("kind", str)(v) for v in text.split(",") if v.strip())
    if spec.type is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    return spec.type(text)


def parse_dataclass(cls, argv: list[str] | None = None, description: str = ""):
    """An instance of dataclass `cls` with every field settable as --field-name VALUE (typed by parse_value)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for spec in fields(cls):
        parser.add_argument("--" + spec.name.replace("_", "-"), dest=spec.name, default=None,
                            metavar=spec.name.upper(), help=spec.metadata.get("help"))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    values = {}
    for spec in fields(cls):
        if spec.name in given:
            try:
                values[spec.name] = parse_value(spec, given[spec.name])
            except ValueError as e:
                parser.error(f"--{spec.name.replace('_', '-')} {given[spec.name]!r}: {e}")
    return cls(**values)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="presets: " + ", ".join(PRESETS))
    for spec in fields(Config):
        name = "--" + spec.name.replace("_", "-")
        parser.add_argument(name, dest=spec.name, default=None, metavar=spec.name.upper(), help=spec.metadata["help"])
    return parser


def config_from_dict(saved: dict) -> Config:
    """A Config from a saved configuration (a checkpoint's "config"): fields this version does not know are left
    out, new fields keep their defaults, lists become the tuples the fields hold."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})


def resolve(args: argparse.Namespace, base: dict | None = None) -> Config:
    """Defaults, then the preset (or `base`, a saved configuration), then whatever the command line set."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in fields(Config)}}
    if base is not None:
        cfg = config_from_dict(base)
    else:
        preset = given.get("preset", Config.preset)
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
        cfg = Config(preset=preset, **PRESETS[preset])
    specs = {f.name: f for f in fields(Config)}
    for key, text in given.items():
        try:
            setattr(cfg, key, parse_value(specs[key], text))
        except ValueError as e:
            raise UsageError(f"--{key.replace('_', '-')} {text!r}: {e}") from None
    if not cfg.out:
        cfg.out = f"runs/{cfg.preset}"
    check_values(cfg)
    return cfg


# (field, test, what it must be): the ranges a run needs, checked before anything starts
_RANGES = [
    ("iters", lambda v: v >= 1, "at least 1"),
    ("ddp_timeout", lambda v: v > 0, "positive"),
    ("lr", lambda v: v > 0, "positive"),
    ("gamma", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("bias_lr_mult", lambda v: v >= 0, "0 or more"),
    ("warmup_iters", lambda v: v >= 0, "0 or more"),
    ("log_every", lambda v: v >= 1, "at least 1"),
    ("checkpoint_every", lambda v: v >= 1, "at least 1"),
    ("frozen_cache_mb", lambda v: v >= 0, "0 (off) or more"),
    ("ims_per_batch", lambda v: v >= 1, "at least 1"),
    ("rois_per_batch", lambda v: v >= 1, "at least 1"),
    ("fg_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("fg_thresh", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("bg_thresh_hi", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("bg_thresh_lo", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("bbox_thresh", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("loss_box_weight", lambda v: v >= 0, "0 or more"),
    ("scales", lambda v: len(v) > 0 and min(v) > 0, "one or more positive sizes"),
    ("max_size", lambda v: v > 0, "positive"),
    ("test_scales", lambda v: len(v) > 0 and min(v) > 0, "one or more positive sizes"),
    ("test_max_size", lambda v: v > 0, "positive"),
    ("lr_steps", lambda v: all(s >= 0 for s in v), "iterations (0 or more)"),
    ("max_proposals", lambda v: v >= 1, "at least 1"),
    ("tile", lambda v: v >= 0, "0 (off) or a tile side in pixels"),
    ("tile_overlap", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("workers", lambda v: v >= 0, "0 (one per core) or more"),
    ("fc_dim", lambda v: v >= 0, "0 (the default) or more"),
    ("nms", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("score_thresh", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("max_per_class", lambda v: v >= 1, "at least 1"),
    ("max_per_image", lambda v: v >= 0, "0 (no cap) or more"),
    ("svd_fc6", lambda v: v >= 1, "at least 1"),
    ("svd_fc7", lambda v: v >= 1, "at least 1"),
]


def check_values(cfg: Config) -> None:
    """Raise UsageError naming the first field whose value a run cannot use."""
    for name, ok, what in _RANGES:
        value = getattr(cfg, name)
        if not ok(value):
            raise UsageError(f"--{name.replace('_', '-')} {value!r}: must be {what}")
    if cfg.bg_thresh_lo > cfg.bg_thresh_hi:
        raise UsageError(f"--bg-thresh-lo {cfg.bg_thresh_lo} is above --bg-thresh-hi {cfg.bg_thresh_hi}")
    if cfg.rois_per_batch < cfg.ims_per_batch:
        raise UsageError(f"--rois-per-batch {cfg.rois_per_batch} is less than one RoI per image "
                         f"(--ims-per-batch {cfg.ims_per_batch})")
    if cfg.eval_metric not in ("voc07", "area"):
        raise UsageError(f"--eval-metric {cfg.eval_metric!r}: must be voc07 or area")
    for name in ("train_proposals", "test_proposals"):
        value = getattr(cfg, name)
        if value not in ("fast", "quality", "dense") and not value.endswith(".mat"):
            raise UsageError(f"--{name.replace('_', '-')} {value!r}: must be fast, quality or a .mat file, or "
                             "dense (sliding windows)")
    if cfg.tile and any(v.endswith(".mat") for v in (cfg.train_proposals, cfg.test_proposals)):
        raise UsageError(f"--tile {cfg.tile}: a .mat file holds proposals of whole images, not of tiles; use "
                         "fast, quality or dense proposals with tiling")


def resolve_device(name: str):
    """The torch.device a config's `device` names ("auto": CUDA when available, else the CPU)."""
    import torch

    # Denormal floats (tiny activations) run ~10x slower on x86 CPUs; flushing them to zero changes no result
    # that matters and keeps CPU training fast.
    torch.set_flush_denormal(True)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: must be auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: must be auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
