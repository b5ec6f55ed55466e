#!/usr/bin/env bash
# The GPU suite: one command that verifies and measures seqfuse on a fresh GPU machine
# (CUDA torch and nvcc, no network) and leaves everything in one folder.
#
#   bash benchmarks/gpu/run.sh OUTDIR [--wheels DIR] [--quick | --tests-only] [--dry-run]
#
#   OUTDIR      created if missing; gets env.json, steps.tsv, logs/, bench/,
#               ceilings.json, results.json and results.md
#   --wheels    a folder of anchor wheels (benchmarks/gpu/fetch_wheels.sh makes it);
#               those whose distribution is missing are installed with --no-index
#               --no-deps into a fresh --target folder put on PYTHONPATH, so the
#               machine's own torch and triton are never touched
#   --quick     a run that surely fits in 6 minutes (see the budget below)
#   --tests-only  env, build, probe and the CUDA tests (cap 200 s), then the report: the
#               check of new CUDA code on a short device allowance (~5 minutes)
#   (Where the machine hands back only a few files (some lending tools return
#   eight), write OUTDIR outside the returned folder and return it as one archive,
#   `run.sh /tmp/suite ...; tar czf "$OUT/suite.tgz" -C /tmp suite`.)
#   --dry-run   no GPU needed: argument handling, the wheel install (into a temporary
#               folder), the output layout, the sanitizer workload and the ceilings on
#               the CPU, and the report built from the recorded CPU run in
#               benchmarks/results/cpu/ (the build, tests and benchmarks are only named)
#
# Steps, with the time each is allowed (full / quick) and what the first full run on an
# H200 (16 cores, 2026-12-04; benchmarks/results/nvidia-h200/) took. Every step runs
# under `timeout` and is also cut to what is left of the whole budget (560 s full, 330 s
# quick: under the 10-minute command limit, with the machine's start and the file
# transfers outside it), so the suite ends in time; a step cut short is reported.
#   env        machine record                               5 s   cap 20 / 20
#   anchors    pip install from --wheels                    1 s   cap 60 / 60
#   build      setup.py build_ext, this GPU's arch only    51 s   cap 240 / 240
#   probe      suite.py probe; on a failure, a rebuild with /usr/bin/g++ and a second
#              probe (not in the first run)                ~5 s   cap 60 (+ 240 + 60)
#   tests      pytest -m cuda tests (~870 cases, 8 workers) 87 s  cap 120 / 60
#   memcheck   compute-sanitizer over sanitize.py     (8 s, cut short by a crash) 45 / 30
#   ceilings   copy bandwidth, bf16/fp16/fp32 matmul         5 s   cap 30 / 30
#   bench-*    python -m seqfuse.bench FAMILY --device cuda: sparse_softmax 56 s (cap
#              70 / 25), linear_attention over 70 s (now 4 cases, cap 120 / 40), scan
#              and global_pointer cut short by errors (cap 60 / 25). Each row is
#              printed as it is measured: a family cut short keeps its rows in its
#              log, and the report takes them from there
#   racecheck  (shared-memory hazards; the slowest tool) (41 s, cut short) 60 / 40
#   initcheck                                      (6 s, cut short) cap 45 / 30
set -uo pipefail

usage() {
  sed -n '4,23p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

OUT="" WHEELS="" QUICK=0 DRY=0 TESTS_ONLY=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --wheels) [[ $# -ge 2 ]] || usage; WHEELS=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --tests-only) TESTS_ONLY=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage ;;
    -*) echo "run.sh: unknown option $1" >&2; usage ;;
    *) [[ -z $OUT ]] || { echo "run.sh: one OUTDIR only" >&2; usage; }; OUT=$1; shift ;;
  esac
done
[[ -n $OUT ]] || { echo "run.sh: OUTDIR is required" >&2; usage; }
if [[ -n $WHEELS && ! -d $WHEELS ]]; then
  echo "run.sh: --wheels $WHEELS is not a folder" >&2
  exit 2
fi

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$REPO/benchmarks/gpu
mkdir -p "$OUT/logs" "$OUT/bench" || exit 2
OUT=$(cd "$OUT" && pwd)
: >"$OUT/steps.tsv"
PY=${PYTHON:-python3}
# The in-place build under python/ is the seqfuse these steps import.
export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$REPO" || exit 2

BUDGET=${SEQFUSE_SUITE_BUDGET:-$([[ $QUICK == 1 ]] && echo 330 || echo 560)}
RESERVE=15  # kept back for the report
START=$SECONDS
cap() { [[ $QUICK == 1 ]] && echo "$2" || echo "$1"; }

# step NAME CAP CMD...: runs CMD under timeout, its output in logs/NAME.log, and
# records "NAME rc seconds allowed log" in steps.tsv. Returns CMD's status.
step() {
  local name=$1 limit=$2 left log=$OUT/logs/$1.log
  shift 2
  left=$((BUDGET - (SECONDS - START) - RESERVE))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "no time left in the ${BUDGET}s budget" >"$log"
    printf '%s\t-\t0\t0\tlogs/%s.log\n' "$name" "$name" >>"$OUT/steps.tsv"
    echo "== $name: skipped (no time left)"
    return 0
  fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  printf '%s\t%d\t%d\t%d\tlogs/%s.log\n' "$name" "$rc" $((SECONDS - t0)) "$limit" "$name" \
    >>"$OUT/steps.tsv"
  echo "== $name: exit $rc, $((SECONDS - t0)) s (allowed $limit s)"
  return $rc
}

# skip NAME WHY: records a step the dry run does not run.
skip() {
  echo "dry run: $2" >"$OUT/logs/$1.log"
  printf '%s\t-\t0\t0\tlogs/%s.log\n' "$1" "$1" >>"$OUT/steps.tsv"
  echo "== $1: skipped ($2)"
}

finish() {
  "$PY" "$HERE/suite.py" report "$OUT" >"$OUT/logs/report.log" 2>&1 || cat "$OUT/logs/report.log"
  echo
  echo "results: $OUT/results.md"
  cat "$OUT/logs/report.log"
  exit "$1"
}

dry_flag=$([[ $DRY == 1 ]] && echo --dry-run)
step env "$(cap 20 20)" "$PY" "$HERE/suite.py" env "$OUT" $dry_flag

# ---- anchors: only the distributions this python lacks, never their dependencies.
if [[ -n $WHEELS ]]; then
  PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/seqfuse-anchors.XXXXXX")
  echo "$PREFIX" >"$OUT/anchors_prefix.txt"
  install_anchors() {
    local missing=() whl dist
    for whl in "$WHEELS"/*.whl; do
      [[ -e $whl ]] || continue
      dist=$(basename "$whl" | cut -d- -f1)
      if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
        echo "present: $dist $("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")"
      else
        missing+=("$whl")
      fi
    done
    ((${#missing[@]})) || { echo "nothing to install"; return 0; }
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$PREFIX" \
      "${missing[@]}" || return 1
    for whl in "${missing[@]}"; do echo "installed: $(basename "$whl")"; done
  }
  # timeout runs programs, not shell functions: hand the function to a child bash.
  export -f install_anchors
  export WHEELS PREFIX PY
  step anchors "$(cap 60 60)" bash -c install_anchors
  export PYTHONPATH="$PYTHONPATH:$PREFIX"
else
  skip anchors "no --wheels folder given"
fi

# ---- build: this GPU's arch only, every core.
if [[ $DRY == 1 ]]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
else
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
    echo "run.sh: torch sees no GPU" >&2
    printf 'build\t1\t0\t0\tlogs/build.log\n' >>"$OUT/steps.tsv"
    finish 1
  }
fi
JOBS=$(nproc)
BUILD=(env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" "$PY" setup.py build_ext --inplace)
if [[ $DRY == 1 ]]; then
  skip build "would run: ${BUILD[*]}"
else
  # accelerated-scan compiles its CUDA at first import: do that beside the build.
  if "$PY" -c "import importlib.util as u; exit(u.find_spec('accelerated_scan') is None)" 2>/dev/null; then
    TORCH_CUDA_ARCH_LIST="$ARCH" timeout 240 "$PY" -c "import accelerated_scan.warp" \
      >"$OUT/logs/anchor_warmup.log" 2>&1 &
    WARMUP=$!
  fi
  if ! step build "$(cap 240 240)" "${BUILD[@]}" ||
     ! "$PY" -c "import seqfuse, sys; sys.exit('cuda' not in seqfuse.build_info()['backends'])" \
       >>"$OUT/logs/build.log" 2>&1; then
    echo "run.sh: the build failed; the first compiler error:"
    grep -m1 -A30 -E "(error|fatal error):|FAILED:" "$OUT/logs/build.log" || tail -40 "$OUT/logs/build.log"
    finish 1
  fi
fi

# ---- the build probe: calls in child processes that a build mixing two C++ runtimes
# crashes on (suite.py PROBES: on the first H200 run every error message holding a
# number segfaulted). If one fails and a system compiler other than the environment's
# CC/CXX is there, the extension is rebuilt with it and probed again.
if [[ $DRY == 1 ]]; then
  skip probe "needs the CUDA build"
elif ! step probe 60 "$PY" "$HERE/suite.py" probe "$OUT"; then
  if [[ -x /usr/bin/g++ && $(command -v "${CXX:-c++}") != /usr/bin/g++ ]]; then
    rm -rf build python/seqfuse/_C*.so
    step build-system-gcc "$(cap 240 240)" env CC=/usr/bin/gcc CXX=/usr/bin/g++ "${BUILD[@]}" &&
      step probe-system-gcc 60 "$PY" "$HERE/suite.py" probe "$OUT" --name probe-system-gcc
  fi
fi

# ---- CUDA tests. About 870 cases, most of them small: their float64 references and
# Python overhead are CPU work, so 8 pytest-xdist workers (when installed) share the GPU.
# -v: a line per case as it finishes, so a run cut short by its limit still says which
# cases passed and failed (the junit XML and the summary are written only at the end).
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
# A crashed worker is replaced as often as needed (xdist's default gives up after a few):
# one crashing case must not stop the others.
XDIST=${XDIST:+$XDIST --max-worker-restart=1000}
TESTS=("$PY" -m pytest -v -p no:cacheprovider -rfE --durations=25 $XDIST -m cuda tests
       --junitxml="$OUT/logs/tests.xml")
if [[ $DRY == 1 ]]; then
  # Collecting them takes 10 s here, and CI's own test run already imports every file.
  skip tests "would run: ${TESTS[*]}"
else
  step tests "$( ((TESTS_ONLY)) && echo 200 || cap 120 60)" "${TESTS[@]}"
fi
((TESTS_ONLY)) && finish 0

# ---- compute-sanitizer over every CUDA kernel (on a dry run: the same calls on the CPU).
# memcheck here; racecheck and initcheck after the benchmarks, with what time is left
# (the emulated device's tests already check barriers and unwritten shared memory).
SANITIZE_DTYPES=$([[ $QUICK == 1 ]] && echo "--dtypes float32,float16")
# Without the caching allocator every tensor is its own allocation, so memcheck sees
# an access past a tensor's end and initcheck a read of memory never written.
sanitize() {
  local tool=$1 limit=$2
  step "$tool" "$limit" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
    --tool "$tool" --error-exitcode 1 "$PY" "$HERE/sanitize.py" $SANITIZE_DTYPES
}
if [[ $DRY == 1 ]]; then
  step sanitize-cpu 60 "$PY" "$HERE/sanitize.py" --device cpu --dtypes float32
else
  sanitize memcheck "$(cap 45 30)"
fi

# ---- the machine's ceilings, once.
step ceilings "$(cap 30 30)" "$PY" "$HERE/suite.py" ceilings "$OUT" \
  --device "$([[ $DRY == 1 ]] && echo cpu || echo cuda)"

# ---- every benchmark family, each in its own process and time limit. 0.1 s of calls
# per timing (the default is 0.3) is still hundreds of repetitions of a GPU kernel, and
# the sparse softmax family alone times about 200 cases.
[[ -n ${WARMUP:-} ]] && wait "$WARMUP"
for family in scan linear_attention sparse_softmax global_pointer; do
  if [[ $DRY == 1 ]]; then
    cp "$REPO/benchmarks/results/cpu/$family.json" "$OUT/bench/$family.json"
    skip "bench-$family" "copied benchmarks/results/cpu/$family.json"
  else
    limit=$(case $family in linear_attention) cap 120 40 ;; scan|global_pointer) cap 60 25 ;;
            *) cap 70 25 ;; esac)
    step "bench-$family" "$limit" "$PY" -m seqfuse.bench "$family" --device cuda \
      --json "$OUT/bench/$family.json" --min-time 0.1 $([[ $QUICK == 1 ]] && echo --quick)
  fi
done

if [[ $DRY != 1 ]]; then
  sanitize racecheck "$(cap 60 40)"
  sanitize initcheck "$(cap 45 30)"
fi

finish 0
