#!/usr/bin/env bash
# Run pytest inside a qemu VM booted with the afsd lab kernel (cachefiles on-demand, erofs fscache mode).
#
#   scripts/vm-test.sh [pytest args...]          e.g. scripts/vm-test.sh tests/vm -q
#
# The guest's root is this machine's root, shared read-only over 9p, so the guest runs this checkout and its
# .venv unchanged; a sparse ext4 disk image gives it writable scratch space (cachefiles needs ext4, not tmpfs)
# and a second 9p share carries the results back. tests/vm/init.sh is the guest's PID 1: it runs pytest, writes
# the exit code, and stops the VM. This script prints the guest's console and exits with pytest's exit code
# (124: timed out, 125: the VM stopped without a result).
#
# Environment:
#   AFSD_VM_TIMEOUT=SECONDS   kill qemu after this long (default 450 x the deadline scale: 1800 with 2 vCPUs)
#   AFSD_VM_RESULTS=DIR       keep the guest's results there: exit-code, report.jsonl, junit.xml, console.log
#   AFSD_VM_KERNEL=BZIMAGE    kernel to boot (default: scripts/kernel-setup.sh path; built if missing)
#   AFSD_VM_PYTHON=PATH       interpreter inside the guest (default: .venv/bin/python, else /usr/bin/python3)
#   AFSD_VM_MEMORY=MIB, AFSD_VM_CPUS=N, AFSD_VM_DISK_SIZE=SIZE (2048, 2, 8G)
#   AFSD_VM_CPU_HOG=N         N busy loops in the guest while the tests run: a loaded machine, on purpose (0)
#   AFSD_DEADLINE_SCALE=N     how much longer than on the host the guest's deadlines are (afsd/lab/deadlines.py,
#                             and each test's pytest timeout: 150 s x N); default 8 x (1 + hogs) / CPUs, since a
#                             Python daemon takes seconds to start under TCG
#   AFSD_VM_KERNEL_ARGS=...   extra kernel command line (e.g. loglevel=7 to see every kernel message)
#   AFSD_VM_QUIET=1           do not copy the console to stdout (it is still kept in AFSD_VM_RESULTS)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MEMORY=${AFSD_VM_MEMORY:-2048}
CPUS=${AFSD_VM_CPUS:-2}
DISK_SIZE=${AFSD_VM_DISK_SIZE:-8G}
HOG=${AFSD_VM_CPU_HOG:-0}
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || { echo "vm-test: error: AFSD_VM_CPUS must be a positive number" >&2; exit 2; }
[[ $HOG =~ ^[0-9]+$ ]] || { echo "vm-test: error: AFSD_VM_CPU_HOG must be a number" >&2; exit 2; }
SCALE=${AFSD_DEADLINE_SCALE:-$(((8 * (1 + HOG) + CPUS - 1) / CPUS))}
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || { echo "vm-test: error: AFSD_DEADLINE_SCALE must be a whole number >= 1" >&2; exit 2; }
TIMEOUT=${AFSD_VM_TIMEOUT:-$((450 * SCALE))}

say() { echo "vm-test: $*" >&2; }
die() { say "error: $*"; exit 2; }

[ "$(id -u)" -eq 0 ] || die "run as root: qemu shares / with the guest and the guest mounts filesystems"
[[ $ROOT != *[[:space:]]* ]] || die "the checkout path '$ROOT' contains white space; the kernel command line cannot carry it"

kernel=${AFSD_VM_KERNEL:-}
if [ -z "$kernel" ]; then
  if ! kernel=$("$ROOT/scripts/kernel-setup.sh" path 2>/dev/null) || ! command -v qemu-system-x86_64 >/dev/null; then
    say "no lab kernel (or no qemu) yet: building it once with scripts/kernel-setup.sh build"
    kernel=$("$ROOT/scripts/kernel-setup.sh" build)
  fi
fi
[ -f "$kernel" ] || die "kernel image $kernel not found"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found; run scripts/kernel-setup.sh build (it installs qemu-system-x86)"

python=${AFSD_VM_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then python=$ROOT/.venv/bin/python; else python=/usr/bin/python3; fi
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/afsd-vm.XXXXXX")
share=$work/share
mkdir "$share"
qemu_pid=
tail_pid=
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local pid
  for pid in $qemu_pid $tail_pid ${progress_pid:-}; do  # qemu_pid is `timeout`, which passes the signal on to qemu
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "${AFSD_VM_RESULTS:-}" ]; then
    mkdir -p "$AFSD_VM_RESULTS"
    cp "$work/console.log" "$AFSD_VM_RESULTS/" 2>/dev/null || true
    find "$share" -maxdepth 1 -type f ! -name job.sh -exec cp -t "$AFSD_VM_RESULTS" {} + 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The job for the guest's init: shell-quoted so any pytest argument survives.
{
  printf 'AFSD_VM_CHECKOUT=%q\n' "$ROOT"
  printf 'AFSD_VM_PYTHON=%q\n' "$python"
  printf 'AFSD_VM_CPU_HOG=%q\n' "$HOG"
  printf 'AFSD_DEADLINE_SCALE=%q\n' "$SCALE"
  printf 'AFSD_VM_PYTEST_ARGS=('
  [ $# -gt 0 ] && printf '%q ' "$@"
  printf ')\n'
} >"$share/job.sh"

# Sparse, so 8G costs only what the guest writes. The guest mounts it with noinit_itable, so ext4 does not
# spend emulated CPU zeroing inode tables.
truncate -s "$DISK_SIZE" "$work/scratch.img"
mkfs.ext4 -q -F -L afsd-vm-scratch "$work/scratch.img"

append="console=ttyS0 panic=-1 quiet root=hostroot rootfstype=9p ro"
append+=" rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose"
append+=" init=$ROOT/tests/vm/init.sh ${AFSD_VM_KERNEL_ARGS:-}"

start=$(date +%s)
: >"$work/console.log"  # exists before tail starts following it
say "booting $(basename "$(dirname "$kernel")")/bzImage under qemu (TCG, $CPUS CPUs, $MEMORY MiB, $HOG CPU hogs;" \
  "deadlines x$SCALE; timeout $TIMEOUT s)"
# KVM is not used: on the project's machines /dev/kvm exists but qemu aborts with it (an MSR assertion, measured): docs/kernel-lab.md.
timeout --kill-after=10 "$TIMEOUT" \
  qemu-system-x86_64 -accel tcg -cpu max -smp "$CPUS" -m "$MEMORY" -nographic -no-reboot \
  -kernel "$kernel" -append "$append" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
  -virtfs "local,path=$share,mount_tag=results,security_model=passthrough,multidevs=remap" \
  -drive "file=$work/scratch.img,if=virtio,format=raw,cache=unsafe" \
  -device virtio-rng-pci -nic none \
  </dev/null >"$work/console.log" 2>&1 &
qemu_pid=$!
# Every minute: how long, and how many tests the guest has finished (its report on the results share).
(
  while kill -0 "$qemu_pid" 2>/dev/null; do
    sleep 60 >/dev/null 2>&1 &   # (not our stdout: a caller reading it to its end would wait out the sleep)
    wait $! 2>/dev/null || true
    kill -0 "$qemu_pid" 2>/dev/null || break
    done_count=$(grep -c '"when": "teardown"' "$share/report.jsonl" 2>/dev/null || true)
    failed_count=$(grep '"outcome": "failed"' "$share/report.jsonl" 2>/dev/null | grep -c . || true)
    say "running for $(($(date +%s) - start)) s: ${done_count:-0} tests done, ${failed_count:-0} failed so far"
  done
) &
progress_pid=$!
if [ "${AFSD_VM_QUIET:-0}" != 1 ]; then
  tail -n +1 -f --pid="$qemu_pid" "$work/console.log" &
  tail_pid=$!
fi
rc=0
wait "$qemu_pid" || rc=$?
qemu_pid=
kill "$progress_pid" 2>/dev/null || true
wait "$progress_pid" 2>/dev/null || true
progress_pid=
if [ -n "$tail_pid" ]; then
  wait "$tail_pid" || true
  tail_pid=
fi
elapsed=$(($(date +%s) - start))

if [ -f "$share/exit-code" ]; then
  code=$(cat "$share/exit-code")
  say "guest pytest exited $code after $elapsed s (boot + tests)"
  [ "$rc" -eq 124 ] && say "warning: the VM did not stop by itself after pytest ended; qemu was killed"
  exit "$code"
fi
if [ "$rc" -eq 124 ]; then
  say "error: timed out after $TIMEOUT s; killed qemu (raise AFSD_VM_TIMEOUT if the tests need longer)"
  exit 124
fi
say "error: the VM stopped after $elapsed s without a pytest result (qemu exit $rc); see the console output above"
exit 125
