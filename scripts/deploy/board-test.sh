#!/usr/bin/env bash
# The workspace test suite cross-built here and run on an aarch64 board over ssh: each test binary
# is copied to the board and run there natively (scripts/deploy/ssh-runner.sh is cargo's runner),
# so the kernel tables the board's own CPU selects are the ones tested.
#
#   scripts/deploy/board-test.sh USER@HOST [cargo test options]
#   e.g. scripts/deploy/board-test.sh pi@raspberrypi.local
#        scripts/deploy/board-test.sh pi@raspberrypi.local -p moe-runtime --lib tensor::kernels
#
# Tests read fixtures and start workspace programs (moed, moe-run) by the absolute paths they were
# built with, so the runner mirrors the working tree (without target/ and .git) and the built
# programs to the same path on the board: that path must be writable by the ssh user there (once:
# `ssh USER@HOST sudo install -d -o USER $PWD`). Needs ssh and rsync on both sides, and a key or
# agent so ssh does not ask for a password for every test binary. The board needs no Rust.
# Environment: BOARD_SSH_OPTS (extra ssh options), BOARD_WRAPPER (a command the board runs each
# test binary under, e.g. to try this script against an x86 host running qemu-aarch64).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  sed -n 2,16p "$0" >&2
  exit 2
fi
host=$1
shift
TARGET=aarch64-unknown-linux-gnu
scripts/deploy/cross-build.sh --setup-only

root=$(pwd)
# shellcheck disable=SC2086
if ! ssh -o BatchMode=yes ${BOARD_SSH_OPTS:-} "$host" "mkdir -p '$root' && test -w '$root'"; then
  echo "cannot write $root on $host over ssh: run once \`ssh $host sudo install -d -o \$USER $root\`" >&2
  echo "(the tests open fixtures by the paths they were built with), and check ssh works without a password" >&2
  exit 1
fi
echo "board: $host ($(ssh ${BOARD_SSH_OPTS:-} "$host" 'uname -m; grep -m1 -i "model name\|^Model" /proc/cpuinfo || true' | paste -sd' ' -))"

# The whole workspace unless the options name packages.
scope=(--workspace)
for a in "$@"; do
  case $a in -p | -p* | --package | --package=*) scope=() ;; esac
done
# Build first, so that the workspace programs the tests start exist before the first sync.
cargo test "${scope[@]}" --target "$TARGET" --no-run "$@"
export BOARD_HOST=$host BOARD_ROOT=$root BOARD_STAMP
BOARD_STAMP=$(mktemp)
trap 'rm -f "$BOARD_STAMP"' EXIT
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=$root/scripts/deploy/ssh-runner.sh
cargo test "${scope[@]}" --target "$TARGET" --no-fail-fast "$@"
