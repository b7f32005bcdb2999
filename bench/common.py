"""What the kernel benchmarks share: quantiles, the output folder, the table header, the CSV and PNG files."""

import csv
from pathlib import Path

QUANTILES = [0.5, 0.2, 0.8]  # do_bench's median and the 20-80% band the tables and plots show
OUT = Path(__file__).resolve().parent / "out"


def print_header(names: list[str], widths: list[int]) -> None:
    """One line of right-aligned column names, as wide as the rows printed below it."""
    print(" ".join(f"{h:>{w}}" for h, w in zip(names, widths, strict=True)))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks write PNGs; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_results(rows: list[dict], stem: str, figure) -> None:
    """Write bench/out/<stem>.csv (one line per row dict) and <stem>.png, the Figure that figure(rows) draws.

    Args:
        rows: dicts with the same keys, the CSV columns.
        stem: file name without extension, the op's name ("roi_pool").
        figure: rows -> matplotlib Figure.
    """
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure(rows).savefig(OUT / f"{stem}.png", dpi=120)
    print(f"wrote {OUT / f'{stem}.csv'} and {OUT / f'{stem}.png'}")
