"""launch/flower.py: the commands --dry-run prints for certificates, SuperLink, SuperNode and the
run, and its one-line argument errors. Dry runs execute nothing (the commands only print)."""

import ipaddress
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
  assert ("subjectAltName=DNS:link.example.org,DNS:localhost,IP:127.0.0.1,IP:::1"
          in cmds[2])
  assert "-CA" in cmds[3] and cmds[3][cmds[3].index("-out") + 1] == f"{tmp_path}/c/server.pem"
  assert not (tmp_path / "c").exists()  # a dry run creates nothing
  ip = dry("certs", "--host", "10.1.2.3")
  assert "subjectAltName=IP:10.1.2.3,DNS:localhost,IP:127.0.0.1,IP:::1" in ip[2]
  local = dry("certs", "--host", "127.0.0.1")  # named once
  assert "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:::1" in local[2]


def test_superlink_and_supernode_commands():
  (link,) = dry("superlink", "--certs", "/etc/jmtl", "--port", "9443")
  assert link[link.index("--ssl-certfile") + 1] == "/etc/jmtl/server.pem"
  assert link[link.index("--port") + 1] == "9443"
  assert "--disable-runtime-dependency-installation" in link and "--insecure" not in link
  assert link[link.index("--host") + 1] == "0.0.0.0"  # every interface unless told
  (local,) = dry("superlink", "--host", "127.0.0.1")
  assert local[local.index("--host") + 1] == "127.0.0.1"
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


@pytest.mark.parametrize("host", ["link.example.org", "10.1.2.3"])
def test_real_certs_hold_the_host_and_localhost_and_verify_against_the_ca(tmp_path, host):
  """openssl really run (no dry run): the server certificate's SANs hold --host and the names
  the SuperLink's own SuperExec dials (localhost, 127.0.0.1, ::1; without them gRPC refuses it:
  "certificate is not valid for '127.0.0.1'"), and its signature verifies with the CA's key."""
  if shutil.which("openssl") is None:
    pytest.fail("openssl is not installed: `flower.py certs` needs it")
  from cryptography import x509  # (a dependency of flwr, the `flower` extra)
  from cryptography.hazmat.primitives.asymmetric import ec
  out = tmp_path / "c"
  r = subprocess.run([sys.executable, str(SCRIPT), "certs", "--host", host, "--out", str(out)],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
  server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
  san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
  dns = san.get_values_for_type(x509.DNSName)
  ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
  try:
    assert str(ipaddress.ip_address(host)) in ips
  except ValueError:
    assert host in dns
  assert "localhost" in dns and {"127.0.0.1", "::1"} <= ips
  assert server.issuer == ca.subject
  ca.public_key().verify(server.signature, server.tbs_certificate_bytes,
                         ec.ECDSA(server.signature_hash_algorithm))  # raises if not the CA's
  server.verify_directly_issued_by(ca)


def test_help_shows_the_defaults():
  for cmd, want in (("supernode", "(default: 9094)"), ("superlink", "(default: 9093)"),
                    ("certs", "(default: 365)"), ("run", "(default: 0)")):
    r = subprocess.run([sys.executable, str(SCRIPT), cmd, "--help"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and want in " ".join(r.stdout.split()), (cmd, r.stdout)
