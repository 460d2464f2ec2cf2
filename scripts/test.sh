#!/usr/bin/env bash
# The project's test command (CI runs exactly this): formatting, lints, then every test; on an
# x86_64 host also the lints for aarch64 and the whole suite again under qemu-aarch64 as a
# Raspberry Pi 4 (cortex-a72, NEON without dotprod) and a Pi 5 (cortex-a76, dotprod), which
# installs the cross toolchain and qemu-user when missing (scripts/check/qemu-test.sh).
#
#   MOE_EDGE_QEMU=0 scripts/test.sh      native only (quick local runs)
#   MOE_EDGE_PREGATE=1 scripts/test.sh   also the pre-gating router (tract-onnx) lints and tests
#   MOE_EDGE_FUZZ=20 scripts/test.sh     the fuzz smoke run's SECONDS per target (15; 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# The daemon's tests with the official Python `openai` client (and `jsonschema` to check
# structured output) run when the packages are there.
if command -v python3 >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check openai jsonschema >/dev/null 2>&1 || \
    echo "note: could not install the Python openai/jsonschema packages; their daemon tests will be skipped"
fi

cargo fmt --all -- --check
# No import cycles between files, moe-runtime's layers respected, no overlong files.
python3 scripts/check/check_layout.py
cargo clippy --workspace --all-targets --quiet -- -D warnings
# llama.cpp's tokenizer test vectors and chat templates (a git-ignored download, kept between
# runs); with MOE_EDGE_REQUIRE_VOCAB=1 their tests fail instead of skipping when they are missing.
scripts/fixtures/fetch_llama_cpp_files.sh
MOE_EDGE_REQUIRE_VOCAB=1 cargo test --workspace

# The distilled pre-gating GRU runs natively (tested above); tract-onnx, behind the `pregate`
# feature, runs other predictor networks and checks the native one. Building tract takes about
# 10 minutes cold on 2 cores, more than CI's time budget (well under 45 minutes on a slow
# machine) can spare next to the QEMU suites, so its lints and tests are opt-in here:
# MOE_EDGE_PREGATE=1 scripts/test.sh
if [ "${MOE_EDGE_PREGATE:-0}" = 1 ]; then
  cargo clippy -p moe-runtime --features pregate --all-targets --quiet -- -D warnings
  cargo test -p moe-runtime --features pregate --test pregate
fi

# aarch64. The complete suite, not a subset: it costs one cross build of the test binaries
# (about 5 minutes cold on 2 cores) and about a minute per emulated CPU, and every test
# exercises the NEON kernels through the forward pass.
if [ "${MOE_EDGE_QEMU:-1}" != 0 ] && [ "$(uname -m)" = x86_64 ]; then
  start=$(date +%s)
  scripts/check/qemu-test.sh both
  # The NEON code (and board detection) compiles only for aarch64, so only an aarch64 clippy
  # sees it. It is all in moe-runtime; linting the other crates for aarch64 too costs CI about
  # 2 minutes, so they are linted only once they have aarch64-only code.
  lint=(-p moe-runtime)
  if grep -rqs --include='*.rs' 'target_arch = "aarch64"' convert daemon tests; then
    lint=(--workspace)
  fi
  cargo clippy "${lint[@]}" --all-targets --target aarch64-unknown-linux-gnu --quiet -- -D warnings
  echo "aarch64 (qemu tests and clippy): $(($(date +%s) - start)) s"
fi

# Fuzzing: the `cargo test --workspace` above replays every fuzz seed and every input that ever
# crashed a target (fuzz/targets/tests/replay.rs). Last, a smoke run of each coverage-guided
# target, MOE_EDGE_FUZZ seconds each (15 by default, 0 skips it): scripts/check/fuzz.sh, which
# installs the nightly toolchain and cargo-fuzz when missing and builds every target with
# AddressSanitizer (docs/ROBUSTNESS.md has what that costs: about 1000 CPU-seconds cold). A
# finding fails the run. It is the one step CI drops to stay within its time: when the steps
# above took longer than MOE_EDGE_FUZZ_AFTER seconds (2400), or the tools cannot be installed,
# it is skipped with a note.
fuzz_seconds=${MOE_EDGE_FUZZ:-15}
elapsed=$(($(date +%s) - started))
if [ "$fuzz_seconds" = 0 ]; then
  :
elif [ "$elapsed" -gt "${MOE_EDGE_FUZZ_AFTER:-2400}" ]; then
  echo "note: skipping the fuzz smoke run: the tests took ${elapsed} s, more than MOE_EDGE_FUZZ_AFTER=${MOE_EDGE_FUZZ_AFTER:-2400} (a slow machine; the seeds and regressions were replayed above)" >&2
elif scripts/check/fuzz.sh --install; then
  start=$(date +%s)
  scripts/check/fuzz.sh "$fuzz_seconds"
  echo "fuzz smoke run (build and ${fuzz_seconds} s per target): $(($(date +%s) - start)) s"
else
  echo "note: skipping the fuzz smoke run: the nightly toolchain or cargo-fuzz could not be installed (MOE_EDGE_FUZZ=0 skips it without trying)" >&2
fi
