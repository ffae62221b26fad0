"""A Flower deployment on localhost for tests: a SuperLink and SuperNodes as subprocesses on free
ports, TLS with a CA and server certificate generated here (`cryptography`), a Flower app
directory whose components are jmtl.federated.flower's apps, and `flwr run` against it. Every
process gets its own session so `stop` ends it and its children (the ServerApp / ClientApp
subprocesses)."""

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from jmtl.federated import flower

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def make_certificates(out: Path) -> dict[str, Path]:
  """A self-signed CA and a server certificate for 127.0.0.1 / localhost signed by it (PEM)."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
  now = datetime.datetime.now(datetime.timezone.utc)
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jmtl test CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  cert = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
          .issuer_name(ca_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName(
              [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
              critical=False)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .sign(ca_key, hashes.SHA256()))
  out.mkdir(parents=True, exist_ok=True)
  paths = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server.key"}
  paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
  return paths


APP_TOML = flower.app_pyproject("jmtlflowertest", {
    "problem": "flower_problem:make", "workdir": "", "rounds": 3, "local-steps": 2,
    "algo": "fedavg", "sites": "a,b", "round-timeout": 60.0, "wait-sites": 60.0, "config": "",
    "overrides": "", "compress": "", "secure-aggregation": False, "secagg-max-weight": 1000.0,
    "secagg-clipping-range": flower.SECAGG_CLIPPING_RANGE,
    "secagg-quantization-range": flower.SECAGG_QUANTIZATION_RANGE,
    "max-empty-rounds": flower.MAX_EMPTY_ROUNDS})


class Cluster:
  """SuperLink + one SuperNode per site on localhost, TLS; `run(**run_config)` submits a run.
  `extra` {name: site}: more SuperNodes (process `supernode_<name>`) with that node config site
  (a second claimant of a site)."""

  def __init__(self, tmp: Path, sites: list[str], extra: dict[str, str] | None = None):
    self.tmp, self.sites, self.extra = tmp, sites, dict(extra or {})
    self.procs: dict[str, subprocess.Popen] = {}
    self.certs = make_certificates(tmp / "certs")
    self.port = free_port()
    self.home = tmp / "flwr_home"
    self.home.mkdir(parents=True, exist_ok=True)
    (self.home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
        f'root-certificates = "{self.certs["ca"]}"\n')
    self.app = tmp / "app"
    self.app.mkdir(parents=True, exist_ok=True)
    (self.app / "pyproject.toml").write_text(APP_TOML)
    (self.app / "README.md").write_text("jmtl Flower test app\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["FLWR_HOME"] = str(self.home)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    # Each message runs in a fresh ClientApp process: a persistent compilation cache spares
    # every round after the first its compile.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # The SuperExecs (one beside the SuperLink, one per SuperNode) look for a ServerApp /
    # ClientApp to launch every second by default: every round waits for that poll.
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.2"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    self.env = env

  def _start(self, name: str, args: list[str], env: dict | None = None):
    log = open(self.tmp / f"{name}.log", "wb")
    self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        env=env or self.env, cwd=self.tmp,
                                        start_new_session=True)

  def start(self):
    self._start("superlink", [
        str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs["ca"]),
        "--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
        "--host", "127.0.0.1", "--port", str(self.port),
        "--disable-runtime-dependency-installation"])
    for name, site in [(s, s) for s in self.sites] + list(self.extra.items()):
      env = dict(self.env, FLWR_HOME=str(self.tmp / f"home_{name}"))
      self._start(f"supernode_{name}", [
          str(BIN / "flower-supernode"), "--root-certificates", str(self.certs["ca"]),
          "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
          "--port", str(free_port()), "--node-config", f'site="{site}"'], env)
    return self

  def run(self, workdir: Path, *, secagg: bool = False, **config) -> subprocess.CompletedProcess:
    """`flwr run` of the app with run config `config` and `workdir`; `secagg`: the run config
    key `secure-aggregation` on (what `jmtl federated` sets from fed.secure_aggregation)."""
    items = {"workdir": str(workdir), **({"secure-aggregation": True} if secagg else {}),
             **config}
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())
    app = self.app
    return subprocess.run([str(BIN / "flwr"), "run", str(app), "local", "--run-config", text,
                           "--format", "json"], env=self.env, cwd=self.tmp, capture_output=True,
                          text=True, timeout=120)

  def kill(self, name: str):
    """SIGKILL a process and its children (its session), as a crashed machine would."""
    p = self.procs[name]
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    p.wait(timeout=10)

  def stop(self):
    for p in self.procs.values():
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except ProcessLookupError:
        continue
    deadline = time.time() + 10
    for p in self.procs.values():
      try:
        p.wait(timeout=max(deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

  def logs(self) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                     for f in sorted(self.tmp.glob("*.log")))


def _descendants(root: int) -> list[tuple[int, str]]:
  """(pid, command line) of every process under `root` (from /proc: Linux)."""
  children: dict[int, list[int]] = {}
  for d in Path("/proc").iterdir():
    if not d.name.isdigit():
      continue
    try:
      stat = (d / "stat").read_text()
      ppid = int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    children.setdefault(ppid, []).append(int(d.name))
  out, todo = [], list(children.get(root, []))
  while todo:
    pid = todo.pop()
    try:
      cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
      continue
    out.append((pid, cmd))
    todo += children.get(pid, [])
  return out


def kill_serverapp(cluster: Cluster) -> int:
  """SIGKILL the ServerApp process the SuperLink started (`flwr-serverapp`), as a crashed
  server machine would; returns its pid. AssertionError when there is none."""
  pids = [pid for pid, cmd in _descendants(cluster.procs["superlink"].pid)
          if "flwr-serverapp" in cmd]
  assert pids, f"no flwr-serverapp process under the SuperLink\n{cluster.logs()}"
  for pid in pids:
    os.kill(pid, signal.SIGKILL)
  return pids[0]
