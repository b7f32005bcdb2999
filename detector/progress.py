"""Progress of long loops: a tqdm bar on a terminal; in a log (a file, CI, a cluster job) a plain line every
10% instead of the hundreds of carriage-return frames a bar would write there. Also the peak memory a run used."""

import resource
import sys
import time

from tqdm import tqdm


class _LogLines:
    """tqdm's interface (iteration, update, close, context manager) writing '<desc>: 40% (160/400), 12s, eta 18s'."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", step: float = 0.1, **_):
        self.iterable, self.desc, self.unit, self.step = iterable, desc, unit, step
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start, self.next_report = 0, time.time(), step

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n / self.total >= self.next_report - 1e-9 and self.n < self.total:
            self.next_report += self.step
            self._line()

    def _line(self) -> None:
        elapsed = time.time() - self.start
        eta = elapsed * (self.total - self.n) / max(self.n, 1)
        print(f"{self.desc}: {100 * self.n / self.total:.0f}% ({self.n}/{self.total} {self.unit}), {elapsed:.0f}s, "
              f"eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.total and self.n >= self.total and self.next_report <= 1 + 1e-9:
            self.next_report = 2  # the 100% line once
            print(f"{self.desc}: done ({self.n} {self.unit}) in {time.time() - self.start:.0f}s", file=sys.stderr,
                  flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
             leave: bool = True):
    """tqdm(iterable, ...) on a terminal, periodic plain lines elsewhere; a plain iterable when disabled."""
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return _LogLines(iterable, total=total, desc=desc, unit=unit)


def peak_memory_mb(device=None) -> float:
    """The peak memory of this process so far: resident set size on a CPU, allocated tensors on a CUDA device."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes
