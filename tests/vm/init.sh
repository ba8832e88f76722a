#!/bin/bash
# PID 1 of the test VM that scripts/vm-test.sh boots. The root filesystem is the host's, read-only over 9p.
# Mount what a Linux userland expects, run pytest on the checkout as the job file says, write the exit code
# to the results share, and stop the VM (qemu runs with -no-reboot, so a reboot ends it).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RESULTS=/run/afsd-vm/results
SCRATCH=/run/afsd-vm/scratch

stop_vm() {
  sync
  # sysrq 'b' reboots at once, and -no-reboot turns that into qemu exiting. Should it fail, init exiting
  # panics the kernel, and panic=-1 reboots too.
  echo b >/proc/sysrq-trigger 2>/dev/null
  exit "${1:-0}"
}
fail() {
  echo "vm-init: error: $*" >&2
  stop_vm 1
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# The guest gets fresh /tmp and /var/tmp; the host's stay reachable, for a checkout that lives there.
HOST_DIRS=/run/afsd-vm/host
mkdir -p "$HOST_DIRS/tmp" "$HOST_DIRS/var-tmp"
mount --bind /tmp "$HOST_DIRS/tmp"
mount --bind /var/tmp "$HOST_DIRS/var-tmp"
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null

mkdir -p "$RESULTS" "$SCRATCH"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results "$RESULTS" || fail "cannot mount the results share"
mount -t ext4 -o noinit_itable /dev/vda "$SCRATCH" || fail "cannot mount the scratch disk /dev/vda"
# Temporary files land on ext4 (cachefiles' cache dir and fanotify marks need a disk filesystem, not tmpfs).
mkdir -p "$SCRATCH/tmp" "$SCRATCH/var-tmp"
chmod 1777 "$SCRATCH/tmp" "$SCRATCH/var-tmp"
mount --bind "$SCRATCH/var-tmp" /var/tmp

ip link set lo up || fail "cannot bring up the loopback interface"
hostname afsd-vm

# shellcheck source=/dev/null
. "$RESULTS/job.sh" || fail "no job file in the results share"
export HOME=/tmp/home LANG=C.UTF-8 TMPDIR="$SCRATCH/tmp"
export AFSD_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 AFSD_VM_REPORT="$RESULTS/report.jsonl"
export AFSD_DEADLINE_SCALE="${AFSD_DEADLINE_SCALE:-4}"   # afsd/lab/deadlines.py: everything is slow under TCG
# OpenSSL's SSSE3/AVX/AVX2 SHA-256 runs 3x slower under TCG than its plain integer code (measured in the guest:
# 23 vs 67 MB/s; on real CPUs the vector code is the faster one): without those bits every chunk check in the VM
# costs what it would on no real machine (docs/kernel-lab.md). AES-NI and PCLMUL stay on.
export OPENSSL_ia32cap="${OPENSSL_ia32cap:-~0x1000020000000000:~0x20000128}"
mkdir -p "$HOME"
case "$AFSD_VM_CHECKOUT" in   # a checkout under the host's /tmp or /var/tmp: put it back where it was
  /tmp/*) hidden="$HOST_DIRS/tmp/${AFSD_VM_CHECKOUT#/tmp/}" ;;
  /var/tmp/*) hidden="$HOST_DIRS/var-tmp/${AFSD_VM_CHECKOUT#/var/tmp/}" ;;
  *) hidden= ;;
esac
if [ -n "$hidden" ] && [ -d "$hidden" ]; then
  mkdir -p "$AFSD_VM_CHECKOUT" && mount --bind "$hidden" "$AFSD_VM_CHECKOUT"
fi
cd "$AFSD_VM_CHECKOUT" || fail "checkout $AFSD_VM_CHECKOUT not visible in the guest"
echo "vm-init: kernel $(uname -r) up after $(cut -d' ' -f1 /proc/uptime) s; running pytest ${AFSD_VM_PYTEST_ARGS[*]}"

# A loaded machine on request (AFSD_VM_CPU_HOG): busy loops competing with the tests for the vCPUs.
hogs=()
for _ in $(seq 1 "${AFSD_VM_CPU_HOG:-0}"); do
  sh -c 'while :; do :; done' &
  hogs+=($!)
done
[ "${#hogs[@]}" -gt 0 ] && echo "vm-init: ${#hogs[@]} CPU hog(s) running"

# The checkout is read-only here: no cache provider, no bytecode, temporary dirs on the scratch disk.
# Each test's timeout (pyproject's 600 s on the host) stretches with the deadlines.
"$AFSD_VM_PYTHON" -m pytest -p no:cacheprovider -p tests.vm.report --basetemp="$SCRATCH/pytest" \
  --timeout=$((150 * AFSD_DEADLINE_SCALE)) --junitxml="$RESULTS/junit.xml" "${AFSD_VM_PYTEST_ARGS[@]}"
code=$?
[ "${#hogs[@]}" -gt 0 ] && kill "${hogs[@]}" 2>/dev/null
echo "$code" >"$RESULTS/exit-code.partial" && mv "$RESULTS/exit-code.partial" "$RESULTS/exit-code"
echo "vm-init: pytest exited $code after $(cut -d' ' -f1 /proc/uptime) s of uptime"
[ -n "$hidden" ] && umount "$AFSD_VM_CHECKOUT"
umount /var/tmp "$SCRATCH" "$RESULTS"
stop_vm 0
