#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv:
#   openssh-server (sshd) and rsync: tests/test_ray_up.py does a real `ray up` with the
#   `local` provider against 127.0.0.1: it starts its own sshd (never the system's), and Ray
#   SSHes into it and rsyncs file_mounts. openssh-server brings the client (ssh, ssh-keygen).
#   The test also uses `unshare` and `setpriv` (util-linux, in every Debian/Ubuntu base image)
#   and must run as root.
#   chromium and chromium-driver (chromedriver): tests/test_browser.py drives a real headless
#   Chromium (via selenium) through the MLflow UI (`launch.py --ui`) and the SLIM annotation
#   page (`launch.py --annotate`); it never downloads a browser.
#   postgresql: tests/test_concurrency.py runs sweeps at once against an `mlflow server` backed
#   by a real PostgreSQL, as cluster.yaml's head does; the test starts its own server (initdb
#   in a temp dir, a free port, as the `postgres` user when run as root), never the system's.
# Idempotent: installs only what is missing, so re-running it is cheap and needs no network.
# Needs root (or sudo) and apt-get (Debian/Ubuntu images). Usage: .ci/system-deps.sh
set -euo pipefail

missing=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)

if [ "${#missing[@]}" -eq 0 ]; then
  echo "system-deps: openssh-server, rsync, chromium, chromium-driver, postgresql already installed"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "system-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: no apt-get; install ${missing[*]} with your package manager" >&2
  exit 1
fi

echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends "${missing[@]}"
# The packages' postinst may start a system sshd on port 22 and a PostgreSQL on 5432 (where an
# init system exists); the tests start their own on free loopback ports and do not need them.
