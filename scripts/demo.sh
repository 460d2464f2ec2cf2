#!/usr/bin/env bash
# Sets up this machine and runs the main job on a bundled small checkpoint:
# build the release binaries, convert a Hugging Face MoE checkpoint to GGUF, generate text.
#
#   scripts/demo.sh [HF_CHECKPOINT_DIR] [PROMPT]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

ckpt=${1:-models/small-moe/hf}
prompt=${2:-"It is a truth universally acknowledged, that"}
out=target/demo
mkdir -p "$out"

echo "== building release binaries"
cargo build --release --quiet -p moe-runtime -p moe-convert

name=$(basename "$(cd "$ckpt" && pwd)")
[ "$name" = hf ] && name=$(basename "$(dirname "$(cd "$ckpt" && pwd)")")
echo "== converting $ckpt to $out/$name-q8_0.gguf"
target/release/moe-convert "$ckpt" -o "$out/$name-q8_0.gguf" --type q8_0

echo "== generating"
target/release/moe-run -m "$out/$name-q8_0.gguf" -p "$prompt" -n 64 --temp 0.8 --seed 7
