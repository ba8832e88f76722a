#!/usr/bin/env bash
# Install everything afsd needs on Debian bookworm, as root: the apt packages and a Python venv
# (.venv) with afsd installed in editable mode. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc libffi-dev   # venv + building the cffi shims
  libssl-dev                                        # the fanotify shim's SHA-256 (libcrypto)
  erofs-utils                                       # mkfs.erofs / fsck.erofs / dump.erofs
  docker-registry skopeo umoci                      # a real registry, an independent client and unpacker
  runc debootstrap busybox-static                   # containers and realistic test images
  containerd                                        # CRI + shims: the afsd snapshotter's tests (docs/containerd.md)
  apache2-utils zstd iproute2 util-linux kmod ca-certificates
  nftables                                          # afslet --network bridge: NAT and the host-closing rules
  dnsmasq-base                                      # a real DNS server for the proxy's tests
  # the lab kernel with cachefiles on-demand mode (scripts/kernel-setup.sh build) and its VM
  linux-source-6.12 bc flex bison libelf-dev libssl-dev build-essential cpio xz-utils qemu-system-x86 e2fsprogs
)

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/setup.sh: run as root (it installs apt packages and mounts filesystems in tests)" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the project's metadata or the C shim changed.
stamp=.venv/.afsd-installed
want=$(cat pyproject.toml setup.py c_ext/* 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c 'import afsd' 2>/dev/null; then
  echo "setup: installing afsd and its Python dependencies into .venv" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,bench]'
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv/bin/afsd)" >&2
