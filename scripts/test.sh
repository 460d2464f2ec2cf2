#!/usr/bin/env bash
# The project's test command (CI runs exactly this): formatting, lints, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# The daemon's test with the official Python `openai` client runs when the package is there.
if command -v python3 >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check openai >/dev/null 2>&1 || \
    echo "note: could not install the Python openai package; its daemon test will be skipped"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
