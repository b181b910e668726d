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
# Idempotent: installs only what is missing, so re-running it is cheap and needs no network.
# Needs root (or sudo) and apt-get (Debian/Ubuntu images). Usage: .ci/system-deps.sh
set -euo pipefail

missing=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if [ "${#missing[@]}" -eq 0 ]; then
  echo "system-deps: openssh-server, rsync, chromium, chromium-driver already installed"
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
# The package's postinst may start a system sshd on port 22 (where an init system exists);
# the tests start their own sshd on a free loopback port and do not need it.
