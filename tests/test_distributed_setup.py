"""Multi-host setup mistakes that JAX's runtime would answer with a C++ abort are caught first:
one jmtl line naming the coordinator address (exit 2)."""

import pathlib
import socket
import subprocess
import sys

import pytest

from jmtl.parallel import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_is_named():
  port = _free_port()  # nobody listens there
  with pytest.raises(RuntimeError, match=rf"'localhost:{port}' \(process 0\) was not reachable "
                                         r"within 1 s"):
    distributed.check_coordinator(f"localhost:{port}", 1, 1.0)


def test_busy_port_on_process_0_is_named():
  with socket.socket() as held:
    held.bind(("", 0))
    held.listen()
    port = held.getsockname()[1]
    with pytest.raises(RuntimeError, match=rf"process 0 cannot listen on port {port}"):
      distributed.check_coordinator(f"localhost:{port}", 0, 1.0)


def test_reachable_coordinator_passes_and_bad_addresses_are_named():
  with socket.socket() as listening:
    listening.bind(("localhost", 0))
    listening.listen()
    distributed.check_coordinator(f"localhost:{listening.getsockname()[1]}", 1, 1.0)
  for bad in ("localhost", "localhost:http", ":1234", "host:70000"):
    with pytest.raises(RuntimeError, match="is not host:port"):
      distributed.check_coordinator(bad, 1, 1.0)


def test_cli_line_for_an_unreachable_coordinator():
  port = _free_port()
  out = subprocess.run(
      [sys.executable, "-m", "jmtl.cli", "train", "--config",
       str(REPO / "tests" / "configs" / "tiny_sst2.py"), "--workdir", "/nonexistent/never",
       "--config.dist.initialize=true", f"--config.dist.coordinator_address=localhost:{port}",
       "--config.dist.num_processes=2", "--config.dist.process_id=1",
       "--config.dist.initialization_timeout_s=2"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("jmtl: error: "), out.stderr
  assert f"'localhost:{port}' (process 0) was not reachable within 2 s" in out.stderr
