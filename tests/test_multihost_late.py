"""One process of a multi-host run reaching the train step's first collective long after the
other (a slow compile, a persistent-cache miss on one host, a slow first batch).

On CPU, XLA builds a gloo context at the first collective over a new set of devices and waits
for the other processes there with a fixed 30 s timeout; `distributed.first_run_sync` makes
every process wait for the others at the coordination service's barrier instead (timeout
dist.initialization_timeout_s). Here process 1 holds its first batch until 40 s after process 0
has compiled the train step: both processes must finish with the numbers of a 1-process run
(without `first_run_sync` process 0 fails after 30 s and process 1 aborts).
"""

from __future__ import annotations

import time

import jax
import pytest

import faults
from test_multihost import SST2, _env, _port

from jmtl.parallel import distributed

HOLD_S = 40.0  # > gloo's 30 s key-value wait
COMPILED = "Finished XLA compilation of jit(step)"  # jax_log_compiles' line


def test_first_run_sync_is_the_plain_call_with_one_process():
  """One process: `fn` is called directly, never compiled ahead (`lower` is not touched), so
  the one-process path and its compile count are unchanged."""
  assert jax.process_count() == 1
  calls = []

  def fn(*args, **kwargs):
    calls.append((args, kwargs))
    return sum(args) + kwargs.get("c", 0)

  fn.lower = lambda *a, **k: pytest.fail("lower called with one process")
  synced = distributed.first_run_sync(fn, "test_one")
  assert synced.jitted is fn
  assert synced(1, 2, c=3) == 6 and synced(1, 2, c=3) == 6
  assert calls == [((1, 2), {"c": 3})] * 2


def test_signature_separates_what_selects_an_executable():
  """`_signature` differs exactly when a jitted function would compile anew: shapes, dtypes,
  weak types, shardings, pytree structure, static values; not the array values."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  sig = distributed._signature  # pylint: disable=protected-access
  a = jnp.zeros((2, 3), jnp.float32)
  assert sig((a,), {}) == sig((jnp.ones((2, 3), jnp.float32),), {})
  assert sig((a,), {}) != sig((jnp.zeros((3, 2), jnp.float32),), {})
  assert sig((a,), {}) != sig((jnp.zeros((2, 3), jnp.bfloat16),), {})
  assert sig((jnp.asarray(1.0),), {}) != sig((jnp.asarray(1.0, jnp.float32),), {})  # weak type
  assert sig(({"x": a},), {}) != sig(({"y": a},), {})
  assert sig((a, "cola"), {}) != sig((a, "sst2"), {})
  assert sig((a,), {"k": 1}) != sig((a,), {"k": 2})
  assert sig((np.zeros(3),), {}) == sig((np.ones(3),), {})
  key = jax.random.key(0)  # a typed key array has no weak_type
  assert sig((key,), {}) == sig((jax.random.key(1),), {}) != sig((jax.random.split(key),), {})
  assert sig(([1],), {"v": {1, 2}}) == sig(([1],), {"v": {1, 2}})  # unhashable: by repr


@pytest.mark.slow
def test_process_reaching_first_train_step_40s_late_gives_the_one_process_run(
    tmp_path, data_dir, jax_cache):
  # The session's JAX compilation cache (conftest.py; tests/test_multihost.py's runs compiled
  # these programs): a cache hit still logs COMPILED (jax_log_compiles times the compile-or-load
  # step) and gloo's context is still built at the first collective's run, where process 0 waits.
  cache = jax_cache
  ref, work = tmp_path / "one", tmp_path / "two"
  # The 1-process reference runs alongside (mostly while process 1 holds), to save time.
  reference = faults.Job(faults.cmd(ref, *SST2), _env(data_dir, cache, 8),
                         logs=tmp_path / "ref_logs")
  trace, release = tmp_path / "trace1", tmp_path / "release"
  port = _port()
  jobs = []
  for pid in range(2):
    env = _env(data_dir, cache, 4, f"hold_at=1:{release}" if pid else "")
    if pid:
      env["JMTL_FAULT_TRACE"] = str(trace)
    else:
      env["JAX_LOG_COMPILES"] = "1"  # says when process 0 has compiled the train step
    argv = faults.cmd(work, *SST2, "--config.dist.initialize=true",
                      f"--config.dist.coordinator_address=localhost:{port}",
                      "--config.dist.num_processes=2", f"--config.dist.process_id={pid}")
    jobs.append(faults.Job(argv, env, logs=tmp_path / "logs"))
  try:
    faults.wait_until(lambda: trace.exists() and "hold 1" in trace.read_text(), jobs[1],
                      timeout=300, what="process 1 holding its first batch")
    # From here process 0 is at the train step's first run (its compile has finished), and
    # process 1 reaches it more than HOLD_S s later.
    faults.wait_until(lambda: COMPILED in jobs[0].err_path.read_text(), jobs[0], timeout=300,
                      what="process 0 compiling the train step")
    held = time.monotonic()
    # Process 0 must still be running (waiting for process 1) when the hold ends.
    while time.monotonic() - held < HOLD_S:
      assert jobs[0].poll() is None, jobs[0].wait().stderr[-3000:]
      time.sleep(0.2)
    release.touch()
  finally:
    release.touch()
  results = [job.wait(timeout=300) for job in jobs]
  res = reference.wait(timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  for pid, res in enumerate(results):
    assert res.returncode == 0, (pid, res.stdout[-2000:], res.stderr[-3000:])
    assert "jmtl: error" not in res.stderr
  assert "batch 1" in trace.read_text()
  faults.assert_same_train(work, ref, rel=1e-5)
  faults.assert_same_eval(work, ref, rel=1e-5)
  # The ahead-of-time compile is the compile: one train-step variant, as in one process.
  got, want = faults.train_rows(work), faults.train_rows(ref)
  assert ([r.get("train/compilations") for r in got.values()] ==
          [r.get("train/compilations") for r in want.values()])
