#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
# Extra arguments go to pytest (e.g. `-m slow` for the slow suites).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: a real Redis for the remote tier, Chromium for the status page test
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
    $apt_get update -qq
    DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq "${need[@]}" >/dev/null
fi

# the package (builds its C helpers) with its test extras; torch pinned to the local CPU build
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "torch==2.13.0" -e ".[test]"

# the real model and prompts, converted once to a cache outside the repository
bash scripts/install_model.sh

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
