"""tiny_fed_flower.py over 3 sites (Flower's SecAgg+ needs at least 3) with secure aggregation:
`jmtl federated --config.fed.backend=flower` runs its rounds through Flower's SecAgg+."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "tiny_fed_flower", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "tiny_fed_flower.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  c = _base.get_config()
  c.fed.sites = tuple(dict(name=n, devices=1) for n in ("a", "b", "c"))
  c.fed.rounds = 1
  c.fed.secure_aggregation = True
  return c
