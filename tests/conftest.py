"""Test setup: 8 fake CPU devices (set before jax is imported), the real-data fixture, and a
per-module release of JAX's compilation caches (keeps the one-process suite's memory bounded)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc
import pathlib
from collections.abc import Iterator

import pytest

_GUESS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
if "JMTL_DATA_DIR" not in os.environ and _GUESS.is_dir():
  os.environ["JMTL_DATA_DIR"] = str(_GUESS)  # the checkout's sibling shared/data, as in CI


def _data_root() -> pathlib.Path | None:
  root = os.environ.get("JMTL_DATA_DIR")
  if root:
    return pathlib.Path(root).resolve()
  return None


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """Root of the real datasets. Missing data fails under CI=true and skips elsewhere."""
  root = _data_root()
  if root is None or not root.is_dir():
    msg = f"real data not found (JMTL_DATA_DIR={os.environ.get('JMTL_DATA_DIR')!r})"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return root


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> pathlib.Path:
  """One persistent JAX compilation cache for the `jmtl` runs the tests start as subprocesses
  (`faults.env(cache=...)`), shared by the whole session: a program one module's run compiled
  (same model, shapes, device count and flags, which key the cache) is loaded by the next
  module's run instead of compiled again. The programs, hence the numbers, are the same."""
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module", autouse=True)
def _release_jax_memory() -> Iterator[None]:
  """After each test module: drop JAX's compiled-function caches and collect garbage.

  The suite runs in one process; without this, executables compiled by earlier modules and
  arrays they keep alive add up (resident memory grew to ~6 GB). jax is imported here, not at
  the top, so the environment set above is in place before jax first loads.
  """
  yield
  import jax  # lazily: after the XLA_FLAGS/JAX_PLATFORMS setup above

  jax.clear_caches()
  gc.collect()
