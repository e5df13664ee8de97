#!/usr/bin/env bash
# The GPU check: the GPU test suite and the GPU benchmarks, on a machine with a CUDA GPU.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Needs (pre-installed where the machine has no network): a CUDA build of torch,
# CuPy for CUDA 12 (`pip install 'cupy-cuda12x>=13'`, which pulls cuda-pathfinder;
# NVRTC comes from torch's nvidia-cuda-nvrtc-cu12 wheel or a CUDA toolkit), the
# package installed (`pip install -e .`, C extensions built), redis-server on PATH,
# and the SmolLM2 model for `bench codecs` (scripts/install_model.sh).
# Writes into OUTDIR: versions.txt, pytest-gpu.txt, bench-gpu.txt, bench-codecs.txt
# (each ends with the command's JSON line where it has one) and status.txt.
# Takes about 5-8 minutes on an H100.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."

if ! python -c 'import cupy' 2>/dev/null; then
    echo "CuPy is missing: installing the gpu extra" | tee -a "$out/status.txt"
    timeout 180 pip install -q 'cupy-cuda12x>=13' >>"$out/status.txt" 2>&1 \
        || echo "pip install of cupy-cuda12x failed (no network?): kernel tests will skip" | tee -a "$out/status.txt"
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python - <<'PY'
import platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}")
try:
    import cupy
    drv = cupy.cuda.runtime.driverGetVersion()
    rt = cupy.cuda.runtime.runtimeGetVersion()
    print(f"cupy {cupy.__version__}, driver API {drv // 1000}.{drv % 1000 // 10}, runtime {rt // 1000}.{rt % 1000 // 10}")
except Exception as exc:
    print(f"cupy not usable: {exc}")
PY
} 2>&1 | tee "$out/versions.txt"

status=0
run() {  # run NAME SECONDS CMD...: output to OUTDIR/NAME.txt, exit status to status.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/status.txt"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "$name exit $rc" | tee -a "$out/status.txt"
    tail -n 3 "$out/$name.txt"
    [ "$rc" -eq 0 ] || status=1
}

run pytest-gpu 240 python -m pytest -m gpu -v -s -p no:cacheprovider tests
run bench-gpu 120 python -m kvstore.cli bench gpu --json --no-progress
run bench-codecs 150 python -m kvstore.cli bench codecs --device cuda --quick --json --no-progress
exit $status
