"""Checkpointer: a step that fails to restore is never deleted (kept aside by the writer,
untouched by a reader), and a refused checkpoint leaves every step in place."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmtl.train import checkpoint as checkpoint_lib


def _tree(step: int) -> dict:
  return {"w": jnp.arange(6, dtype=jnp.float32) * step, "b": jnp.full((2, 3), step, jnp.int32)}


def _abstract() -> dict:
  tree = _tree(0)
  return checkpoint_lib.abstract_like(tree, jax.tree.map(lambda x: x.sharding, tree))


def _digest(folder) -> dict[str, str]:
  """Relative path -> SHA-256 of every file under `folder` (what "kept intact" compares)."""
  return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture
def ck(tmp_path):
  """Steps 1 and 2 saved; step 2's state files overwritten with garbage (its meta reads)."""
  directory = tmp_path / "checkpoints"
  writer = checkpoint_lib.Checkpointer(directory, keep=3)
  for step in (1, 2):
    writer.save(step, _tree(step), {"pos": step}, {"step": step})
  writer.close()
  files = [f for f in (directory / "2" / "state").rglob("*") if f.is_file()]
  assert files
  for f in files:
    f.write_bytes(b"garbage!" * 16)
  return directory, _digest(directory / "2")


def _assert_step_1(restored) -> None:
  step, state, data, meta = restored
  assert (step, data, meta) == (1, {"pos": 1}, {"step": 1})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(6, dtype=np.float32))
  np.testing.assert_array_equal(np.asarray(state["b"]), np.ones((2, 3), np.int32))


def test_writer_moves_an_unreadable_newer_step_aside_instead_of_deleting_it(ck, capsys):
  directory, before = ck
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  _assert_step_1(ckpt.restore_latest(_abstract()))
  assert (directory / "2").is_dir(), "restore_latest must not delete or move anything itself"
  ckpt.remove_incomplete()  # the writer accepts the workdir: step 2 goes aside, kept whole
  aside = directory.parent / "checkpoints-unreadable" / "2"
  assert _digest(aside) == before
  assert ckpt.all_steps() == [1]
  err = capsys.readouterr().err
  assert "step 2" in err and "cannot be restored" in err and str(aside) in err, err
  ckpt.save(2, _tree(2), {"pos": 2}, {"step": 2})  # training writes step 2 again
  ckpt.close()
  again = checkpoint_lib.Checkpointer(directory, read_only=True)
  step, state, _, _ = again.restore_latest(_abstract())
  assert step == 2
  np.testing.assert_array_equal(np.asarray(state["w"]), 2 * np.arange(6, dtype=np.float32))
  again.close()
  assert _digest(aside) == before


def test_a_second_unreadable_copy_of_a_step_does_not_replace_the_first(ck):
  directory, before = ck
  (directory.parent / "checkpoints-unreadable" / "2").mkdir(parents=True)
  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  _assert_step_1(ckpt.restore_latest(_abstract()))
  ckpt.remove_incomplete()
  ckpt.close()
  assert _digest(directory.parent / "checkpoints-unreadable" / "2.1") == before


def test_a_reader_never_touches_an_unreadable_step(ck, capsys):
  directory, before = ck
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  _assert_step_1(ckpt.restore_latest(_abstract()))
  ckpt.remove_incomplete()  # a no-op on a reader
  ckpt.close()
  assert _digest(directory / "2") == before
  assert not (directory.parent / "checkpoints-unreadable").exists()
  assert "step 2" in capsys.readouterr().err


def test_a_refused_checkpoint_keeps_every_step(ck):
  directory, before = ck

  def refuse(step, meta):
    raise ValueError(f"step {step} is another run's")

  ckpt = checkpoint_lib.Checkpointer(directory, keep=3)
  with pytest.raises(ValueError, match="step 2 is another run's"):
    ckpt.restore_latest(_abstract(), check=refuse)
  ckpt.close()
  assert _digest(directory / "2") == before and (directory / "1").is_dir()
