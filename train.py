"""Train Fast R-CNN: single-stage multi-task training (paper §2.3), then evaluate on the test split.

    python train.py                              # the built-in data set, MobileNetV2, a few minutes on a CPU
    python train.py --preset voc07_vgg16 --data VOCdevkit/VOC2007 --weights vgg16-397923af.pth
    torchrun --nproc_per_node=2 train.py ...     # data-parallel (DDP: NCCL on GPUs, gloo on CPUs)

Top to bottom: config -> every input checked -> processes -> model (with its ImageNet weights) -> data and
proposals -> regression-target statistics -> SGD -> loop -> checkpoints -> final model -> evaluation.
Exit status: 0 done, 1 bad input or a failed run (one message, no traceback), 2 a bad command-line value,
130 / 143 stopped by Ctrl-C / SIGTERM after saving a checkpoint that --resume continues exactly.
"""

import csv
import math
import os
import signal
import sys
import time

import numpy as np
import torch

from detector import shapes
from detector.batches import BatchLoader
from detector.checkpoint import read_checkpoint, save_checkpoint
from detector.config import UsageError, build_parser, resolve, resolve_device
from detector.data import load_voc, read_split_ids, resolve_classes
from detector.distributed import Group
from detector.errors import InputError
from detector.evaluate import evaluate_split
from detector.frozen_features import FrozenFeatures
from detector.model import build_model, param_groups
from detector.plots import plot_loss_curve
from detector.progress import peak_memory_mb
from detector.proposals import proposals_for_split
from detector.roi_sampling import regression_stats
from detector.tiling import DEFAULT_MIN_VISIBLE, small_object_warning, tile_records
from detector.weights import default_weights

# Fault injection for the tests of what a failure on one process does to the others: "RANK:data" fails that
# process's data phase, "RANK:nonfinite@N" makes its loss NaN at iteration N. Empty (the default): no effect.
FAULT = os.environ.get("FASTRCNN_TEST_FAULT", "")


def lr_at(cfg, it: int) -> float:
    """Step schedule (solver.prototxt lr_policy "step"), with an optional linear warm-up."""
    lr = cfg.lr * cfg.gamma ** sum(it >= s for s in cfg.lr_steps)
    if it < cfg.warmup_iters:
        lr *= (it + 1) / cfg.warmup_iters
    return lr


def check_inputs(cfg) -> None:
    """Every path the run will read, checked before any long phase (the data set itself is validated as read)."""
    if cfg.data:
        if not os.path.isdir(cfg.data):
            raise InputError(f"--data {cfg.data}: no such directory")
        for split in (cfg.train_split, *([cfg.test_split] if cfg.evaluate else [])):
            read_split_ids(cfg.data, split)  # names the missing split file and the splits that exist
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise InputError(f"--weights {cfg.weights}: no such file")
    for name in ("train_proposals", "test_proposals"):
        path = getattr(cfg, name)
        if path.endswith(".mat") and not os.path.isfile(path):
            raise InputError(f"--{name.replace('_', '-')} {path}: no such file")


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send before pre-empting a job) set a flag that the training
    loop reads once per iteration, so the checkpoint it then writes holds the state at an iteration boundary."""

    def __init__(self):
        self.signal = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        """Back to the handlers from before (after training: Ctrl-C interrupts evaluation again)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def main() -> int:
    args = build_parser(__doc__).parse_args()
    resumed = read_checkpoint(args.resume) if args.resume else None
    cfg = resolve(args, resumed["config"] if resumed else None)
    check_inputs(cfg)
    with Group(resolve_device(cfg.device), cfg.ddp_timeout) as group:
        run = prepare(cfg, group, resumed, args.resume)
        code = train(cfg, group, run)
        if code:
            return code
        if group.world > 1:
            group.check_replicas(run.model)
            run.log(f"DDP: weights identical on all {group.world} processes")
    if not group.main:
        return 0
    return finish(cfg, run)


class Run:
    """What the phases hand on: the data, the model and its solver, where training starts, phase times."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def prepare(cfg, group: Group, resumed: dict | None, resume_path: str) -> Run:
    """The model with its ImageNet weights, the training data and proposals, the solver, the resumed state."""
    log = print if group.main else (lambda *a, **k: None)
    device = group.device
    torch.manual_seed(cfg.seed + group.rank)
    phases = {}
    # --- model: the backbone with its ImageNet weights (a bad --weights file fails here, before any long phase) ---
    t0 = time.time()
    root = cfg.data or group.rank0_first(lambda: shapes.ensure_dataset(log=log))
    phases["dataset"] = time.time() - t0
    classes = resolve_classes(root, cfg.train_split, cfg.classes or None, log=log)
    weights = cfg.weights or default_weights(cfg.backbone)
    model = build_model(cfg.backbone, len(classes), weights, cfg.fc_dim, cfg.freeze, log=log)
    if not weights:
        log("weights: none (random initialisation)")

    # --- data: records and proposals (process 0 first: the others read its cache), target statistics ---
    t0 = time.time()
    log(f"data: {root} | {len(classes)} classes: {', '.join(classes)}")

    def load_training_data():
        if FAULT == f"{group.rank}:data":
            raise InputError(f"injected data failure ({FAULT})")
        records, _ = load_voc(root, cfg.train_split, classes, log=log)
        # Objects below one feature stride as the network sees them are the usual cause of a near-zero AP on
        # large images (aerial, microscopy): say so, and how to fix it, before any long phase.
        warning = small_object_warning(records, cfg.scales, cfg.max_size, round(1 / model.roi_pool.spatial_scale),
                                       cfg.tile)
        if warning:
            log(f"warning: {warning}")
        if cfg.tile:  # tiles without objects are left out: background-only images add no object to learn
            images = len(records)
            records = tile_records(records, cfg.tile, cfg.tile_overlap, keep_empty=False)
            log(f"tiling: {images} images -> {len(records)} tiles of at most {cfg.tile} px with objects "
                f"(overlap {cfg.tile_overlap:g}; an object cut by a tile border is kept, clipped, when at least "
                f"{DEFAULT_MIN_VISIBLE:.0%} of its area lies inside)")
        # Selective search and the dense grid at the working scale: the largest training scale.
        return records, proposals_for_split(records, cfg.train_proposals, cfg.max_proposals, cfg.workers,
                                            cfg.train_split, log, scale=max(cfg.scales), max_size=cfg.max_size)

    records, proposals = group.rank0_first(load_training_data)
    means, stds = regression_stats([r.boxes for r in records], [r.labels for r in records], proposals,
                                   len(classes), cfg.bbox_thresh, include_flipped=cfg.use_flipped,
                                   widths=[r.width for r in records])
    phases["proposals_and_stats"] = time.time() - t0

    # --- solver and the resumed state ---
    model.to(device)
    model.set_target_stats(means, stds)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.bias_lr_mult), lr=cfg.lr,
                                momentum=cfg.momentum, fused=device.type in ("cpu", "cuda"))
    try:
        loader = BatchLoader(records, proposals, cfg, len(classes), means, stds, model.backbone.normalize,
                             seed=cfg.seed, rank=group.rank, world=group.world)
    except ValueError as e:
        raise InputError(f"{root} {cfg.train_split}: {e}") from None
    start = 0
    if resumed:
        training = resumed["training"]
        if training is None:
            raise InputError(f"--resume {resume_path}: a final model holds no training state; resume from "
                             "checkpoint.pt")
        if training["world_size"] != group.world:
            raise InputError(f"--resume {resume_path} was written by {training['world_size']} process(es) and "
                             f"this run has {group.world}: each process's image share and random state would change, "
                             "so the run would not continue exactly; resume with the same number of processes")
        own = training["ranks"][group.rank]
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(training["optimizer"])
        loader.load_state_dict(own["batches"])
        torch.set_rng_state(own["cpu_rng"])
        if device.type == "cuda" and own["cuda_rng"]:
            torch.cuda.set_rng_state(own["cuda_rng"][0], device)
        start = training["iter"]
        log(f"resumed from {resume_path} at iteration {start}")
    # --- the output folder: written only once every input has been read ---
    if group.main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            f.write(cfg.to_json())
    log(cfg.to_json())
    return Run(root=root, classes=classes, model=model, optimizer=optimizer, loader=loader, start=start, log=log,
               phases=phases, csv_path=os.path.join(cfg.out, "metrics.csv"))


def save_training_state(cfg, group: Group, run: Run, it: int) -> None:
    """checkpoint.pt at the boundary before iteration `it` (0-based): everything to continue exactly."""
    cuda = group.device.type == "cuda"
    ranks = group.gather({"batches": run.loader.state_dict(), "cpu_rng": torch.get_rng_state(),
                          "cuda_rng": [torch.cuda.get_rng_state(group.device)] if cuda else []})
    if group.main:
        training = {"iter": it, "optimizer": run.optimizer.state_dict(), "world_size": group.world, "ranks": ranks}
        save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), run.model, run.classes, vars(cfg), run.root,
                        folded=False, training=training)


def train(cfg, group: Group, run: Run) -> int:
    """The SGD loop from run.start to cfg.iters; returns the exit status (0: finished)."""
    model, optimizer, loader, log, device = run.model, run.optimizer, run.loader, run.log, group.device
    train_model = torch.nn.parallel.DistributedDataParallel(model) if group.world > 1 else model
    if group.main and (run.start == 0 or not os.path.exists(run.csv_path)):
        with open(run.csv_path, "w", newline="") as f:
            csv.writer(f).writerow(["iter", "loss", "loss_cls", "loss_box", "lr", "ms_per_iter"])
    model.train()
    frozen = FrozenFeatures(model.backbone, cfg.frozen_cache_mb)
    if cfg.frozen_cache_mb > 0 and not frozen.layers:
        log("--frozen-cache-mb: the trunk starts with a trainable layer, nothing to keep; the cache is off")
    stop = StopRequest()
    try:
        t_train, window, window_t = time.time(), [], time.time()
        for it in range(run.start, cfg.iters):
            lr = lr_at(cfg, it)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            batch = loader.next()
            # the frozen layers' outputs, reused where this (image, scale, flip) came before (or the images)
            inputs, start = frozen.trunk_input(batch, device)
            losses = train_model(inputs, batch.rois.to(device), batch.targets(device), start=start)
            loss = losses["loss_cls"] + cfg.loss_box_weight * losses["loss_box"]
            if FAULT == f"{group.rank}:nonfinite@{it + 1}":
                loss = loss * float("nan")
            # one agreement per iteration: every process stops together, before a backward the others would wait in
            nonfinite, received = group.flags(not math.isfinite(loss.item()), stop.signal)
            if nonfinite:
                print(f"error: non-finite loss at iteration {it + 1} on process(es) {nonfinite} (here: cls "
                      f"{losses['loss_cls'].item():.4g}, box {losses['loss_box'].item():.4g}); stopping. The last "
                      f"good checkpoint in {cfg.out} is kept. Try a lower --lr or check the data for degenerate "
                      "boxes.", file=sys.stderr)
                return 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window.append((loss.item(), losses["loss_cls"].item(), losses["loss_box"].item()))
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iters:
                ms = (time.time() - window_t) * 1000 / len(window)
                mean = np.mean(window, axis=0)
                eta = ms * (cfg.iters - done) / 1000
                log(f"iter {done}/{cfg.iters} | loss {mean[0]:.3f} (cls {mean[1]:.3f} box {mean[2]:.3f}) | "
                    f"lr {lr:.2g} | {ms:.0f} ms/it | eta {eta / 60:.1f}m", flush=True)
                if group.main:
                    with open(run.csv_path, "a", newline="") as f:
                        csv.writer(f).writerow([done, *(f"{v:.5f}" for v in mean), f"{lr:.6g}", f"{ms:.1f}"])
                window, window_t = [], time.time()
            if received and done < cfg.iters:
                save_training_state(cfg, group, run, done)
                log(f"\nstopped by signal {received}: saved {cfg.out}/checkpoint.pt at iteration {done}; "
                    "continue with --resume")
                return 128 + received  # 130 for SIGINT, 143 for SIGTERM, as shells report them
            if done % cfg.checkpoint_every == 0 and done < cfg.iters:
                save_training_state(cfg, group, run, done)
        run.phases["training"] = time.time() - t_train
        if frozen.layers:
            log(frozen.summary())
        run.iters_run = cfg.iters - run.start
        save_training_state(cfg, group, run, cfg.iters)
        return 0
    finally:
        stop.restore()


def finish(cfg, run: Run) -> int:
    """The final model (target normalisation folded into bbox_pred), the loss plot, and the evaluation."""
    log, phases = run.log, run.phases
    save_checkpoint(os.path.join(cfg.out, "final.pt"), run.model, run.classes, vars(cfg), run.root, folded=True)
    if os.path.exists(run.csv_path):
        plot_loss_curve(run.csv_path, os.path.join(cfg.out, "loss.png"))
    if not cfg.evaluate:
        return 0
    t_eval = time.time()
    test_records, _ = load_voc(run.root, cfg.test_split, run.classes, log=log, clean=False)  # the devkit's truth
    metrics = evaluate_split(run.model, test_records, run.classes, cfg, cfg.out, cfg.test_split, log)
    phases["evaluation"] = time.time() - t_eval
    log("phases: " + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()) +
        f" | {phases['training'] * 1000 / max(run.iters_run, 1):.0f} ms/iteration | peak memory "
        f"{peak_memory_mb(run.model.bbox_means.device):.0f} MB")
    log(f"mAP {metrics['mAP']:.4f} | outputs in {cfg.out}/ (final.pt, metrics.json, results/, loss.png)")
    return 0


def cli() -> int:
    """main() with bad input reported as one line: exit status 2 for a bad command-line value, 1 otherwise."""
    try:
        return main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
