#!/usr/bin/env bash
# Compile every CUDA source in the package with nvcc, so that a kernel that
# does not build fails CI even on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
while IFS= read -r -d '' src; do
    nvcc -std=c++17 -arch=sm_90 -c "$src" -o "$out/$(basename "$src").o"
    n=$((n + 1))
done < <(find kvstore -name '*.cu' -print0)
echo "nvcc compiled $n CUDA source(s)"
