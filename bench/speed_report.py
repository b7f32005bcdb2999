"""Paper Table 4 from speed_vs_rcnn.py's measurements: built, printed, written to JSON / CSV / PNG.

Per net: test totals, speedups over R-CNN, training-time estimates (unit times x counts) and FLOPs, printed
above the paper's figures (one K40 GPU) and saved as speed_vs_rcnn.json, .csv and .png.
"""

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.rcnn_baselines import train_estimates

if TYPE_CHECKING:  # type hints only: speed_vs_rcnn imports this module
    from bench.speed_vs_rcnn import Config

FRCN_ITERS = 40_000  # FR solver.prototxt / train_net.py: 30k at lr 1e-3, then 10k at 1e-4

# Paper Table 4 (one K40 GPU; SPPnet only for L). summarize() builds ours in this method -> row -> net layout.
PAPER = {
    "frcn": {"train_h": {"S": 1.2, "M": 2.0, "L": 9.5}, "train_speedup": {"S": 18.3, "M": 14.0, "L": 8.8},
             "test_s": {"S": 0.10, "M": 0.15, "L": 0.32}, "test_speedup": {"S": 98, "M": 80, "L": 146}},
    "frcn_svd": {"test_s": {"S": 0.06, "M": 0.08, "L": 0.22}, "test_speedup": {"S": 169, "M": 150, "L": 213}},
    "rcnn": {"train_h": {"S": 22, "M": 28, "L": 84}, "train_speedup": {"S": 1, "M": 1, "L": 1},
             "test_s": {"S": 9.8, "M": 12.1, "L": 47.0}, "test_speedup": {"S": 1, "M": 1, "L": 1}},
    "spp5": {"train_h": {"L": 25}, "train_speedup": {"L": 3.4}, "test_s": {"L": 2.3},
             "test_speedup": {"L": 20}},
}
METHODS = {"rcnn": "R-CNN", "spp5": "SPPnet 5 scales", "spp1": "SPPnet 1 scale", "frcn": "Fast R-CNN",
           "frcn_svd": "Fast R-CNN + SVD"}
TRAINED = {"rcnn": "R-CNN", "spp5": "SPPnet", "frcn": "Fast R-CNN"}  # method key -> name in the estimates


def summarize(per_net: dict, disk: dict, cfg: "Config", device_name: str, wall_s: float) -> dict:
    """Totals, speedups and training-estimate rows per net, in the JSON layout (`table` mirrors PAPER)."""
    table = {m: {"test_s": {}, "test_speedup": {}} for m in METHODS}
    res = {"device": device_name, "torch": torch.__version__, "config": asdict(cfg), "disk": disk,
           "wall_s": wall_s, "test_speedup": {}, "train_speedup": {}, "table": table, "paper": PAPER,
           "nets": {}}
    for net, m in per_net.items():
        rows, unit_s = train_estimates(m["units"], disk, cfg.proposals), m["units"]["frcn_step_s"]
        rows.append({"method": "Fast R-CNN", "stage": "fine-tune", "unit_s": unit_s, "count": FRCN_ITERS,
                     "unit": f"{unit_s:.4f} s per iteration of {cfg.train_images} images, "
                             f"{cfg.rois_per_batch} RoIs",
                     "count_source": "iterations (FR solver: 30k + 10k)",
                     "hours": unit_s * FRCN_ITERS / 3600})
        test = {k: v[0] for k, v in m["test"].items()}
        hours = {k: sum(r["hours"] for r in rows if r["method"] == name) for k, name in TRAINED.items()}
        for k in METHODS:
            table[k]["test_s"][net], table[k]["test_speedup"][net] = test[k], test["rcnn"] / test[k]
        for k in TRAINED:
            table[k].setdefault("train_h", {})[net] = hours[k]
            table[k].setdefault("train_speedup", {})[net] = hours["rcnn"] / hours[k]
        res["test_speedup"][net] = test["rcnn"] / test["frcn"]
        res["test_speedup"][f"{net}_svd"] = test["rcnn"] / test["frcn_svd"]
        res["train_speedup"][net] = hours["rcnn"] / hours["frcn"]
        res["nets"][net] = {"test_s": test, "test_how": {k: v[1] for k, v in m["test"].items()},
                            "train_h": hours, "train_estimates": rows, "stages": m["stages"],
                            "gflops": {k: v / 1e9 for k, v in m["flops"].items()}, "units": m["units"]}
    return res


def print_report(res: dict) -> None:
    """Table 4 (ours above the paper's figures), the test breakdown with FLOPs, the training estimates."""
    nets, table = list(res["nets"]), res["table"]
    nw = max(4, *(len(n) + 1 for n in nets))  # the net column of the breakdowns
    groups = [("frcn", "Fast R-CNN"), ("rcnn", "R-CNN"), ("spp5", "SPPnet 5-scale")]
    width = max(10 * len(nets), 16)
    print(f"\nTable 4 on {res['device']} (paper: one K40 GPU). Train times are ESTIMATES: unit times measured"
          " here x counts (breakdown below).")
    print(" " * 24 + "".join(f"{title:<{width}}" for _, title in groups))
    print(" " * 24 + "".join("".join(f"{n:<10}" for n in nets).ljust(width) for _ in groups))
    rows = (("Train time (h)", "train_h", False, ""), ("Train speedup", "train_speedup", False, "x"),
            ("Test rate (s/im)", "test_s", False, ""), (" with SVD", "test_s", True, ""),
            ("Test speedup", "test_speedup", False, "x"), (" with SVD", "test_speedup", True, "x"))
    for label, row, svd, unit in rows:
        for who, source in (("ours", table), ("paper", PAPER)):
            cells = ""
            for method, _ in groups:
                method = ("frcn_svd" if method == "frcn" else None) if svd else method
                values = [source.get(method, {}).get(row, {}).get(n) for n in nets]
                cells += "".join(f"{'-' if v is None else f'{v:.3g}{unit}':<10}" for v in values).ljust(width)
            print(f"{label if who == 'ours' else '':<17}{who:>6} {cells}")
    print("\nTest time per image and FLOPs. FLOP ratio = R-CNN FLOPs / method FLOPs, the arithmetic a method"
          " saves; a speedup above or below it comes from the implementation.")
    print(f"{'net':<{nw}}{'method':<17}{'s/image':>9}{'GFLOP/im':>10}{'FLOP ratio':>11}{'speedup':>9}"
          f"{'GFLOP/s':>9}  how")
    for n in nets:
        r = res["nets"][n]
        for m, title in METHODS.items():
            s, g = r["test_s"][m], r["gflops"][m]
            print(f"{n:<{nw}}{title:<17}{s:>9.4g}{g:>10.4g}{r['gflops']['rcnn'] / g:>11.3g}"
                  f"{r['test_s']['rcnn'] / s:>9.3g}{g / s:>9.3g}  {r['test_how'][m]}")
    print("\nTraining = unit time measured here x count. Not modelled, so the R-CNN and SPPnet totals are"
          " lower bounds: liblinear solves, box-regressor fitting, data loading.")
    for n in nets:
        for e in res["nets"][n]["train_estimates"]:
            print(f"{n:<{nw}}{e['method']:<11}{e['stage']:<15}{e['unit_s']:>10.4g} s x {e['count']:>7} "
                  f"= {e['hours']:>9.3g} h  [{e['unit']}; count: {e['count_source']}]")
    d = res["disk"]
    print(f"(disk {d['write_mb_s']:.0f} MB/s write, {d['read_mb_s']:.0f} MB/s read;"
          f" wall {res['wall_s']:.0f} s)")


def write_outputs(res: dict, out: Path) -> None:
    """speed_vs_rcnn.json (everything), .csv (a row per net and method), .png (ours vs paper, log scale)."""
    (out / "speed_vs_rcnn.json").write_text(json.dumps(res, indent=1))
    rows = ("test_s", "test_speedup", "train_h", "train_speedup")
    with open(out / "speed_vs_rcnn.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "net", "method", *rows, "gflops", *(f"paper_{r}" for r in rows), "test_how"])
        for n, r in res["nets"].items():
            for m in METHODS:
                ours = [res["table"][m].get(row, {}).get(n, "") for row in rows]
                paper = [PAPER.get(m, {}).get(row, {}).get(n, "") for row in rows]
                w.writerow([res["device"], n, m, *ours, f"{r['gflops'][m]:.4g}", *paper, r["test_how"][m]])
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    nets = list(res["nets"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, row, methods, ylabel in ((axes[0], "test_s", list(METHODS), "test time (s / image)"),
                                     (axes[1], "train_h", list(TRAINED), "train time (hours, estimated)")):
        bar = 0.8 / len(methods)
        for j, m in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * bar for i in range(len(nets))]
            color = f"C{list(METHODS).index(m)}"  # one colour per method in both panels
            ax.bar(xs, [res["table"][m][row][n] for n in nets], bar, label=METHODS[m], color=color)
            paper = [(x, PAPER.get(m, {}).get(row, {}).get(n)) for x, n in zip(xs, nets)]
            paper = [(x, v) for x, v in paper if v]
            ax.scatter([x for x, _ in paper], [v for _, v in paper], marker="_", s=200, c="k", zorder=3)
        ax.set(xticks=range(len(nets)), xticklabels=nets, yscale="log", ylabel=ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(f"Table 4 re-measured on {res['device']} (bars), the paper on a K40 (ticks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "speed_vs_rcnn.png", dpi=120)
    plt.close(fig)
