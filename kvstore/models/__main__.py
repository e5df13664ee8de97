"""``python3 -m kvstore.models``: convert SmolLM2 once (if needed) and print where it lives.

scripts/install_model.sh runs this after installing the packages, so tests
and benchmarks later load the converted folder in seconds.
"""

from __future__ import annotations

import json
import sys
import time

from kvstore.errors import KVStoreError
from kvstore.models.smollm2 import MANIFEST, ensure_converted


def main() -> int:
    start = time.perf_counter()
    try:
        folder = ensure_converted()
    except KVStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((folder / MANIFEST).read_text())
    print(f"SmolLM2-135M-Instruct ready in {folder} ({time.perf_counter() - start:.1f} s)")
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
