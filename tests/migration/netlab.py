"""``kvstore serve`` inside a network-lab node, for tests (the lab itself: kvstore.benchmarks.netlab).

The namespaces, shaped links and the delaying relay live in the package
(``kvstore.benchmarks.netlab``, ``kvstore.benchmarks.relay``) so that
``kvstore bench migrate`` uses them too; this module adds :class:`LabDaemon`,
the test fixtures' daemon process started inside a node.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvstore.benchmarks.netlab import (
    CONGESTED,
    CROSS_DC,
    NetLab,
    Node,
    call_host,
    rate_bps,
    unavailable_reason,
)
from tests.service.daemon_fixtures import Body, DaemonProc, Reply

__all__ = ["CONGESTED", "CROSS_DC", "LabDaemon", "NetLab", "Node", "call_host", "rate_bps", "unavailable_reason"]


class LabDaemon(DaemonProc):
    """``kvstore serve`` inside a lab node: data plane and admin API on every address of the node.

    The admin API and the data plane are reached from the test process at
    ``node.mgmt_ip`` (unshaped) and from other nodes at ``node.ip`` (shaped).
    Binding beyond loopback needs tokens: ``tokens`` is required.
    """

    def __init__(self, lab: NetLab, node: str, workdir: Path, tokens: Mapping[str, str],
                 args: Sequence[str] = (), port: int = 7481, admin_port: int = 7482) -> None:
        super().__init__(workdir, tokens=tokens, name=f"daemon-{node}",
                         args=["--host", "0.0.0.0", "--admin-host", "0.0.0.0", *args])
        self.lab, self.node = lab, lab.node(node)
        self.port, self.admin_port = port, admin_port
        argv = list(self.argv)
        argv[argv.index("--port") + 1] = str(port)
        argv[argv.index("--admin-port") + 1] = str(admin_port)
        self.argv = argv

    def start(self) -> LabDaemon:
        """Start inside the node and wait for /healthz over the management link.

        Raises:
            RuntimeError: the process exited or did not answer in time (with its log).
        """
        with open(self.log_path, "ab") as log:
            self.proc = self.lab.popen(self.node.name, self.argv, env=self.env, stdout=log, stderr=log,
                                       cwd=self.workdir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.call("GET", "/healthz", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"daemon in {self.node.name} did not start:\n{self.log_text()}")

    def call(self, method: str, path: str, body: Body = None, token: str | None = None,
             headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> Reply:
        return call_host(self.node.mgmt_ip, self.admin_port, method, path, body, token, headers, timeout)

    @property
    def url(self) -> str:
        """The data plane's URL from the test process (management link, unshaped)."""
        return f"kvstore://{self.node.mgmt_ip}:{self.port}"
