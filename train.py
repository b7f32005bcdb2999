"""Train Fast R-CNN: single-stage multi-task training (paper §2.3), then evaluate on the test split.

    python train.py                              # the built-in data set, MobileNetV2, a few minutes on a CPU
    python train.py --preset voc07_vgg16 --data VOCdevkit/VOC2007 --weights vgg16-397923af.pth
    torchrun --nproc_per_node=2 train.py ...     # data-parallel (DDP: NCCL on GPUs, gloo on CPUs)

Top to bottom: config -> device -> model (with its ImageNet weights) -> data and proposals -> regression-target
statistics -> SGD -> loop -> checkpoints -> final model -> evaluation.
"""

import csv
import gc
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from detector import shapes
from detector.batches import BatchLoader
from detector.checkpoint import read_checkpoint, save_checkpoint
from detector.config import build_parser, resolve, resolve_device
from detector.data import load_voc, resolve_classes
from detector.errors import InputError
from detector.evaluate import evaluate_split
from detector.model import build_model, param_groups
from detector.plots import plot_loss_curve
from detector.proposals import proposals_for_split
from detector.roi_sampling import regression_stats
from detector.weights import default_weights


def lr_at(cfg, it: int) -> float:
    """Step schedule (solver.prototxt lr_policy "step"), with an optional linear warm-up."""
    lr = cfg.lr * cfg.gamma ** sum(it >= s for s in cfg.lr_steps)
    if it < cfg.warmup_iters:
        lr *= (it + 1) / cfg.warmup_iters
    return lr


def check_replicas(model: torch.nn.Module, world: int) -> None:
    """DDP must keep every rank's weights identical; a divergence means a bug, so it stops the run."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    for r, other in enumerate(gathered):
        if not torch.equal(other, flat):
            raise RuntimeError(f"DDP replicas diverged: rank {r} differs by {(other - flat).abs().max():.3g}")


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send before pre-empting a job) set a flag that the training
    loop reads between iterations, so the checkpoint it then writes holds the state at an iteration boundary."""

    def __init__(self):
        self.signal = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, world: int) -> int:
        """The signal any rank has received (0: none); under DDP every rank must stop at the same iteration."""
        if world == 1:
            return self.signal
        flag = torch.tensor([self.signal])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def restore(self) -> None:
        """Back to the handlers from before (after training: Ctrl-C interrupts evaluation again)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def main() -> int:
    args = build_parser(__doc__).parse_args()
    resumed = read_checkpoint(args.resume) if args.resume else None
    cfg = resolve(args, resumed["config"] if resumed else None)

    # --- distributed (torchrun sets WORLD_SIZE/RANK/LOCAL_RANK) ---
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = rank == 0
    log = print if main_rank else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed + rank)
    phases = {}

    # --- model: the backbone with its ImageNet weights (a bad --weights file fails here, before any long phase) ---
    weights = cfg.weights or default_weights(cfg.backbone)
    t0 = time.time()
    root = cfg.data or shapes.ensure_dataset(log=log)
    phases["dataset"] = time.time() - t0
    classes = resolve_classes(root, cfg.train_split, cfg.classes or None, log=log)
    model = build_model(cfg.backbone, len(classes), weights, cfg.fc_dim, cfg.freeze, log=log)
    if not weights:
        log("weights: none (random initialisation)")
    os.makedirs(cfg.out, exist_ok=True)
    log(cfg.to_json())
    if main_rank:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            f.write(cfg.to_json())

    # --- data: records, proposals, regression-target statistics ---
    t0 = time.time()
    log(f"data: {root} | {len(classes)} classes: {', '.join(classes)}")
    train_records, _ = load_voc(root, cfg.train_split, classes, log=log)
    if world > 1 and not main_rank:
        dist.barrier()  # rank 0 computes and caches the proposals first; the others read the cache
    train_props = proposals_for_split(train_records, cfg.train_proposals, cfg.max_proposals, cfg.workers,
                                      cfg.train_split, log)
    if world > 1 and main_rank:
        dist.barrier()
    means, stds = regression_stats([r.boxes for r in train_records], [r.labels for r in train_records],
                                   train_props, len(classes), cfg.bbox_thresh, include_flipped=cfg.use_flipped,
                                   widths=[r.width for r in train_records])
    phases["proposals_and_stats"] = time.time() - t0

    # --- solver ---
    model.to(device)
    model.set_target_stats(means, stds)
    groups = param_groups(model, cfg.weight_decay, cfg.bias_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=device.type in ("cpu", "cuda"))
    loader = BatchLoader(train_records, train_props, cfg, len(classes), means, stds, model.backbone.normalize,
                         seed=cfg.seed + rank)
    start = 0
    if resumed:
        training = resumed["training"]
        if training is None:
            raise InputError(f"--resume {args.resume}: a final model holds no training state; resume from "
                             "checkpoint.pt")
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(training["optimizer"])
        own = training["ranks"][rank] if rank < len(training["ranks"]) else None
        if own is None or training["world_size"] != world:
            raise InputError(f"--resume {args.resume} was written by {training['world_size']} process(es), this "
                             f"run has {world}: resume with the same number of processes")
        loader.load_state_dict(own["batches"])
        torch.set_rng_state(own["cpu_rng"])
        if device.type == "cuda" and own["cuda_rng"]:
            torch.cuda.set_rng_state(own["cuda_rng"][0], device)
        start = training["iter"]
        log(f"resumed from {args.resume} at iteration {start}")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def checkpoint(it: int) -> None:
        """checkpoint.pt at the boundary before iteration `it` (0-based): everything to continue exactly."""
        own = {"batches": loader.state_dict(), "cpu_rng": torch.get_rng_state(),
               "cuda_rng": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}
        ranks = [own]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, own)
        if main_rank:
            training = {"iter": it, "optimizer": optimizer.state_dict(), "world_size": world, "ranks": ranks}
            save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), model, classes, vars(cfg), root, folded=False,
                            training=training)

    # --- training loop ---
    csv_path = os.path.join(cfg.out, "metrics.csv")
    if main_rank and (start == 0 or not os.path.exists(csv_path)):
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(["iter", "loss", "loss_cls", "loss_box", "lr", "ms_per_iter"])
    model.train()
    stop = StopRequest()
    t_train, window, window_t = time.time(), [], time.time()
    for it in range(start, cfg.iters):
        received = stop.agreed(world)
        if received:
            checkpoint(it)
            log(f"\nstopped by signal {received}: saved {cfg.out}/checkpoint.pt at iteration {it}; continue "
                "with --resume")
            return 128 + received  # 130 for SIGINT, 143 for SIGTERM, as the shell reports them
        lr = lr_at(cfg, it)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        batch = loader.next()
        targets = {"labels": batch.labels.to(device), "bbox_targets": batch.bbox_targets.to(device),
                   "bbox_weights": batch.bbox_weights.to(device)}
        losses = train_model(batch.images.to(device), batch.rois.to(device), targets)
        loss = losses["loss_cls"] + cfg.loss_box_weight * losses["loss_box"]
        if not math.isfinite(loss.item()):
            print(f"error: non-finite loss at iteration {it + 1} (cls {losses['loss_cls'].item():.4g}, box "
                  f"{losses['loss_box'].item():.4g}); stopping. The last good checkpoint in {cfg.out} is kept. "
                  "Try a lower --lr or check the data for degenerate boxes.", file=sys.stderr)
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
            if main_rank:
                with open(csv_path, "a", newline="") as f:
                    csv.writer(f).writerow([done, *(f"{v:.5f}" for v in mean), f"{lr:.6g}", f"{ms:.1f}"])
            window, window_t = [], time.time()
        if done % cfg.checkpoint_every == 0 and done < cfg.iters:
            checkpoint(done)
    stop.restore()
    phases["training"] = time.time() - t_train
    checkpoint(cfg.iters)
    if world > 1:
        check_replicas(model, world)
        log(f"DDP: weights identical on all {world} ranks")
        # The DDP reducer holds the process group and gloo's worker threads; free it now, while the interpreter is
        # alive (left to interpreter shutdown, its teardown can abort the process: "terminate called without an
        # active exception"), and leave the group only after every rank is done with it.
        del train_model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        if not main_rank:
            return 0

    # --- final model (normalisation folded into bbox_pred) and evaluation ---
    save_checkpoint(os.path.join(cfg.out, "final.pt"), model, classes, vars(cfg), root, folded=True)
    if os.path.exists(csv_path):
        plot_loss_curve(csv_path, os.path.join(cfg.out, "loss.png"))
    if not cfg.evaluate:
        return 0
    t_eval = time.time()
    test_records, _ = load_voc(root, cfg.test_split, classes, log=log)
    test_props = proposals_for_split(test_records, cfg.test_proposals, cfg.max_proposals, cfg.workers,
                                     cfg.test_split, log)
    metrics = evaluate_split(model, test_records, test_props, classes, cfg, cfg.out, cfg.test_split, log)
    phases["evaluation"] = time.time() - t_eval
    log("phases: " + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()) +
        f" | {phases['training'] * 1000 / max(cfg.iters - start, 1):.0f} ms/iteration")
    log(f"mAP {metrics['mAP']:.4f} | outputs in {cfg.out}/ (final.pt, metrics.json, results/, loss.png)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
