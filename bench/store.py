"""Storage benchmark: every tier against its plain baseline, measured in the same run.

    python bench/store.py [--json] [--quick] [--chunks N] [--chunk-mib M] ...

The same as ``kvstore bench store``; see kvstore/benchmarks/store.py for what
is measured and how the ratios read.
"""

from __future__ import annotations

import sys

from kvstore.benchmarks.store import main

if __name__ == "__main__":
    sys.exit(main())
