"""Prefetcher: same stream as the plain iterator, exact resume, errors at their batch, clean
shutdown, `put` on the worker (real SST-2/RTE through TrainIterator)."""

import pathlib
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from jmtl import config as config_lib
from jmtl.data import pipeline, sources
from jmtl.data.prefetch import Prefetcher
from jmtl.data.tokenizer import Tokenizer
from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib
from jmtl.tasks import get_task

TESTS = pathlib.Path(__file__).parent
TOK = Tokenizer.load(TESTS / "fixtures" / "data" / "vocab.txt")
TASKS = ("sst2", "rte")


@pytest.fixture(scope="module")
def setup(data_dir):
  """(config, records): tiny_sst2 with RTE added, task_per_batch, records loaded once."""
  c = config_lib.load_config_file(str(TESTS / "configs" / "tiny_sst2.py"))
  c.tasks = TASKS
  c.data.dir = str(data_dir)
  c.data.max_train_examples = 64
  c.data.mixing = "task_per_batch"
  c.data.mixture = "uniform"
  c.data.batch_size = 8
  c.data.max_len = 32
  c.data.length_buckets = (16, 32)
  records = {t: sources.load_records(get_task(t), "train", c.data) for t in TASKS}
  return c, records


def _iterator(setup):
  c, records = setup
  return pipeline.train_iterator(c, list(TASKS), TOK, records=records)


def _same(a, b, where=""):
  assert a.keys() == b.keys(), where
  for t in a:
    assert a[t].keys() == b[t].keys(), where
    for k in a[t]:
      np.testing.assert_array_equal(np.asarray(a[t][k]), np.asarray(b[t][k]),
                                    err_msg=f"{where} {t}/{k}")


def _plain(setup, n):
  it = _iterator(setup)
  return [next(it) for _ in range(n)]


class _Failing:
  """Wraps an iterator; its `fail_at`-th batch (0-based) raises."""

  def __init__(self, it, fail_at):
    self.it, self.fail_at, self.calls = it, fail_at, 0
    self.raised = threading.Event()

  def __next__(self):
    i = self.calls
    self.calls += 1
    if i == self.fail_at:
      self.raised.set()
      raise ValueError("bad row at train.tsv:42")
    return next(self.it)

  def get_state(self):
    return {"calls": self.calls, "inner": self.it.get_state()}

  def set_state(self, s):
    self.calls = s["calls"]
    self.it.set_state(s["inner"])


def test_prefetched_stream_equals_plain_stream(setup):
  plain = _plain(setup, 30)
  with Prefetcher(_iterator(setup), depth=3) as p:
    for k in range(30):
      _same(next(p), plain[k], f"batch {k}")
  # The stream mixes both tasks, so the state really depends on the step.
  assert {next(iter(b)) for b in plain} == set(TASKS)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_resume_from_prefetcher_state_is_exact(setup, depth):
  plain = _plain(setup, 22)
  for k in (0, 3, 12):
    with Prefetcher(_iterator(setup), depth=depth) as p:
      for _ in range(k):
        next(p)
      state = p.get_state()
    # The state is that of the plain iterator after k batches, whatever the read-ahead.
    ref = _iterator(setup)
    for _ in range(k):
      next(ref)
    assert state == ref.get_state()
    with Prefetcher(_iterator(setup), depth=depth) as q:
      next(q)  # some read-ahead to throw away
      q.set_state(state)
      assert q.get_state() == state
      for j in range(10):
        _same(next(q), plain[k + j], f"depth {depth}, k {k}, batch {k + j}")


def test_worker_error_surfaces_at_its_batch(setup):
  failing = _Failing(_iterator(setup), fail_at=5)
  with Prefetcher(failing, depth=4) as p:
    next(p)
    next(p)  # now batches 2..4 are buffered and the thread goes on to batch 5
    assert failing.raised.wait(5.0)
    for _ in range(3):
      next(p)  # the thread has met the error, but it must not show before batch 5
    good = p.get_state()
    with pytest.raises(ValueError, match=r"^bad row at train.tsv:42$") as err:
      next(p)
    assert type(err.value) is ValueError
    assert good == {"calls": 5, "inner": {**good["inner"], "step": 5}}
    assert p.get_state() == good  # the position stays at the last good batch
    with pytest.raises(ValueError, match="bad row"):
      next(p)  # and stays raised


def test_stop_iteration_ends_iteration():
  class Finite:
    def __init__(self):
      self.i = 0

    def __next__(self):
      if self.i == 3:
        raise StopIteration
      self.i += 1
      return self.i

    def get_state(self):
      return self.i

    def set_state(self, s):
      self.i = s

  with Prefetcher(Finite()) as p:
    assert list(p) == [1, 2, 3]
    assert p.get_state() == 3


def _prefetch_threads():
  """Live prefetch threads (by name: other tests may leave unrelated threads finishing)."""
  return [t for t in threading.enumerate() if t.name == "jmtl-prefetch"]


def test_close_joins_thread_and_is_idempotent(setup):
  before = len(_prefetch_threads())
  it = _iterator(setup)
  p = Prefetcher(it, depth=2)
  next(p)
  next(p)
  assert len(_prefetch_threads()) == before + 1
  p.close()
  assert len(_prefetch_threads()) == before
  p.close()
  assert len(_prefetch_threads()) == before
  with pytest.raises(RuntimeError, match="closed"):
    next(p)
  assert it.get_state()["step"] == 2  # set back from the read-ahead to what was consumed
  with Prefetcher(_iterator(setup)):
    assert len(_prefetch_threads()) == before + 1
  assert len(_prefetch_threads()) == before


def test_unclosed_prefetcher_does_not_hang_a_crashed_main(tmp_path):
  script = tmp_path / "crash.py"
  script.write_text(
      "import itertools, time\n"
      "from jmtl.data.prefetch import Prefetcher\n"
      "class Slow:\n"
      "  def __init__(self): self.i = 0\n"
      "  def __next__(self): time.sleep(0.01); self.i += 1; return self.i\n"
      "  def get_state(self): return self.i\n"
      "  def set_state(self, s): self.i = s\n"
      "p = Prefetcher(Slow(), depth=2)\n"
      "next(p)\n"
      "raise SystemExit('main crashed')\n")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=30, cwd=TESTS.parent)
  assert out.returncode == 1 and "main crashed" in out.stderr


def test_bad_set_state_keeps_position(setup):
  with Prefetcher(_iterator(setup)) as p:
    next(p)
    state = p.get_state()
    with pytest.raises(ValueError, match="version"):
      p.set_state({"version": 99})
    assert p.get_state() == state
    ref = _iterator(setup)
    ref.set_state(state)
    _same(next(p), next(ref))


def test_put_runs_on_the_worker_and_places_batches(setup):
  c, _ = setup
  mesh = mesh_lib.make_mesh(c.mesh)
  sh = sharding_lib.batch_sharding(mesh, tuple(tuple(r) for r in c.mesh.rules))
  threads = set()

  def put(batch):
    threads.add(threading.get_ident())
    return jax.device_put(batch, sh)

  plain = _plain(setup, 4)
  with Prefetcher(_iterator(setup), put=put) as p:
    for k in range(4):
      b = next(p)
      for arrays in b.values():
        for x in arrays.values():
          assert isinstance(x, jax.Array) and x.sharding == sh
      _same(b, plain[k])
  assert len(jax.devices()) == 8 and threads and threading.get_ident() not in threads


def test_depth_must_be_positive(setup):
  with pytest.raises(ValueError, match="depth"):
    Prefetcher(_iterator(setup), depth=0)
