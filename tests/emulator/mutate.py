"""Mutation check of the emulated tests: break one barrier or bound of a kernel, rerun.

Each mutation removes one __syncthreads() / __syncwarp() (or G::sync()) or shifts one
loop or guard bound by one in one place of csrc/cuda/<family>.cu, found by an exact
snippet that must occur there exactly once. For each mutation the script writes the
mutated file in place, rebuilds the emulated extension (incremental: only that kernel's
translation unit recompiles), runs the family's emulated tests with a time limit, and
restores the original file whatever happens. A test failure, a crash, a timeout or an
emulator error all count as caught; a mutation the tests still pass survived.

    python tests/emulator/mutate.py                       # every family
    python tests/emulator/mutate.py --family scan         # one family
    python tests/emulator/mutate.py --family scan --only scan.carry-in-barrier
    python tests/emulator/mutate.py --list                # the table, nothing run

It refuses to start unless `git diff --quiet csrc/cuda` says the kernels are clean, and
runs from the repository root with the installed seqfuse package (see tests/conftest.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BARRIER, BOUND = "barrier", "bound"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    kind: str     # BARRIER or BOUND
    snippet: str  # occurs exactly once in the family's .cu
    mutant: str   # what replaces it
    what: str     # the barrier or bound broken, in words


def drop(name: str, snippet: str, barrier: str, what: str) -> Mutation:
    """The snippet without its one occurrence of `barrier` (a line of its own)."""
    lines = snippet.split("\n")
    hits = [i for i, line in enumerate(lines) if line.strip() == barrier or line.strip().startswith(barrier + " ")]
    if len(hits) != 1:
        raise ValueError(f"{name}: the snippet must hold exactly one line with {barrier}")
    del lines[hits[0]]
    return Mutation(name, BARRIER, snippet, "\n".join(lines), what)


def bound(name: str, snippet: str, mutant: str, what: str) -> Mutation:
    return Mutation(name, BOUND, snippet, mutant, what)


ST, SW, GS = "__syncthreads();", "__syncwarp();", "G::sync();"

MUTATIONS: dict[str, list[Mutation]] = {
    "scan": [
        drop("scan.tile-barrier",
             "s_tile = atomicAdd(lookback.counter, 1u);\n  __syncthreads();", ST,
             "threads read s_tile before thread 0 has drawn it"),
        drop("scan.aggregate-barrier",
             "s_agg[warp][lane] = agg;\n  __syncthreads();", ST,
             "warp 0 composes s_agg before every warp has written its aggregate"),
        drop("scan.carry-in-barrier",
             "  __syncthreads();\n\n  // 3. Replay from the carry-in and write,", ST,
             "warps read s_carry before warp 0 has written their carry-in"),
        # (scan.da-reuse-barrier survived: each thread reuses its own s_carry slot, and
        # the barrier was deleted from the kernel.)
        drop("scan.da-sum-barrier",
             "s_carry[warp][lane] = da_sum;\n      __syncthreads();", ST,
             "warp 0 sums the da partials before every warp has written its own"),
        drop("scan.publish-syncwarp",
             "__threadfence();\n    __syncwarp();", SW,
             "lane 0 raises a look-back flag before the other lanes have stored their values"),
        bound("scan.last-channel",
              "const bool active = c < g.C;", "const bool active = c < g.C - 1;",
              "the last channel of every row counts as inactive"),
        bound("scan.chunk-aggregate-warps",
              "for (int w = 1; w < kWarps && chunk", "for (int w = 1; w < kWarps - 1 && chunk",
              "a chunk's published aggregate leaves out its last warp"),
        bound("scan.first-step",
              "return {bi, t == g.time_at(0), t == g.time_at(g.T - 1)};",
              "return {bi, t == g.time_at(1), t == g.time_at(g.T - 1)};",
              "a row's second step is taken as its first (da and dh0 at the wrong step)"),
        Mutation("scan.exact-turn-barrier", BARRIER, "if (turns > 1) __syncthreads();",
                 "if (turns > 1) {}",
                 "on the exact path a warp replays before the warp before it has handed over"),
        drop("scan.deferred-publish-barrier",
             "if (s_deferred) {\n    __syncthreads();", ST,
             "a deferred inclusive prefix is published before the last warp has written it"),
        bound("scan.packed-sequence-end",
              "end = g.cu_seqlens[n + 1] - 1;", "end = g.cu_seqlens[n + 1];",
              "a packed sequence's last step is taken one step late (its cut is missed)"),
    ],
    "linear_attention": [
        drop("la.chunk-start-barrier",
             "    __syncthreads();  // the previous chunk is done with A, B, C", ST,
             "a chunk's loads overwrite A, B, C while the state update still reads them"),
        drop("la.loaded-barrier",
             "                   : acc_t(0);\n    }\n    __syncthreads();\n", ST,
             "the products read A, B, C before every thread has loaded its part"),
        drop("la.half-operands-barrier",
             "if (lane == 0) ex[job] = e;\n      }\n      __syncthreads();", ST,
             "16-bit: wmma loads Ah, Bh before every row is scaled and rounded"),
        drop("la.half-scores-barrier",
             "wmma::mem_row_major);\n      }\n      __syncthreads();\n\n      // P_rs", ST,
             "16-bit: P is masked from F before every S tile is stored"),
        drop("la.half-probs-barrier",
             "if (lane == 0) den[r] = z;\n        }\n      }\n      __syncthreads();", ST,
             "16-bit: P C loads Ph (over Ah, Bh) before every row of P is written"),
        drop("la.float-probs-barrier",
             "* dot;\n      }\n      __syncthreads();", ST,
             "float: the outputs read P before it is complete"),
        drop("la.normaliser-barrier",
             "inv_den[r] = ps.normalize ? acc_t(1) / d : acc_t(1);\n    }\n    __syncthreads();", ST,
             "outputs are normalised before inv_den is written"),
        drop("la.state-read-barrier",
             "    __syncthreads();  // every product has read X", ST,
             "the state update overwrites X while products still read it"),
        # (la.state-out-barrier survived: each thread stores the X entries it updated
        # itself, and the barrier was deleted from the kernel.)
        drop("la.decode-barrier",
             "if (lane == 0) partial[warp][kCols] = acc_z;\n  __syncthreads();", ST,
             "decoding: warp 0 sums the partials before every warp has written them"),
        bound("la.gpow-table",
              "for (int i = 0; i <= kChunk; ++i, x *= gamma) gpow[i] = x;",
              "for (int i = 0; i < kChunk; ++i, x *= gamma) gpow[i] = x;",
              "gamma^kChunk (a full chunk's decay of X) is never written"),
        bound("la.update-decay-exponent",
              "sum += gpow[n - 1 - s] * Bs", "sum += gpow[n - s] * Bs",
              "the state update decays each step once too often"),
    ],
    "sparse_softmax": [
        drop("ss.reduce-reuse-barrier",
             "    __syncthreads();  // a previous reduction may still be reading scratch", ST,
             "a block reduction overwrites scratch while the previous one still reads it"),
        drop("ss.reduce-barrier",
             "if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;\n    __syncthreads();", ST,
             "a block reduction reads scratch before every warp has written it"),
        drop("ss.exclusive-sum-barrier",
             "if (lane == kWarp - 1) scratch[warp] = inclusive;\n    __syncthreads();", ST,
             "a block prefix sum reads the warp totals before they are written"),
        drop("ss.hist-zero-sync",
             "sh.hist[b] = 0;\n    G::sync();", GS,
             "the histogram is counted into before every bin is zeroed"),
        drop("ss.hist-count-sync",
             "1u);\n    }\n    G::sync();\n    find_digit", GS,
             "the digit is searched before every entry is counted"),
        drop("ss.sort-step-sync",
             "a[j] = tmp;\n        }\n      }\n      G::sync();", GS,
             "a bitonic step starts before the previous one is done"),
        drop("ss.dense-fill-sync",
             "    G::sync();  // the fill lands before the kept entries are written over it", GS,
             "the dense fill may land over kept probabilities"),
        drop("ss.stage-sync",
             "stage[i] = row[i];\n    G::sync();", GS,
             "the staged row is read before it is staged"),
        drop("ss.filter-count-barrier",
             "    __syncthreads();  // every thread has read the count before any appends to it", ST,
             "filter: appends to the candidate count before every thread has read it"),
        drop("ss.cut-chunk-sync",
             "const Composite c = j < n ? cand[j] : kNone;\n    G::sync();", GS,
             "filter cut: survivors move over candidates not yet read"),
        drop("ss.topk-backward-barrier",
             "  __syncthreads();  // the zeros land before the scatter", ST,
             "top-k backward: the zero fill may land over scattered gradients"),
        drop("ss.ce-backward-barrier",
             "if (threadIdx.x == 0) target_kept = 0;\n  __syncthreads();", ST,
             "cross-entropy backward: zeros and target_kept = 0 race with the scatter"),
        drop("ss.entropy-trace-barrier",
             "  __syncthreads();  // the trace written by thread 0 is visible to the block", ST,
             "entropy backward: the trace is read before thread 0 has written its last slot"),
        bound("ss.sort-last-merge",
              "for (int size = 2; size <= n; size <<= 1) {",
              "for (int size = 2; size < n; size <<= 1) {",
              "the bitonic sort skips its last merge"),
        bound("ss.sort-padding",
              "for (int j = int(kk) + G::rank(); j < n_sort; j += G::kSize) sort_buf[j] = kNone;",
              "for (int j = int(kk) + 1 + G::rank(); j < n_sort; j += G::kSize) sort_buf[j] = kNone;",
              "one padding slot of the sort buffer is left unset"),
    ],
    "global_pointer": [
        drop("gp.merge-reuse-barrier",
             "const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;\n  __syncthreads();", ST,
             "block_merge overwrites sm_m/sm_z while thread 0 still reads the previous merge"),
        drop("gp.merge-barrier",
             "sm_z[warp] = x.z;\n  }\n  __syncthreads();", ST,
             "thread 0 merges the warps' partials before they are written"),
        drop("gp.theta-barrier",
             "scores_log_base());\n  }\n  __syncthreads();", ST,
             "rope: rows are rotated before the frequencies are staged"),
        # (gp.chunk-start-barrier survived: not needed, gone from the kernel.)
        drop("gp.chunk-staged-barrier",
             "&sm.b[0][0], K::kPitch);\n  __syncthreads();", ST,
             "the product reads sm.a, sm.b before they are staged"),
        # (gp.out-reuse-barrier survived: not needed, gone from the kernel.)
        drop("gp.out-stored-barrier",
             "c1, T + 4, wmma::mem_row_major);\n    __syncthreads();", ST,
             "16-bit: threads read sm.out before every fragment is stored"),
        drop("gp.column-sums-barrier",
             "sm.sums[ty][tx + kSide * c] = v;\n        }\n        __syncthreads();", ST,
             "bias_end gradient: sums read before every thread has written them"),
        drop("gp.column-sums-reuse-barrier",
             "grad_bias[row * g.L + j0 + tid] += v;\n        }\n        __syncthreads();", ST,
             "bias_end gradient: the next head's sums overwrite these while still read"),
        # (gp.ds-barrier survived: not needed, gone from the kernel.)
        drop("gp.v-staged-barrier",
             "&sm.v[0][0], T + 1);\n      __syncthreads();", ST,
             "dS @ v reads v before it is staged"),
        drop("gp.tile-end-barrier",
             "    __syncthreads();\n  }\n  if (!g.rope) return;", ST,
             "rope backward reads other threads' grad rows before they are written"),
        bound("gp.odd-d-pair",
              "if (d + 1 < g.D) x1 = to_acc(src[1]);", "if (d + 1 <= g.D) x1 = to_acc(src[1]);",
              "odd D: the pair past the head dim reads the next element"),
        bound("gp.columns-diagonal-tile",
              "const int64_t u_end = COLUMNS ? (g.tril ? own + 1 : tiles) : tiles;",
              "const int64_t u_end = COLUMNS ? (g.tril ? own : tiles) : tiles;",
              "tril: the columns kernel skips its diagonal tile"),
        bound("gp.loss-partials",
              "for (int64_t t = 0; t < parts; ++t) {", "for (int64_t t = 0; t < parts - 1; ++t) {",
              "the loss leaves out the last tile's partial"),
    ],
    # The LM-head loss's backward: no barriers (one thread per output element), bounds only.
    "linear_cross_entropy": [
        bound("lce.gather-last-column",
              "if (d >= s.D) return;\n  float acc = 0.f;\n  for (int64_t j",
              "if (d >= s.D - 1) return;\n  float acc = 0.f;\n  for (int64_t j",
              "dhidden: the last column of every token is never written"),
        bound("lce.gather-vocabulary",
              "if (v < s.V) acc +=", "if (v < s.V - 1) acc +=",
              "dhidden: the last vocabulary row is never gathered"),
        bound("lce.scatter-run-start",
              "if ((p > 0 && sorted[p - 1] == v) || v >= s.V) return;",
              "if ((p > 1 && sorted[p - 1] == v) || v >= s.V) return;",
              "dweight: position 1 starts a second, shorter run of row sorted[0] (two writers)"),
        bound("lce.scatter-run-end",
              "for (int64_t q = p; q < M && sorted[q] == v; ++q) {",
              "for (int64_t q = p; q < M - 1 && sorted[q] == v; ++q) {",
              "dweight, dbias: the last sorted entry is left out of its run"),
        bound("lce.scatter-last-column",
              "if (d >= s.D) return;\n  float acc = 0.f, bias = 0.f;",
              "if (d >= s.D - 1) return;\n  float acc = 0.f, bias = 0.f;",
              "dweight: the last column is never written, and dbias with D = 1"),
    ],
}

# pytest -k per family: every kernel of the family, its float16 paths, and short enough
# to rerun for every mutation (None: the whole emulated file).
SUBSETS: dict[str, str | None] = {
    "scan": "not 1000",  # the whole emulated file but the 1000 one-step sequences
    "linear_attention": (
        "(test_forward_backward_match_reference and elu1 and True-True-True) or test_odd_sizes"
        " or test_chunked_decoding or (test_low_precision_dtypes and dtype2)"
        " or (test_cuda_16bit_tensor_core_path and True-True and (shape0 or shape3) and dtype0)"
        " or (test_cuda_float64_matches_cpu_kernel and (shape0 or shape1) and elu1) or test_cuda_decode_step"
    ),
    "sparse_softmax": (
        "test_sparse_softmax_matches_reference or test_topk_softmax_matches_reference"
        " or (test_every_topk_path and random) or (test_every_topk_path_in_half_types and dtype0)"
        " or test_cross_entropy_matches_reference or test_taylor or test_entropy"
    ),
    "global_pointer": (
        "test_scores_match_reference or test_scores_and_fused_loss_edge_shapes"
        " or (test_fused_loss_equals_sparse_loss_on_scores and none)"
        " or (test_cuda_low_precision and dtype0 and not True-2)"
        " or (test_cuda_low_precision and dtype2 and not True-2)"
        " or test_dense_loss_matches_reference"
    ),
    "linear_cross_entropy": None,
}
TEST_TIMEOUT = {"scan": 600, "linear_attention": 600, "sparse_softmax": 600, "global_pointer": 600,
                "linear_cross_entropy": 600}
BUILD_TIMEOUT = 1200


def kernel_path(family: str) -> Path:
    return ROOT / "csrc" / "cuda" / f"{family}.cu"


def check_snippets(family: str, source: str) -> None:
    """Every snippet of the family occurs exactly once (the kernel may have moved on)."""
    for m in MUTATIONS[family]:
        n = source.count(m.snippet)
        if n != 1:
            raise SystemExit(f"{m.name}: its snippet occurs {n} times in {kernel_path(family)} "
                             f"(expected once); update the table:\n{m.snippet}")


def build() -> tuple[bool, str]:
    """Rebuilds the emulated extension in a subprocess; (ok, the tail of its output)."""
    code = "import sys; sys.path.insert(0, 'tests'); import emulator; emulator.load()"
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, "build timed out"
    return p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def run_tests(family: str) -> tuple[str, str]:
    """(verdict, detail): 'passed', 'failed', 'timeout' or 'crashed' (signal, error)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "emulated", "-p", "no:cacheprovider",
           f"tests/test_{family}.py"]
    if SUBSETS[family]:
        cmd += ["-k", SUBSETS[family]]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           timeout=TEST_TIMEOUT[family])
    except subprocess.TimeoutExpired:
        return "timeout", f"over {TEST_TIMEOUT[family]} s"
    out = (p.stdout + p.stderr).strip().splitlines()
    last = out[-1] if out else ""
    if p.returncode == 0:
        return "passed", last
    if p.returncode == 5:
        raise SystemExit(f"no emulated test of {family} matched -k {SUBSETS[family]!r}")
    if p.returncode == 1:
        failed = next((line for line in out if line.startswith(("FAILED", "ERROR"))), last)
        return "failed", failed[:160]
    return "crashed", f"exit status {p.returncode}: {last[:120]}"


def require_clean_tree() -> None:
    if subprocess.run(["git", "diff", "--quiet", "csrc/cuda"], cwd=ROOT).returncode != 0:
        raise SystemExit("csrc/cuda has uncommitted changes: commit or stash them first "
                         "(the script writes mutants there and restores the committed text)")


def run_family(family: str, only: set[str] | None, baseline: bool) -> list[tuple[Mutation, str, float]]:
    path = kernel_path(family)
    original = path.read_text()
    check_snippets(family, original)
    mutations = [m for m in MUTATIONS[family] if only is None or m.name in only]
    results = []
    print(f"== {family}: {len(mutations)} mutations; tests: -k {SUBSETS[family] or '(all)'}",
          flush=True)
    if baseline and mutations:
        ok, log = build()
        if not ok:
            raise SystemExit(f"the unmutated emulated extension does not build:\n{log}")
        t0 = time.monotonic()
        verdict, detail = run_tests(family)
        if verdict != "passed":
            raise SystemExit(f"{family}: the unmutated tests do not pass ({verdict}: {detail})")
        print(f"   baseline: tests pass in {time.monotonic() - t0:.0f} s", flush=True)
    for m in mutations:
        t0 = time.monotonic()
        try:
            path.write_text(original.replace(m.snippet, m.mutant, 1))
            ok, log = build()
            if not ok:
                verdict, detail = "build-error", log.strip().splitlines()[-1] if log.strip() else ""
            else:
                verdict, detail = run_tests(family)
        finally:
            path.write_text(original)
        status = {"passed": "SURVIVED", "build-error": "BUILD ERROR"}.get(verdict, "caught")
        dt = time.monotonic() - t0
        print(f"   {status:<11} {m.name:<32} {dt:5.0f} s  {verdict}: {detail}", flush=True)
        results.append((m, status, dt))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", action="append", choices=list(MUTATIONS),
                    help="a family to mutate (repeatable; default: all)")
    ap.add_argument("--only", action="append", help="only this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the check that the unmutated tests pass")
    args = ap.parse_args()
    families = args.family or list(MUTATIONS)
    for f in families:
        check_snippets(f, kernel_path(f).read_text())
    if args.list:
        for f in families:
            print(f"== {f} ({len(MUTATIONS[f])}): tests -k {SUBSETS[f] or '(all)'}")
            for m in MUTATIONS[f]:
                print(f"   {m.kind:<7} {m.name:<32} {m.what}")
        return
    require_clean_tree()
    only = set(args.only) if args.only else None
    summary = {}
    try:
        for f in families:
            summary[f] = run_family(f, only, not args.no_baseline)
    finally:
        build()  # leave the emulated extension built from the restored sources
    print("== summary")
    for f, results in summary.items():
        caught = sum(s == "caught" for _, s, _ in results)
        survived = [m.name for m, s, _ in results if s == "SURVIVED"]
        broken = [m.name for m, s, _ in results if s == "BUILD ERROR"]
        line = f"   {f:<17} {caught}/{len(results)} caught"
        if survived:
            line += f"; survived: {', '.join(survived)}"
        if broken:
            line += f"; did not build: {', '.join(broken)}"
        print(line)


if __name__ == "__main__":
    main()
