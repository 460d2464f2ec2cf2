#!/usr/bin/env bash
# The complete workspace test suite for aarch64, run under qemu-user on an x86_64 host, once per
# emulated CPU, so that both NEON kernel tables are exercised:
#   cortex-a72  Raspberry Pi 4: NEON without dotprod ("aarch64 neon" table)
#   cortex-a76  Raspberry Pi 5: dotprod and fp16 ("aarch64 neon+dotprod", and the other table too)
#
#   scripts/check/qemu-test.sh [cortex-a72|cortex-a76|both] [cargo test options]     (default: both)
#
# Options are passed to every `cargo test` of the suite, e.g. `--exclude moe-daemon` or
# `-- --skip some_test`; the summary counts tests filtered out that way.
#
# Installs the target, cross toolchain and qemu-user if missing (scripts/deploy/cross-build.sh). The
# runner in .cargo/config.toml reads QEMU_CPU. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET=aarch64-unknown-linux-gnu

case "${1:-both}" in
  both) cpus=(cortex-a72 cortex-a76) ;;
  cortex-a72 | cortex-a76) cpus=("$1") ;;
  *)
    echo "usage: $0 [cortex-a72|cortex-a76|both] [cargo test options]" >&2
    exit 2
    ;;
esac
shift || true

if [ "$(uname -m)" = aarch64 ]; then
  echo "this is an aarch64 host: run cargo test --workspace directly (no emulation)" >&2
  exit 2
fi
scripts/deploy/cross-build.sh --setup-only --qemu
known=$(qemu-aarch64 -cpu help || true) # exits with 1 after listing
for cpu in "${cpus[@]}"; do
  if ! grep -qw "$cpu" <<<"$known"; then
    echo "this qemu-aarch64 ($(qemu-aarch64 --version | head -1)) cannot emulate $cpu" >&2
    exit 1
  fi
done

# Children inherit these, so aarch64 programs started by tests run on the same emulated CPU.
export QEMU_LD_PREFIX=${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu}

# Tests that start a workspace binary as a child process (the moed daemon tests) need the kernel
# itself to run aarch64 executables, i.e. a binfmt_misc handler for qemu-aarch64; cargo's runner
# only covers the test binaries. Use the host's handler if it has one. Otherwise register one in
# the private binfmt_misc instance of a new user namespace (Linux >= 6.7), which leaves the host
# untouched, and run cargo inside it.
register=':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
register+=':\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
register+=":$(command -v qemu-aarch64):F"
in_binfmt_ns() {
  unshare --user --map-root-user --mount -- sh -c '
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc &&
      printf %s "$1" >/proc/sys/fs/binfmt_misc/register &&
      shift && exec "$@"' sh "$register" "$@"
}
wrap=()
if grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  echo "aarch64 child processes: the host's binfmt_misc handler"
elif in_binfmt_ns true 2>/dev/null; then
  echo "aarch64 child processes: a private binfmt_misc handler in a user namespace"
  wrap=(in_binfmt_ns)
else
  echo "warning: this kernel cannot start aarch64 programs (no binfmt_misc handler for" >&2
  echo "qemu-aarch64, and no private one possible), so tests that start moed will fail." >&2
  echo "Installing qemu-user-binfmt (as root) registers a handler." >&2
fi

# Build once, so that the times below are the emulated test runs alone.
start=$(date +%s)
cargo test --workspace --target "$TARGET" --no-run "$@"
echo "test build: $(($(date +%s) - start)) s"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
summary=()
status=0
for cpu in "${cpus[@]}"; do
  export QEMU_CPU=$cpu
  echo
  echo "=== $cpu: cargo test --workspace --target $TARGET $*"
  start=$(date +%s.%N)
  # --no-fail-fast: a failure in one test binary must not hide the counts of the others.
  if ! "${wrap[@]}" cargo test --workspace --target "$TARGET" --no-fail-fast "$@" 2>&1 |
    tee "$logs/$cpu.log"; then
    status=1
  fi
  secs=$(echo "$start $(date +%s.%N)" | awk '{ printf "%.1f", $2 - $1 }')

  # The kernel tests print the table best() picked ("kernel path: ...") and every table they
  # checked ("testing ..."); -q's progress dots may share their lines, hence grep -o.
  paths=$(cargo test -q --target "$TARGET" -p moe-runtime --lib tensor::kernels \
    -- --nocapture --test-threads=1 2>&1 | grep -o 'kernel path: .*\|testing .*' || true)
  echo "--- $cpu kernel paths:"
  echo "$paths" | sed 's/^/    /'

  counts=$(awk '/^test result:/ {
      for (i = 1; i <= NF; i++) {
        if ($(i + 1) ~ /^passed/) p += $i
        if ($(i + 1) ~ /^failed/) f += $i
        if ($(i + 1) ~ /^ignored/) g += $i
        if ($(i + 1) ~ /^filtered/) o += $i
      }
    } END { printf "%d passed, %d failed, %d ignored, %d filtered out", p, f, g, o }' "$logs/$cpu.log")
  best=$(echo "$paths" | sed -n 's/^kernel path: //p' | head -1)
  tested=$(echo "$paths" | sed -n 's/^testing //p' | paste -sd, - | sed 's/,/, /g')
  summary+=("$cpu: $counts in ${secs} s; best() = ${best:-?}; tables checked: ${tested:-none}")
done

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
if [ $status -ne 0 ]; then
  echo "FAILED: see the failures above" >&2
fi
exit $status
