#!/usr/bin/env bash
# cargo's runner for scripts/deploy/board-test.sh: copies one aarch64 test binary to the board and
# runs it there with its arguments, in the same directory as here. The first call of a test run
# mirrors the working tree and the built workspace programs to the same absolute path on the board.
# Test-relevant environment variables (RUST_*, RAYON_*, MOE_EDGE_*) go along.
set -euo pipefail
bin=$1
shift
: "${BOARD_HOST:?run through scripts/deploy/board-test.sh}" "${BOARD_ROOT:?}"
ssh_opts=(${BOARD_SSH_OPTS:-})
if [ -n "${BOARD_STAMP:-}" ] && [ ! -s "$BOARD_STAMP" ]; then
  rsync -a --delete --exclude /target --exclude /.git --exclude '/fuzz/libfuzzer/target' \
    -e "ssh ${ssh_opts[*]}" "$BOARD_ROOT/" "$BOARD_HOST:$BOARD_ROOT/"
  # The programs tests start: target/aarch64-unknown-linux-gnu/PROFILE/{moed,moe-run,moe-convert}.
  dir=$(dirname "$(dirname "$bin")")
  progs=()
  for p in moed moe-run moe-convert; do
    [ -x "$dir/$p" ] && progs+=("$dir/$p")
  done
  ssh "${ssh_opts[@]}" "$BOARD_HOST" "mkdir -p '$dir'"
  [ ${#progs[@]} -eq 0 ] || rsync -a -e "ssh ${ssh_opts[*]}" "${progs[@]}" "$BOARD_HOST:$dir/"
  echo synced >"$BOARD_STAMP"
fi
ssh "${ssh_opts[@]}" "$BOARD_HOST" "mkdir -p '$(dirname "$bin")'"
rsync -a -e "ssh ${ssh_opts[*]}" "$bin" "$BOARD_HOST:$bin"
envs=()
while IFS='=' read -r k v; do
  envs+=("$k=$(printf %q "$v")")
done < <(env | grep -E '^(RUST_[A-Z_]+|RAYON_NUM_THREADS|MOE_EDGE_[A-Z_]+|QEMU_[A-Z_]+)=' || true)
args=()
for a in "$@"; do args+=("$(printf %q "$a")"); done
exec ssh "${ssh_opts[@]}" "$BOARD_HOST" "cd $(printf %q "$PWD") && env ${envs[*]} ${BOARD_WRAPPER:-} $(printf %q "$bin") ${args[*]}"
