#!/usr/bin/env bash
# Downloads the anchor libraries the GPU suite compares against, as wheels for the
# GPU machine (Python 3.12, manylinux x86_64), into DIR:
#
#   bash benchmarks/gpu/fetch_wheels.sh benchmarks/gpu/wheels
#
# The GPU machine has no network, so benchmarks/gpu/run.sh installs from DIR with
# `pip --no-index`. Every wheel is fetched with --no-deps: their declared needs are
# torch and triton (never to be replaced on that machine: they come with its CUDA
# torch), einops and transformers (fla; present in that image) — pip would
# otherwise pull a second torch. Pinned versions, the newest on PyPI on 2026-12-01.
set -euo pipefail
if [[ $# -ne 1 || $1 == -* ]]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
dir=$1
mkdir -p "$dir"

ANCHORS=(
  flash-linear-attention==0.6.0  # fla.layers / fla.models; needs fla-core of the same version
  fla-core==0.6.0                # fla.ops: chunk_linear_attn, fused_chunk_linear_attn (Triton)
  accelerated-scan==0.3.1        # accelerated_scan.warp: CUDA, compiled by torch at first import
  entmax==1.3                    # sparsemax(k=...)
  liger-kernel==0.8.5            # Triton fused losses
  cut-cross-entropy==25.1.1      # Triton linear + cross-entropy
)

python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  -d "$dir" "${ANCHORS[@]}"
ls -1 "$dir"/*.whl
