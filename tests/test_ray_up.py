"""A real `ray up` / `ray down` of cluster_local.yaml against this machine, with a sweep between.

How "this machine" becomes a remote head node:
- The test starts its own sshd on a free loopback port (generated host and client keys, a temp
  authorized_keys), never the system's. Ray's cluster launcher has no SSH port setting, so
  the cluster file reaches that port through `auth.ssh_proxy_command`: a tiny TCP relay
  (`ProxyCommand`), which Ray also passes to the rsync of `file_mounts`.
- sshd runs as PID 1 of its own PID namespace (`unshare --pid --mount-proc`). `ray stop`,
  which head_start_ray_commands and `ray down` run on the head, kills every Ray process it can
  see on the machine; inside the namespace it sees only this cluster, so other Ray instances
  (other tests, other users) survive. Killing the namespace's PID 1 kills everything left in
  it, which is the last line of cleanup.
- sshd sets HOME to a temp dir for the sessions it serves, so `~/debias-sweep`,
  `~/ray_bootstrap_config.yaml` and `~/.bashrc` on the "head" never touch the real home.
- Everything lives under one short temp dir in /tmp: Ray's Unix socket paths (under its temp
  dir) must stay below ~107 characters.

Needs root (sshd's privilege separation, `unshare --pid`) and openssh-server + rsync:
.ci/system-deps.sh installs them; CI runs it first.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, with ray and activate
DEPS_HINT = "run .ci/system-deps.sh (installs openssh-server and rsync) first"

# A ProxyCommand: connect to HOST PORT and copy stdin -> socket and socket -> stdout.
RELAY = '''\
import os, socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := sock.recv(65536):
    os.write(1, data)
'''


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (all held open until all are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))  # all interfaces: Ray's GCS, for one, listens on 0.0.0.0
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def need(tool: str, path: str | None = None) -> str:
    found = shutil.which(tool) or (path if path and os.access(path, os.X_OK) else None)
    if not found:
        pytest.fail(f"`{tool}` is missing: {DEPS_HINT}")
    return found


@dataclass
class Proc:
    pid: int
    ppid: int
    name: str
    cmd: str  # the command line, space-joined (the name for kernel threads)


def processes() -> list[Proc]:
    """Every live process, from /proc (Linux; psutil is not a dependency of this project)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state == "Z":
            continue  # dead, only not reaped yet
        cmd = " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a) or name
        found.append(Proc(int(entry), int(ppid), name, cmd))
    return found


def descendants(pid: int) -> list[Proc]:
    procs = processes()
    family, result = {pid}, []
    for _ in range(len(procs)):
        new = [p for p in procs if p.ppid in family and p.pid not in family]
        if not new:
            break
        family.update(p.pid for p in new)
        result += new
    return result


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket LISTENing on `port` (IPv4 and IPv6), from /proc/net."""
    found = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state != "0A" or int(hex_port, 16) != port:
                    continue
                raw = bytes.fromhex(address)
                # /proc/net stores addresses as 32-bit words in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if table == "tcp" else
                                           socket.AF_INET6, raw))
    return found


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def tail(text: str | bytes | None, n: int = 12000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


@dataclass
class Head:
    """The sshd that plays the head node: how to reach it and what runs in it."""

    proc: subprocess.Popen
    port: int
    user: str
    key: Path
    home: Path
    namespace: str
    log: Path

    def ssh_proxy_command(self, relay: Path) -> str:
        return f"{sys.executable} {relay} %h {self.port}"


@contextlib.contextmanager
def loopback_head(work: Path) -> Iterator[Head]:
    """sshd on 127.0.0.1:<free port>, PID 1 of a new PID namespace; killed (with all in it)."""
    sshd = need("sshd", "/usr/sbin/sshd")
    keygen = need("ssh-keygen")
    need("ssh")
    need("rsync")
    unshare, setpriv = need("unshare"), shutil.which("setpriv")
    if os.geteuid() != 0:
        pytest.fail("test_ray_up needs root: sshd's privilege separation and `unshare --pid` "
                    "(the PID namespace that keeps `ray stop` away from other Ray instances)")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir

    for name in ("host_key", "id_test"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "ray-up-test",
                        "-f", str(work / name)], check=True)
    shutil.copy(work / "id_test.pub", work / "authorized_keys")
    home, head_tmp = work / "home", work / "h"
    home.mkdir()
    head_tmp.mkdir()
    port = free_port()
    user = getpass.getuser()
    (work / "sshd_config").write_text("\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {work / 'host_key'}",
        f"PidFile {work / 'sshd.pid'}",
        f"AuthorizedKeysFile {work / 'authorized_keys'}",
        f"AllowUsers {user}",
        "PermitRootLogin prohibit-password",  # root, key only
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # PAM session modules (pam_loginuid) fail in containers. Without PAM, sshd refuses
        # accounts whose password field starts with "!" (locked), even for key logins.
        "UsePAM no",
        "StrictModes no",  # the keys live under /tmp, which is world-writable
        # The sessions' environment: a private HOME, and Ray's temp files (the head's
        # autoscaler keeps cluster state there) inside the test's dir.
        # Ray >= 2.5x turns token auth on when ~/.ray/auth_token exists (any earlier local
        # ray.init writes one): the head (private HOME) and the driver (the user's HOME) must
        # agree, so both run with it explicitly off.
        f"SetEnv HOME={home} RAY_TMPDIR={head_tmp} RAY_USAGE_STATS_ENABLED=0 "
        "RAY_AUTH_MODE=disabled",
        "LogLevel VERBOSE",
        "",
    ]))
    log = work / "sshd.log"
    # setpriv --pdeathsig: if pytest dies, unshare gets SIGKILL; --kill-child passes it on to
    # sshd, and the namespace's PID 1 dying takes every process in it along.
    cmd = [unshare, "--pid", "--fork", "--kill-child", "--mount-proc",
           sshd, "-D", "-e", "-f", str(work / "sshd_config")]
    if setpriv:
        cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd did not start (exit {proc.returncode}); a container without "
                            f"CAP_SYS_ADMIN cannot `unshare --pid`:\n{tail(log.read_text())}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"sshd is not listening on port {port}:\n{tail(log.read_text())}")
            time.sleep(0.1)
        sshd_pids = [p.pid for p in descendants(proc.pid) if p.name == "sshd"]
        namespace = pid_namespace(sshd_pids[0]) if sshd_pids else None
        assert namespace and namespace != pid_namespace(os.getpid()), \
            "sshd is not in its own PID namespace; `ray stop` would kill every Ray here"
        yield Head(proc, port, user, work / "id_test", home, namespace, log)
    finally:
        proc.kill()  # SIGKILL: unshare ignores SIGTERM while it waits for its child
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


RAY_NAMES = {"raylet", "gcs_server"}
RAY_MARKERS = ("/ray/", "ray::", "raylet", "gcs_server", "ray_bootstrap_config")
SSH_NAMES = {"ssh", "sshd", "sshd-session"}


def cluster_ray_processes(head: Head, work: Path, gcs_port: int) -> list[str]:
    """Ray processes of this cluster: in the head's namespace, or naming its dir or port."""
    port_re = re.compile(rf"[:=]{gcs_port}\b")
    found = []
    for proc in processes():
        if proc.pid == os.getpid():
            continue
        if proc.name in SSH_NAMES or proc.cmd.startswith("sshd"):
            continue  # the transport (sshd sessions, ssh ControlMaster), not Ray
        if proc.name not in RAY_NAMES and not any(m in proc.cmd for m in RAY_MARKERS):
            continue
        if (pid_namespace(proc.pid) == head.namespace or str(work) in proc.cmd
                or port_re.search(proc.cmd)):
            found.append(f"{proc.pid} {proc.cmd[:300]}")
    return found


def kill_pids(lines: list[str]) -> None:
    for line in lines:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{tail(exc.stdout)}"
                    f"\n{tail(exc.stderr)}")


def unique_cluster_name(ports: dict[str, int]) -> str:
    return f"debias-sweep-test-{ports['gcs']}"  # unique: the GCS port was free


def cluster_file(head: Head, work: Path, relay: Path, ports: dict[str, int]) -> Path:
    """cluster_local.yaml pointed at the loopback head, with the existing venv and free ports."""
    config: dict[str, Any] = yaml.safe_load((REPO / "cluster_local.yaml").read_text())
    config["cluster_name"] = unique_cluster_name(ports)
    config["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    config["auth"] = {"ssh_user": head.user, "ssh_private_key": str(head.key),
                      "ssh_proxy_command": head.ssh_proxy_command(relay)}
    # Use the venv that runs this test instead of creating one and reinstalling the project;
    # like the real file, put it on PATH through ~/.bashrc (Ray's shells are `bash -i`).
    activate = f"source {VENV_BIN / 'activate'}"
    config["setup_commands"] = [
        f"grep -qxF '{activate}' ~/.bashrc || echo '{activate}' >> ~/.bashrc",
    ]
    # No MLflow server here (the sweep logs to a sqlite file; test_head_mlflow_server checks
    # the server command) and free ports instead of Ray's defaults, which another Ray on this
    # machine may hold: 6379; the dashboard's 8265 (Ray 2.60 starts dashboard.py even with
    # --include-dashboard=false, with --port-retries=0); the dashboard agent's 52365; the Ray
    # Client server's 10001 (it only starts, and the flag is only accepted, with ray[client]).
    from ray._private.utils import get_ray_client_dependency_error

    client = ("" if get_ray_client_dependency_error() is not None
              else f"--ray-client-server-port={ports['client']} ")
    config["head_start_ray_commands"] = [
        "ray stop",
        f"ray start --head --port={ports['gcs']} --num-cpus=2 --dashboard-host=127.0.0.1 "
        f"--include-dashboard=false --dashboard-port={ports['dashboard']} {client}"
        f"--dashboard-agent-listen-port={ports['agent']} --temp-dir={work / 'h' / 'ray'} "
        f"--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats",
    ]
    path = work / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ssh_control_dir(cluster_name: str) -> Path:
    """Where Ray keeps this cluster's SSH ControlMaster sockets (it never removes the dir)."""
    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:HASH_MAX_LENGTH]

    return Path(f"/tmp/ray_ssh_{digest(getpass.getuser())}/{digest(cluster_name)}")


def check_mlflow(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None, "no MLflow experiment 'quickstart'"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # The quickstart is a study, run here with ERM alone: its parent plus the study's run.
    names = sorted(p.info.run_name for p in parents)
    assert names == ["erm/Odd", "study"], names
    (parent,) = [p for p in parents if p.info.run_name == "erm/Odd"]
    assert parent.info.status == "FINISHED", parent.info.status
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert children, "no child runs under 'erm/Odd'"
    assert {r.info.status for r in children} == {"FINISHED"}, [r.info.status for r in children]
    assert {r.data.tags.get("phase") for r in children} == {"search", "seeds"}
    assert all("val/worst_group_acc" in r.data.metrics for r in children)


def test_ray_up_runs_a_sweep_and_ray_down_stops_every_ray_process():
    work = Path(tempfile.mkdtemp(prefix="dbs-", dir="/tmp"))
    relay = work / "relay.py"
    relay.write_text(RELAY)
    names = ("gcs", "dashboard", "client", "agent")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    env = dict(os.environ, RAY_TMPDIR=str(work), TMPDIR=str(work), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    ray = str(VENV_BIN / "ray")
    timings: dict[str, float] = {}
    try:
        with loopback_head(work) as head:
            path = cluster_file(head, work, relay, ports)
            down_done = False
            try:
                t0 = time.monotonic()
                up = run([ray, "up", "-y", str(path), "--no-config-cache", "--log-color",
                          "false"], env, timeout=300)
                timings["ray up"] = time.monotonic() - t0
                assert up.returncode == 0, (
                    f"ray up failed ({up.returncode}):\n{tail(up.stdout)}\n{tail(up.stderr)}"
                    f"\nsshd log:\n{tail(head.log.read_text(), 1500)}")

                # file_mounts: the code arrived, without the venv, git history or results.
                synced = head.home / "debias-sweep"
                assert (synced / "launch.py").is_file() and (synced / "debias/data").is_dir()
                assert not (synced / ".venv").exists() and not (synced / ".git").exists()
                assert (head.home / "ray_bootstrap_config.yaml").is_file()
                # The leak check below only means something if it sees the running cluster.
                running = cluster_ray_processes(head, work, ports["gcs"])
                assert "raylet" in str(running) and "gcs_server" in str(running), running

                t0 = time.monotonic()
                sweep = run([sys.executable, "launch.py", "sweeps/quickstart.yaml",
                             "--address", f"127.0.0.1:{ports['gcs']}",
                             "--set", "dataset.image_size=16", "--set", "train.epochs=1",
                             "--set", "methods=[erm]", "--set", "search.space=null",
                             "--set", "search.num_samples=1", "--set", "seeds=[0]",
                             "--set", "targets=[Odd]", "--set", f"storage={work / 'results'}",
                             "--set", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"],
                            env, timeout=600)
                timings["sweep"] = time.monotonic() - t0
                assert sweep.returncode == 0, (
                    f"sweep failed ({sweep.returncode}):\n{tail(sweep.stdout)}"
                    f"\n{tail(sweep.stderr)}")
                check_mlflow(f"sqlite:///{work / 'mlflow.db'}")
                # The trials ran on the cluster's workers, not on a Ray the driver started.
                logs = list((work / "h" / "ray").glob("session_*/logs/worker-*.out"))
                assert logs, "no worker logs in the cluster's session dir"

                t0 = time.monotonic()
                down = run([ray, "down", "-y", str(path), "--log-color", "false"], env,
                           timeout=180)
                down_done = True
                timings["ray down"] = time.monotonic() - t0
                assert down.returncode == 0, f"ray down failed:\n{tail(down.stdout)}"
                # `ray down` reports success even when `ray stop` failed on the head: check.
                deadline = time.monotonic() + 15
                while (left := cluster_ray_processes(head, work, ports["gcs"])) \
                        and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert not left, "Ray processes left after `ray down`:\n" + "\n".join(left)
            finally:
                if not down_done:
                    with contextlib.suppress(Exception):
                        subprocess.run([ray, "down", "-y", str(path)], cwd=REPO, env=env,
                                       stdin=subprocess.DEVNULL, capture_output=True,
                                       timeout=120)
                kill_pids(cluster_ray_processes(head, work, ports["gcs"]))
    finally:
        # Anything else this test started names its dir (the relay, ssh ControlMasters).
        for proc in processes():
            if proc.pid != os.getpid() and str(work) in proc.cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
        # The cluster name is unique to this run (it contains a port that was free), so the
        # directory is this test's own; its parent is shared with real clusters: left alone.
        shutil.rmtree(ssh_control_dir(unique_cluster_name(ports)), ignore_errors=True)
        print("timings:", {k: round(v, 1) for k, v in timings.items()})


def test_head_mlflow_server_listens_on_private_ip_and_loopback_only():
    """Run the head's MLflow commands from cluster_local.yaml as `ray up` would, twice."""
    config = yaml.safe_load((REPO / "cluster_local.yaml").read_text())
    commands = [c for c in config["head_start_ray_commands"] if "mlflow" in c]
    assert len(commands) == 2, commands  # stop the previous server, start a new one
    private_ip = (subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout
                  .split() or [""])[0]
    if not private_ip or private_ip.startswith("127."):
        pytest.fail(f"`hostname -I` gives no non-loopback address ({private_ip!r}); the head's "
                    "MLflow command binds to the first one")
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="dbs-mlflow-", dir="/tmp"))
    home = work / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    script = "\n".join(c.replace("5000", str(port)) for c in commands)
    pid_file = home / "mlflow.pid"
    hosts = {private_ip, "127.0.0.1"}

    def start_and_wait() -> int:
        """Run the commands; wait until /health answers on both addresses; the group id."""
        old = pid_file.read_text() if pid_file.exists() else None
        subprocess.run(["bash", "-c", script], cwd=home, env=env, check=True, timeout=30)
        deadline, healthy = time.monotonic() + 120, set()
        while healthy != hosts:
            for host in hosts - healthy:
                with contextlib.suppress(OSError):
                    url = f"http://{host}:{port}/health"
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            healthy.add(host)
            if time.monotonic() > deadline:
                log = (home / "mlflow.log").read_text() if (home / "mlflow.log").exists() else ""
                pytest.fail(f"MLflow healthy on {sorted(healthy)} only, of {sorted(hosts)}:\n"
                            f"{tail(log)}")
            time.sleep(0.5)
        pid = pid_file.read_text().strip()
        assert pid and pid != old, "the pid file was not rewritten"
        return int(pid)

    try:
        first = start_and_wait()
        # Nothing else listens on the fresh port: all listeners there are this server's.
        assert listening_addresses(port) == hosts, listening_addresses(port)
        assert (home / "mlflow.db").is_file()
        # A second `ray up` restarts it: the old process group (gunicorn workers included,
        # which would otherwise keep the port) is gone, and a new server answers.
        second = start_and_wait()
        assert second != first
        assert not [p for p in processes() if _pgid(p.pid) == first]
        assert listening_addresses(port) == hosts
    finally:
        # The server's process group (gunicorn's command line does not name the test's dir),
        # and anything else that names the dir, e.g. a server whose pid file was never written.
        def ours() -> list[Proc]:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            group = int(text) if text.isdigit() else None
            return [p for p in processes() if p.pid != os.getpid()
                    and ((group is not None and _pgid(p.pid) == group) or str(work) in p.cmd)]

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in ours():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
            deadline = time.monotonic() + 10
            while ours() and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(work, ignore_errors=True)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
