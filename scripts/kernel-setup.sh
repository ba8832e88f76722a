#!/usr/bin/env bash
# The afsd kernel lab: report what the running kernel can do for afsd, and build (and optionally install) a
# kernel with cachefiles on-demand mode from Debian's linux-source-6.12.
#
#   scripts/kernel-setup.sh check [--json]      what the RUNNING kernel supports (always exits 0)
#   scripts/kernel-setup.sh build [--host]      build the kernel once; later calls reuse the cached bzImage
#   scripts/kernel-setup.sh path  [--host]      print the cached bzImage path, or fail if it is not built
#   scripts/kernel-setup.sh install --yes       install the --host kernel into /boot with a grub entry
#   scripts/kernel-setup.sh uninstall --yes     remove what install added
#
# Two profiles share one recipe. The default (qemu) profile is what scripts/vm-test.sh boots: tinyconfig plus
# scripts/kernel/config-fragment. --host adds scripts/kernel/config-fragment.host: the drivers and systemd
# needs of a real machine or hypervisor VM (disks, NICs, ACPI), which a qemu guest on a 9p root does without.
# Built kernels live in ${AFSD_KERNEL_CACHE:-~/.cache/afsd/kernel}/<key>/, where <key> hashes the fragments,
# the linux-source package version and this script's build functions; a killed build leaves no entry.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FRAGMENT_DIR=$ROOT/scripts/kernel
SOURCE_PACKAGE=linux-source-6.12
SOURCE_TARBALL=/usr/src/linux-source-6.12.tar.xz
CACHE_ROOT=${AFSD_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/afsd/kernel}
BUILD_PACKAGES=("$SOURCE_PACKAGE" bc flex bison libelf-dev libssl-dev build-essential cpio xz-utils)
# What scripts/vm-test.sh needs to boot the kernel (mkfs.ext4 for the scratch disk).
VM_PACKAGES=(qemu-system-x86 e2fsprogs)
GRUB_SCRIPT=/etc/grub.d/42_afsd_kernel
GRUB_ENTRY_ID=afsd-lab-kernel

say() { echo "kernel-setup: $*" >&2; }
# Seconds between progress lines while a long stage runs (packages, unpacking, compiling).
PROGRESS_INTERVAL=${AFSD_PROGRESS_INTERVAL:-30}
die() { say "error: $*"; exit 1; }

usage() {
  sed -n '5,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------- packages

missing_packages() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

ensure_packages() {
  local missing
  mapfile -t missing < <(missing_packages "$@")
  [ "${#missing[@]}" -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}; run as root or: apt-get install ${missing[*]}"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  run_stage "installing packages" /dev/null apt-get update -qq || die "apt-get update failed"
  run_stage "installing packages" /dev/null apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
    die "apt-get install ${missing[*]} failed"
}

# ---------------------------------------------------------------------------------------------- progress

# While a stage runs, say every PROGRESS_INTERVAL seconds what it is and how long it (and the build) has
# taken, so a 6-12 minute build never looks hung. For compiling, also how many files and the last one.
BUILD_START=$(date +%s)
watch_stage() {  # pid stage log
  local pid=$1 stage=$2 log=$3 begun last count detail
  begun=$(date +%s)
  while kill -0 "$pid" 2>/dev/null; do
    sleep "$PROGRESS_INTERVAL" >/dev/null 2>&1 &   # (not our stdout: a caller reading it to its end would wait out the sleep)
    wait $! 2>/dev/null || true
    kill -0 "$pid" 2>/dev/null || break
    detail=
    if [ "$stage" = compiling ] && [ -f "$log" ]; then
      count=$(grep -cE '^  (CC|AS|LD|AR)' "$log" || true)
      last=$(grep -E '^  (CC|AS|LD|AR)' "$log" | tail -n 1 | awk '{print $2}')
      detail=" ($count files${last:+, last $last})"
    fi
    say "$stage: $(($(date +%s) - begun)) s (build $(($(date +%s) - BUILD_START)) s)$detail"
  done
}

run_stage() {  # stage log command... — output appended to log; returns the command's exit code
  local stage=$1 log=$2 rc=0 pid watcher
  shift 2
  "$@" >>"$log" 2>&1 &
  pid=$!
  watch_stage "$pid" "$stage" "$log" &
  watcher=$!
  wait "$pid" || rc=$?
  kill "$watcher" 2>/dev/null || true
  wait "$watcher" 2>/dev/null || true
  return "$rc"
}

source_version() {
  dpkg-query -W -f='${Version}' "$SOURCE_PACKAGE" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------- profiles

PROFILE=qemu
fragments() {
  echo "$FRAGMENT_DIR/config-fragment"
  [ "$PROFILE" = host ] && echo "$FRAGMENT_DIR/config-fragment.host"
  return 0
}

# The recipe: every function whose text decides what ends up in the bzImage. Their source is part of the
# cache key, so editing the recipe rebuilds the kernel.
configure_tree() {  # tree fragment...
  local tree=$1
  shift
  make -C "$tree" -s ARCH=x86_64 tinyconfig
  (cd "$tree" && scripts/kconfig/merge_config.sh -m .config "$@")
  make -C "$tree" -s ARCH=x86_64 olddefconfig
}

compile_tree() {  # tree
  KBUILD_BUILD_USER=afsd KBUILD_BUILD_HOST=afsd-kernel-lab \
    make -C "$1" ARCH=x86_64 -j"$(($(nproc) + 1))" bzImage
}

cache_key() {
  local version
  version=$(source_version)
  [ -n "$version" ] || return 1
  {
    echo "afsd kernel recipe 1"
    echo "source $SOURCE_PACKAGE $version"
    declare -f configure_tree compile_tree
    local fragment
    while read -r fragment; do
      echo "fragment $(basename "$fragment")"
      cat "$fragment"
    done < <(fragments)
  } | sha256sum | cut -c1-16
}

cached_dir() {
  local key
  key=$(cache_key) || return 1
  [ -f "$CACHE_ROOT/$key/bzImage" ] || return 1
  echo "$CACHE_ROOT/$key"
}

# ------------------------------------------------------------------------------------------------- build

# Every line of the fragments must be in .config as written: olddefconfig silently drops an option whose
# dependencies are unmet, and a kernel missing, say, CACHEFILES_ONDEMAND would only fail much later.
verify_config() {  # config fragment...
  local config=$1 fragment line name bad=0
  shift
  for fragment in "$@"; do
    while IFS= read -r line; do
      if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=.* ]]; then
        name=${BASH_REMATCH[1]}
        grep -Fqx -- "$line" "$config" && continue
      elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        name=${BASH_REMATCH[1]}
        grep -q "^$name=" "$config" || continue
      else
        continue
      fi
      say "config: $(basename "$fragment") wants '$line' but olddefconfig gave: $(grep -E "^(# )?${name}[= ]" "$config" || echo 'nothing (symbol unknown or its menu is off)')"
      bad=1
    done <"$fragment"
  done
  [ "$bad" -eq 0 ] || die "the kernel config lost options (unmet dependencies?); fix scripts/kernel/config-fragment*"
}

# The unpacked source tree is kept between builds (per profile and source version) so that a fragment change
# rebuilds incrementally (~30 s) instead of from scratch (~6 min). It appears atomically too.
prepare_tree() {  # tree
  local tree=$1 partial
  [ -f "$tree/Makefile" ] && return 0
  partial="$tree.partial.$$"
  rm -rf "$partial"
  mkdir -p "$partial"
  say "unpacking $SOURCE_TARBALL"
  run_stage unpacking /dev/null tar -xf "$SOURCE_TARBALL" -C "$partial" --strip-components=1 ||
    die "unpacking $SOURCE_TARBALL failed"
  mv -T "$partial" "$tree"
}

cmd_build() {
  ensure_packages "${BUILD_PACKAGES[@]}" "${VM_PACKAGES[@]}"
  [ -f "$SOURCE_TARBALL" ] || die "$SOURCE_TARBALL is missing although $SOURCE_PACKAGE is installed"
  local key dest dir
  key=$(cache_key) || die "cannot read the version of $SOURCE_PACKAGE"
  dest=$CACHE_ROOT/$key
  if [ -f "$dest/bzImage" ]; then
    say "cached $PROFILE kernel $(cat "$dest/kernelrelease"): $dest/bzImage"
    echo "$dest/bzImage"
    return 0
  fi

  mkdir -p "$CACHE_ROOT"
  exec 9>"$CACHE_ROOT/.lock"
  if ! flock -n 9; then
    say "another build is running; waiting for it"
    run_stage "waiting for the other build" /dev/null flock 9 || die "cannot lock $CACHE_ROOT/.lock"
  fi
  if [ -f "$dest/bzImage" ]; then  # built by the process we waited for
    echo "$dest/bzImage"
    return 0
  fi
  rm -rf "$CACHE_ROOT"/.*.partial.* "$CACHE_ROOT"/work/*.partial.*  # left by killed builds (we hold the lock)

  local tree start log stage
  tree="$CACHE_ROOT/work/$PROFILE-$(source_version)"
  start=$(date +%s)
  BUILD_START=$start
  mkdir -p "$CACHE_ROOT/work"
  prepare_tree "$tree"
  log="$tree/afsd-build.log"
  mapfile -t frags < <(fragments)
  say "configuring ($PROFILE profile: tinyconfig + ${frags[*]##*/})"
  : >"$log"
  run_stage configuring "$log" configure_tree "$tree" "${frags[@]}" ||
    { tail -n 30 "$log" >&2; die "configuring failed; log: $log"; }
  verify_config "$tree/.config" "${frags[@]}"
  say "compiling bzImage with $(($(nproc) + 1)) jobs (about 6 min on 2 cores); log: $log"
  local rc=0
  run_stage compiling "$log" compile_tree "$tree" || rc=$?
  [ "$rc" -eq 0 ] || { tail -n 40 "$log" >&2; die "compiling failed (make exit $rc); log: $log"; }

  stage="$CACHE_ROOT/.$key.partial.$$"
  rm -rf "$stage"
  mkdir -p "$stage"
  cp "$tree/arch/x86/boot/bzImage" "$stage/bzImage"
  cp "$tree/.config" "$stage/config"
  cp "$tree/System.map" "$stage/System.map"
  make -C "$tree" -s kernelrelease >"$stage/kernelrelease"
  cp "$log" "$stage/build.log"
  {
    echo "profile=$PROFILE"
    echo "source=$SOURCE_PACKAGE $(source_version)"
    echo "fragments=${frags[*]##*/}"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "seconds=$(($(date +%s) - start))"
  } >"$stage/build-info"
  mv -T "$stage" "$dest"
  say "built $PROFILE kernel $(cat "$dest/kernelrelease") in $(($(date +%s) - start)) s: $dest/bzImage"
  echo "$dest/bzImage"
}

cmd_path() {
  local dir
  dir=$(cached_dir) || die "no $PROFILE kernel built for this recipe; run: scripts/kernel-setup.sh build${PROFILE/qemu/}"
  echo "$dir/bzImage"
}

# ----------------------------------------------------------------------------------------------- install

refuse_unless_confirmed() {  # yes action
  if [ -n "${CI:-}" ]; then
    die "refusing to $2 while CI is set: this changes the machine's boot loader"
  fi
  [ "$(id -u)" -eq 0 ] || die "$2 needs root"
  if [ "$1" != yes ]; then
    say "this would $2 (/boot, $GRUB_SCRIPT, update-grub)."
    die "pass --yes to do it"
  fi
  [ -d /sys/firmware/efi ] || [ -d /boot/grub ] || die "no grub found in /boot/grub: install only supports grub-booted Debian machines"
  command -v update-grub >/dev/null || die "update-grub not found: install only supports grub-booted Debian machines"
}

# The kernel has no modules and no initramfs, so it must find the root filesystem by itself: root=PARTUUID=
# on a plain partition with ext4, never root=UUID= (that needs an initramfs) nor LVM/dm-crypt.
root_partuuid() {
  local source fstype partuuid
  source=$(findmnt -no SOURCE /)
  fstype=$(findmnt -no FSTYPE /)
  [ "$fstype" = ext4 ] || die "the root filesystem is $fstype; the afsd kernel only mounts an ext4 root without an initramfs"
  [[ $source == /dev/mapper/* || $source == /dev/dm-* ]] && die "the root filesystem is on $source (LVM/dm); the afsd kernel has no initramfs to set that up"
  partuuid=$(blkid -s PARTUUID -o value "$source" || true)
  [ -n "$partuuid" ] || die "$source has no partition UUID; cannot name the root device without an initramfs"
  echo "$partuuid"
}

cmd_install() {
  local confirm=$1 set_default=$2 dir release partuuid boot_uuid kernel_path
  refuse_unless_confirmed "$confirm" "install the afsd kernel and a grub entry"
  PROFILE=host
  dir=$(cached_dir) || die "no host-profile kernel built; run: scripts/kernel-setup.sh build --host"
  release=$(cat "$dir/kernelrelease")
  partuuid=$(root_partuuid)

  install -m 0644 "$dir/bzImage" "/boot/vmlinuz-$release"
  install -m 0644 "$dir/config" "/boot/config-$release"
  install -m 0644 "$dir/System.map" "/boot/System.map-$release"
  boot_uuid=$(grub-probe --target=fs_uuid "/boot/vmlinuz-$release")
  kernel_path=$(grub-mkrelpath "/boot/vmlinuz-$release")

  # Our own menu entry, not Debian's 10_linux: that one would add root=UUID= and look for an initramfs.
  cat >"$GRUB_SCRIPT.tmp" <<EOF
#!/bin/sh
# Written by afsd scripts/kernel-setup.sh install; removed by: scripts/kernel-setup.sh uninstall --yes
exec tail -n +4 "\$0"
menuentry 'afsd lab kernel $release (cachefiles on-demand)' --id $GRUB_ENTRY_ID {
	insmod part_gpt
	insmod part_msdos
	insmod ext2
	search --no-floppy --fs-uuid --set=root $boot_uuid
	linux $kernel_path root=PARTUUID=$partuuid rootfstype=ext4 ro console=tty0 console=ttyS0,115200n8
}
EOF
  chmod 0755 "$GRUB_SCRIPT.tmp"
  mv "$GRUB_SCRIPT.tmp" "$GRUB_SCRIPT"
  update-grub
  if [ "$set_default" = yes ]; then
    grep -Eq '^GRUB_DEFAULT=("?)saved\1$' /etc/default/grub ||
      die "installed, but --default needs GRUB_DEFAULT=saved in /etc/default/grub (then run update-grub and this again)"
    grub-set-default "$GRUB_ENTRY_ID"
    say "installed $release; it is now grub's default entry"
  else
    # Boot it once: if it does not come up, the next reset is back on Debian's kernel.
    grub-reboot "$GRUB_ENTRY_ID"
    say "installed $release; the next boot (only) uses it: reboot now"
  fi
}

cmd_uninstall() {
  refuse_unless_confirmed "$1" "remove the afsd kernel and its grub entry"
  local had=0 f
  for f in /boot/vmlinuz-*-afsd /boot/config-*-afsd /boot/System.map-*-afsd "$GRUB_SCRIPT"; do
    [ -e "$f" ] || continue
    rm -f "$f"
    had=1
  done
  [ "$had" -eq 1 ] || { say "nothing to remove"; return 0; }
  update-grub
  say "removed the afsd kernel and its grub entry"
}

# ------------------------------------------------------------------------------------------------- check

cmd_check() {
  local python
  python=$(command -v python3 || true)
  [ -n "$python" ] || die "check needs python3"
  "$python" - "$@" <<'PYTHON'
"""Probe the running kernel for the three ways afsd can serve erofs blobs lazily (or eagerly)."""
import ctypes
import ctypes.util
import errno
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
IS_ROOT = os.geteuid() == 0
DISK_FILESYSTEMS = ("ext4", "xfs", "btrfs")


def kernel_config() -> tuple[dict[str, str], str | None]:
    """The running kernel's config as {name: value}, and where it came from."""
    release = platform.release()
    for path in ("/proc/config.gz", f"/boot/config-{release}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        config = {}
        for line in text.splitlines():
            if m := re.match(r"(CONFIG_\w+)=(.*)", line):
                config[m[1]] = m[2]
        return config, path
    return {}, None


CONFIG, CONFIG_SOURCE = kernel_config()


def option(name: str) -> str:
    """'y', 'm', 'not set', or 'unknown' when no config is readable."""
    if CONFIG_SOURCE is None:
        return "unknown"
    return CONFIG.get(name, "not set")


def filesystem_of(path: str) -> str:
    """The type of the filesystem holding `path`, from /proc/self/mountinfo (longest mount prefix wins)."""
    path = os.path.realpath(path)
    best, best_type = "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mount_point = left.split()[4].encode().decode("unicode_escape")
            prefix = mount_point.rstrip("/") + "/"
            if (path == mount_point or path.startswith(prefix) or mount_point == "/") and len(mount_point) >= len(best):
                best, best_type = mount_point, right.split()[0]
    return best_type


def disk_scratch_dir() -> str | None:
    """A writable directory on ext4/xfs/btrfs: fanotify pre-content marks are refused on tmpfs and overlayfs."""
    for candidate in (os.environ.get("TMPDIR"), "/var/tmp", "/tmp", os.getcwd(), os.path.expanduser("~")):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            if filesystem_of(candidate) in DISK_FILESYSTEMS:
                return candidate
    return None


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m[1]), int(m[2])) if m else (0, 0)


def check_cachefiles() -> dict:
    evidence = []
    device = os.path.exists("/dev/cachefiles")
    evidence.append("/dev/cachefiles present" if device else "/dev/cachefiles missing")
    for name in ("CONFIG_CACHEFILES", "CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EROFS_FS_ONDEMAND"):
        evidence.append(f"{name}={option(name)}")
    probe = probe_cachefiles_bind() if device else "not run (no /dev/cachefiles)"
    evidence.append(f"probe: {probe}")
    configured = option("CONFIG_CACHEFILES_ONDEMAND") == "y" and option("CONFIG_EROFS_FS_ONDEMAND") == "y"
    if probe.startswith("ok"):
        supported = option("CONFIG_EROFS_FS_ONDEMAND") in ("y", "unknown")
    else:
        supported = device and configured
    return {"supported": supported, "evidence": evidence}


def probe_cachefiles_bind() -> str:
    """Bind an on-demand cache on a throwaway ext4 directory and let it go again."""
    if not IS_ROOT:
        return "not run (needs root)"
    scratch = disk_scratch_dir()
    if scratch is None:
        return "not run (no writable ext4/xfs/btrfs directory for a cache)"
    try:
        fd = os.open("/dev/cachefiles", os.O_RDWR)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return "not run (/dev/cachefiles is in use by another daemon, e.g. cachefilesd)"
        return f"failed to open /dev/cachefiles: {e.strerror}"
    cache_dir = tempfile.mkdtemp(prefix="afsd-check-", dir=scratch)
    try:
        os.write(fd, f"dir {cache_dir}".encode())
        os.write(fd, b"tag afsd-check")
        os.write(fd, b"bind ondemand")
        return f"ok (bound an on-demand cache in {filesystem_of(cache_dir)} {scratch})"
    except OSError as e:
        return f"bind ondemand failed: {e.strerror}"
    finally:
        os.close(fd)
        shutil.rmtree(cache_dir, ignore_errors=True)


FAN_CLASS_PRE_CONTENT = 0x08
FAN_CLOEXEC = 0x01
FAN_MARK_ADD = 0x01
FAN_PRE_ACCESS = 0x00100000
AT_FDCWD = -100


def check_fanotify() -> dict:
    version = kernel_version()
    evidence = [f"kernel {version[0]}.{version[1]} {'>=' if version >= (6, 14) else '<'} 6.14"]
    evidence.append(f"CONFIG_FANOTIFY_ACCESS_PERMISSIONS={option('CONFIG_FANOTIFY_ACCESS_PERMISSIONS')}")
    probe = probe_fanotify()
    evidence.append(f"probe: {probe}")
    if probe.startswith("ok"):
        supported = True
    elif probe.startswith("not run"):
        supported = version >= (6, 14) and option("CONFIG_FANOTIFY_ACCESS_PERMISSIONS") == "y"
    else:
        supported = False
    return {"supported": supported, "evidence": evidence}


def probe_fanotify() -> str:
    """fanotify_init(FAN_CLASS_PRE_CONTENT) plus a FAN_PRE_ACCESS mark on a file on ext4: the exact calls afsd makes."""
    if not IS_ROOT:
        return "not run (needs root: CAP_SYS_ADMIN)"
    scratch = disk_scratch_dir()
    if scratch is None:
        return "not run (no writable ext4/xfs/btrfs directory to mark a file in)"
    libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
    group = libc.fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, os.O_RDWR | getattr(os, "O_LARGEFILE", 0))
    if group < 0:
        return f"fanotify_init(FAN_CLASS_PRE_CONTENT) failed: {os.strerror(ctypes.get_errno())}"
    try:
        with tempfile.NamedTemporaryFile(dir=scratch, prefix="afsd-check-") as f:
            if libc.fanotify_mark(group, FAN_MARK_ADD, FAN_PRE_ACCESS, AT_FDCWD, f.name.encode()) < 0:
                return f"FAN_PRE_ACCESS mark refused: {os.strerror(ctypes.get_errno())}"
            return f"ok (FAN_PRE_ACCESS mark on a file in {filesystem_of(f.name)} {scratch})"
    finally:
        os.close(group)


MS_RDONLY = 1


def check_file_backed_erofs() -> dict:
    evidence = [f"CONFIG_EROFS_FS={option('CONFIG_EROFS_FS')}",
                f"CONFIG_EROFS_FS_BACKED_BY_FILE={option('CONFIG_EROFS_FS_BACKED_BY_FILE')}"]
    probe = probe_file_backed_erofs()
    evidence.append(f"probe: {probe}")
    if probe.startswith("ok"):
        supported = True
    elif probe.startswith("not run"):
        supported = option("CONFIG_EROFS_FS_BACKED_BY_FILE") == "y"
    else:
        supported = False
    return {"supported": supported, "evidence": evidence}


def probe_file_backed_erofs() -> str:
    """mount(2) a tiny erofs image with the image FILE as source (mount(8) would quietly add a loop device)."""
    if not IS_ROOT:
        return "not run (needs root)"
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        return "not run (mkfs.erofs not found; apt-get install erofs-utils)"
    with tempfile.TemporaryDirectory(prefix="afsd-check-") as tmp:
        source, image, target = (os.path.join(tmp, n) for n in ("src", "image.erofs", "mnt"))
        os.mkdir(source)
        os.mkdir(target)
        with open(os.path.join(source, "hello"), "w") as f:
            f.write("hello\n")
        made = subprocess.run([mkfs, "--quiet", image, source], capture_output=True, text=True)
        if made.returncode != 0:
            last_line = (made.stderr.strip().splitlines() or ["no message"])[-1]
            return f"not run (mkfs.erofs failed: {last_line})"
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        if libc.mount(image.encode(), target.encode(), b"erofs", MS_RDONLY, None) < 0:
            return f"mount(2) of an image file failed: {os.strerror(ctypes.get_errno())}"
        try:
            with open(os.path.join(target, "hello")) as f:
                content = f.read()
        finally:
            libc.umount2(target.encode(), 0)
        if content != "hello\n":
            return "mounted, but a file read back wrong"
        return "ok (mounted an image file with mount(2), no loop device)"


def main() -> None:
    as_json = "--json" in sys.argv[1:]
    report = {
        "kernel": platform.release(),
        "config_source": CONFIG_SOURCE,
        "root": IS_ROOT,
        "cachefiles_ondemand": check_cachefiles(),
        "fanotify_pre_content": check_fanotify(),
        "erofs_file_backed": check_file_backed_erofs(),
    }
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    print(f"Kernel {report['kernel']} (config: {CONFIG_SOURCE or 'not readable: no /proc/config.gz or /boot/config-*'})")
    if not IS_ROOT:
        print("Not root: the probes are skipped and the answers come from the config alone.")
    titles = {
        "cachefiles_ondemand": "cachefiles on-demand mode (erofs over fscache, /dev/cachefiles)",
        "fanotify_pre_content": "fanotify pre-content events (FAN_PRE_ACCESS, sparse blob filled on demand)",
        "erofs_file_backed": "file-backed erofs mounts (mount an image file without a loop device)",
    }
    for key, title in titles.items():
        print(f"{'yes' if report[key]['supported'] else 'no ':3}  {title}")
        for line in report[key]["evidence"]:
            print(f"       {line}")


main()
PYTHON
}

# -------------------------------------------------------------------------------------------------- main

[ $# -ge 1 ] || usage
command=$1
shift
confirm=no
set_default=no
json=()
for arg in "$@"; do
  case $arg in
    --host) PROFILE=host ;;
    --yes) confirm=yes ;;
    --default) set_default=yes ;;
    --json) json=(--json) ;;
    -h | --help) usage ;;
    *) die "unknown argument '$arg' for '$command'" ;;
  esac
done

case $command in
  check) cmd_check "${json[@]}" ;;
  build) cmd_build ;;
  path) cmd_path ;;
  install) cmd_install "$confirm" "$set_default" ;;
  uninstall) cmd_uninstall "$confirm" ;;
  -h | --help | help) usage ;;
  *) die "unknown command '$command' (check, build, path, install, uninstall)" ;;
esac
