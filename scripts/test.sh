#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
# Extra arguments go to pytest (e.g. `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
    $apt_get update -qq
    DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq redis-server >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]"

if command -v nvcc >/dev/null 2>&1; then
    bash scripts/compile_kernels.sh
else
    echo "nvcc not found: CUDA sources not compiled"
fi

set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "pytest collected no tests"
    exit 1
fi
exit "$rc"
