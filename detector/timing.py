"""Timing on CPUs and GPUs: device synchronisation, a per-stage timer that follows a model's own forward pass,
and repeated runs of a callable (median and spread). detect.py, eval.py and the benchmarks all time with these.
"""

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work: CUDA calls return before the GPU has finished."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Seconds per stage of a FastRCNN's forward pass, the paper's Fig. 2 split: conv, roi_pool, fc6, fc7, rest.

    Forward hooks on the model's own modules (backbone, roi_pool, head.fc6, head.fc7) mark the end of each stage,
    so the timed pass is the model's forward itself, not a copy of it. `tick("rest")` charges everything since
    the last mark (pre- and post-processing) to "rest". Each mark synchronises the device first.

        timer = StageTimer(model, device)
        with timer:
            ... model.features(x) ... model.predict(feats, rois) ...; timer.tick("rest")
        timer.seconds  # {"conv": ..., "roi_pool": ..., "fc6": ..., "fc7": ..., "rest": ...}
    """

    def __init__(self, model: nn.Module, device: torch.device | str):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._modules = {"conv": model.backbone, "roi_pool": model.roi_pool, "fc6": model.head.fc6,
                         "fc7": model.head.fc7}
        self._handles: list = []
        self._last = time.perf_counter()

    def tick(self, stage: str) -> None:
        """Charge the time since the previous mark to `stage`."""
        sync(self.device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

    def __enter__(self) -> "StageTimer":
        self._last = time.perf_counter()
        for stage, module in self._modules.items():
            # a hook on module m fires after m's forward: (module, inputs, output) -> None
            self._handles.append(module.register_forward_hook(lambda *_, s=stage: self.tick(s)))
        # what runs before the trunk (resizing, normalising) is "rest", not conv
        self._handles.append(self._modules["conv"].register_forward_pre_hook(lambda *_: self.tick("rest")))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def time_runs(fn: Callable[[], object], device: torch.device | str, repeats: int = 5, warmup: int = 1,
              budget_s: float = 0.0) -> list[float]:
    """Seconds of each of up to `repeats` timed calls of fn() after `warmup` untimed ones (device synchronised
    around each call). With budget_s > 0, stops early once the timed calls have used that much time (at least
    one call always runs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if budget_s and sum(times) >= budget_s:
            break
    return times


def summary(times: list[float]) -> dict:
    """Median and spread (min, max) of a list of run times, in seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}
