"""Test setup: 8 fake CPU devices (set before jax is imported) and the real-data fixture."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

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
