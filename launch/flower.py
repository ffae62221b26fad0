#!/usr/bin/env python3
"""Real federated sites on Flower: certificates, the SuperLink, one SuperNode per site, the run.

Standard library only; never imports jmtl. --dry-run prints the exact commands and runs nothing.

  flower.py certs --host H [--out DIR] [--days 365]
      a CA (ca.pem, ca.key: keep ca.key off the sites) and the SuperLink's server certificate
      for H and for localhost / 127.0.0.1 / ::1, which the SuperLink's own SuperExec dials
      (server.pem, server.key), with openssl (>= 3.0)
  flower.py superlink [--certs DIR] [--port 9093] [--database PATH] [--env KEY=VALUE ...]
      the SuperLink (Fleet, Control and runtime APIs on one HTTPS port), on the server machine
  flower.py supernode --superlink H:PORT --site NAME [--ca PATH] [--port 9094]
                      [--cache DIR] [--data-dir DIR] [--env KEY=VALUE ...]
      one site's SuperNode (it dials out to the SuperLink: the site needs no inbound port);
      --data-dir: the site's own data root, node config data-dir (fed.partition = "own")
  flower.py run --config C --workdir W [--connection NAME] [--wait-s S] [-- more jmtl args]
      jmtl federated with fed.backend = flower: submits the run to the SuperLink connection
      NAME of the Flower configuration file ($FLWR_HOME/config.toml, default ~/.flwr)

Each site runs every round in a fresh ClientApp process, so `supernode` points JAX's persistent
compilation cache (--cache) at a directory: only a site's first round compiles.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def parser() -> C.Parser:
  fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}  # --help shows defaults
  p = C.Parser(prog="flower.py", description=__doc__.split("\n\n")[0], **fmt)
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("certs", help="CA + SuperLink server certificate (openssl)", **fmt)
  c.add_argument("--host", required=True, help="the SuperLink's DNS name or IP address")
  c.add_argument("--out", default="certs", help="directory for ca.pem, ca.key, server.pem, "
                 "server.key")
  c.add_argument("--days", type=C.positive, default=365, help="validity of both certificates")
  s = sub.add_parser("superlink", help="start the SuperLink (TLS)", **fmt)
  s.add_argument("--certs", default="certs", help="directory of ca.pem, server.pem, server.key")
  s.add_argument("--port", type=C.positive, default=9093,
                 help="the one HTTPS port of the Fleet, Control and runtime APIs")
  s.add_argument("--host", default="0.0.0.0",
                 help="the address it listens on: 0.0.0.0 = every interface (the sites reach "
                 "it); 127.0.0.1 for a trial on one machine")
  s.add_argument("--database", default="superlink.db", help="the SuperLink's state (SQLite)")
  s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="more environment, e.g. JMTL_DATA_DIR=/data (repeatable)")
  n = sub.add_parser("supernode", help="start one site's SuperNode", **fmt)
  n.add_argument("--superlink", required=True, help="H:PORT of the SuperLink")
  n.add_argument("--site", required=True, help="the site's name in fed.sites")
  n.add_argument("--ca", default="certs/ca.pem", help="the CA certificate (ca.pem)")
  n.add_argument("--port", type=C.positive, default=9094,
                 help="the SuperNode's local runtime API port (localhost only; several "
                 "SuperNodes on one host need one port each)")
  n.add_argument("--data-dir", default="",
                 help="the site's own data root (node config data-dir; read with "
                      "fed.partition = 'own'; '' = the process's JMTL_DATA_DIR)")
  n.add_argument("--cache", default="jax-cache", help="JAX persistent compilation cache dir")
  n.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="more environment, e.g. JMTL_DATA_DIR=/data (repeatable)")
  r = sub.add_parser("run", help="jmtl federated --config.fed.backend=flower", **fmt)
  r.add_argument("--config", required=True, help="the jmtl config (same path on every site)")
  r.add_argument("--workdir", required=True, help="written by the server (SuperLink machine)")
  r.add_argument("--connection", default="", help="SuperLink connection name ('' = default)")
  r.add_argument("--wait-s", type=C.nonneg, default=0,
                 help="seconds to follow the run's rounds.jsonl (fed.flower.wait_s; the "
                 "workdir must be visible here); 0 = return once submitted, then follow it "
                 "with `flwr log RUN_ID` or the workdir's rounds.jsonl")
  r.add_argument("--jmtl", default="jmtl", help="the jmtl executable (a name is looked up on PATH)")
  for q in (c, s, n, r):
    q.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  return p


# Names the server certificate holds besides --host: the SuperLink's own SuperExec (the process
# that starts each run's ServerApp) dials the SuperLink at 127.0.0.1:<port>, and gRPC checks the
# certificate against that name (RFC 6125; without it: "certificate is not valid for
# '127.0.0.1'", and no ServerApp can run).
LOCAL_NAMES = ("DNS:localhost", "IP:127.0.0.1", "IP:::1")


def _san(host: str) -> str:
  """The server certificate's subjectAltName: --host (IP: for an address, else DNS:), then
  LOCAL_NAMES, each once."""
  try:
    own = f"IP:{ipaddress.ip_address(host)}"
  except ValueError:
    own = f"DNS:{host}"
  names = [own] + [n for n in LOCAL_NAMES if n != own]
  return "subjectAltName=" + ",".join(names)


def plan(a, extra: list[str]) -> list:
  if a.cmd != "run" and extra:
    raise C.LaunchError(f"{a.cmd} takes no arguments after --")
  if a.cmd == "certs":
    d = a.out
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    return [["mkdir", "-p", d],
            ["openssl", "req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem",
             "-days", str(a.days), "-subj", "/CN=jmtl federated CA"],
            ["openssl", "req", *ec, "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr",
             "-subj", f"/CN={a.host}", "-addext", _san(a.host)],
            ["openssl", "x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem",
             "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-out", f"{d}/server.pem",
             "-days", str(a.days), "-copy_extensions", "copy"]]
  if a.cmd == "superlink":
    d = a.certs
    return [["env", *C.parse_env(a.env), "flower-superlink", "--ssl-ca-certfile", f"{d}/ca.pem",
             "--ssl-certfile", f"{d}/server.pem", "--ssl-keyfile", f"{d}/server.key",
             "--host", a.host, "--port", str(a.port), "--database", a.database,
             "--disable-runtime-dependency-installation"]]
  if a.cmd == "supernode":
    if ":" not in a.superlink:
      raise C.LaunchError(f"--superlink {a.superlink!r} must be HOST:PORT")
    if not a.site or "/" in a.site or '"' in a.site:
      raise C.LaunchError(f"--site {a.site!r} must be a site name from fed.sites")
    if '"' in a.data_dir:
      raise C.LaunchError(f"--data-dir {a.data_dir!r} must not contain '\"'")
    node = f'site="{a.site}"' + (f' data-dir="{a.data_dir}"' if a.data_dir else "")
    env = [f"JAX_COMPILATION_CACHE_DIR={a.cache}", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0",
           *C.parse_env(a.env)]
    return [["env", *env, "flower-supernode", "--root-certificates", a.ca,
             "--superlink", a.superlink, "--node-config", node,
             "--host", "127.0.0.1", "--port", str(a.port)]]
  keys = ["--config.fed.backend=flower", f"--config.fed.flower.wait_s={a.wait_s}"]
  if a.connection:
    keys.append(f"--config.fed.flower.superlink={a.connection}")
  return [[a.jmtl, "federated", "--config", a.config, "--workdir", a.workdir, *keys, *extra]]


def main(argv: list[str]) -> int:
  own, extra = C.split_extra(argv)
  a = parser().parse_args(own)
  return C.run_plan(plan(a, extra), a.dry_run)


if __name__ == "__main__":
  sys.exit(C.main_wrapper(main))
