"""What the kernel benchmarks share: options, timing, the output folder, the table header, the CSV and PNG."""

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
import triton

from detector.plots import plt  # the one matplotlib set-up (Agg backend): benchmarks only write files
from detector.timing import time_runs

QUANTILES = [0.5, 0.2, 0.8]  # do_bench's median and the 20-80% band the tables and plots show
OUT = Path(__file__).resolve().parent / "out"


def add_options(parser: argparse.ArgumentParser) -> None:
    """--device, --out, --tiny and --threads, the options every kernel benchmark takes (bench/gpu_check.py uses
    them)."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the script's default devices; cuda skips the CPU runs")
    parser.add_argument("--out", default=str(OUT), help="folder for the CSV and PNG (default bench/out)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few runs: seconds")
    # 1 thread compares like with like (torchvision's CPU kernels are serial loops); the default thread count is
    # what a user gets (on a busy 2-core machine torch's 2 threads can stall each other at every op)
    parser.add_argument("--threads", default="1,0",
                        help="comma-separated CPU thread counts to run with, 0 = torch's default (default 1,0)")


def cpu_threads(spec: str, device: str):
    """Yield each thread count of a --threads value with torch set to it (0: torch's default), restoring the
    default afterwards; on CUDA, yield None once."""
    if device != "cpu":
        yield None
        return
    default = torch.get_num_threads()
    try:
        for count in spec.split(","):
            torch.set_num_threads(int(count) or default)
            yield torch.get_num_threads()
    finally:
        torch.set_num_threads(default)


def time_ms(fn, device: str, repeats: int = 50, budget_s: float = 1.0) -> list[float]:
    """[median, 20%, 80%] milliseconds of fn(): triton's do_bench on CUDA (L2 flushed between runs), else
    detector.timing.time_runs, one warm-up then up to `repeats` runs within budget_s (at least one)."""
    if device == "cuda":
        return triton.testing.do_bench(fn, quantiles=QUANTILES)
    return _quantile_ms(time_runs(fn, device, repeats=repeats, warmup=1, budget_s=budget_s))


def _quantile_ms(times_s: list[float]) -> list[float]:
    """[median, 20%, 80%] milliseconds of run times in seconds."""
    ms = [t * 1e3 for t in times_s]
    if len(ms) < 2:
        return ms * 3
    qs = statistics.quantiles(ms, n=10, method="inclusive")  # deciles: qs[1] = 20%, qs[7] = 80%
    return [statistics.median(ms), qs[1], qs[7]]


def time_interleaved(fns: dict, device: str, reference: str, repeats: int, budget_s: float,
                     min_rounds: int = 3) -> dict[str, dict]:
    """Time several providers of one op so that they can be compared on a machine whose speed drifts.

    CPU: rounds that call every fn once, in turn (after one untimed warm-up round), until `repeats` rounds or,
    once min_rounds are done, until budget_s has passed: a slow moment of a shared machine hits every provider
    of that round. CUDA: do_bench for each (a GPU's speed does not drift that way).

    Args:
        fns: provider name -> zero-argument callable.
        reference: the provider the others are compared with.
    Returns:
        name -> {"ms": [median, 20%, 80%], "ratio": median over rounds of (this fn's time / the reference's in
        the same round), "runs": rounds}.
    """
    if device == "cuda":
        ms = {name: time_ms(fn, device) for name, fn in fns.items()}
        return {name: {"ms": m, "ratio": m[0] / ms[reference][0], "runs": 0} for name, m in ms.items()}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            times[name] += time_runs(fn, device, repeats=1, warmup=0)
        rounds += 1
    return {name: {"ms": _quantile_ms(ts),
                   "ratio": statistics.median(t / r for t, r in zip(ts, times[reference], strict=True)),
                   "runs": rounds}
            for name, ts in times.items()}


def pick_devices(choice: str, auto: list[str]) -> list[str]:
    """The devices a --device choice runs on; "auto" is the script's own default list."""
    if choice == "auto":
        return auto
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    return [choice]


def print_header(names: list[str], widths: list[int]) -> None:
    """One line of right-aligned column names, as wide as the rows printed below it."""
    print(" ".join(f"{h:>{w}}" for h, w in zip(names, widths, strict=True)))


def save_results(rows: list[dict], stem: str, figure, out: str | Path = OUT) -> None:
    """Write <out>/<stem>.csv (one line per row dict) and <stem>.png, the Figure that figure(rows) draws.

    Args:
        rows: dicts with the same keys, the CSV columns.
        stem: file name without extension, the op's name ("roi_pool").
        figure: rows -> matplotlib Figure.
        out: the folder, created if needed (default bench/out).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = figure(rows)
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / f'{stem}.csv'} and {out / f'{stem}.png'}")
