"""Where a training iteration's time goes: the profile behind the demo recipe's speed (issue: the default run).

Runs train.py's own preparation (data set, proposals, model, solver, minibatches) for a preset, then times
iterations of the training step split into stages, the device synchronised at each boundary:
    data        the minibatch: images read, flipped, scaled, normalised; RoIs sampled (batches.BatchLoader)
    frozen      the leading frozen trunk layers (only with --frozen-cache-mb > 0, where they run apart; reused
                maps cost nothing here)
    conv        the rest of the trunk (all of it with the cache off)
    roi_pool, fc6, fc7, rest    the model's forward after the trunk (rest: scores, deltas, the loss)
    backward    loss.backward()
    step        the SGD step
The first iterations are warm-up and not counted. Times are of this machine at this moment: compare stages as
shares of one run, not absolute times across runs.

    python bench/profile_train.py                         # the demo preset, as python train.py runs it
    python bench/profile_train.py --frozen-cache-mb 0     # the same with the cache off
    python bench/profile_train.py --iters 60 --skip 10    # any train.py option is accepted
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `python bench/...` finds train.py, detector/
import train  # noqa: E402
from detector.config import build_parser, resolve, resolve_device  # noqa: E402
from detector.distributed import Group  # noqa: E402
from detector.frozen_features import FrozenFeatures  # noqa: E402
from detector.timing import StageTimer, sync  # noqa: E402

STAGES = ["data", "frozen", "conv", "roi_pool", "fc6", "fc7", "rest", "backward", "step"]


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--iters", type=int, default=40, help="iterations timed (default 40)")
    own.add_argument("--skip", type=int, default=5, help="warm-up iterations not counted (default 5)")
    args, rest = own.parse_known_args()
    parser = build_parser(__doc__)
    cfg = resolve(parser.parse_args(rest + ["--out", "/tmp/profile_train"]), None)
    with Group(resolve_device(cfg.device), cfg.ddp_timeout) as group:
        run = train.prepare(cfg, group, None, "")
    model, optimizer, loader, device = run.model, run.optimizer, run.loader, group.device
    frozen = FrozenFeatures(model.backbone, cfg.frozen_cache_mb)
    model.train()
    per_iter = {stage: [] for stage in STAGES}
    for it in range(args.skip + args.iters):
        timer = StageTimer(model, device)
        sync(device)
        t0 = time.perf_counter()
        batch = loader.next()
        targets = batch.targets(device)
        t_data = time.perf_counter()
        inputs, start = frozen.trunk_input(batch, device)
        sync(device)
        t_frozen = time.perf_counter()
        if not frozen.layers:  # the cache is off: trunk_input only padded the images, part of the data stage
            t_data = t_frozen
        with timer:
            losses = model(inputs, batch.rois.to(device), targets, start=start)
            loss = losses["loss_cls"] + cfg.loss_box_weight * losses["loss_box"]
            timer.tick("rest")
        optimizer.zero_grad(set_to_none=True)
        t_fwd = time.perf_counter()
        loss.backward()
        sync(device)
        t_bwd = time.perf_counter()
        optimizer.step()
        sync(device)
        t_step = time.perf_counter()
        if it < args.skip:
            continue
        times = {"data": t_data - t0, "frozen": t_frozen - t_data, **timer.seconds, "backward": t_bwd - t_fwd,
                 "step": t_step - t_bwd}
        for stage in STAGES:
            per_iter[stage].append(times.get(stage, 0.0))
    total = sum(statistics.mean(v) for v in per_iter.values())
    print(f"\n{cfg.preset} preset, {cfg.backbone}, frozen cache {cfg.frozen_cache_mb:g} MiB, {args.iters} "
          f"iterations after {args.skip} warm-up, {torch.get_num_threads()} threads, device {device}")
    print(f"{'stage':>10} {'ms/it':>8} {'share':>6}")
    for stage, v in per_iter.items():
        print(f"{stage:>10} {statistics.mean(v) * 1e3:8.1f} {statistics.mean(v) / total:6.1%}")
    print(f"{'total':>10} {total * 1e3:8.1f}")
    if frozen.layers:
        print(frozen.summary())


if __name__ == "__main__":
    main()
