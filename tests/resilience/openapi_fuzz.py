"""Schemathesis against the admin API's /openapi.json: every operation, generated requests.

Each operation gets ``max_examples`` requests drawn from its schema, sent with
the admin token; a reply must not be a 5xx and must match the document (status
code, content type, body schema). ``/v1/events`` streams, so it is left out.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.service.daemon_fixtures import DaemonProc

SKIP = {("GET", "/v1/events")}  # a server-sent event stream: it never ends


def run_schemathesis(
    st: ModuleType, d: DaemonProc, token: str, max_examples: int
) -> tuple[int, list[str], set[str]]:
    """Run every operation; returns (requests sent, failures as text, operations that rejected
    requests the document calls valid: the document is looser than the server there)."""
    from schemathesis.openapi.checks import RejectedPositiveData

    base = f"http://127.0.0.1:{d.admin_port}"
    schema = st.openapi.from_url(f"{base}/openapi.json")
    failures: list[str] = []
    looser: set[str] = set()
    sent = [0]
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in SKIP:
            continue

        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(op.as_strategy())
        def one(case: Any) -> None:
            response = case.call(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=20)
            sent[0] += 1
            if response.status_code >= 500 and response.status_code != 503:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")
                return
            try:
                case.validate_response(response)
            except BaseExceptionGroup as group:  # schemathesis's FailureGroup of check failures
                for exc in group.exceptions:
                    if isinstance(exc, RejectedPositiveData):
                        looser.add(f"{case.method} {case.operation.path} ({response.status_code}: {response.text[:120]})")
                    else:
                        failures.append(f"{case.method} {case.formatted_path}: {str(exc)[:300]}")

        one()
    return sent[0], failures, looser
