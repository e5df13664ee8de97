"""Turn the suite's result rows into the table of docs/reliability.md.

    KVSTORE_RELIABILITY_DIR=out python -m pytest tests/resilience -m "slow or not slow"
    python -m tests.resilience.report out docs/reliability.md

reads ``out/results.jsonl`` (rows appended by tests/resilience/common.record)
and rewrites the part of the document between the two ``results`` markers
(the rest of the page is kept). Rows of the same scenario and description are
summed, so several runs add up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.resilience.common import RESULTS_FILE

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def table(rows: list[dict[str, object]]) -> str:
    merged: dict[tuple[str, str], dict[str, object]] = {}
    for r in rows:
        k = (str(r["scenario"]), str(r["what"]))
        m = merged.setdefault(k, {"attempts": 0, "held": 0, "detail": "", "time": ""})
        m["attempts"] = int(m["attempts"]) + int(r["attempts"])  # type: ignore[call-overload]
        m["held"] = int(m["held"]) + int(r["held"])  # type: ignore[call-overload]
        m["detail"], m["time"] = r["detail"], r["time"]
    lines = ["| scenario | what was tried | times | held | notes (last run) |", "| --- | --- | ---: | ---: | --- |"]
    for (scenario, what), m in merged.items():
        lines.append(f"| {scenario} | {what} | {m['attempts']} | {m['held']} | {m['detail']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.resilience.report")
    p.add_argument("results_dir", help="the KVSTORE_RELIABILITY_DIR of the run")
    p.add_argument("doc", nargs="?", default="docs/reliability.md", help="page to update [docs/reliability.md]")
    a = p.parse_args(argv)
    src = Path(a.results_dir) / RESULTS_FILE
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    doc = Path(a.doc)
    text = doc.read_text() if doc.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        print(f"{doc} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{tail}")
    print(f"{len(rows)} rows -> {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
