#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz: libFuzzer with AddressSanitizer, debug assertions and
# overflow checks, on the nightly toolchain) of every target in fuzz/targets, each for a set time,
# then one line per target: executions, time, coverage, corpus size and crashes.
#
#   scripts/check/fuzz.sh [SECONDS=60] [TARGET...]   every target (or those named) for SECONDS each
#   scripts/check/fuzz.sh --seeds                    rewrite fuzz/corpus/ from the fixtures
#   scripts/check/fuzz.sh --install                  only install the nightly toolchain and cargo-fuzz
#
# Each target starts from its seeds (fuzz/corpus/NAME, kept in git) and the inputs earlier runs
# found (fuzz/corpus-run/NAME, git-ignored). A crash leaves its input in
# fuzz/libfuzzer/artifacts/NAME/; once fixed, copy it into fuzz/regressions/NAME/ so that
# `cargo test -p moe-fuzz-targets` (CI) replays it. Installs the nightly toolchain and cargo-fuzz
# when missing. Environment: FUZZ_JOBS (1: one process at a time on a shared 2-core machine),
# FUZZ_RSS_MB (4096), FUZZ_TIMEOUT (30 s per input before libFuzzer calls it a hang).
set -euo pipefail
cd "$(dirname "$0")/../.."

targets_all=(gguf tokenizer convert onnx http chat calib)
if [ "${1:-}" = --seeds ]; then
  scripts/fixtures/fetch_llama_cpp_files.sh
  exec cargo test -p moe-fuzz-targets --test seeds -- --ignored --nocapture
fi

install_tools() {
  if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal --no-self-update || return 1
  fi
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked || return 1
  fi
}
if [ "${1:-}" = --install ]; then
  install_tools
  exit
fi
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${targets_all[@]}")

install_tools
# The chat target also renders llama.cpp's real templates when they are there.
scripts/fixtures/fetch_llama_cpp_files.sh

fuzz_dir=fuzz/libfuzzer
start=$(date +%s)
cargo +nightly fuzz build --fuzz-dir "$fuzz_dir"
echo "build: $(($(date +%s) - start)) s" >&2

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
crashed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus-run/$t" "$fuzz_dir/artifacts/$t"
  echo "fuzzing $t for $seconds s" >&2
  set +e
  cargo +nightly fuzz run --fuzz-dir "$fuzz_dir" "$t" "fuzz/corpus-run/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb="${FUZZ_RSS_MB:-4096}" \
    -timeout="${FUZZ_TIMEOUT:-30}" -print_final_stats=1 -jobs="${FUZZ_JOBS:-1}" \
    -artifact_prefix="$fuzz_dir/artifacts/$t/" >"$logs/$t.log" 2>&1
  echo $? >"$logs/$t.rc"
  set -e
done

printf '\n%-10s %12s %8s %8s %8s %8s  %s\n' target executions seconds exec/s cov corpus crashes
for t in "${targets[@]}"; do
  log=$logs/$t.log
  # A run that crashed prints no final stats: its figures are the last status line's.
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tr -d '#' | tail -1 || true)
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
  corpus=$(find "fuzz/corpus-run/$t" -type f | wc -l)
  rc=$(cat "$logs/$t.rc")
  crash=none
  if [ "$rc" != 0 ]; then
    crashed=1
    crash="$(grep -m1 -oE 'ERROR: libFuzzer: [a-z-]+|ERROR: AddressSanitizer: [a-z-]+|panicked at [^ ]+' "$log" || echo "exit $rc")"
    crash="$crash -> $(grep -o "$fuzz_dir/artifacts/$t/[^ ]*" "$log" | tail -1 || true)"
    cp "$log" "$fuzz_dir/artifacts/$t/last.log"
  fi
  printf '%-10s %12s %8s %8s %8s %8s  %s\n' "$t" "${execs:-?}" "${secs:-$seconds}" \
    "$(( ${execs:-0} / (${secs:-$seconds} > 0 ? ${secs:-$seconds} : 1) ))" "${cov:-?}" "$corpus" "$crash"
done
exit $crashed
