#!/usr/bin/env bash
# Build the afsd container image without Docker: a minimal Debian root filesystem (debootstrap) with
# Python, erofs-utils, runc and nftables, plus afsd in /opt/afsd, written as an OCI image layout by umoci.
#
#   scripts/build-image.sh [--output DIR] [--tag TAG] [--print-digest] [--rebuild]
#
# Prints the layout (DIR:TAG) and the manifest digest. Push it with skopeo, e.g.
#   skopeo copy oci:build/image:afsd docker://registry.example/afsd:0.1.0
# Reproducible: the same inputs give the same digest. The inputs are the .deb files (downloaded once
# into a tarball kept in the cache, keyed by suite, mirror and package list), the pinned wheels of
# deploy/image/*requirements.txt, afsd's sources, and this script; every file's mtime is SOURCE_EPOCH,
# caches, logs and machine ids are removed, and bytecode is compiled with hash-based invalidation.
# Expensive parts are cached under ${XDG_CACHE_HOME:-~/.cache}/afsd/image, each keyed by its inputs:
# the debs tarball, the base root filesystem, the wheels and the finished layout (docs/kubernetes.md).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

OUTPUT=build/image
TAG=afsd
PRINT_DIGEST=0
REBUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --output) OUTPUT=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --print-digest) PRINT_DIGEST=1; shift ;;
    --rebuild) REBUILD=1; shift ;;   # build the base and the layout again from the cached debs and wheels
    -h|--help) sed -n 2,16p "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

SUITE=bookworm
MIRROR=${AFSD_IMAGE_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,erofs-utils,runc,nftables,iproute2,ca-certificates
SOURCE_EPOCH=1735689600                      # 2025-01-01T00:00:00Z: every mtime and the config's created
CREATED=2025-01-01T00:00:00Z
PYTHON=python3.11                            # bookworm's; the wheels below are for it
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/afsd/image
HOST_PYTHON=${HOST_PYTHON:-$REPO/.venv/bin/python}

for tool in debootstrap umoci skopeo; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is missing: run scripts/setup.sh" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "build-image: run as root (debootstrap chroots)" >&2; exit 1; }
[ -x "$HOST_PYTHON" ] || { echo "build-image: $HOST_PYTHON is missing: run scripts/setup.sh" >&2; exit 1; }
mkdir -p "$CACHE"

hash_of() { sha256sum | cut -c1-16; }
log() { echo "build-image: $*" >&2; }
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
cleanup() {
  # debootstrap mounts /proc and /sys inside the target while it runs: never remove a tree with mounts.
  for m in $(awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r); do umount -l "$m" || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# Everything below is serialized per cache: two builds at once would race on the same entries.
exec 9>"$CACHE/lock"
flock 9

# 1. The .deb files: downloaded once per (suite, mirror, packages); the tarball's digest pins them.
DEBS_KEY=$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" minbase | hash_of)
DEBS=$CACHE/debs-$DEBS_KEY.tgz
if [ ! -s "$DEBS" ]; then
  log "downloading Debian $SUITE packages ($PACKAGES) into $DEBS"
  debootstrap --variant=minbase --include="$PACKAGES" --make-tarball="$WORK/debs.tgz" \
    "$SUITE" "$WORK/debs-target" "$MIRROR" >"$WORK/debootstrap-download.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap-download.log" >&2; exit 1; }
  mv "$WORK/debs.tgz" "$DEBS"
fi
DEBS_DIGEST=$(sha256sum "$DEBS" | cut -d' ' -f1)

# 2. The base root filesystem, normalized: nothing in it depends on when or where it was built.
BASE_KEY=$(printf '%s\n' "$DEBS_DIGEST" "$SOURCE_EPOCH" "$(sed -n '/^normalize_rootfs()/,/^}/p' "$0")" | hash_of)
BASE=$CACHE/base-$BASE_KEY
[ "$REBUILD" = 1 ] && BASE=$WORK/base-rebuilt   # the cache is left as it is
normalize_rootfs() {
  local root=$1
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
         "$root"/var/lib/dpkg/*-old "$root"/var/cache/ldconfig/aux-cache "$root"/debootstrap
  find "$root/var/log" -type f -delete
  : >"$root/etc/machine-id"; rm -f "$root/var/lib/dbus/machine-id"
  # Written by Kubernetes (and runc) at run time; here only what a bare `runc run` needs.
  printf 'afsd\n' >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  : >"$root/etc/resolv.conf"
  # Password-change dates are "days since 1970 at build time".
  for f in shadow shadow- gshadow gshadow-; do
    [ -f "$root/etc/$f" ] && sed -i -E 's/^([^:]*:[^:]*:)[0-9]+:/\1'"$((SOURCE_EPOCH / 86400))"':/' "$root/etc/$f"
  done
  rm -f "$root"/etc/shadow- "$root"/etc/gshadow- "$root"/etc/passwd- "$root"/etc/group- "$root"/etc/subuid- "$root"/etc/subgid-
  # Bytecode compiled at install time embeds build-time details; it is compiled again at the end.
  find "$root" -xdev -name __pycache__ -type d -prune -exec rm -rf {} +
}
if [ ! -d "$BASE" ]; then
  log "installing the base root filesystem (Debian $SUITE minbase + $PACKAGES)"
  debootstrap --variant=minbase --include="$PACKAGES" --unpack-tarball="$DEBS" \
    "$SUITE" "$WORK/base" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  normalize_rootfs "$WORK/base"
  mv "$WORK/base" "$BASE"
fi

# 3. Wheels: the pinned runtime and build requirements, downloaded once per lock file.
WHEELS_KEY=$(cat deploy/image/requirements.txt deploy/image/build-requirements.txt | hash_of)
WHEELS=$CACHE/wheels-$WHEELS_KEY
if [ ! -d "$WHEELS" ]; then
  log "downloading the pinned wheels into $WHEELS"
  mkdir -p "$WORK/wheels"
  "$HOST_PYTHON" -m pip download -q --only-binary=:all: --no-deps --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WORK/wheels" -r deploy/image/requirements.txt -r deploy/image/build-requirements.txt \
    >"$WORK/pip-download.log" 2>&1 || { grep -v '^WARNING: Location' "$WORK/pip-download.log" >&2; exit 1; }
  mv "$WORK/wheels" "$WHEELS"
fi

# 4. afsd itself: its wheel (with the cffi shim, compiled without debug info so no build path leaks
#    in) installed with the pinned wheels into a venv at /opt/afsd, in a copy of the base.
SOURCES_KEY=$(find afsd c_ext setup.py pyproject.toml README.md -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
              ! -name '*.so' -print0 | sort -z | xargs -0 sha256sum | hash_of)
IMAGE_KEY=$(printf '%s\n' "$BASE_KEY" "$WHEELS_KEY" "$SOURCES_KEY" "$(sha256sum "$0")" | hash_of)
LAYOUT=$CACHE/layout-$IMAGE_KEY
[ "$REBUILD" = 1 ] && LAYOUT=$WORK/layout-rebuilt
if [ ! -d "$LAYOUT" ]; then
  log "building afsd's layer (sources $SOURCES_KEY)"
  # The build environment: the pinned setuptools/wheel/cffi, made once per lock file.
  BUILDENV=$CACHE/buildenv-$WHEELS_KEY
  if [ ! -x "$BUILDENV/bin/python" ]; then
    rm -rf "$BUILDENV"
    "$HOST_PYTHON" -m venv --without-pip "$WORK/buildenv"
    "$HOST_PYTHON" -m pip --python "$WORK/buildenv/bin/python" install -q --no-index --find-links "$WHEELS" \
      -r deploy/image/build-requirements.txt
    mv "$WORK/buildenv" "$BUILDENV"
    # a venv's scripts name their interpreter by path: rewrite after the move
    sed -i "1s|^#!.*/bin/python.*|#!$BUILDENV/bin/python|" "$BUILDENV"/bin/* 2>/dev/null || true
  fi
  mkdir -p "$WORK/src" "$WORK/dist"
  # A copy of the sources at a fixed path (no build artefacts, no .venv): the wheel depends on nothing else.
  find afsd c_ext setup.py pyproject.toml README.md ! -name '*.pyc' ! -path '*/__pycache__*' ! -name '*.so' \
    -print0 | sort -z | cpio -0 -pdm --quiet "$WORK/src"
  (cd "$WORK/src" && SOURCE_DATE_EPOCH=$SOURCE_EPOCH CFLAGS="-g0 -O2" \
    "$BUILDENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$WORK/dist" . \
    >"$WORK/wheel.log" 2>&1) || { tail -20 "$WORK/wheel.log" >&2; exit 1; }

  ROOT=$WORK/rootfs
  cp -a "$BASE" "$ROOT"
  mkdir -p "$ROOT/tmp/wheels"
  cp "$WHEELS"/*.whl "$WORK"/dist/*.whl deploy/image/requirements.txt "$ROOT/tmp/wheels/"
  chroot "$ROOT" /usr/bin/$PYTHON -m venv --without-pip /opt/afsd
  PIP_WHEEL=$(cd "$ROOT/tmp/wheels" && ls pip-*.whl)
  # pip runs from its own wheel inside the chroot: no pip is left in the image.
  chroot "$ROOT" env -i PATH=/usr/bin:/bin /opt/afsd/bin/python "/tmp/wheels/$PIP_WHEEL/pip" install -q \
    --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --find-links /tmp/wheels \
    -r /tmp/wheels/requirements.txt "/tmp/wheels/$(cd "$WORK/dist" && ls afsd-*.whl)"
  rm -rf "$ROOT/tmp/wheels" "$ROOT/root/.cache"
  # Bytecode, compiled in one process with hash-based invalidation: no mtimes in it, same bytes each build.
  chroot "$ROOT" env -i PATH=/usr/bin:/bin SOURCE_DATE_EPOCH=$SOURCE_EPOCH /opt/afsd/bin/python -m compileall \
    -q -j1 --invalidation-mode unchecked-hash /opt/afsd/lib /usr/lib/$PYTHON >/dev/null
  chroot "$ROOT" /opt/afsd/bin/afsd --version >/dev/null

  # 5. The OCI layout: one layer for Debian, one for afsd (an upgrade of afsd changes only the second).
  log "writing the OCI layout"
  APP=$WORK/app
  mkdir -p "$APP/opt" "$APP/usr/local/bin"
  mv "$ROOT/opt/afsd" "$APP/opt/afsd"
  ln -s /opt/afsd/bin/afsd "$APP/usr/local/bin/afsd"
  for tree in "$ROOT" "$APP"; do
    find "$tree" -xdev -exec touch -h -d "@$SOURCE_EPOCH" {} +
  done
  IMG=$WORK/layout
  umoci init --layout "$IMG"
  umoci new --image "$IMG:$TAG"
  umoci insert --image "$IMG:$TAG" --history.created "$CREATED" \
    --history.created_by "debootstrap --variant=minbase --include=$PACKAGES $SUITE" "$ROOT" /
  umoci insert --image "$IMG:$TAG" --history.created "$CREATED" --history.created_by "afsd (sources $SOURCES_KEY)" \
    "$APP" /
  umoci config --image "$IMG:$TAG" --created "$CREATED" --no-history \
    --author afsd --architecture amd64 --os linux \
    --config.entrypoint /usr/local/bin/afsd --config.cmd --help \
    --config.env PATH=/opt/afsd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 --config.env PYTHONDONTWRITEBYTECODE=1 --config.workingdir / \
    --config.stopsignal SIGTERM --config.label org.opencontainers.image.title=afsd
  umoci gc --layout "$IMG"
  mv "$IMG" "$LAYOUT"
fi

mkdir -p "$(dirname "$OUTPUT")"
rm -rf "$OUTPUT"
cp -a "$LAYOUT" "$OUTPUT"
DIGEST=$(skopeo inspect --raw "oci:$OUTPUT:$TAG" | sha256sum | cut -d' ' -f1)
if [ "$PRINT_DIGEST" = 1 ]; then
  echo "sha256:$DIGEST"
else
  echo "image oci:$OUTPUT:$TAG sha256:$DIGEST"
fi
