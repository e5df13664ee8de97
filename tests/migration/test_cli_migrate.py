"""``kvstore migrate`` against two real daemons: progress, exit codes, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.migration.test_transfer import NS
from tests.migration.transfer_helpers import daemon_pair, float_chunks, read_chunks, store_chunks
from tests.redis_servers import free_port
from tests.service.daemon_fixtures import HAVE_DATAPLANE, TOKEN_A, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    root = tmp_path_factory.mktemp("cli")
    with daemon_pair(root) as pair:
        yield pair


def migrate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", "migrate", *args], capture_output=True, text=True,
                          timeout=120, env=None if env is None else {**os.environ, **env})  # fmt: skip


def test_migrate_moves_a_namespace_with_plain_progress_lines(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = float_chunks(NS, 10, seed=30)
    store_chunks(a.port, TOKEN_A, NS, keys, chunks)
    r = migrate("--source", f"http://127.0.0.1:{a.admin_port}", "--token", TOKEN_A, "--peer",
                f"kvstore://127.0.0.1:{b.port}", "--peer-token", TOKEN_A, "--namespace", NS.id.hex(), "--all",
                "--poll-s", "0.05")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "\r" not in r.stdout and "\x1b" not in r.stdout  # not a terminal: plain lines
    assert lines[-2].startswith("100.0%") and "10/10 chunks" in lines[-2], lines
    assert lines[-1].startswith("migrated "), lines
    assert read_chunks(b.port, TOKEN_A, NS, keys, NS.chunk_nbytes) == [c.tobytes() for c in chunks]


def test_migrate_a_key_list(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    keys, chunks = float_chunks(NS, 3, seed=31)
    store_chunks(a.port, TOKEN_A, NS, keys, chunks)
    # tokens from the environment, not the command line
    r = migrate("--source", f"http://127.0.0.1:{a.admin_port}", "--peer", f"kvstore://127.0.0.1:{b.port}",
                "--namespace", NS.id.hex(), "--keys", ",".join(k.hex() for k in keys[:2]), "--codec", "lossless",
                env={"KVSTORE_SOURCE_TOKEN": TOKEN_A, "KVSTORE_PEER_TOKEN": TOKEN_A})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "lossless x2" in r.stdout
    assert read_chunks(b.port, TOKEN_A, NS, keys, NS.chunk_nbytes) == [c.tobytes() for c in chunks[:2]] + [None]


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("unknown namespace", 2, "unknown namespace"),
        ("bad source token", 2, "invalid bearer token"),
        ("bad peer token", 1, "Unauthorized"),
        ("unreachable peer", 1, "unreachable"),
        ("unreachable source", 1, "unreachable"),
        ("bad key", 2, "hex"),
    ],
)
def test_migrate_bad_input_exits_non_zero_with_a_clear_error(
    pair: tuple[DaemonProc, DaemonProc], case: str, code: int, message: str
) -> None:
    a, b = pair
    keys, chunks = float_chunks(NS, 1, seed=32)
    store_chunks(a.port, TOKEN_A, NS, keys, chunks)
    args = {"--source": f"http://127.0.0.1:{a.admin_port}", "--token": TOKEN_A,
            "--peer": f"kvstore://127.0.0.1:{b.port}", "--peer-token": TOKEN_A, "--namespace": NS.id.hex(),
            "--keys": keys[0].hex()}  # fmt: skip
    change = {
        "unknown namespace": {"--namespace": "ab" * 32},
        "bad source token": {"--token": "wrong-token-000000000000"},
        "bad peer token": {"--peer-token": "wrong-token-000000000000"},
        "unreachable peer": {"--peer": f"kvstore://127.0.0.1:{free_port()}"},
        "unreachable source": {"--source": f"http://127.0.0.1:{free_port()}"},
        "bad key": {"--keys": "zz"},
    }[case]
    r = migrate(*(x for kv in {**args, **change}.items() for x in kv))
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "kvstore migrate: error:" in r.stderr and message.lower() in r.stderr.lower(), r.stderr
