"""python -m seqfuse.bench FAMILY [--device cpu|cuda] [--quick] [--json PATH]
python -m seqfuse.bench plot RESULTS.json [...] --out DIR

Times each fused op against the seqfuse reference and any installed anchors, on the
same inputs in one run, and prints a table with the machine limits measured in that
run. FAMILY is one of the registered families, or `all`. `plot` turns the JSON of
such runs into PNG charts (seqfuse.bench.plot; needs matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from seqfuse.bench import common
from seqfuse.bench.common import device_name, write_json

# family name -> module with run(device: str, quick: bool) -> (limits, rows, table str)
FAMILIES = {
    "scan": "seqfuse.bench.scan",
    "linear_attention": "seqfuse.bench.linear_attention",
    "sparse_softmax": "seqfuse.bench.sparse_softmax",
    "global_pointer": "seqfuse.bench.global_pointer",
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        from seqfuse.bench import plot

        sys.exit(plot.main(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m seqfuse.bench", description=__doc__.split("\n")[0])
    parser.add_argument("family", choices=[*FAMILIES, "all"],
                        help="a family, `all`, or `plot` (see above)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON "
                        "(with `all`, PATH is a prefix: PATH-<family>.json)")
    parser.add_argument("--min-time", type=float, default=common.MIN_TIME,
                        help="seconds of repeated calls per timing (longer on noisy machines)")
    args = parser.parse_args(argv)
    common.MIN_TIME = args.min_time

    families = list(FAMILIES) if args.family == "all" else [args.family]
    print(f"device: {device_name(args.device)}; torch {torch.__version__}")
    for family in families:
        module = importlib.import_module(FAMILIES[family])
        limits, rows, table = module.run(args.device, args.quick)
        print(f"\n== {family} ==")
        print(", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in limits.items()))
        print(table)
        if args.json:
            path = f"{args.json}-{family}.json" if args.family == "all" else args.json
            write_json(path, family, args.device, limits, rows)


if __name__ == "__main__":
    main()
