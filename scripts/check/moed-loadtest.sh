#!/usr/bin/env bash
# Load test for moed: 16 concurrent clients send 200 requests (completions and chat, streamed and
# not, one in ten hanging up early) to the real daemon on the qwen3_moe fixture; every request must
# complete with the text it gives alone or be refused 503, none may hang, memory must level off,
# and the daemon must answer afterwards. Prints requests/s, latency p50/p99, rejections and RSS.
#
#   scripts/check/moed-loadtest.sh [--release]
#
# Knobs: MOED_LOAD_CLIENTS (16), MOED_LOAD_REQUESTS (200), MOED_LOAD_TOKEN_DELAY_MS (2),
# MOED_LOAD_MAX_QUEUE (8), MOED_TEST_MODEL=/path/model.gguf (a real model instead of the fixture).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=()
if [[ "${1:-}" == "--release" ]]; then profile=(--release); fi
exec timeout 600 cargo test -p moe-daemon "${profile[@]}" --test load -- --nocapture
