"""python -m seqfuse.bench plot RESULTS.json [...] --out DIR

One PNG per benchmark record (a family's JSON from `python -m seqfuse.bench ...
--json`): each implementation's achieved rate against sequence length (scan, linear
attention) or vocabulary size (sparse softmax), with the roofline ceiling measured in
the same run as a horizontal line; GlobalPointer, whose cases differ in more than one
size, as bars of time and peak memory per method.

A reference or anchor is credited with the same work as seqfuse's row (the bytes or
FLOPs that row counts, over the other implementation's time), so the curves compare
times on one scale. Needs matplotlib (`pip install seqfuse[plot]`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

MISSING_MATPLOTLIB = ("python -m seqfuse.bench plot needs matplotlib, which is not installed: "
                      "pip install seqfuse[plot]  (or: pip install matplotlib)")


def _dims(text: str) -> list[int]:
    return [int(d) for d in re.findall(r"\d+", text)]


def _impls(row: dict) -> dict[str, float]:
    """Implementation name -> ms, from the row's `<name>_ms` columns."""
    return {k[:-3]: v for k, v in row.items()
            if k.endswith("_ms") and isinstance(v, (int, float)) and v > 0}


# family -> (x label, x of a row, panel of a row, series of a row, rate column, unit)
# Rows where x is None (e.g. linear attention's decode step) are left out.
LINE_CHARTS = {
    "scan": ("sequence length T", lambda r: _dims(r["shape"])[1],
             lambda r: f"{r['pass']}", lambda r: f"a {r['a']}, {r['dtype']}", "GB/s", "GB/s"),
    "linear_attention": (
        "sequence length T",
        lambda r: None if r["case"].startswith("decode") else _dims(r["case"])[2],
        lambda r: r["pass"],
        lambda r: f"{r['dtype']}, D={_dims(r['case'])[3]}, norm={r['norm']}",
        "GFLOP/s", "GFLOP/s"),
    # (the LM-head rows, "N x D x V", count products, not bytes: not on this chart)
    "sparse_softmax": ("vocabulary size V",
                       lambda r: _dims(r["rows x V"])[1] if "rows x V" in r else None,
                       lambda r: f"{r['op']} {r['pass']}", lambda r: f"k={r['k']}, {r['dtype']}",
                       "GB/s", "GB/s"),
}


MARKERS = "os^vDP*X"


def _ceilings(limits: dict, unit: str) -> dict[str, float]:
    """The roofline line(s) of the chart, in its unit, from the record's limits."""
    if unit == "GB/s":
        bw = limits.get("memory_bandwidth_GB/s")
        return {"copy bandwidth": bw} if bw else {}
    return {f"{m.group(1)} matmul": v for k, v in limits.items()
            if (m := re.fullmatch(r"matmul_(\w+)_GFLOP/s", k))}


def line_chart(plt, record: dict, path: str) -> None:
    xlabel, x_of, panel_of, series_of, rate_col, unit = LINE_CHARTS[record["family"]]
    # panel -> series label -> [(x, rate)]
    panels: dict[str, dict[str, list]] = {}
    for row in record["rows"]:
        x, rate = x_of(row), row.get(rate_col)
        if x is None or not isinstance(rate, (int, float)):
            continue  # rows with no work count (a fwd+bwd the benchmark gives no bytes)
        times = _impls(row)
        ours = times.get("seqfuse")
        for impl, ms in times.items():
            label = f"{impl}: {series_of(row)}"
            panels.setdefault(panel_of(row), {}).setdefault(label, []).append(
                (x, rate * ours / ms))
    if not panels:
        raise ValueError(f"{record['family']}: no row reports {rate_col}")
    n = len(panels)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.5 * rows), squeeze=False)
    # One colour per implementation, one marker per series (dtype, shape options).
    impls = sorted({label.split(":")[0] for series in panels.values() for label in series})
    kinds = sorted({label.split(": ", 1)[1] for series in panels.values() for label in series})
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        for label, points in sorted(series.items()):
            points.sort()
            impl, kind = label.split(": ", 1)
            ours = impl == "seqfuse"
            ax.plot([p[0] for p in points], [p[1] for p in points], "-" if ours else "--",
                    color=f"C{impls.index(impl) % 10}", marker=MARKERS[kinds.index(kind) % len(MARKERS)],
                    label=label, linewidth=2 if ours else 1)
        for name, value in _ceilings(record["limits"], unit).items():
            ax.axhline(value, color="black", linestyle=":", label=f"roofline: {name}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{unit} (seqfuse's work count / time)")
        ax.set_title(panel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    _finish(plt, fig, record, path)


def bar_chart(plt, record: dict, path: str) -> None:
    """GlobalPointer: fwd+bwd time and peak memory of each method, per case."""
    cases = list(dict.fromkeys(f"{r['case']} {r['shape']} {r['dtype']}" for r in record["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in record["rows"]))
    value = {(f"{r['case']} {r['shape']} {r['dtype']}", r["method"]): r for r in record["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    width = 0.8 / len(methods)
    for ax, column, ylabel in ((axes[0], "fwd+bwd_ms", "fwd+bwd time (ms)"),
                               (axes[1], "peak_MB", "peak extra memory (MB)")):
        for i, method in enumerate(methods):
            xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(cases))]
            ys = [value.get((case, method), {}).get(column) or 0 for case in cases]
            ax.bar(xs, ys, width, label=method)
        if column == "fwd+bwd_ms":
            _matmul_floor(ax, record, cases, value, methods)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    rates = ", ".join(f"{k[len('matmul_TFLOP/s_'):]} {v:.3g}" for k, v in record["limits"].items()
                      if k.startswith("matmul_TFLOP/s_"))
    axes[0].set_title(f"scores + loss, forward + backward (matmul roofline TFLOP/s: {rates})",
                      fontsize=9)
    axes[1].set_title("peak memory of one forward + backward", fontsize=9)
    _finish(plt, fig, record, path)


def _matmul_floor(ax, record, cases, value, methods):
    """The roofline of each case: its FLOPs (TFLOP/s x time of any method, the same count
    for all) at the measured matmul rate of its dtype, drawn across the case's bars."""
    labelled = False
    for c, case in enumerate(cases):
        row = next(value[(case, m)] for m in methods if (case, m) in value)
        rate = record["limits"].get(f"matmul_TFLOP/s_{row['dtype']}")
        if not rate or not isinstance(row.get("TFLOP/s"), (int, float)):
            continue
        floor = row["TFLOP/s"] * row["fwd+bwd_ms"] / rate
        ax.hlines(floor, c - 0.45, c + 0.45, colors="black", linestyles=":",
                  label=None if labelled else "roofline: matmul")
        labelled = True


def _finish(plt, fig, record, path):
    fig.suptitle(f"{record['family']} on {record['device']} (torch {record['torch']}, "
                 f"commit {record['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_record(plt, record: dict, path: str) -> None:
    if record["family"] == "global_pointer":
        bar_chart(plt, record, path)
    elif record["family"] in LINE_CHARTS:
        line_chart(plt, record, path)
    else:
        raise ValueError(f"no chart for family {record['family']!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqfuse.bench plot",
                                     description=__doc__.split("\n\n")[0].split("\n")[-1])
    parser.add_argument("results", nargs="+", metavar="RESULTS.json")
    parser.add_argument("--out", required=True, metavar="DIR")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 1
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    written: set[str] = set()
    for path in args.results:
        with open(path) as f:
            record = json.load(f)
        name = record["family"]
        if name in written:  # a second record of a family, e.g. another device's
            name += "-" + re.sub(r"[^A-Za-z0-9]+", "_", record["device"]).strip("_")
        out = os.path.join(args.out, f"{name}.png")
        plot_record(plt, record, out)
        written.add(name)
        print(out)
    return 0
