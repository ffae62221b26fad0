"""Multi-host set-up mistakes that JAX's runtime would answer with a C++ abort (after its
timeout) are caught first, by a roll call of the processes on the coordinator's port: one jmtl
line naming the key and the values, the same on every process (exit 2)."""

import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest

import faults
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


# ----------------------------------------------------------------- the roll call (threads)
# Process 0 and the others run `check_coordinator` in threads of this process; the expected
# lines are written out by hand from the mistake each test makes.

def _together(calls, start_gaps=None):
  """Runs each `call()` in its own thread (the i-th after `start_gaps[i]` seconds); returns
  what each raised (None: it returned)."""
  results: list = [None] * len(calls)

  def run(i):
    if start_gaps:
      time.sleep(start_gaps[i])
    try:
      calls[i]()
    except BaseException as e:  # noqa: BLE001 - the test inspects it
      results[i] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert not any(t.is_alive() for t in threads), "a roll call did not end"
  return results


def _member(port, pid, n, timeout=5.0, config=None):
  return lambda: distributed.check_coordinator(f"localhost:{port}", pid, timeout,
                                               num_processes=n, config=config)


def _same_line(results) -> str:
  assert all(isinstance(r, distributed.SetupError) for r in results), results
  lines = {str(r) for r in results}
  assert len(lines) == 1, lines
  return lines.pop()


def test_roll_call_passes_and_frees_the_port():
  port = _free_port()
  cfg = {"seed": 0, "tasks": ["sst2"]}
  results = _together([_member(port, p, 3, config=cfg) for p in (0, 2, 1)], [0, 0.2, 0.4])
  assert results == [None, None, None]
  with socket.socket() as again:  # what jax.distributed.initialize binds next
    again.bind(("", port))


def test_roll_call_names_a_duplicate_process_id_on_every_process():
  port = _free_port()
  # Process 0 then waits for id 2 until its timeout (2 s), answering at once.
  results = _together([_member(port, 0, 3, 2.0), _member(port, 1, 3, 2.0),
                       _member(port, 1, 3, 2.0)], [0, 0.2, 0.2])
  assert _same_line(results) == (
      "config key 'dist.process_id' = 1 is given to 2 processes; each of the "
      "dist.num_processes = 3 processes needs its own id in 0..2")


def test_roll_call_names_a_second_process_0():
  """The second process 0 cannot listen; it joins the roll call as id 0 and is named, and so
  is the real process 1 that comes afterwards (within the grace after a mistake)."""
  port = _free_port()
  results = _together([_member(port, 0, 2), _member(port, 0, 2), _member(port, 1, 2)],
                      [0, 0.5, 1.0])
  assert _same_line(results) == (
      "config key 'dist.process_id' = 0 is given to 2 processes; each of the "
      "dist.num_processes = 2 processes needs its own id in 0..1")


def test_roll_call_names_different_num_processes():
  port = _free_port()
  results = _together([_member(port, 0, 2, 2.0), _member(port, 1, 3, 2.0)], [0, 0.2])
  assert _same_line(results) == (
      "config key 'dist.num_processes' differs between the processes of this run: 2 on "
      "process 0, 3 on process 1; start every process with the same value")


def test_roll_call_names_the_ids_that_never_came():
  port = _free_port()
  start = time.monotonic()
  results = _together([_member(port, 0, 4, timeout=1.5), _member(port, 2, 4, timeout=1.5)],
                      [0, 0.2])
  assert _same_line(results) == (
      "config key 'dist.num_processes' = 4: process ids 1, 3 never joined within 1.5 s "
      "(dist.initialization_timeout_s; joined: 0, 2); start every process, or lower "
      "dist.num_processes")
  assert time.monotonic() - start < 1.5 + 3.0  # process 0's timeout, not the client's margin


def test_roll_call_names_the_keys_of_different_configs():
  port = _free_port()
  mine = {"seed": 0, "data.batch_size": 8, "tasks": ["sst2"]}
  theirs = {"seed": 1, "data.batch_size": 8, "tasks": ["sst2"]}
  results = _together([_member(port, 0, 2, config=mine), _member(port, 1, 2, config=theirs)],
                      [0, 0.2])
  assert _same_line(results) == (
      "the processes of this run have different configs (seed: 0 on process 0, 1 on process 1); "
      "start every process with the same config and overrides")


def test_roll_call_ignores_a_port_probe():
  port = _free_port()

  def probe():
    time.sleep(0.2)
    with socket.create_connection(("localhost", port), timeout=2.0):
      pass  # connects and hangs up without a word, like a health check

  results = _together([_member(port, 0, 2), probe, _member(port, 1, 2)], [0, 0, 0.6])
  assert results == [None, None, None]


def test_something_else_on_the_port_is_named():
  """A process that meets another server (JAX's coordination service of a run that already
  started, another program) instead of the roll call: one line, not a hang."""
  with socket.socket() as server:
    server.bind(("localhost", 0))
    server.listen()
    port = server.getsockname()[1]

    def serve(reply):
      conn, _ = server.accept()
      with conn:
        conn.recv(1024)
        if reply:
          conn.sendall(reply)

    t = threading.Thread(target=serve, args=(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00",))
    t.start()
    with pytest.raises(distributed.SetupError,
                       match=r"^config key 'dist.process_id' = 1: 'localhost:\d+' answered, but "
                             r"not as jmtl's roll call .*is this id given to two processes"):
      _member(port, 1, 2, timeout=2.0)()
    t.join()

    def serve_silently():
      while True:
        try:
          conn, _ = server.accept()
        except OSError:
          return
        conn.close()

    server.settimeout(1.5)
    t = threading.Thread(target=serve_silently)
    t.start()
    with pytest.raises(distributed.SetupError,
                       match=r"accepted connections but never answered jmtl's roll call within "
                             r"1 s"):
      _member(port, 1, 2, timeout=1.0)()
    t.join()


# ----------------------------------------------------------------- the CLI: one line each

def _cli(port, pid, n, *extra, timeout_s=6, host="localhost"):
  return subprocess.Popen(
      [sys.executable, "-m", "jmtl.cli", "train", "--config",
       str(REPO / "tests" / "configs" / "tiny_sst2.py"), "--workdir", "/nonexistent/never",
       "--config.dist.initialize=true", f"--config.dist.coordinator_address={host}:{port}",
       f"--config.dist.num_processes={n}", f"--config.dist.process_id={pid}",
       f"--config.dist.initialization_timeout_s={timeout_s}", *extra],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2"))


def _lines(procs) -> str:
  """Every process exits 2 with the same single `jmtl: error:` line on stderr; returns it."""
  lines = set()
  for proc in procs:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("jmtl: error: "), err[-3000:]
    lines.add(err.strip())
  assert len(lines) == 1, lines
  return lines.pop()


def test_cli_duplicate_process_id_is_one_line_on_every_process():
  port = _free_port()
  line = _lines([_cli(port, 0, 3), _cli(port, 1, 3), _cli(port, 1, 3)])
  assert line == ("jmtl: error: config key 'dist.process_id' = 1 is given to 2 processes; each "
                  "of the dist.num_processes = 3 processes needs its own id in 0..2")


def test_cli_num_processes_mismatch_is_one_line_on_every_process():
  port = _free_port()
  line = _lines([_cli(port, 0, 3), _cli(port, 1, 2)])
  assert line == ("jmtl: error: config key 'dist.num_processes' differs between the processes "
                  "of this run: 3 on process 0, 2 on process 1; start every process with the "
                  "same value")


def test_cli_config_difference_names_the_key_but_not_the_coordinator_spelling():
  """Hosts may spell process 0's address differently; only real config differences count."""
  port = _free_port()
  line = _lines([_cli(port, 0, 2), _cli(port, 1, 2, "--config.train.steps=3", host="127.0.0.1")])
  assert "train.steps" in line and "coordinator_address" not in line, line


def test_cli_per_host_display_and_timeout_are_not_config_differences():
  """Each host may choose its own progress display and join timeout (they change no number);
  a key that does change the numbers is still named, alone."""
  port = _free_port()
  line = _lines([_cli(port, 0, 2, "--config.train.progress=bar", "--config.train.steps=3"),
                 _cli(port, 1, 2, "--config.train.progress=none", timeout_s=9)])
  assert line == ("jmtl: error: the processes of this run have different configs (train.steps: "
                  "3 on process 0, 12 on process 1); start every process with the same config "
                  "and overrides"), line


def test_stop_code_carries_the_signal_and_the_lowest_process_that_got_it():
  # code = signal * 2**16 + (2**16 - 1 - process): by hand, SIGTERM (15) on process 1.
  assert distributed.stop_code(15, 1) == 15 * 65536 + 65534 == 1048574
  assert distributed.stop_code(None, 3) == 0 and distributed.stop_origin(0) is None
  assert distributed.stop_origin(1048574) == (15, 1)
  # The maximum over processes: the largest signal wins, then the lowest process id.
  codes = [distributed.stop_code(s, p) for p, s in enumerate([None, 15, 15, 2])]
  assert distributed.stop_origin(max(codes)) == (15, 1)
  codes = [distributed.stop_code(s, p) for p, s in enumerate([2, None, 15])]
  assert distributed.stop_origin(max(codes)) == (15, 2)


def test_refusal_line_names_the_first_refusing_process_and_the_others():
  assert distributed.refusal_line(["", "", ""]) is None
  assert distributed.refusal_line(["", "data differ"]) == "process 1: data differ"
  assert distributed.refusal_line(["a", "", "b"]) == "process 0 (also refused on process 2): a"
  assert (distributed.refusal_line(["", "x", "y", "z"])
          == "process 1 (also refused on processes 2, 3): x")


def test_cli_missing_process_is_named():
  port = _free_port()
  line = _lines([_cli(port, 0, 3, timeout_s=5), _cli(port, 1, 3, timeout_s=5)])
  assert line == ("jmtl: error: config key 'dist.num_processes' = 3: process id 2 never joined "
                  "within 5 s (dist.initialization_timeout_s; joined: 0, 1); start every process, "
                  "or lower dist.num_processes")


def test_cli_process_id_out_of_range_is_refused_by_the_config_check(capsys):
  line = faults.cli_error_line(capsys, [
      "train", "--config", str(REPO / "tests" / "configs" / "tiny_sst2.py"), "--workdir",
      "/nonexistent/never", "--config.dist.initialize=true",
      "--config.dist.coordinator_address=localhost:1", "--config.dist.num_processes=2",
      "--config.dist.process_id=2"])
  assert "dist.process_id" in line and "must be < dist.num_processes = 2" in line


def test_a_latecomer_meeting_jax_service_is_named():
  """The real case behind the line above: process 0 has finished its roll call and JAX's
  coordination service (gRPC) holds the port; a process arriving then (an id given twice with
  N = 2) is told so at once instead of waiting for an answer."""
  port = _free_port()
  service = subprocess.Popen(
      [sys.executable, "-c", "import jax; jax.distributed.initialize("
       f"'localhost:{port}', 2, 0, initialization_timeout=30)"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 30
    while True:  # until the service listens
      try:
        socket.create_connection(("localhost", port), timeout=1.0).close()
        break
      except OSError:
        assert time.monotonic() < deadline and service.poll() is None, "no JAX service"
        time.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(distributed.SetupError,
                       match=r"'dist.process_id' = 1: 'localhost:\d+' answered, but not as "
                             r"jmtl's roll call \(it speaks another protocol\)"):
      _member(port, 1, 2, timeout=5.0)()
    assert time.monotonic() - start < 2.0
  finally:
    service.kill()
    service.wait()
