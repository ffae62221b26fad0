"""Sites of a federated config: field checks, participation sampling, simulated seconds and the
deadline, all against hand-worked values."""

import numpy as np
import pytest

from jmtl.config import ConfigError
from jmtl.defaults import base_config
from jmtl.federated import loop
from jmtl.federated import sites as sites_lib


def _config(*sites, tasks=("sst2", "mrpc")):
  c = base_config()
  c.tasks = tasks
  c.fed.sites = sites
  return c


def test_defaults_and_task_resolution():
  sites = sites_lib.sites_from_config(_config(dict(name="a"), dict(name="b", tasks=("mrpc",))))
  assert sites[0].tasks == ("sst2", "mrpc") and sites[1].tasks == ("mrpc",)
  assert sites[0].devices == 1 and sites[0].up_mbps == 100.0


@pytest.mark.parametrize("sites,message", [
    ((), "config key 'fed.sites' is empty"),
    ((dict(name="a"), dict(name="a")), "entry 1 ('a'): field 'name' repeats entry 0"),
    ((dict(name="a", devices=2), dict(name="b")), "entry 1 ('b'): field 'devices' = 1 differs"),
    ((dict(name="a", share=1.0), dict(name="b")), "entry 1 ('b'): field 'share' is unset"),
    ((dict(name="a", tasks=("sst2",)), dict(name="b", tasks=("sst2",))),
     "no site holds task 'mrpc'"),
    ((dict(name="a", speed=0),), "entry 0 ('a'): field 'speed' = 0 must be > 0"),
    ((dict(name="a/b"),), "entry 0 ('a/b'): field 'name' = 'a/b' must be a non-empty name"),
    (("a",), "entry 0: must be a dict of site fields"),
])
def test_bad_entries_name_the_entry_and_field(sites, message):
  with pytest.raises(ConfigError, match=None) as e:
    sites_lib.sites_from_config(_config(*sites))
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_sampling_is_seeded_and_takes_round_fraction_of_sites():
  masks = [loop.sample_participants(0, r, 8, 0.5) for r in range(1, 6)]
  assert all(m.sum() == 4 for m in masks)
  assert len({m.tobytes() for m in masks}) > 1  # different rounds, different sites
  np.testing.assert_array_equal(masks[2], loop.sample_participants(0, 3, 8, 0.5))
  assert loop.sample_participants(0, 1, 8, 0.01).sum() == 1  # at least one site
  assert loop.sample_participants(0, 1, 8, 1.0).sum() == 8


def test_site_seconds_and_deadline_hand_worked():
  a, b = sites_lib.sites_from_config(_config(
      dict(name="a", latency_ms=50.0, down_mbps=100.0, up_mbps=10.0, speed=1.0),
      dict(name="b", latency_ms=10.0, down_mbps=1000.0, up_mbps=1000.0, speed=0.25)))
  # a: 2 x 0.05 + 1e6 B x 8 / 1e8 + 10 x 0.1 / 1 + 1e6 x 8 / 1e7 = 0.1 + 0.08 + 1 + 0.8 = 1.98
  # b: 2 x 0.01 + 8e6 / 1e9 + 10 x 0.1 / 0.25 + 8e6 / 1e9 = 0.02 + 0.008 + 4 + 0.008 = 4.036
  secs = loop.site_seconds([a, b], [1_000_000, 1_000_000], 10, 0.1)
  np.testing.assert_allclose(secs, [1.98, 4.036])
  np.testing.assert_array_equal(loop.deadline_mask(np.ones(2), secs, 2.0), [1, 0])
  np.testing.assert_array_equal(loop.deadline_mask(np.ones(2), secs, 0.0), [1, 1])
  np.testing.assert_array_equal(loop.deadline_mask(np.array([0, 1]), secs, 5.0), [0, 1])
