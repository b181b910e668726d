"""cluster.yaml and cluster_local.yaml: Ray's own offline validation, plus what matters to us.

Ray validates a cluster file in `ray up` with `prepare_config` (fills defaults; for the `local`
provider, `prepare_local` turns head_ip/worker_ips into its single node type) and then
`validate_config` (the JSON schema and node-type checks). Both run here without a cloud
account. The real `ray up` of cluster_local.yaml is tests/test_ray_up.py.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
FILES = ["cluster.yaml", "cluster_local.yaml"]
# Top-level repository entries that the cluster's nodes do not need (everything else is synced).
NOT_ON_NODES = {".ci", ".gitignore", "tests", "benchmarks", "BENCHMARKS.md", "cluster.yaml",
                "cluster_local.yaml", "docs"}
PRIVATE_IP = "$(hostname -I | cut -d\" \" -f1)"  # the head's first (private) address


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / name).read_text())


def prepared(name: str) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(name)))
    validate_config(config)
    return config


def mlflow_commands(config: dict[str, Any]) -> list[str]:
    return [c for c in config["head_start_ray_commands"] if "mlflow server" in c]


@pytest.mark.parametrize("name", FILES)
def test_ray_validates_the_cluster_file(name):
    config = prepared(name)
    assert config["cluster_name"].startswith("debias-sweep")
    assert config["head_node_type"] in config["available_node_types"]


def test_local_file_is_launch_ready_offline():
    """The local provider needs no cloud: Ray's whole bootstrap of the file runs here."""
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.local.config import LOCAL_CLUSTER_NODE_TYPE

    raw = load("cluster_local.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and isinstance(raw["provider"]["worker_ips"], list)
    assert {"ssh_user", "ssh_private_key"} <= set(raw["auth"])
    # prepare_local refuses files that declare their own node types.
    assert "available_node_types" not in raw and "head_node_type" not in raw
    config = _bootstrap_config(copy.deepcopy(raw), no_config_cache=True)
    assert config["head_node_type"] == LOCAL_CLUSTER_NODE_TYPE
    node_type = config["available_node_types"][LOCAL_CLUSTER_NODE_TYPE]
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.parametrize("name", FILES)
def test_dashboard_is_bound_to_loopback(name):
    config = prepared(name)
    heads = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(heads) == 1
    assert "--head" in heads[0]
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", heads[0]), heads[0]
    # The autoscaler (AWS workers, local worker_ips) reads the file `ray up` writes there.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in heads[0]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "0.0.0.0" not in command and "[::]" not in command, command
    workers = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert len(workers) == 1 and "--address=$RAY_HEAD_IP:6379" in workers[0]


@pytest.mark.parametrize("name", FILES)
def test_mlflow_server_binds_private_ip_and_loopback_never_all_interfaces(name):
    config = prepared(name)
    (command,) = mlflow_commands(config)
    assert "0.0.0.0" not in command and "::" not in command, command
    # --host: the head's private address, where workers inside the network reach it.
    hosts = re.findall(r"--host[= ](\$\([^)]*\)|\S+)", command)
    assert hosts == [PRIVATE_IP], hosts
    # Extra gunicorn listeners: loopback only (the end of `ray attach -p 5000`).
    binds = re.findall(r"(?:--bind|-b)[= ]([^\s\"']+)", command)
    assert binds == ["127.0.0.1:5000"], binds
    assert "--port 5000" in command
    # Backed by PostgreSQL on the AWS head (several writers), sqlite on machines you own;
    # detached from the SSH session that starts it.
    assert BACKEND[name] in command
    assert command.startswith("nohup setsid ") and command.rstrip().endswith("&")
    assert "echo $$ > ~/mlflow.pid" in command
    # A re-run of `ray up` stops the previous server (its whole process group) first.
    stops = [c for c in config["head_start_ray_commands"] if "kill -- -$(cat ~/mlflow.pid)" in c]
    assert len(stops) == 1
    start_at = config["head_start_ray_commands"].index(command)
    assert config["head_start_ray_commands"].index(stops[0]) < start_at


BACKEND = {"cluster.yaml": "--backend-store-uri postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow",
           "cluster_local.yaml": "--backend-store-uri sqlite:///$HOME/mlflow.db"}


def test_the_aws_head_sets_up_postgresql_without_a_password_in_the_file():
    setup = " ".join(load("cluster.yaml")["head_setup_commands"])
    assert "apt-get install" in setup and "postgresql" in setup
    assert "CREATE ROLE mlflow" in setup and "createdb -O mlflow mlflow" in setup
    assert "~/.pgpass" in setup and "umask 077" in setup and "openssl rand" in setup
    assert "pip install -q psycopg2-binary" in setup


def test_both_files_start_the_same_way():
    aws, local = load("cluster.yaml"), load("cluster_local.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "file_mounts",
                "rsync_exclude"):
        same = [c.replace(BACKEND["cluster.yaml"], BACKEND["cluster_local.yaml"])
                if isinstance(c, str) else c for c in aws[key]] if key.endswith("commands") \
            else aws[key]
        assert same == local[key], key
    # Setup: identical except that the AWS head's autoscaler needs boto3.
    assert [c.replace(" boto3", "") for c in aws["setup_commands"]] == local["setup_commands"]


@pytest.mark.parametrize("name", FILES)
def test_setup_commands_install_this_project(name):
    config = load(name)
    installs = [c for c in config["setup_commands"] if "pip install" in c and "-e " in c]
    assert len(installs) == 1, config["setup_commands"]
    (install,) = installs
    assert "-e ~/debias-sweep" in install and install.startswith("~/venv/bin/pip ")
    # The venv is what later shells use (Ray runs them with `bash -i`, which reads ~/.bashrc).
    assert any("python3 -m venv ~/venv" in c for c in config["setup_commands"])
    assert any(">> ~/.bashrc" in c and "~/venv/bin/activate" in c
               for c in config["setup_commands"])
    # Ray is pinned (all nodes run one version) within the project's own requirement.
    pins = re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", install)
    assert len(pins) == 1, install
    ray_req = next(Requirement(r) for r in importlib.metadata.requires("debias-sweep") or []
                   if Requirement(r).name == "ray")
    assert ray_req.specifier.contains(pins[0]), (pins[0], str(ray_req.specifier))
    if config["provider"]["type"] == "aws":
        assert "boto3" in install


def test_gpu_workers_autoscale_from_zero():
    config = prepared("cluster.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) >= 1
    gpu = {name: t for name, t in types.items()
           if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no GPU worker node type"
    for name, node_type in gpu.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        assert node_type["node_config"]["InstanceType"].startswith(("g", "p")), name
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu.values())


def test_file_mounts_bring_everything_the_nodes_need(tmp_path):
    """~/debias-sweep gets the package, the CLI, the sweeps and what `pip install -e` reads."""
    config = load("cluster.yaml")
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        # Mirror the repository layout: ~/debias-sweep/X <- ./X, relative to the repo root.
        assert local.startswith("./") and remote == f"~/debias-sweep/{local[2:]}", remote
        assert (REPO / local).exists(), local
    mounted = {local[2:] for local in mounts.values()}
    assert {"pyproject.toml", "README.md", "launch.py", "debias", "sweeps"} <= mounted
    # Whatever is added at the top level later must be synced or listed in NOT_ON_NODES.
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    assert tracked.returncode == 0, f"git ls-files failed: {tracked.stderr}"
    top = {line.split("/")[0] for line in tracked.stdout.splitlines()}
    missing = top - mounted - NOT_ON_NODES
    assert not missing, f"top-level entries neither in file_mounts nor NOT_ON_NODES: {missing}"


def test_rsync_skips_bytecode(tmp_path):
    """Dry-run rsync with the exact filter arguments Ray builds from the file's settings."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    if shutil.which("rsync") is None:
        pytest.fail("rsync is missing: run .ci/system-deps.sh (installs openssh-server rsync)")
    config = load("cluster.yaml")
    options = {"rsync_exclude": config["rsync_exclude"], "rsync_filter": config.get("rsync_filter")}
    args = SSHCommandRunner._create_rsync_filter_args(None, options)
    for local in config["file_mounts"].values():
        source = local + "/" if (REPO / local).is_dir() else local  # as Ray does
        out = subprocess.run(["rsync", "-an", "--out-format=%n", *args, source, f"{tmp_path}/"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        synced = [line for line in out.splitlines() if line.strip()]
        assert synced, local
        assert not [f for f in synced if "__pycache__" in f or f.endswith(".pyc")], local
    # And on a tree that surely has bytecode, at any depth.
    src = tmp_path / "src"
    (src / "pkg" / "sub" / "__pycache__").mkdir(parents=True)
    for f in ("pkg/a.py", "pkg/sub/b.py", "pkg/sub/__pycache__/b.cpython-311.pyc", "pkg/c.pyc"):
        (src / f).write_text("")
    out = subprocess.run(["rsync", "-an", "--out-format=%n", *args, "pkg/", f"{tmp_path}/dst/"],
                         cwd=src, capture_output=True, text=True, check=True).stdout
    assert sorted(line for line in out.splitlines() if not line.endswith("/")) \
        == ["a.py", "sub/b.py"], out
