"""Sites of a federated run (`fed.sites`): their fields, checks, and what follows from them.

Each entry of `fed.sites` is a dict; `FIELDS` declares every field once (type, default, meaning,
check). `sites_from_config` turns the entries into `Site`s or raises one `ConfigError` line that
names the entry (index and name) and the field, e.g.

  config key 'fed.sites' entry 2 ('aws-eu'): field 'up_mbps' = -5 must be > 0

Rules across entries: names are distinct; every site spans the same number of devices (one SPMD
program: the `site` mesh axis has equal slices); either no site or every site gives `share`, and
likewise `examples` (never both kinds); a site's `tasks` are names from `tasks`, and every task
of `tasks` is held by at least one site; `data_dir` is given only with fed.partition = "own"
(each site's rows are then its own files, `jmtl.federated.loop.own_records`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jmtl.config import ConfigError


def _num(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


# field: (default, meaning, (predicate, "must be ..." text))
FIELDS: dict[str, tuple[Any, str, tuple[Any, str]]] = {
    "name": (None, "unique site name (required); metric keys site/<name>/...",
             (lambda v: isinstance(v, str) and v and "/" not in v and v.strip() == v,
              "a non-empty name without '/' or surrounding spaces")),
    "cloud": ("", "cloud provider (cost is summed per cloud)", (lambda v: isinstance(v, str),
                                                                "a string")),
    "region": ("", "region (documentation only)", (lambda v: isinstance(v, str), "a string")),
    "devices": (1, "devices of the site: its slice of the `site` mesh axis",
                (lambda v: _int(v) and v >= 1, "an int >= 1")),
    "speed": (1.0, "relative compute speed (step time = fed.step_time_s / speed)",
              (lambda v: _num(v) and v > 0, "> 0")),
    "up_mbps": (100.0, "upload bandwidth, megabits per second", (lambda v: _num(v) and v > 0,
                                                                 "> 0")),
    "down_mbps": (100.0, "download bandwidth, megabits per second",
                  (lambda v: _num(v) and v > 0, "> 0")),
    "latency_ms": (50.0, "one-way latency to the server, milliseconds",
                   (lambda v: _num(v) and v >= 0, ">= 0")),
    "price_device_hour": (0.0, "price of one device-hour, dollars",
                          (lambda v: _num(v) and v >= 0, ">= 0")),
    "price_egress_gb": (0.0, "price of one GB (1e9 bytes) sent out of the site, dollars",
                        (lambda v: _num(v) and v >= 0, ">= 0")),
    "share": (0.0, "relative share of the rows of each task it holds (0 = unset)",
              (lambda v: _num(v) and v >= 0, ">= 0")),
    "examples": (0, "exact training rows per task it holds (0 = unset; the rest is unused)",
                 (lambda v: _int(v) and v >= 0, "an int >= 0")),
    "tasks": ((), "tasks the site holds; () = every task of `tasks`",
              (lambda v: isinstance(v, (tuple, list)) and all(isinstance(t, str) for t in v),
               "a tuple of task names")),
    "data_dir": ("", "fed.partition = 'own': the site's data root (its training files, in the "
                 "layout of data.dir); '' = the process's data root (data.dir / $JMTL_DATA_DIR); "
                 "on Flower the SuperNode's node config data-dir comes first",
                 (lambda v: isinstance(v, str), "a string (a path)")),
}


@dataclasses.dataclass(frozen=True)
class Site:
  """One site; fields as in `FIELDS` (tasks resolved: never empty)."""

  name: str
  cloud: str
  region: str
  devices: int
  speed: float
  up_mbps: float
  down_mbps: float
  latency_ms: float
  price_device_hour: float
  price_egress_gb: float
  share: float
  examples: int
  tasks: tuple[str, ...]
  data_dir: str = ""


def _entry(i: int, raw: Any, all_tasks: tuple[str, ...]) -> Site:
  label = f"config key 'fed.sites' entry {i}"
  if hasattr(raw, "to_dict"):
    raw = raw.to_dict()
  if not isinstance(raw, dict):
    raise ConfigError(f"{label}: must be a dict of site fields, got {raw!r}")
  name = raw.get("name")
  if isinstance(name, str) and name:
    label += f" ({name!r})"
  unknown = sorted(set(raw) - set(FIELDS))
  if unknown:
    raise ConfigError(f"{label}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
  values = {}
  for field, (default, _, (ok, text)) in FIELDS.items():
    if field not in raw:
      if default is None:
        raise ConfigError(f"{label}: field {field!r} is required")
      values[field] = default
      continue
    v = raw[field]
    try:
      good = bool(ok(v))
    except (TypeError, ValueError):
      good = False
    if not good:
      raise ConfigError(f"{label}: field {field!r} = {v!r} must be {text}")
    values[field] = v
  tasks = tuple(values["tasks"]) or tuple(all_tasks)
  bad = [t for t in tasks if t not in all_tasks]
  if bad:
    raise ConfigError(f"{label}: field 'tasks' names {bad[0]!r}, which is not in tasks "
                      f"{list(all_tasks)}")
  if len(set(tasks)) != len(tasks):
    raise ConfigError(f"{label}: field 'tasks' = {list(tasks)} repeats a task")
  values["tasks"] = tuple(t for t in all_tasks if t in tasks)  # the config's task order
  for f in ("speed", "up_mbps", "down_mbps", "latency_ms", "price_device_hour",
            "price_egress_gb", "share"):
    values[f] = float(values[f])
  return Site(**values)


def sites_from_config(config: Any) -> list[Site]:
  """The `fed.sites` entries as `Site`s; ConfigError (one line naming the entry) otherwise."""
  raw = tuple(config.fed.sites)
  if not raw:
    raise ConfigError("config key 'fed.sites' is empty: a federated run needs at least one site")
  all_tasks = tuple(config.tasks)
  sites = [_entry(i, r, all_tasks) for i, r in enumerate(raw)]
  seen: dict[str, int] = {}
  for i, s in enumerate(sites):
    if s.name in seen:
      raise ConfigError(f"config key 'fed.sites' entry {i} ({s.name!r}): field 'name' repeats "
                        f"entry {seen[s.name]}")
    seen[s.name] = i
  for i, s in enumerate(sites):
    if s.devices != sites[0].devices:
      raise ConfigError(
          f"config key 'fed.sites' entry {i} ({s.name!r}): field 'devices' = {s.devices} differs "
          f"from entry 0's {sites[0].devices}; every site spans the same number of devices")
  for field in ("share", "examples"):
    given = [getattr(s, field) > 0 for s in sites]
    if any(given) and not all(given):
      i = given.index(False)
      raise ConfigError(f"config key 'fed.sites' entry {i} ({sites[i].name!r}): field "
                        f"{field!r} is unset while other sites set it; set it on every site "
                        f"or none")
  own = config.fed.get("partition", "iid") == "own"
  for i, s in enumerate(sites):
    if s.data_dir and not own:
      raise ConfigError(f"config key 'fed.sites' entry {i} ({s.name!r}): field 'data_dir' is "
                        f"read only with fed.partition = 'own' (got "
                        f"{config.fed.get('partition')!r})")
  if any(s.share > 0 for s in sites) and any(s.examples > 0 for s in sites):
    raise ConfigError("config key 'fed.sites': sites give both 'share' and 'examples'; use one")
  for t in all_tasks:
    if not any(t in s.tasks for s in sites):
      raise ConfigError(f"config key 'fed.sites': no site holds task {t!r} (field 'tasks')")
  return sites
