"""launch/flower.py: the commands --dry-run prints for certificates, SuperLink, SuperNode and the
run, and its one-line argument errors. Dry runs execute nothing (the commands only print)."""

import shlex
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "flower.py"


def dry(*args):
  own = list(args)
  own.insert(own.index("--") if "--" in own else len(own), "--dry-run")
  r = subprocess.run([sys.executable, str(SCRIPT), *own], capture_output=True, text=True,
                     timeout=30)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


def test_certs_make_a_ca_and_a_server_certificate_for_the_host(tmp_path):
  cmds = dry("certs", "--host", "link.example.org", "--out", str(tmp_path / "c"))
  assert cmds[0] == ["mkdir", "-p", str(tmp_path / "c")]
  assert cmds[1][:3] == ["openssl", "req", "-x509"] and f"{tmp_path}/c/ca.pem" in cmds[1]
  assert "subjectAltName=DNS:link.example.org" in cmds[2]
  assert "-CA" in cmds[3] and cmds[3][cmds[3].index("-out") + 1] == f"{tmp_path}/c/server.pem"
  assert not (tmp_path / "c").exists()  # a dry run creates nothing
  ip = dry("certs", "--host", "10.1.2.3")
  assert "subjectAltName=IP:10.1.2.3" in ip[2]


def test_superlink_and_supernode_commands():
  (link,) = dry("superlink", "--certs", "/etc/jmtl", "--port", "9443")
  assert link[link.index("--ssl-certfile") + 1] == "/etc/jmtl/server.pem"
  assert link[link.index("--port") + 1] == "9443"
  assert "--disable-runtime-dependency-installation" in link and "--insecure" not in link
  (node,) = dry("supernode", "--superlink", "link.example.org:9443", "--site", "aws-eu",
                "--ca", "/etc/jmtl/ca.pem", "--env", "JMTL_DATA_DIR=/data")
  assert node[node.index("--superlink") + 1] == "link.example.org:9443"
  assert node[node.index("--root-certificates") + 1] == "/etc/jmtl/ca.pem"
  assert node[node.index("--node-config") + 1] == 'site="aws-eu"'
  assert "JMTL_DATA_DIR=/data" in node and "JAX_COMPILATION_CACHE_DIR=jax-cache" in node


def test_run_is_jmtl_federated_with_the_flower_backend():
  (cmd,) = dry("run", "--config", "c.py", "--workdir", "/runs/x", "--connection", "prod",
               "--", "--config.fed.rounds=5")
  assert cmd[:6] == ["jmtl", "federated", "--config", "c.py", "--workdir", "/runs/x"]
  assert "--config.fed.backend=flower" in cmd and "--config.fed.flower.superlink=prod" in cmd
  assert cmd[-1] == "--config.fed.rounds=5"


def test_bad_arguments_are_one_line():
  for args in (["supernode", "--superlink", "nohost", "--site", "a", "--dry-run"],
               ["superlink", "--dry-run", "--", "x"],
               ["run", "--config", "c.py", "--workdir", "w", "--", "--dry-run"]):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert r.stdout == ""
