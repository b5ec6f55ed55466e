"""The Python half of benchmarks/gpu/run.sh: the machine record, the ceilings and the
report. run.sh runs the steps; this file turns what they left in OUTDIR into results.

    python benchmarks/gpu/suite.py env OUTDIR [--dry-run]
    python benchmarks/gpu/suite.py ceilings OUTDIR --device cuda|cpu
    python benchmarks/gpu/suite.py report OUTDIR
    python benchmarks/gpu/suite.py probe OUTDIR [--name NAME]

`report` reads OUTDIR/env.json, OUTDIR/ceilings.json, OUTDIR/steps.tsv (one line per
step: name, exit status, seconds, time allowed, log) and OUTDIR/bench/*.json (written
by `python -m seqfuse.bench`), and writes OUTDIR/results.json (all of it, with every
benchmark row's % of the suite's ceilings) and OUTDIR/results.md, then prints a short
summary table. It needs neither a GPU nor seqfuse's extension. `probe` records the
toolchain of the build (compilers, the libstdc++ linked and loaded) and runs a few calls
in child processes that a miscompiled build crashes on (PROBES); exit 1 if one fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

# Exit statuses of `timeout` (124: the limit passed; 137: killed after the grace period).
TIMED_OUT = {124, 137}


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_record(dry_run: bool) -> dict:
    """Device, driver, torch, CUDA, nvcc and the commit: what the results were run on."""
    import torch

    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader"])
    nvcc = _run(["nvcc", "--version"])
    here = os.path.dirname(os.path.abspath(__file__))
    record = {
        "dry_run": dry_run,
        "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                   else f"no GPU ({platform.machine()}, dry run)" if dry_run else "no GPU"),
        "capability": (".".join(map(str, torch.cuda.get_device_capability(0)))
                       if torch.cuda.is_available() else None),
        "nvidia_smi": smi,
        "driver": smi.split(",")[1].strip() if smi and smi.count(",") >= 1 else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvcc": nvcc.splitlines()[-1] if nvcc else None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "commit": _run(["git", "-C", here, "rev-parse", "HEAD"]),
        "dirty": bool(_run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"])),
    }
    return record


def measure_ceilings(device: str) -> dict:
    """The machine's own limits, measured once for the whole suite: copy bandwidth
    (bytes read + written) and dense matmul rates. On a CPU the sizes are small: that
    mode exists so that the dry run exercises this code, not to measure the CPU."""
    import torch

    from seqfuse.bench import common

    gpu = device.startswith("cuda")
    # 4 GiB copied on a GPU: far past the 50-60 MB L2 of an H100/H200; 8192^3 products
    # fill the chip. A CPU's half-precision products run at about 1 GFLOP/s (no
    # native units), so they get small sizes there and every timing a short minimum.
    nbytes = 1 << 32 if gpu else 1 << 26
    sizes = {torch.bfloat16: 8192 if gpu else 256, torch.float16: 8192 if gpu else 256,
             torch.float32: 8192 if gpu else 1024}
    if not gpu:
        common.MIN_TIME = 0.1
    out = {"device": device, "copy_GB/s": common.memory_bandwidth(device, nbytes) / 1e9,
           "copy_bytes": nbytes, "matmul_n": {}, "matmul_TFLOP/s": {},
           "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for dtype, n in sizes.items():
        name = str(dtype)[6:]
        out["matmul_n"][name] = n
        out["matmul_TFLOP/s"][name] = common.matmul_rate(device, dtype, n) / 1e12
    return out


# ---- the build probe -----------------------------------------------------------------

# Each runs in a child process, so a crash is an exit status, not the end of the suite.
# On the first H200 run every error message of seqfuse's CUDA ops that printed a number
# (a shape, an eps) killed the process with SIGSEGV, and so did the sparse GlobalPointer
# losses, which then formatted a shape on every call; messages without numbers were
# raised cleanly. These calls tell such a build apart from a sound one.
PROBES = {
    "cpu error with a number": (
        "import torch, seqfuse\n"
        "try:\n"
        "    seqfuse.causal_linear_attention(torch.zeros(2, 5, 2), torch.zeros(2, 5, 2), "
        "torch.zeros(2, 5, 2))\n"
        "except ValueError as e:\n"
        "    assert '[2, 5, 2]' in str(e), str(e)\n"),
    "cuda error with a number": (
        "import torch, seqfuse\n"
        "x = torch.zeros(2, 5, 2, device='cuda')\n"
        "try:\n"
        "    seqfuse.causal_linear_attention(x, x, x)\n"
        "except ValueError as e:\n"
        "    assert '[2, 5, 2]' in str(e), str(e)\n"),
    "cuda sparse multilabel loss": (
        "import torch, seqfuse\n"
        "s = torch.randn(3, 10, device='cuda')\n"
        "pos = torch.tensor([[1, 2], [0, 3], [4, 4]], device='cuda')\n"
        "out = seqfuse.sparse_multilabel_categorical_crossentropy(s, pos)\n"
        "assert torch.isfinite(out).all()\n"),
}


def probe(outdir: str, name: str) -> int:
    """The build's toolchain record and the PROBES; writes OUTDIR/NAME.json, returns 1 if
    any probe failed or crashed."""
    import seqfuse

    so = seqfuse._C.__file__
    maps = _run([sys.executable, "-c", "import seqfuse; print(open('/proc/self/maps').read())"])
    record = {
        "extension": so,
        "CC": os.environ.get("CC"), "CXX": os.environ.get("CXX"),
        "c++ --version": (_run([os.environ.get("CXX", "c++"), "--version"]) or "").split("\n")[0],
        "/usr/bin/g++ --version": (_run(["/usr/bin/g++", "--version"]) or "").split("\n")[0],
        "ldd (libstdc++, libgcc, libgomp)": [
            line.strip() for line in (_run(["ldd", so]) or "").splitlines()
            if any(lib in line for lib in ("stdc++", "libgcc", "gomp"))],
        "loaded libstdc++": sorted({line.split()[-1] for line in (maps or "").splitlines()
                                    if "libstdc++" in line}),
        "probes": {},
    }
    failed = 0
    for probe_name, code in PROBES.items():
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=60)
            rc, err = done.returncode, done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            rc, err = "timeout", ""
        record["probes"][probe_name] = {"rc": rc, "stderr": err}
        failed += rc != 0
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {probe_name}: exit {rc}")
    print(json.dumps({k: v for k, v in record.items() if k != "probes"}, indent=1))
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    return 1 if failed else 0


# ---- the report ----------------------------------------------------------------------

def read_steps(path: str) -> list[dict]:
    steps = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, rc, seconds, allowed, log = line.rstrip("\n").split("\t")
                steps.append({"step": name, "rc": None if rc == "-" else int(rc),
                              "seconds": float(seconds), "allowed_s": int(allowed),
                              "log": log})
    for s in steps:
        s["status"] = ("skipped" if s["rc"] is None else "ok" if s["rc"] == 0 else
                       "timed out" if s["rc"] in TIMED_OUT else f"failed ({s['rc']})")
    return steps


def annotate(row: dict, ceilings: dict) -> dict:
    """The row with %copy (of the copy bandwidth) and %matmul (of the matmul rate of the
    row's dtype) against the suite's ceilings, where the row reports a rate. The
    benchmark's own %bw and %matmul (against limits its family's run measured) are kept
    as "%bw (own run)" and "%matmul (own run)"."""
    row = dict(row)
    for key in ("%bw", "%matmul"):
        if key in row:
            row[f"{key} (own run)"] = row.pop(key)
    bw = ceilings.get("copy_GB/s")
    if bw and isinstance(row.get("GB/s"), (int, float)):
        row["%copy"] = 100 * row["GB/s"] / bw
    rate = ceilings.get("matmul_TFLOP/s", {}).get(row.get("dtype"))
    flops = (row["GFLOP/s"] / 1e3 if isinstance(row.get("GFLOP/s"), (int, float))
             else row.get("TFLOP/s"))
    if rate and isinstance(flops, (int, float)):
        row["%matmul"] = 100 * flops / rate
    return row


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _columns(rows: list[dict]) -> list[str]:
    # The benchmark's own columns in order, its own-run percentages left to the JSON:
    # the table shows only the suite-wide %copy/%matmul.
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and not c.endswith("(own run)")
                 and c not in ("%copy", "%matmul")]
    return cols + [c for c in ("%copy", "%matmul") if any(c in r for r in rows)]


def family_summary(family: str, rows: list[dict]) -> dict:
    def stats(key):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return (statistics.median(vals), max(vals)) if vals else None
    speedups = sorted({k for r in rows for k in r if k.startswith("x_")})
    return {"family": family, "rows": len(rows), "%copy": stats("%copy"),
            "%matmul": stats("%matmul"), **{k: stats(k) for k in speedups}}


def partial_rows(log: str) -> list[dict]:
    """The rows a benchmark printed ("row: {...}", seqfuse.bench.common.Rows) before it
    was stopped."""
    rows = []
    with open(log, errors="replace") as f:
        for line in f:
            if line.startswith("row: "):
                try:
                    rows.append(json.loads(line[len("row: "):]))
                except json.JSONDecodeError:
                    pass  # the last line of a killed run can be cut off
    return rows


def build_report(outdir: str) -> dict:
    def load(name):
        path = os.path.join(outdir, name)
        return json.load(open(path)) if os.path.exists(path) else None
    ceilings = load("ceilings.json") or {}
    families = {}
    for path in sorted(glob.glob(os.path.join(outdir, "bench", "*.json"))):
        record = json.load(open(path))
        families[record["family"]] = record
    # A family cut short by its time limit wrote no JSON: take the rows it printed.
    for path in sorted(glob.glob(os.path.join(outdir, "logs", "bench-*.log"))):
        family = os.path.basename(path)[len("bench-"):-len(".log")]
        if family not in families:
            rows = partial_rows(path)
            if rows:
                families[family] = {"family": family, "device": "(cut short: rows from its log)",
                                    "commit": "-", "partial": True, "rows": rows}
    for record in families.values():
        record["rows"] = [annotate(r, ceilings) for r in record["rows"]]
    return {"env": load("env.json"), "ceilings": ceilings,
            "steps": read_steps(os.path.join(outdir, "steps.tsv")), "families": families,
            "summary": [family_summary(f, r["rows"]) for f, r in families.items()]}


def _num(v: float) -> str:
    return f"{v:.2g}" if abs(v) < 10 else f"{v:.0f}"


def _pair(v) -> str:
    return "-" if v is None else f"{_num(v[0])} / {_num(v[1])}"


def summary_lines(report: dict) -> list[str]:
    """The short table run.sh prints last: steps, then one line per family."""
    lines = [f"{'step':<22} {'status':<12} {'s':>6} {'allowed':>7}"]
    for s in report["steps"]:
        lines.append(f"{s['step']:<22} {s['status']:<12} {s['seconds']:>6.0f} {s['allowed_s']:>7}")
    lines.append("")
    lines.append(f"{'family':<18} {'rows':>4}  {'%copy med/max':<15} {'%matmul med/max':<17} speedups (median)")
    for f in report["summary"]:
        speed = ", ".join(f"{k[2:]} {_num(v[0])}x" for k, v in f.items()
                          if k.startswith("x_") and v)
        lines.append(f"{f['family']:<18} {f['rows']:>4}  {_pair(f['%copy']):<15} "
                     f"{_pair(f['%matmul']):<17} {speed or '-'}")
    return lines


def markdown(report: dict) -> str:
    env, ceil = report["env"] or {}, report["ceilings"]
    out = ["# seqfuse GPU suite results", ""]
    if env.get("dry_run"):
        out += ["**Dry run**: no GPU. The benchmark rows are a recorded CPU run and the "
                "ceilings were measured now, on this CPU at small sizes, so the % columns "
                "check the arithmetic, not the machine.", ""]
    out += [f"- device: {env.get('device')} (capability {env.get('capability')}), "
            f"driver {env.get('driver')}",
            f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, {env.get('nvcc')}",
            f"- commit {env.get('commit')}{' (with local changes)' if env.get('dirty') else ''}",
            ""]
    if ceil:
        rates = ", ".join(f"{k} {v:.4g}" for k, v in ceil.get("matmul_TFLOP/s", {}).items())
        sizes = ", ".join(f"{k} {v}" for k, v in ceil.get("matmul_n", {}).items())
        out += [f"Ceilings, measured once for the suite: copy {ceil['copy_GB/s']:.4g} GB/s "
                f"(read + write, {ceil['copy_bytes'] >> 20} MiB); matmul TFLOP/s {rates} "
                f"(n: {sizes}). %copy and %matmul in the tables are against these.", ""]
    out += ["## Steps", "", markdown_table(report["steps"], ["step", "status", "seconds",
                                                               "allowed_s", "log"]), ""]
    out += ["## Summary", "", "```", *summary_lines(report), "```", ""]
    for family, record in report["families"].items():
        out += [f"## {family}", "", f"{record['device']}, commit {record['commit']}.", "",
                markdown_table(record["rows"], _columns(record["rows"])), ""]
    return "\n".join(out)


def report(outdir: str) -> dict:
    rep = build_report(outdir)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(rep, f, indent=1)
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write(markdown(rep))
    print("\n".join(summary_lines(rep)))
    return rep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("outdir")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("ceilings")
    p.add_argument("outdir")
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("report")
    p.add_argument("outdir")
    p = sub.add_parser("probe")
    p.add_argument("outdir")
    p.add_argument("--name", default="probe")
    args = parser.parse_args(argv)
    if args.command == "env":
        record = machine_record(args.dry_run)
        json.dump(record, open(os.path.join(args.outdir, "env.json"), "w"), indent=1)
        print(json.dumps(record, indent=1))
    elif args.command == "ceilings":
        record = measure_ceilings(args.device)
        json.dump(record, open(os.path.join(args.outdir, "ceilings.json"), "w"), indent=1)
        print(json.dumps(record, indent=1))
    elif args.command == "probe":
        return probe(args.outdir, args.name)
    else:
        report(args.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
